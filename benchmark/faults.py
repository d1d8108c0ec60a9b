"""Deterministic fault injection for the crash tests: the process kills itself (SIGKILL, as an out-of-memory
killer or a pulled plug would), or a write finds the disk full, or the device fails, at a named point, so that a
test can make a fault happen exactly there instead of guessing when a timer will land.

Off unless ``MEDROBUST_FAULT`` is set, to ``<point>[:<n>[:<action>]]``: at the n-th time ``point`` is reached
(n = 1 if omitted), do ``action``: ``kill`` (default: SIGKILL), ``enospc`` (raise the OSError of a full disk) or
``device`` (raise the RuntimeError of a failing GPU, not an out-of-memory one). The points (``POINTS``):
``planned`` (the grid is planned, before the run is recorded), ``attacking`` (a cell's subjects are loaded, its
attack about to start), ``attacked`` (a cell's attack has finished, before its results reach the store),
``committing`` (inside the store's transaction for a cell, before the commit), ``written`` (a cell is
committed), ``replacing`` (a file written beside its target, before it is renamed into place: the preprocessing
cache, split files, checkpoints, the cohort's images) and ``synthesizing`` (a subject of the built-in cohort is
written).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

POINTS = ("planned", "attacking", "attacked", "committing", "written", "replacing", "synthesizing")
ACTIONS = ("kill", "enospc", "device")
_reached: Counter = Counter()


def fault_point(point: str) -> None:
    """Reach ``point``; with ``MEDROBUST_FAULT`` naming it, fail there on its n-th time as it says."""
    spec = os.environ.get("MEDROBUST_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    count, _, action = rest.partition(":")
    if action and action not in ACTIONS:  # a misspelt test setting must not silently become a kill
        raise ValueError(f"MEDROBUST_FAULT: action {action!r} is not one of {', '.join(ACTIONS)}")
    _reached[point] += 1
    if _reached[point] != int(count or 1):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by MEDROBUST_FAULT)")
    if action == "device":
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by MEDROBUST_FAULT)")
    os.kill(os.getpid(), signal.SIGKILL)
