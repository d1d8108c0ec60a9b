"""The `medrobust` command line."""

from __future__ import annotations

import sys

import click

from medrobust.errors import MedrobustError


class _Group(click.Group):
    """A click group that turns MedrobustError into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MedrobustError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="medrobust")
def main() -> None:
    """Adversarial-robustness benchmark for deep models on 3D medical images."""


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


@data.command("synth")
@click.option("--out", type=click.Path(file_okay=False), default="runs/cohort", show_default=True,
              help="Folder for the BIDS dataset (created; must be new or hold the same cohort).")
@click.option("--n", type=int, default=500, show_default=True, help="Number of subjects.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shape", callback=_triple(int), default="48x56x48", show_default=True,
              help="Output grid in voxels (x, y, z in RAS); the paper's grid is 172x220x156.")
@click.option("--voxel-size", callback=_triple(float), default="3.5", show_default=True, help="Voxel size in mm.")
@click.option("--age-range", nargs=2, type=float, default=(5.0, 90.0), show_default=True,
              help="Ages are drawn uniformly between MIN and MAX years.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_synth(out, n, seed, shape, voxel_size, age_range, quiet) -> None:
    """Generate the built-in lifespan cohort (synthetic T1w + labels on MNI152/AAL3 anatomy) as BIDS."""
    from medrobust.cohort import CohortSpec, synthesize

    spec = CohortSpec(n=n, seed=seed, shape=shape, voxel_size=voxel_size, age_range=tuple(age_range))
    root = synthesize(out, spec, progress=not quiet)
    click.echo(f"cohort: {n} subjects in {root}")
