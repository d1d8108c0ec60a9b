"""The command line around a run: `status` (done, failed with reasons, pending, the writer), `run --retry-failed`
after a real failure, the run's overrides (--device, --precision) and their validation, and a busy store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from medrobust.cli import main
from medrobust.results.store import ResultStore

FGSM = '\n[[attacks]]\nname = "fgsm"\n'


@pytest.fixture(scope="module")
def run_config(tiny_config):
    """Factory: ``run_config(root, name, linf, attacks, extra)``, a tiny run (conftest's ``tiny_config``) of one
    cnn3d, batches of 3 subjects, l-inf budgets ``linf``, the budgets ``extra`` and the attacks ``attacks``."""

    def write(root: Path, name: str, linf: str = "[1e-3]", attacks: str = FGSM, extra: str = "", top: str = "") -> Path:
        grid = f'\n[[budgets]]\nnorm = "linf"\nepsilon = {linf}\n' + extra + attacks
        return tiny_config(root, name, "batch_size = 3\nseed = 1\n" + top, grid)

    return write


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_config) -> Path:
    """A folder with the tiny cohort and a trained cnn3d (made by a one-cell run into 'base')."""
    root = tmp_path_factory.mktemp("cli_run")
    result = CliRunner().invoke(main, ["run", str(run_config(root, "base")), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    return root


def _status(run_dir: Path, *options: str) -> list[str]:
    result = CliRunner().invoke(main, ["status", str(run_dir), *options])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


@pytest.mark.slow
def test_status_lists_pending_cells_of_a_config(trained, run_config):
    config = run_config(trained, "base", linf="[1e-3, 2e-3, 4e-3]")  # two budgets more than were run
    lines = _status(trained / "base", "--config", str(config))
    assert lines[0] == f"{trained / 'base' / 'results.sqlite'}: 1 cells done, 0 failed"
    assert f"{config}: 3 cells, 1 done, 0 failed, 2 pending" in lines
    pending = sorted(line.split(" ", 2)[2] for line in lines if line.startswith("pending "))
    assert pending == ["cnn3d fgsm linf eps=0.002 range older fixed", "cnn3d fgsm linf eps=0.004 range older fixed"]
    assert sum(line.startswith("run ") and "finished" in line for line in lines) == 1
    assert not any(line.startswith(("failed ", "being written", "note:")) for line in lines)


def test_status_of_a_folder_without_a_store(tmp_path):
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert result.exit_code == 2 and "holds no results store" in result.stderr


# A user's attack plugin, as first written: its l2 step raises. The fixed version below replaces the file.
PLUGIN = '''
from medrobust.attacks import register_attack
from medrobust.attacks.fgsm import FGSM


@register_attack
class Careful(FGSM):
    name = "careful-fgsm"

    def perturb(self, state):
        {body}
        return super().perturb(state)
'''
BROKEN = 'if self.budget.norm == "l2":\n            raise ValueError("the l2 step is not written yet")'
FIXED = "pass"


def _medrobust_run(config: Path, *options: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """A plain `medrobust run` in a process of its own (``pythonpath``: a folder put first on its path)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "medrobust.cli", "run", str(config), "--quiet", "--no-report",
                           *options], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_failed_cell_is_listed_by_status_and_rerun_by_retry_failed(trained, run_config):
    plugin = trained / "careful_plugin.py"
    plugin.write_text(PLUGIN.format(body=BROKEN))
    # The plugin is named by the config (`plugins`), and a plain `medrobust run` imports it.
    config = run_config(trained, "plugin", attacks='\n[[attacks]]\nname = "careful-fgsm"\n',
                        extra='\n[[budgets]]\nnorm = "l2"\nepsilon = [0.5, 1.0]\n', top=f'plugins = ["{plugin}"]\n')
    first = _medrobust_run(config)
    assert first.returncode == 1, first.stdout + first.stderr  # the grid went on past the failures
    assert "1 cells run, 0 already finished, 2 failed" in first.stdout
    lines = _status(trained / "plugin")
    assert lines[0].endswith(": 1 cells done, 2 failed")
    failed = sorted(line.split(" ", 2)[2] for line in lines if line.startswith("failed "))
    assert failed == [f"cnn3d careful-fgsm l2 eps={eps} range older fixed: ValueError: the l2 step is not "
                      f"written yet" for eps in ("0.5", "1")]
    with ResultStore(trained / "plugin", create=False) as store:
        failed_ids = {f["id"] for f in store.failures()}

    # The plugin is fixed; the cells are the same (an attack's code is not part of a cell), so only
    # --retry-failed runs them again, and only them.
    plugin.write_text(PLUGIN.format(body=FIXED))
    retried = _medrobust_run(config, "--retry-failed")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "2 cells run, 1 already finished, 0 failed" in retried.stdout
    with ResultStore(trained / "plugin", create=False) as store:
        statuses = store.statuses()
        assert len(statuses) == 3 and set(statuses.values()) == {"done"} and failed_ids <= set(statuses)
        assert store.failures() == [] and len(store.samples()) == 3 * 3
    lines = _status(trained / "plugin")
    assert lines[0].endswith(": 3 cells done, 0 failed") and not any(line.startswith("failed ") for line in lines)
    runs = [line for line in lines if line.startswith("run ")]
    assert len(runs) == 2 and all(", finished " in line for line in runs)


@pytest.mark.slow
def test_device_and_precision_override_the_config(trained, run_config):
    config = run_config(trained, "override")
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report", "--device", "cpu",
                                       "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    with ResultStore(trained / "override", create=False) as store:
        cells, runs = store.cells(), store.runs()
    assert list(cells["precision"]) == ["bf16"] and list(cells["device"]) == ["cpu"]
    # The run's record says what ran, not only what the file said.
    assert runs[-1]["config"]["precision"] == "bf16" and runs[-1]["config"]["device"] == "cpu"
    # The same config in fp32 is another cell: not skipped.
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report", "--precision", "fp32"])
    assert result.exit_code == 0 and "1 cells run, 0 already finished" in result.output


@pytest.mark.parametrize(("options", "message"), [
    (["--device", "gpu"], "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "cuda:x"], "expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--precision", "fp8"], "'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
    (["--executor", "dask"], "'dask' is not one of 'local', 'ray'"),
    (["--ray-address", "10.0.0.1:6379"], "--ray-address goes with --executor ray"),
])
def test_bad_run_options_are_refused_before_anything_runs(tmp_path, options, message):
    config = tmp_path / "never.toml"
    config.write_text('[dataset]\npath = "nowhere"\n')  # would fail later, were the options accepted
    result = CliRunner().invoke(main, ["run", str(config), *options])
    assert result.exit_code == 2
    assert message in result.output and not (tmp_path / "runs").exists()


# A process that holds a store as its writer, as a run does, until it is stopped.
HOLDER = "import sys, time; from medrobust.results.store import ResultStore; s = ResultStore(sys.argv[1]); " \
         "print('ok', flush=True); time.sleep(600)"


@pytest.mark.slow
def test_a_second_run_on_a_busy_store_is_refused_with_exit_code_3(trained, run_config):
    config = run_config(trained, "busy")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(trained / "busy")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report"])
        assert result.exit_code == 3
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"error: {trained / 'busy' / 'results.sqlite'} is being written by another "
                               f"medrobust run (pid {holder.pid} on ")
        assert "wait for that run to finish" in line
        assert f"being written now by pid {holder.pid}" in "\n".join(_status(trained / "busy"))
    finally:
        holder.kill()
        holder.wait()
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output


ENTRY_POINT_PLUGIN = '''
from medrobust.attacks import register_attack
from medrobust.attacks.fgsm import FGSM


@register_attack
class Installed(FGSM):
    name = "installed-fgsm"
'''


@pytest.mark.slow
def test_an_installed_plugin_is_found_by_its_entry_point(trained, run_config, tmp_path):
    # A lab's package as pip installs it: its module and a dist-info declaring the entry point
    # medrobust.attacks; nothing in the config names it.
    site = tmp_path / "site"
    (site / "lab_attacks-0.1.dist-info").mkdir(parents=True)
    (site / "lab_attacks.py").write_text(ENTRY_POINT_PLUGIN)
    (site / "lab_attacks-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-attacks\n"
                                                                "Version: 0.1\n")
    (site / "lab_attacks-0.1.dist-info" / "entry_points.txt").write_text("[medrobust.attacks]\nlab = lab_attacks\n")
    config = run_config(trained, "installed", attacks='\n[[attacks]]\nname = "installed-fgsm"\n')
    result = _medrobust_run(config, pythonpath=site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 cells run, 0 already finished, 0 failed" in result.stdout
    # Without the package, the name is unknown: one line, exit 2.
    missing = _medrobust_run(config)
    assert missing.returncode == 2 and "attacks[0].name" in missing.stderr and "installed-fgsm" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0, missing.stderr


@pytest.mark.parametrize(("plugins", "message"), [
    ('["no_such_lab_module"]', "plugins[0]: no module named 'no_such_lab_module'"),
    ('["missing/attacks.py"]', "plugins[0]: no Python file at 'missing/attacks.py'"),
    ('["{broken}"]', "plugins[0]: importing"),
    ("[3]", "plugins[0] must be a string"),
])
def test_a_bad_plugin_is_one_line_and_exit_2(tmp_path, plugins, message):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('this plugin is broken')\n")
    config = tmp_path / "bad.toml"
    config.write_text(f'plugins = {plugins.replace("{broken}", str(broken))}\n[dataset]\npath = "nowhere"\n')
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
