"""Validators of attack arguments, one each: every attack checks its own arguments with these, so that a bad
value is refused at construction with the same one-line message naming the argument (plugin attacks may use them
too)."""

from __future__ import annotations

import numbers

from medrobust.attacks.budget import is_finite_real
from medrobust.errors import MedrobustError


def check_count(name: str, value: object) -> int:
    """``value`` as an int if it is an integer >= 1 (not a bool), else a MedrobustError naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise MedrobustError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_positive(name: str, value: object, meaning: str = "") -> float:
    """``value`` as a float if it is a finite number > 0; ``meaning`` (e.g. "a fraction of the radius") is said in
    the error."""
    if not is_finite_real(value) or value <= 0:
        raise MedrobustError(f"{name} must be a finite number > 0{f' ({meaning})' if meaning else ''}, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: object, meaning: str = "") -> float:
    """``value`` as a float if it is a finite number >= 0; ``meaning`` is said in the error."""
    if not is_finite_real(value) or value < 0:
        raise MedrobustError(f"{name} must be a finite number >= 0{f' ({meaning})' if meaning else ''}, got {value!r}")
    return float(value)


def check_step_size(value: object) -> float:
    """A step size as the gradient attacks take it: a fraction of the budget radius > 0, so that one setting
    serves every epsilon and unit."""
    return check_positive("step_size", value, "a fraction of the radius")


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise MedrobustError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise MedrobustError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
