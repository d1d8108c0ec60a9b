"""Deterministic fault injection for the crash tests: the process kills itself (SIGKILL, as an out-of-memory
killer or a pulled plug would) at a named point of a run, so that a test can stop a run exactly there instead of
guessing when a timer will land.

Off unless ``MEDROBUST_FAULT`` is set, to ``<point>:<n>``: die the n-th time ``point`` is reached (n = 1 if
omitted). The points (``POINTS``): ``planned`` (the grid is planned, before the run is recorded), ``attacked``
(a cell's attack has finished, before its results reach the store), ``committing`` (inside the store's
transaction for a cell, before the commit), ``written`` (a cell is committed).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = ("planned", "attacked", "committing", "written")
_reached: Counter = Counter()


def fault_point(point: str) -> None:
    """Reach ``point``; with ``MEDROBUST_FAULT`` naming it, die there on its n-th time."""
    spec = os.environ.get("MEDROBUST_FAULT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
