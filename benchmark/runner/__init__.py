"""The runner: grid -> cells -> outcomes -> store.

A config (``config``) names models, attacks, budgets, objectives and threat models; the driver (``driver.run``)
provisions the dataset and the checkpoints (``provision``), plans every cell with its id (``cells``, ``plan``;
cached in the run folder so that a finished grid re-runs without loading anything), and hands the pending cells
to an executor (``executors``: in this process, one worker per GPU, or Ray tasks). A worker computes a cell
(``execute.compute_cell``) with the models and subjects it loaded once (``inputs.LoadedInputs``) and returns a
``CellOutcome``, which only the driver writes.
"""

from medrobust.runner.driver import RunSummary, run
from medrobust.runner.plan import plan

__all__ = ["RunSummary", "plan", "run"]
