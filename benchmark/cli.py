"""The `medrobust` command line.

Exit codes: 0 success; 1 a run finished with failed cells; 2 bad input (a MedrobustError, one line on stderr);
3 the run's store is being written by another run (one line on stderr naming it).
"""

from __future__ import annotations

import errno
import re
import sqlite3
import sys

import click

from medrobust.errors import FieldError, MedrobustError
from medrobust.settings import ADVERSARIAL_THREAT_MODELS, LOSSES, CohortSpec, TrainingConfig
from medrobust.vocabulary import EXECUTORS, PRECISIONS

EXIT_FAILED_CELLS, EXIT_BAD_INPUT, EXIT_STORE_BUSY, EXIT_INTERRUPTED = 1, 2, 3, 130
# The defaults the options show are the settings' own.
_COHORT, _TRAINING = CohortSpec(), TrainingConfig()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _disk_full(error: BaseException) -> bool:
    """Whether an error is a full disk (ENOSPC, a quota, or SQLite's SQLITE_FULL)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "disk is full" in str(error)


class _Group(click.Group):
    """A click group that turns MedrobustError, a bad option or argument and a full disk into one line on stderr and
    exit code 2 (3 for a busy store), and Ctrl-C into one line and exit code 130 (not click's "Aborted!" with 1, the
    code of failed cells)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # a bad option or argument: one line too, naming where help is
            where = error.ctx.command_path if error.ctx is not None else "medrobust"
            click.echo(f"error: {_one_line(error.format_message())} (`{where} --help` lists the options)", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: what had finished is kept (every finished cell is in the store, and the same "
                       "`medrobust run` resumes from it)", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (OSError, sqlite3.OperationalError) as error:
            if not _disk_full(error):
                raise
            where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
            click.echo(f"error: the disk is full{where} ({_one_line(error)}); nothing written is half-written (every "
                       f"finished cell is in the store): free some space and run the same command again", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except MedrobustError as error:
            from medrobust.results.store import StoreBusyError

            if isinstance(error, FieldError):  # a setting the library names by its field: name it by its flag
                flag = _FLAGS.get(error.field, error.field.replace("_", "-"))
                error = MedrobustError(f"--{flag} {error.problem}")
            click.echo(f"error: {_one_line(error)}", err=True)
            sys.exit(EXIT_STORE_BUSY if isinstance(error, StoreBusyError) else EXIT_BAD_INPUT)


# fields whose flag is not their name with dashes
_FLAGS = {"adversarial_norm": "budget", "adversarial_epsilon": "budget"}


@click.group(cls=_Group)
@click.version_option(package_name="medrobust")
def main() -> None:
    """Adversarial-robustness benchmark for deep models on 3D medical images."""
    from medrobust.plugins import load_entry_points

    load_entry_points()  # the installed plugins' models and attacks, by name in every command


@main.group(cls=_Group)
def data() -> None:
    """Datasets: generate the built-in cohort, inspect a dataset."""


def _triple(kind: type):
    """A click callback parsing 'AxBxC' or a single value into a 3-tuple."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        parts = value.lower().replace(",", "x").split("x")
        try:
            numbers = tuple(kind(p) for p in parts)
        except ValueError:
            raise click.BadParameter(f"expected e.g. 48x56x48 or a single number, got {value!r}") from None
        if len(numbers) == 1:
            numbers = numbers * 3
        if len(numbers) != 3:
            raise click.BadParameter(f"expected three values, got {value!r}")
        return numbers

    return parse


def _feature_source(ctx: click.Context, param: click.Parameter, value: str | None):
    """A click callback parsing FORMAT:PATH into a FeatureSource (medrobust.data.tables)."""
    if value is None:
        return None
    from pathlib import Path

    from medrobust.data.tables import FEATURE_FORMATS, FeatureSource

    format_, _, path = value.partition(":")
    if format_ not in FEATURE_FORMATS or not path:
        raise click.BadParameter(f"expected FORMAT:PATH with FORMAT one of {', '.join(FEATURE_FORMATS)}, got {value!r}")
    try:
        return FeatureSource(format=format_, path=Path(path)).validate()
    except MedrobustError as err:
        raise click.BadParameter(str(err).replace("dataset.features.", "")) from None


# `--features` of the commands that read a dataset (data check, train).
_FEATURES_OPTION = click.option(
    "--features", "features", default=None, metavar="FORMAT:PATH", callback=_feature_source,
    help="Read the context features by name: freesurfer:SUBJECTS_DIR (each subject's stats/aseg.stats), "
         "synthseg:VOLUMES.csv, or table:FILE.csv (a subject id column and named columns).")


@data.command("synth")
@click.option("--out", type=click.Path(file_okay=False), default="runs/cohort", show_default=True,
              help="Folder for the BIDS dataset (created; must be new or hold the same cohort).")
@click.option("--n", type=int, default=_COHORT.n, show_default=True, help="Number of subjects.")
@click.option("--seed", type=int, default=_COHORT.seed, show_default=True)
@click.option("--shape", callback=_triple(int), default="x".join(map(str, _COHORT.shape)), show_default=True,
              help="Output grid in voxels (x, y, z in RAS); the paper's grid is 172x220x156.")
@click.option("--voxel-size", callback=_triple(float), default="x".join(map(str, _COHORT.voxel_size)),
              show_default=True, help="Voxel size in mm.")
@click.option("--age-range", nargs=2, type=float, default=_COHORT.age_range, show_default=True,
              help="Ages are drawn uniformly between MIN and MAX years.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_synth(out, n, seed, shape, voxel_size, age_range, quiet) -> None:
    """Generate the built-in lifespan cohort (synthetic T1w + labels on MNI152/AAL3 anatomy) as BIDS."""
    from medrobust.data.cohort import synthesize

    spec = CohortSpec(n=n, seed=seed, shape=shape, voxel_size=voxel_size, age_range=tuple(age_range))
    root = synthesize(out, spec, progress=not quiet)
    click.echo(f"cohort: {n} subjects in {root}")


@data.command("check")
@click.argument("dataset", type=click.Path(exists=True))
@click.option("--shape", callback=_triple(int), default=None, help="Model grid; default: the dataset's grid.")
@click.option("--voxel-size", callback=_triple(float), default=None, help="Model voxel size in mm.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Preprocessed-tensor cache; default: <dataset>/.medrobust_cache.")
@_FEATURES_OPTION
@click.option("--strict", is_flag=True, help="Fail at the first bad subject instead of listing it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_check(dataset, shape, voxel_size, cache_dir, features, strict, quiet) -> None:
    """Load and preprocess a dataset (BIDS folder or CSV manifest); list usable and skipped subjects."""
    from pathlib import Path

    from medrobust.data import load_prepared

    index, preprocessing, prepared = load_prepared(dataset, shape, voxel_size, Path(cache_dir) if cache_dir else None,
                                                   strict=strict, progress=not quiet, features=features)
    ages = prepared.ages
    click.echo(f"{index.root}: {len(prepared.subject_ids)} usable subjects, {len(prepared.skipped)} skipped; "
               f"ages {float(ages.min()):.1f}-{float(ages.max()):.1f}; grid {preprocessing.shape} at "
               f"{preprocessing.voxel_size} mm; {len(prepared.feature_names)} context features")
    for skipped in prepared.skipped:
        click.echo(f"skipped {skipped.subject_id}: {skipped.reason}")


def _norm_epsilon(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, float]:
    """A click callback reading NORM:EPSILON (linf:0.002)."""
    norm, _, epsilon = value.partition(":")
    try:
        return norm, float(epsilon)
    except ValueError:
        raise click.BadParameter(f"expected NORM:EPSILON such as linf:0.002, got {value!r}") from None


@main.command("train")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="A BIDS folder or a CSV/TSV manifest.")
@click.option("--model", "models", multiple=True, default=("cnn3d",), show_default=True,
              help="Registered model (or segmenter, e.g. seg_unet) name; repeat to train several (a model built from "
                   "another reuses the one trained here).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/models", show_default=True,
              help="Folder for checkpoints (<model>-seed<seed>.safetensors + .json) and test predictions.")
@click.option("--trained", "--trunk", "trained", multiple=True, type=click.Path(dir_okay=False),
              help="Checkpoint of a trained model that a requested model is built from (the two-stage hybrid: a "
                   "cnn3d, whose trunk it freezes); repeat for several.")
@click.option("--epochs", type=int, default=_TRAINING.epochs, show_default=True)
@click.option("--batch-size", type=int, default=_TRAINING.batch_size, show_default=True)
@click.option("--lr", type=float, default=_TRAINING.lr, show_default=True)
@click.option("--weight-decay", type=float, default=_TRAINING.weight_decay, show_default=True,
              help="L2 penalty of Adam.")
@click.option("--loss", type=click.Choice(LOSSES), default=_TRAINING.loss, show_default=True,
              help="Loss on the standardized age.")
@click.option("--patience", type=int, default=_TRAINING.patience, show_default=True,
              help="Early stopping on validation MAE.")
@click.option("--seed", type=int, default=_TRAINING.seed, show_default=True,
              help="Seed of initialization and batch order.")
@click.option("--split-seed", type=int, default=0, show_default=True,
              help="Seed of the subject-level train/val/test split (saved next to the dataset).")
@click.option("--shape", callback=_triple(int), default=None, help="Model grid; default: the dataset's grid.")
@click.option("--voxel-size", callback=_triple(float), default=None, help="Model voxel size in mm.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Preprocessed-tensor cache; default: <dataset>/.medrobust_cache.")
@_FEATURES_OPTION
@click.option("--strict", is_flag=True, help="Stop at the first bad subject instead of skipping it.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch's CPU threads (default: what torch picks).")
@click.option("--adversarial", metavar="ATTACK", default=None,
              help="Adversarial training: each batch's subjects replaced by this registered attack's adversarial "
                   "examples of the regression error |f(x') - y| (e.g. pgd); the checkpoint's name and sidecar "
                   "record the defence.")
@click.option("--budget", "adversarial_budget", metavar="NORM:EPSILON", callback=_norm_epsilon,
              default=f"{_TRAINING.adversarial_norm}:{_TRAINING.adversarial_epsilon:g}", show_default=True,
              help="With --adversarial: the attack's budget, epsilon a fraction of each image's intensity range.")
@click.option("--adversarial-steps", type=int, default=_TRAINING.adversarial_steps, show_default=True,
              help="With --adversarial: the attack's steps (where it takes steps).")
@click.option("--adversarial-ratio", type=float, default=_TRAINING.adversarial_ratio, show_default=True,
              help="With --adversarial: the fraction of each batch replaced by adversarial examples.")
@click.option("--adversarial-threat-model", type=click.Choice(ADVERSARIAL_THREAT_MODELS),
              default=_TRAINING.adversarial_threat_model, show_default=True,
              help="With --adversarial: perturbed lets the attacker move the regional volumes too.")
@click.option("--adversarial-warmup", type=int, default=_TRAINING.adversarial_warmup, show_default=True,
              help="With --adversarial: epochs over which epsilon ramps up from 0 (the best epoch is chosen after).")
@click.option("--noise-sigma", type=float, default=_TRAINING.noise_sigma, show_default=True,
              help="Gaussian noise of this scale (the model's input units) added to every training image: the base "
                   "of a median-smoothed model (a config's `smoothing`) at that sigma.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_cmd(data_path, models, out, trained, epochs, batch_size, lr, weight_decay, loss, patience, seed, split_seed,
              shape, voxel_size, device, cache_dir, features, strict, threads, adversarial, adversarial_budget,
              adversarial_steps, adversarial_ratio, adversarial_threat_model, adversarial_warmup, noise_sigma,
              quiet) -> None:
    """Train brain-age models; writes checkpoints and prints clean test MAE, Pearson r and n."""
    from pathlib import Path

    from medrobust.training import TrainRequest, train

    norm, epsilon = adversarial_budget
    config = TrainingConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, loss=loss,
                            patience=patience, seed=seed, adversarial=adversarial, adversarial_norm=norm,
                            adversarial_epsilon=epsilon, adversarial_steps=adversarial_steps,
                            adversarial_ratio=adversarial_ratio, adversarial_threat_model=adversarial_threat_model,
                            adversarial_warmup=adversarial_warmup, noise_sigma=noise_sigma)
    request = TrainRequest(
        data=Path(data_path), models=list(models), out=Path(out), config=config, shape=shape, voxel_size=voxel_size,
        trained=[Path(path) for path in trained], split_seed=split_seed, device=device,
        cache_dir=Path(cache_dir) if cache_dir else None, strict=strict, progress=not quiet, features=features,
        threads=threads)
    for result in train(request):
        click.echo(f"{result.name:14s} {result.summary}  (best epoch {result.best_epoch}, {result.seconds:.0f} s)  "
                   f"{result.checkpoint}")


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback checking a device name: auto, cpu, cuda or cuda:N."""
    if value is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


@main.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write the leaderboard page when the run ends.")
@click.option("--retry-failed", is_flag=True,
              help="Run again the cells the store records as failed (by default they are skipped, and counted).")
@click.option("--device", callback=_device, default=None,
              help="auto, cpu, cuda or cuda:N; overrides the config's `device`.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="fp32, bf16 or fp16 (autocast); overrides the config's `precision` (another precision makes other "
                   "cells).")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local",
              show_default=True,
              help="local (in this process) or ray (Ray tasks); either way only this process writes the store.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="The Ray cluster to join (with --executor ray); default: start a local one.")
@click.option("--force", is_flag=True, help="Compute the cells again even where they are finished (with --only: "
              "the matching ones), replacing their stored results.")
@click.option("--only", default=None, metavar="PATTERN", help="Run only the cells whose description matches the "
              "shell pattern, e.g. 'cnn3d pgd linf *' (as the run's lines name them).")
@click.option("--retrain", is_flag=True, help="Train a missing model even where the config's `models_from` "
              "holds a checkpoint trained on this dataset with these settings (the demo's shipped ones).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch's CPU threads; overrides the config's `threads` (default: what torch picks; on a CPU "
                   "another process also uses, fewer threads than cores avoid oversubscription).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_cmd(config_path, report, retry_failed, device, precision, executor, ray_address, force, only, retrain,
            threads, quiet) -> None:
    """Run the benchmark grid of a TOML config; results go to <out>/results.sqlite.

    Cells already done are skipped, so the same command resumes an interrupted or killed run; cells that failed
    before are skipped unless --retry-failed. The page is rewritten unless nothing ran and it is newer than the
    store. Exit code 0: every cell of the grid done; 1: some cells failed, here or earlier (recorded with their
    errors; see `medrobust status`); 2: bad input; 3: another run is writing the same store; 130: interrupted
    (Ctrl-C; the same command resumes).
    """
    import dataclasses

    from medrobust.runner import run
    from medrobust.runner.config import load_config
    from medrobust.runner.executors import check_executor

    check_executor(executor, ray_address, probe=False)  # the options at once; run() probes the address

    config = load_config(config_path)
    overrides = {key: value for key, value in (("device", device), ("precision", precision), ("threads", threads))
                 if value is not None}
    if overrides:  # the run's record (its config) says what ran
        config = dataclasses.replace(config, **overrides, raw={**config.raw, **overrides})
    summary = run(config, progress=not quiet, retry_failed=retry_failed, executor=executor, ray_address=ray_address,
                  force=force, only=only, retrain=retrain)
    earlier = f" (and {summary.failed_before} failed earlier, skipped)" if summary.failed_before else ""
    click.echo(f"{summary.done} cells run, {summary.skipped - summary.failed_before} already finished, "
               f"{len(summary.failed)} failed{earlier}, {summary.unreliable} possibly unreliable "
               f"({summary.seconds:.0f} s); results: {summary.store}")
    if report:
        from medrobust.reports import write_report
        from medrobust.reports.leaderboard import PAGE_FILENAME

        page = summary.out / PAGE_FILENAME
        if summary.done or summary.failed or not _newer(page, summary.store):
            page = write_report(summary.out)
        click.echo(f"leaderboard: {page}")
    if summary.failed or summary.failed_before:
        sys.exit(EXIT_FAILED_CELLS)


def _newer(page, store) -> bool:
    """Whether the page was written after the store (and its write-ahead log) last changed."""
    from pathlib import Path

    sources = [path for path in (Path(store), Path(f"{store}-wal")) if path.exists()]
    return page.is_file() and all(page.stat().st_mtime_ns >= path.stat().st_mtime_ns for path in sources)


@main.command("list")
@click.argument("kind", type=click.Choice(["models", "segmenters", "attacks"]))
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of one line per entry.")
def list_cmd(kind, as_json) -> None:
    """The registered models, segmenters or attacks (plugins included): name, description, parameters with their
    defaults; for attacks also norms, threat models, role and scope."""
    import json

    from medrobust.catalogue import describe

    described = describe(kind)
    if as_json:
        click.echo(json.dumps(described, indent=1))
        return
    for item in described:
        extra = (f" [{', '.join(item['norms'])}; {', '.join(item['threat_models'])}; {item['role']}, "
                 f"{item['scope']}]") if kind == "attacks" else (
            f" [built from {', '.join(item['requires'])}]" if item.get("requires") else "")
        arguments = ", ".join(f"{k}={v!r}" for k, v in item["parameters"].items())
        click.echo(f"{item['name']}{extra}: {item['description']}")
        click.echo(f"    {arguments}")


@main.command("segment")
@click.option("--segmenter", "segmenter_path", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint of a trained segmenter (`medrobust train --model seg_unet`).")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="A BIDS folder or a CSV/TSV manifest.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The table to write: participant_id and one vol_<region> column per region, in mL.")
@click.option("--device", callback=_device, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Preprocessed-tensor cache; default: <dataset>/.medrobust_cache.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def segment_cmd(segmenter_path, data_path, out, device, cache_dir, quiet) -> None:
    """Measure every subject's regional volumes with a trained segmenter and write them as a features table, which
    `--features table:FILE` (or [dataset.features]) gives to models trained and attacked on the segmenter's volumes;
    where the subjects have label maps, print the segmenter's mean Dice on them."""
    from pathlib import Path

    from medrobust.segmentation import write_volumes

    written, dice = write_volumes(Path(segmenter_path), Path(data_path), Path(out), device,
                                  Path(cache_dir) if cache_dir else None, progress=not quiet)
    click.echo(f"{written} subjects' volumes in {out}" + (f"; mean Dice {dice:.3f} on their label maps"
                                                        if dice is not None else ""))


@main.command("check-model")
@click.argument("config_path", metavar="[CONFIG]", type=click.Path(dir_okay=False), required=False)
@click.option("--model", "labels", multiple=True, help="Check only the model of this label (repeatable).")
@click.option("--factory", default=None, help="Instead of a config: 'package.module:callable' or 'file.py:callable'.")
@click.option("--torchscript", default=None, type=click.Path(dir_okay=False), help="Instead of a config: a file.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False), help="A .safetensors, .pt or .pth state "
              "dict for --factory.")
@click.option("--input-shape", callback=_triple(int), default=None, help="The model's grid, e.g. 160x192x160.")
@click.option("--voxel-size", callback=_triple(float), default=None, help="Its voxel size in mm.")
@click.option("--normalization", default=None, help="zscore_brain (default), zscore, minmax or none.")
@click.option("--output", default=None, help="years (default), standardized or bins.")
@click.option("--age-mean", type=float, default=None, help="With --output standardized.")
@click.option("--age-std", type=float, default=None, help="With --output standardized.")
@click.option("--bin-centres", default=None, help="With --output bins: comma-separated ages.")
@click.option("--data", "data_path", default=None, type=click.Path(exists=True),
              help="With --factory or --torchscript: the dataset to check it on (all its subjects' split).")
def check_model_cmd(config_path, labels, factory, torchscript, weights, input_shape, voxel_size, normalization,
                    output, age_mean, age_std, bin_centres, data_path) -> None:
    """Check models before benchmarking them (the checks `medrobust run` makes, and more): one line per check.

    Loads each model of CONFIG as configured (or the one --factory / --torchscript model on --data) and, on a
    few of the subjects it would be attacked on, checks its output shape and dtype, finite plausible ages,
    determinism in eval mode, batch independence, a finite non-zero gradient for every input it takes, and a
    finite-difference probe of that gradient (masked gradients). Exit code 0: every check passed; 1: some
    failed; 2: bad input.
    """
    from medrobust.runner.config import load_config, parse_config
    from medrobust.runner.plan import check_models

    if config_path is not None:
        config = load_config(config_path)
    else:
        if bool(factory) == bool(torchscript) or data_path is None:
            raise click.UsageError("give a CONFIG, or --factory or --torchscript with --data")
        model = {"factory": factory} if factory else {"torchscript": torchscript}
        values = {"weights": weights, "input_shape": list(input_shape) if input_shape else None,
                  "voxel_size": list(voxel_size) if voxel_size else None, "normalization": normalization,
                  "output": output, "age_mean": age_mean, "age_std": age_std,
                  "bin_centres": [float(v) for v in bin_centres.split(",")] if bin_centres else None}
        model.update({k: v for k, v in values.items() if v is not None})
        # A config of the one model; its attack and budget only complete the config: check-model runs no attack.
        config = parse_config({"dataset": {"path": data_path, "split": "all"}, "out": "runs/check-model",
                               "models": [model], "attacks": [{"name": "fgsm"}],
                               "budgets": [{"norm": "linf", "epsilon": 1e-3}]}, "check-model")
    failed = 0
    for label, findings in check_models(config, list(labels) or None).items():
        for finding in findings:
            failed += not finding.passed
            mark = "PASS" if finding.passed else ("FAIL" if finding.blocking else "WARN")
            click.echo(f"{mark} {label}: {finding.name}: {_one_line(finding.detail)}")
    if failed:
        sys.exit(EXIT_FAILED_CELLS)


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for the page; default: RUN_DIR (required with several run folders).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Only the cells this config plans (a store also keeps cells of earlier versions of a grid).")
def report_cmd(run_dirs, out, config_path) -> None:
    """Write the leaderboard page (leaderboard.html), its figure and results.csv from a run's store; several run
    folders make one page of their merged stores (a cell in two stores is one row)."""
    from pathlib import Path

    from medrobust.reports import write_report

    only = None
    if config_path is not None:
        from medrobust.runner import plan
        from medrobust.runner.config import load_config

        only = {cell.id for cell in plan(load_config(config_path))}
    folders = [Path(folder) for folder in run_dirs]
    page = write_report(folders if len(folders) > 1 else folders[0], Path(out) if out else None, only)
    click.echo(f"leaderboard: {page}")


@main.command("export")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--to", "folder", required=True, type=click.Path(file_okay=False),
              help="Folder for the exported files (created if missing).")
def export_cmd(run_dirs, folder) -> None:
    """Export a run's results for a paper: the headline and pivot tables as LaTeX (booktabs) and Markdown, the
    figure as PNG, SVG and PDF, the per-subject rows as CSV and one JSON record per model; several run folders
    are merged as by `medrobust report`."""
    from pathlib import Path

    from medrobust.reports.export import export

    written = export([Path(run_dir) for run_dir in run_dirs], Path(folder))
    click.echo(f"{len(written)} files in {folder}: {', '.join(sorted({path.name for path in written})[:8])}, ...")


@main.command("status")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Also count and list the config's cells not run yet (plans its grid, runs nothing; its dataset "
                   "and checkpoints must exist).")
def status_cmd(run_dir, config_path) -> None:
    """Where a run stands: cells done and failed (with the reasons), the run writing the store now if any, and
    every recorded invocation; with --config, the cells still pending. Reads the store only (no lock taken)."""
    from medrobust.results.store import ResultStore, describe_spec, lock_holder

    with ResultStore(run_dir, create=False) as store:
        statuses, failures, runs, path = store.statuses(), store.failures(), store.runs(), store.path
    done = sum(status == "done" for status in statuses.values())
    click.echo(f"{path}: {done} cells done, {len(failures)} failed")
    holder = lock_holder(path)
    if holder is not None:
        click.echo(f"being written now by pid {holder['pid']} on {holder.get('host')} since "
                   f"{holder.get('started_at')}: {holder.get('command', '')}")
    if config_path is not None:
        from medrobust.runner import plan
        from medrobust.runner.config import load_config

        config = load_config(config_path)
        cells = plan(config)
        pending = [cell for cell in cells if cell.id not in statuses]
        counts = {status: sum(statuses.get(cell.id) == status for cell in cells) for status in ("done", "failed")}
        click.echo(f"{config_path}: {len(cells)} cells, {counts['done']} done, {counts['failed']} failed, "
                   f"{len(pending)} pending")
        if config.out.resolve() != path.parent.resolve():
            click.echo(f"note: {config_path} writes to {config.out}, not {run_dir}")
        for cell in pending:
            click.echo(f"pending {cell.id} {cell.describe()}")
    for failure in failures:
        click.echo(f"failed {failure['id']} {describe_spec(failure['spec'])}: {_one_line(failure['error'] or '')}")
    for number, record in enumerate(runs, start=1):
        if record["finished_at"]:
            end = f"finished {record['finished_at']}"
        elif holder is not None and number == len(runs):
            end = "running"
        else:
            end = "did not finish (stopped or killed)"
        click.echo(f"run {record['id']} started {record['started_at']}, {end}")


if __name__ == "__main__":
    main()
