"""The attack-speed benchmarks' settings (from the environment, see ``ratios.py``) and their ratio table, printed
at the end of the session and written to ``MEDROBUST_BENCH_TABLE`` when set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ratios import RESULTS, Settings, markdown


@pytest.fixture(scope="session")
def bench_settings():
    settings = Settings.from_env()
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    yield settings
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    table = markdown(RESULTS)
    terminalreporter.write_sep("-", "attack cost against its floor (ratios measured in the same rounds)")
    terminalreporter.write(table)
    path = os.environ.get("MEDROBUST_BENCH_TABLE")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(table)
        terminalreporter.write_line(f"ratio table written to {path}")
