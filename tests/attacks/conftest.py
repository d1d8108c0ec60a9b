"""Fixtures of the attack tests: one CPU thread, and ``attack_name`` parametrized over every registered attack."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import list_attacks
from medrobust.attacks.checks import missing_package


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tensors here are tiny: a second thread saves nothing, and when another process loads the CPU, OpenMP's
    spin-waiting made the attack tests 25 times slower (130 s instead of 5 s on the 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_generate_tests(metafunc) -> None:
    """A test that takes ``attack_name`` runs for every registered attack; one that needs an optional package
    which is missing is skipped with its install line."""
    if "attack_name" in metafunc.fixturenames:
        params = []
        for name in list_attacks():
            reason = missing_package(name)
            params.append(pytest.param(name, id=name,
                                       marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
        metafunc.parametrize("attack_name", params)
