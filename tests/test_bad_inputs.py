"""The catalogue of bad inputs and faults, kept as tests: each case builds its bad input in a copy of a finished
run (the pre-redesign fixture's dataset, checkpoints and config, its grid complete), runs the real command, and
checks the exit code, that what it says is one line naming the file or field (no traceback), and that the store's
cells and rows, the preprocessing cache and the checkpoints are as they were. The config's own catalogue is
tests/runner/test_config.py (BAD)."""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import shutil
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medrobust.cli import main
from medrobust.results.store import SCHEMA_VERSION, ResultStore

FIXTURE = Path(__file__).resolve().parent / "runner" / "fixtures" / "pre_redesign"
RUN = ["run", "config.toml", "--quiet", "--no-report"]
CHECK = ["data", "check", "dataset", "--quiet", "--cache-dir", "check-cache"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The fixture's folder with its grid run to the end (store migrated, cache made): nothing is left to run, so
    a bad input that went unnoticed would show as a changed store or a zero exit code."""
    root = tmp_path_factory.mktemp("bad-inputs") / "base"
    shutil.copytree(FIXTURE, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = CliRunner().invoke(main, RUN)
    assert result.exit_code == 0, result.output
    return root


def _t1(root: Path, subject: str = "sub-00") -> Path:
    return root / "dataset" / subject / "anat" / f"{subject}_T1w.nii"


def _rewrite_t1(root: Path, data: np.ndarray, subject: str = "sub-00", affine: np.ndarray | None = None) -> None:
    image = nib.load(str(_t1(root, subject)))
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), str(_t1(root, subject)))


def _header_dims(root: Path, dims: tuple[int, int, int]) -> None:
    """Patch the dimensions a NIfTI-1 header claims (int16 dim[1:4] at byte 42), leaving its voxels as they are."""
    path = _t1(root)
    raw = bytearray(path.read_bytes())
    raw[42:48] = struct.pack("<3h", *dims)
    path.write_bytes(bytes(raw))


def _participants(root: Path, edit: Callable[[str], str]) -> None:
    path = root / "dataset" / "participants.tsv"
    path.write_text(edit(path.read_text()))


def _sidecar(root: Path, edit: Callable[[dict], None], name: str = "cnn3d") -> None:
    path = root / "models" / f"{name}.json"
    sidecar = json.loads(path.read_text())
    edit(sidecar)
    path.write_text(json.dumps(sidecar))


def _config(root: Path, edit: Callable[[str], str]) -> None:
    path = root / "config.toml"
    path.write_text(edit(path.read_text()))


class _Evil:
    """A pickle that would leave a file behind if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return 40.0 + self.conv(x).mean(dim=(1, 2, 3, 4))


def net():
    torch.manual_seed(0)
    return Net()


class WithFeatures(Net):
    def forward(self, x, features):
        return super().forward(x) + features.sum(1)
"""
OWN_MODEL = ('[[models]]\nname = "cnn3d"\ncheckpoint = "models/cnn3d"\ntrain_if_missing = false\n',
             '[[models]]\nfactory = "net.py:net"\nweights = "{weights}"\ninput_shape = [16, 16, 16]\n'
             'voxel_size = [1, 1, 1]\n')


def _own_model(root: Path, weights: str, write: Callable[[Path], None] | None = None) -> None:
    (root / "net.py").write_text(NET)
    if write is not None:
        write(root / weights)
    _config(root, lambda text: text.replace(OWN_MODEL[0], OWN_MODEL[1].format(weights=weights)))


def _disguised_pickle(root: Path, name: str) -> None:
    _own_model(root, name, lambda path: path.write_bytes(pickle.dumps({"conv.weight": _Evil(root / "pwned")})))


def _foreign_sqlite(root: Path) -> None:
    (root / "out" / "results.sqlite").unlink()
    db = sqlite3.connect(root / "out" / "results.sqlite")
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    db.commit()
    db.close()


def _newer_store(root: Path) -> None:
    db = sqlite3.connect(root / "out" / "results.sqlite", isolation_level=None)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()


def _read_only_out(root: Path, patch: pytest.MonkeyPatch) -> None:
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "out":  # as a read-only file system answers (this box runs as root: chmod would not do)
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return mkdir(self, *args, **kwargs)

    patch.setattr(Path, "mkdir", refuse)


def _interrupt(root: Path, patch: pytest.MonkeyPatch) -> None:
    import medrobust.runner.driver as driver

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    patch.setattr(driver, "ensure_dataset", stop)


_HELD: list[ResultStore] = []  # a store another writer holds during a case


def _busy(root: Path) -> None:
    _HELD.append(ResultStore(root / "out"))  # another writer holds the store (this process, another open file)


# (id, setup(root, monkeypatch), command, exit code, what the one line must say). Setups take the monkeypatch
# only where they need it.
Case = tuple[str, Callable, list[str], int, str]
CASES: list[Case] = [
    # ---- dataset files: the subject is skipped with its reason (exit 0), its file named
    ("corrupt image", lambda r: _t1(r).write_bytes(b"not a nifti" * 40), CHECK, 0, "sub-00_T1w.nii: T1w image is not a readable NIfTI"),
    ("truncated image", lambda r: _t1(r).write_bytes(_t1(r).read_bytes()[:600]), CHECK, 0, "T1w image is not a readable NIfTI"),
    ("4D image", lambda r: _rewrite_t1(r, np.ones((16, 16, 16, 2), np.float32)), CHECK, 0, "a 3D volume is needed"),
    ("NaN voxels", lambda r: _rewrite_t1(r, np.full((16, 16, 16), np.nan, np.float32)), CHECK, 0, "4096 NaN/Inf voxels"),
    ("header claims 4000^3", lambda r: _header_dims(r, (4000, 4000, 4000)), CHECK, 0, "header claims 4000x4000x4000 voxels"),
    ("1x1x1 image", lambda r: _rewrite_t1(r, np.ones((1, 1, 1), np.float32)), CHECK, 0, "has shape (1, 1, 1); a 3D volume is needed"),
    ("singular affine", lambda r: _rewrite_t1(r, np.ones((16, 16, 16), np.float32), affine=np.diag([1.0, 1.0, 1e-14, 1.0])), CHECK, 0, "invalid affine"),
    ("constant image", lambda r: _rewrite_t1(r, np.ones((16, 16, 16), np.float32)), CHECK, 0, "image is constant"),
    ("label map on another grid", lambda r: nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), np.eye(4)), str(
        r / "dataset" / "derivatives" / "seg" / "sub-00" / "anat" / "sub-00_dseg.nii")), CHECK, 0, "label map grid"),
    ("negative labels", lambda r: nib.save(nib.Nifti1Image(-np.ones((16, 16, 16), np.int16), np.eye(4)), str(
        r / "dataset" / "derivatives" / "seg" / "sub-00" / "anat" / "sub-00_dseg.nii")), CHECK, 0, "non-negative integer labels"),
    ("image missing", lambda r: _t1(r).unlink(), CHECK, 0, "no T1w image under"),
    ("subject not listed", lambda r: _participants(r, lambda t: "\n".join(t.splitlines()[:-1]) + "\n"), CHECK, 0, "not listed (no age)"),
    ("dangling symlink", lambda r: (r / "dataset" / "sub-00" / "anat" / "gone.nii").symlink_to(r / "nowhere.nii"), RUN, 0, ""),
    # ---- participants and label tables
    ("age not a number", lambda r: _participants(r, lambda t: t.replace("sub-00\t20.0", "sub-00\tabc")), CHECK, 0, "age 'abc' is not a number"),
    ("age 300", lambda r: _participants(r, lambda t: t.replace("sub-00\t20.0", "sub-00\t300")), CHECK, 0, "is above 125 years"),
    ("negative age", lambda r: _participants(r, lambda t: t.replace("sub-00\t20.0", "sub-00\t-3")), CHECK, 0, "is not a non-negative number"),
    ("age n/a", lambda r: _participants(r, lambda t: t.replace("sub-00\t20.0", "sub-00\tn/a")), CHECK, 0, "age is missing"),
    ("subject listed twice", lambda r: _participants(r, lambda t: t + t.splitlines()[1] + "\n"), CHECK, 0, "listed twice"),
    ("no participants.tsv", lambda r: (r / "dataset" / "participants.tsv").unlink(), CHECK, 2, "participants.tsv: missing"),
    ("no age column", lambda r: _participants(r, lambda t: t.replace("\tage\t", "\tyears\t", 1)), CHECK, 2, "needs columns `participant_id` and `age`"),
    ("dseg.tsv without names", lambda r: (r / "dataset" / "dseg.tsv").write_text("id\tlabel\n1\tx\n"), CHECK, 2, "needs columns `index` and `name`"),
    ("dseg.tsv bad index", lambda r: (r / "dataset" / "dseg.tsv").write_text("index\tname\none\tx\n"), CHECK, 2, "index 'one' is not an integer"),
    ("manifest without images", lambda r: (r / "m.csv").write_text("age\n30\n"), ["data", "check", "m.csv", "--quiet"], 2, "no image column"),
    ("manifest file missing", lambda r: (r / "m.csv").write_text("image,age\nnone.nii,30\n" + "".join(
        f"{_t1(r, f'sub-{i:02d}')},{20 + i}\n" for i in range(1, 4))), ["data", "check", "m.csv", "--quiet"], 0, "image file not found"),
    ("dataset neither folder nor table", lambda r: (r / "data.zip").write_bytes(b"PK"), ["data", "check", "data.zip", "--quiet"], 2, "not a folder or a .csv/.tsv"),
    ("features table repeats a subject", lambda r: (r / "f.csv").write_text("participant_id,vol_a\nsub-00,1\nsub-00,2\n"),
     [*CHECK, "--features", "table:f.csv"], 2, "subject sub-00 has a second row"),
    ("features format unknown", lambda r: None, [*CHECK, "--features", "fsl:f.csv"], 2, "Invalid value for '--features'"),
    # ---- the config, where the model or the run is concerned (the keys alone: tests/runner/test_config.py)
    ("out is a file", lambda r: _config(r, lambda t: t.replace('out = "out"', 'out = "config.toml"')), RUN, 2, "cannot be made a run folder"),
    ("out inside a file", lambda r: _config(r, lambda t: t.replace('out = "out"', 'out = "config.toml/out"')), RUN, 2, "cannot be made a run folder"),
    ("out on a read-only file system", _read_only_out, RUN, 2, "cannot be made a run folder (Read-only file system)"),
    ("dataset path missing", lambda r: shutil.rmtree(r / "dataset"), RUN, 2, "dataset.path 'dataset' does not exist"),
    ("count above the split", lambda r: _config(r, lambda t: t.replace("count = 3", "count = 300")), RUN, 2, "dataset.count = 300"),
    ("one model under two labels", lambda r: _config(r, lambda t: t + '\n[[models]]\nname = "cnn3d"\nlabel = "again"\n'
                                                     'checkpoint = "models/cnn3d"\ntrain_if_missing = false\n'), RUN, 2, "are the same model"),
    ("factory not importable", lambda r: _config(r, lambda t: t.replace(OWN_MODEL[0], OWN_MODEL[1].format(weights="w.pt").replace(
        'factory = "net.py:net"\nweights = "w.pt"', 'factory = "no_such_lab.nets:net"'))), RUN, 2, "no_such_lab"),
    ("weights missing", lambda r: _own_model(r, "absent.pt"), RUN, 2, "absent.pt"),
    ("pickle disguised as .pt", lambda r: _disguised_pickle(r, "evil.pt"), RUN, 2, "evil.pt"),
    ("pickle disguised as .safetensors", lambda r: _disguised_pickle(r, "evil.safetensors"), RUN, 2, "evil.safetensors"),
    ("state dict with a missing key", lambda r: _own_model(r, "part.pt", lambda p: __import__("torch").save({}, p)), RUN, 2, "missing"),
    ("features the data lack", lambda r: _config(r, lambda t: t.replace(OWN_MODEL[0], OWN_MODEL[1].format(weights="w.pt").replace(
        'net.py:net"\nweights = "w.pt"\n', 'net.py:WithFeatures"\ninputs = "image+features"\nfeatures = ["vol_nowhere"]\n')))
        or (r / "net.py").write_text(NET),
     RUN, 2, "the data have no 'vol_nowhere'"),
    ("no cell matches --only", lambda r: None, [*RUN, "--only", "resnet *"], 2, "matches no cell"),
    ("unknown executor", lambda r: None, [*RUN, "--executor", "dask"], 2, "Invalid value for '--executor'"),
    ("ray address without ray", lambda r: None, [*RUN, "--ray-address", "127.0.0.1:6379"], 2, "--ray-address goes with --executor ray"),
    ("malformed ray address", lambda r: None, [*RUN, "--executor", "ray", "--ray-address", "head-node"], 2, "is not [ray://]HOST:PORT"),
    ("ray address nobody answers", lambda r: None, [*RUN, "--executor", "ray", "--ray-address", "127.0.0.1:9"], 2, "nobody answers at 127.0.0.1:9"),
    ("cuda without a GPU", lambda r: None, [*RUN, "--device", "cuda:7"], 2, "cuda"),
    # ---- checkpoints
    ("sidecar not JSON", lambda r: (r / "models" / "cnn3d.json").write_text("{cut"), RUN, 2, "cnn3d.json is unreadable or corrupt"),
    ("sidecar lost its weights hash", lambda r: _sidecar(r, lambda s: s.pop("weights_sha256")), RUN, 2, "records no weights_sha256"),
    ("sidecar voxel size edited", lambda r: _sidecar(r, lambda s: s.update(voxel_size=[2.0, 2.0, 2.0])), RUN, 2, "voxel_size [2.0, 2.0, 2.0] is not the model's"),
    ("sidecar names an unknown model", lambda r: _sidecar(r, lambda s: s["model"].update(name="vit")), RUN, 2, "names unknown model 'vit'"),
    ("weights replaced", lambda r: (r / "models" / "cnn3d.safetensors").write_bytes(b"\0" * 64), RUN, 2, "sha256 differs"),
    ("weights of the other model", lambda r: shutil.copy(r / "models" / "hybrid_e2e.safetensors", r / "models" / "cnn3d.safetensors"), RUN, 2, "sha256 differs"),
    ("sidecar of a newer format", lambda r: _sidecar(r, lambda s: s.update(format_version=99)), RUN, 2, "version 99"),
    # ---- stores
    ("store is no SQLite file", lambda r: (r / "out" / "results.sqlite").write_bytes(b"garbage" * 500), RUN, 2, "not a readable results store"),
    ("another program's SQLite file", _foreign_sqlite, RUN, 2, "SQLite file of another program (tables invoices)"),
    ("store of a newer schema", _newer_store, RUN, 2, "upgrade medrobust"),
    ("store being written", _busy, RUN, 3, "is being written by another medrobust run"),
    ("report of a folder without a store", lambda r: (r / "empty").mkdir(), ["report", "empty"], 2, "holds no results store"),
    ("status of a folder without a store", lambda r: (r / "empty").mkdir(), ["status", "empty"], 2, "holds no results store"),
    ("report of a foreign store", _foreign_sqlite, ["report", "out"], 2, "SQLite file of another program"),
    # ---- signals
    ("Ctrl-C", _interrupt, RUN, 130, "interrupted: what had finished is kept"),
]


def _snapshot(root: Path) -> dict:
    """What must not change: the store's cells and rows (not its runs: a run that stopped is recorded as such), every
    other file under out/ (the cache, the examples, the plan) and the checkpoints."""
    files = {}
    for folder in (root / "out", root / "models"):
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            # The store is compared by its rows; the plan cache is rewritten whenever the plan's key moves.
            if path.is_file() and not path.name.startswith("results.sqlite") and path.name != "plan-cache.json":
                files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    store = root / "out" / "results.sqlite"
    try:
        db = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)
        rows = [db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall() for table in ("cells", "samples")]
        db.close()
    except sqlite3.DatabaseError:  # a case that put something else there: its bytes, then
        rows = hashlib.sha256(store.read_bytes()).hexdigest() if store.is_file() else None
    return {"files": files, "store": rows}


@pytest.mark.parametrize(("name", "setup", "command", "code", "says"), CASES, ids=[case[0] for case in CASES])
def test_a_bad_input_is_one_line_and_changes_nothing(finished: Path, tmp_path: Path, monkeypatch, name: str,
                                                     setup: Callable, command: list[str], code: int,
                                                     says: str) -> None:
    root = tmp_path / "lab"
    shutil.copytree(finished, root)
    monkeypatch.chdir(root)
    if setup.__code__.co_argcount == 2:
        setup(root, monkeypatch)
    else:
        setup(root)
    before = _snapshot(root)
    try:
        result = CliRunner().invoke(main, command)
    finally:
        while _HELD:
            _HELD.pop().close()
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError))
    if code in (2, 3, 130):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert says in lines[0], lines[0]
        assert lines[0].startswith("error: ") or code == 130
    else:
        assert says in result.output, result.output
    assert _snapshot(root) == before, "the store, the cache or a checkpoint changed"
    assert not (root / "pwned").exists()  # no pickle was ever unpickled


# ---- faults: a full disk, a failing device, writes killed half-way, a killed cohort generation


@pytest.fixture
def pending(tmp_path: Path, monkeypatch) -> Path:
    """The fixture as it is committed: the cells of l0 still to run (l0 gained an argument since)."""
    root = tmp_path / "lab"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    monkeypatch.setattr("medrobust.faults._reached", __import__("collections").Counter())
    return root


def _cells(root: Path) -> list:
    with ResultStore(root / "out", create=False) as store:
        return sorted(store.statuses().items())


def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes(pending: Path, monkeypatch) -> None:
    from medrobust.runner import plan
    from medrobust.runner.config import load_config

    before = _cells(pending)
    todo = {cell.id for cell in plan(load_config("config.toml"))} - {cell_id for cell_id, _ in before}
    assert len(todo) > 2
    monkeypatch.setenv("MEDROBUST_FAULT", "committing:2:enospc")  # the second cell's commit finds the disk full
    full = CliRunner().invoke(main, RUN)
    assert full.exit_code == 2, full.output
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the disk is full") and "run the same command" in lines[0]
    after = _cells(pending)
    assert len(after) == len(before) + 1 and set(before) < set(after)  # the first cell whole, the second not at all
    monkeypatch.delenv("MEDROBUST_FAULT")
    resumed = CliRunner().invoke(main, RUN)  # space is back
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(todo) - 1} cells run, {104 - len(todo) + 1} already finished, 0 failed" in resumed.output
    assert all(status == "done" for _, status in _cells(pending))


def test_a_device_error_fails_its_cell_and_the_grid_goes_on(pending: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDROBUST_FAULT", "attacking:1:device")
    result = CliRunner().invoke(main, RUN)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "CUDA error: an illegal memory access" in result.output
    with ResultStore(pending / "out", create=False) as store:
        cells = store.cells()
    failed = cells[cells["status"] == "failed"]
    assert len(failed) == 1 and failed["error"].iloc[0].startswith("RuntimeError: CUDA error")
    assert (cells["attack"] == "l0").sum() > 1 and (cells[cells["attack"] == "l0"]["status"] == "done").sum() >= 1


@pytest.mark.parametrize("count", [1, 3, 6])
def test_a_write_killed_before_its_rename_leaves_no_half_entry(pending: Path, count: int) -> None:
    # The preprocessing cache, the split files and the examples are written beside their target and renamed into
    # place: a kill between the two leaves a hidden temporary file, never a half-written entry.
    import os
    import subprocess
    import sys

    env = {**os.environ, "MEDROBUST_FAULT": f"replacing:{count}"}
    killed = subprocess.run([sys.executable, "-m", "medrobust.cli", *RUN], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    from safetensors.torch import load_file

    for entry in (pending / "out" / "cache").glob("*.safetensors"):
        load_file(str(entry))  # every entry under a cache name is whole
    for entry in (pending / "out").rglob("*.json"):
        json.loads(entry.read_text())
    env.pop("MEDROBUST_FAULT")
    resumed = subprocess.run([sys.executable, "-m", "medrobust.cli", *RUN], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert all(status == "done" for _, status in _cells(pending))


def test_a_killed_cohort_generation_is_started_again_by_the_same_command(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "medrobust.cli", "data", "synth", "--n", "10", "--shape", "16x16x16",
               "--voxel-size", "10", "--quiet"]
    fresh = subprocess.run([*command, "--out", str(tmp_path / "fresh")], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    env = {**os.environ, "MEDROBUST_FAULT": "synthesizing:4"}
    killed = subprocess.run([*command, "--out", str(tmp_path / "cohort")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9 and not (tmp_path / "cohort").exists()  # no half cohort under its name
    env.pop("MEDROBUST_FAULT")
    again = subprocess.run([*command, "--out", str(tmp_path / "cohort")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())

    def listing(root: Path) -> dict:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != "dataset_description.json"}

    assert listing(tmp_path / "cohort") == listing(tmp_path / "fresh")  # generation is deterministic


@pytest.mark.parametrize("address", ["127.0.0.1:9", "head-node"])
def test_a_run_refused_before_it_starts_is_not_recorded_as_one_that_died(pending: Path, address: str) -> None:
    def runs() -> list:
        with ResultStore(pending / "out", create=False) as store:
            return store.runs()

    before = runs()
    result = CliRunner().invoke(main, [*RUN, "--executor", "ray", "--ray-address", address])
    assert result.exit_code == 2 and "--ray-address" in result.stderr
    assert runs() == before  # `medrobust status` says nothing of a run that "did not finish"
