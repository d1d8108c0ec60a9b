"""docs/your-model.md runs as written: its files are written, its Python blocks and commands run in order, in a
folder holding a small dataset `data/`, each in a process of its own (as a reader would run them)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "your-model.md"
DATASET = REPO / "tests" / "runner" / "fixtures" / "pre_redesign" / "dataset"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str, str]]:
    """(language, file name or "", text) of every fenced block of the page, in order."""
    blocks = []
    for language, info, text in BLOCK.findall(PAGE.read_text()):
        match = re.search(r"file=(\S+)", info)
        blocks.append((language, match.group(1) if match else "", text))
    return blocks


def test_the_page_has_what_the_issue_asks_for() -> None:
    text = "\n".join(block[2] for block in _blocks())
    for needed in ("weights = \"net.pt\"", "monai.networks.nets:DenseNet121", "torchscript = ", "medrobust.evaluate(",
                   "plugins = [", "check_attack("):
        assert needed in text, needed


@pytest.mark.slow
def test_every_block_of_your_model_md_runs(tmp_path: Path) -> None:
    shutil.copytree(DATASET, tmp_path / "data")
    (tmp_path / "data" / "splits-seed0.json").unlink()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
    has_monai = importlib.util.find_spec("monai") is not None
    ran = 0
    for language, name, text in _blocks():
        if "monai" in text and not has_monai:  # the MONAI example needs the optional package
            continue
        if name:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
            continue
        if language == "python":
            commands = [[sys.executable, "-c", text]]
        elif language == "bash":
            commands = [[sys.executable, "-m", "medrobust.cli", *line.split()[1:]]
                        for line in text.splitlines() if line.startswith("medrobust ")]
        else:
            continue  # a snippet to read (another project's pyproject.toml)
        for command in commands:
            result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{command[-1][:200]}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            ran += 1
    assert ran >= 9
    assert (tmp_path / "runs" / "mine" / "results.sqlite").is_file()
    assert (tmp_path / "runs" / "notebook" / "leaderboard.html").is_file()
    assert not (tmp_path / "data" / "splits-seed0.json").exists()  # the dataset is never written into
