"""Packaging: the four code folders form one `medrobust` namespace, both editable and as a built wheel.

The wheel check is offline and fast: the sources are copied into tmp_path (so the build writes nothing into the
repo), the wheel is built without isolation, installed with --no-deps into a fresh virtualenv, and the heavy
dependencies (torch, numpy, ...) are made importable by a `.pth` file that appends this environment's site-packages.
Lines of a `.pth` file are plain sys.path entries: the `.pth` files inside that folder (among them the editable
install's finder hook) are not processed, so `medrobust` can only come from the fresh venv. The test asserts that.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "medrobust": "benchmark",
    "medrobust.models": "models",
    "medrobust.attacks": "attacks",
    "medrobust.reports": "reports",
}


def _packages() -> dict[str, Path]:
    """Every package of the four code folders (each folder with an ``__init__.py``), by its import name."""
    packages = {}
    for package, folder in PACKAGE_DIRS.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(REPO / folder).parts
            name = ".".join((package, *parts))
            if name not in PACKAGE_DIRS or not parts:
                packages[name] = init.parent
    return packages


PACKAGES = _packages()
TIMEOUT = 120


def _is_under(path: str | Path, folder: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def _clean_env() -> dict[str, str]:
    """The environment for child processes: nothing that would put the repo or another install on sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


# ------------------------------------------------------------------------------------------------ editable install


def test_pyproject_maps_the_four_folders():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-dir"] == PACKAGE_DIRS
    assert sorted(config["tool"]["setuptools"]["packages"]) == sorted(PACKAGES)
    assert config["project"]["scripts"] == {"medrobust": "medrobust.cli:main"}


def test_editable_install_imports_from_the_repo_folders():
    import medrobust

    for name, folder in PACKAGES.items():
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve() == (folder / "__init__.py").resolve(), name
    assert _is_under(medrobust.__file__, REPO / "benchmark")
    cli = importlib.import_module("medrobust.cli")
    assert Path(cli.__file__).resolve() == (REPO / "benchmark" / "cli.py").resolve()

    # The installed metadata in site-packages (a `medrobust.egg-info` left in the repo root by a build can come
    # first on sys.path under `python -m pytest`, so look in site-packages itself).
    from importlib.metadata import distributions

    site = sysconfig.get_paths()["purelib"]
    dists = [d for d in distributions(path=[site]) if d.metadata["Name"] == "medrobust"]
    assert len(dists) == 1, f"expected one medrobust install in {site}, found {len(dists)}"
    direct_url = json.loads(dists[0].read_text("direct_url.json") or "{}")
    assert direct_url.get("dir_info", {}).get("editable") is True, f"not an editable install: {direct_url}"
    assert _is_under(direct_url["url"].removeprefix("file://"), REPO), direct_url


# ------------------------------------------------------------------------------------------- wheel in a fresh venv


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Build the wheel from a copy of the sources and install it into a fresh venv; returns the paths."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (pip install build)")
    if importlib.util.find_spec("venv") is None:
        pytest.skip("the `venv` module is not available in this Python")

    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in ["pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE"]:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    dist = root / "dist"
    # -x: the build backend (setuptools) is checked by importing it; `wheel` from build-system.requires is not
    # needed by setuptools >= 70.1 and may be absent offline.
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-x", "--outdir", str(dist), str(src)], root)
    wheels = list(dist.glob("medrobust-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    python = venv / "bin" / "python"
    paths = json.loads(
        _run([str(python), "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"], root).stdout
    )
    site = Path(paths["purelib"])
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheels[0])],
        root,
    )

    # The heavy dependencies come from this environment's site-packages, appended as plain sys.path entries.
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "zz_host_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return {"root": root, "wheel": wheels[0], "venv": venv, "python": python, "site": site,
            "scripts": Path(paths["scripts"])}


def test_wheel_contents(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert len(entry_points) == 1, sorted(names)
        scripts = wheel.read(entry_points[0]).decode()
    for name in ["medrobust/__init__.py", "medrobust/cli.py", "medrobust/errors.py",
                 "medrobust/models/__init__.py", "medrobust/attacks/__init__.py", "medrobust/reports/__init__.py"]:
        assert name in names, f"{name} missing from the wheel: {sorted(names)}"
    # Every module of every code folder is shipped, under its namespace; nothing else is at the top level.
    for package, folder in PACKAGES.items():
        for module in folder.glob("*.py"):
            assert f"{package.replace('.', '/')}/{module.name}" in names, f"{folder}/{module.name} not shipped"
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"medrobust"}
    lines = [line.replace(" ", "") for line in scripts.splitlines()]
    assert "[console_scripts]" in lines and "medrobust=medrobust.cli:main" in lines, scripts


CHECK = """
import importlib, json, sys
from importlib.metadata import distribution
modules = [importlib.import_module(name) for name in sys.argv[1:]]
print(json.dumps({
    "files": {m.__name__: m.__file__ for m in modules},
    "dist": str(distribution("medrobust")._path),
    "editable_finder": [n for n in sys.modules if n.startswith("__editable__")],
    "sys_path": sys.path,
}))
"""


def test_fresh_venv_imports_the_installed_wheel(built):
    result = _run([str(built["python"]), "-c", CHECK, *PACKAGES, "medrobust.cli"], built["root"])
    info = json.loads(result.stdout.strip().splitlines()[-1])
    for name, file in info["files"].items():
        assert _is_under(file, built["site"]), f"{name} imported from {file}, not from the fresh venv"
        assert not _is_under(file, REPO), f"{name} imported from the repo: {file}"
    assert Path(info["files"]["medrobust.models"]).resolve() == (built["site"] / "medrobust/models/__init__.py")
    assert info["editable_finder"] == [], "the main venv's editable finder leaked into the fresh venv"
    assert _is_under(info["dist"], built["site"]), info["dist"]
    assert not any(p and _is_under(p, REPO) and not _is_under(p, REPO / ".venv") for p in info["sys_path"]), (
        info["sys_path"]
    )


def test_console_script_runs_from_the_fresh_venv(built):
    script = built["scripts"] / "medrobust"
    assert script.is_file(), f"no console script in {built['scripts']}"
    assert script.read_text().splitlines()[0] == f"#!{built['python']}", "console script is not bound to the venv"
    result = _run([str(script), "--help"], built["root"])
    assert "Usage: medrobust" in result.stdout and "data" in result.stdout, result.stdout
    version = _run([str(script), "--version"], built["root"])
    assert "0.1.0" in version.stdout, version.stdout
