"""Cross-checks through other libraries: our attacks' steps computed by ART and torchattacks (each optional,
imported only when such an attack is built)."""

from medrobust.attacks.backends.art import ARTFGSM, ARTPGD
from medrobust.attacks.backends.torchattacks_pgd import TorchattacksPGD

__all__ = ["ARTFGSM", "ARTPGD", "TorchattacksPGD"]
