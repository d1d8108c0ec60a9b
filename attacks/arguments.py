"""Validators of attack arguments, one each: every attack checks its own arguments with these, so that a bad
value is refused at construction with the same one-line message naming the argument (plugin attacks may use them
too). The general ones live in ``medrobust.arguments`` (no torch there, so that every layer shares them)."""

from __future__ import annotations

from medrobust.arguments import (
    check_choice,
    check_count,
    check_flag,
    check_non_negative,
    check_positive,
    check_probability,
    check_seed,
    is_finite_real,
)

__all__ = ["check_choice", "check_count", "check_flag", "check_non_negative", "check_positive", "check_probability",
           "check_seed", "check_step_size", "is_finite_real"]


def check_step_size(value: object) -> float:
    """A step size as the gradient attacks take it: a fraction of the budget radius > 0, so that one setting
    serves every epsilon and unit."""
    return check_positive("step_size", value, "a fraction of the radius")
