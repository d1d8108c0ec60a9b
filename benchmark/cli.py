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
