"""Validators of arguments, one each, so that a bad value is refused where it is given with the same one-line
message naming the argument: the attacks' (``medrobust.attacks.arguments`` adds theirs), median smoothing's and
whatever else takes numbers from a user. No torch here: every layer may use it."""

from __future__ import annotations

import math
import numbers

from medrobust.errors import MedrobustError


def is_finite_real(value: object) -> bool:
    """True for a finite real number; bool is an int subclass but never a magnitude, so it is refused."""
    return (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    )


def check_count(name: str, value: object) -> int:
    """``value`` as an int if it is an integer >= 1 (not a bool), else a MedrobustError naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise MedrobustError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_seed(name: str, value: object) -> int:
    """``value`` as an int if it is an integer >= 0 (not a bool): a seed."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise MedrobustError(f"{name} must be an integer >= 0, got {value!r}")
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


def check_probability(name: str, value: object, meaning: str = "") -> float:
    """``value`` as a float if it lies strictly between 0 and 1 (an error rate, a confidence level's complement)."""
    if not is_finite_real(value) or not 0 < value < 1:
        raise MedrobustError(f"{name} must be a number in (0, 1){f' ({meaning})' if meaning else ''}, got {value!r}")
    return float(value)


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
