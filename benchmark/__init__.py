"""medrobust: adversarial-robustness benchmark suite for deep models on 3D medical images."""

__version__ = "0.1.0"
