"""Executors: where a run's cells are computed. The driver (``medrobust.runner.driver.run``) hands an executor its
pending ``CellTask``s (a cell, or cells that differ only in their budget, computed together) and writes each
``CellOutcome`` to the store as it arrives; executors never touch the store.

``local``: in this process, one task after the other; with several devices (several visible GPUs), one worker
thread per device, each with its own copy of the models. ``ray``: each task a Ray task (asking for one GPU when
the run uses CUDA) that receives its cells' specs and file paths, loads the model and subjects itself (once per
worker process) and returns the outcomes; a task whose worker dies is retried a bounded number of times.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Iterator

import torch

from medrobust.devices import deterministic_cuda
from medrobust.errors import MedrobustError
from medrobust.plugins import import_plugins
from medrobust.runner.execute import CellOutcome, CellTask, compute_cells
from medrobust.runner.inputs import LoadedInputs
from medrobust.vocabulary import EXECUTORS

# How many times Ray reruns a task whose worker process died (out of memory, a lost node).
RAY_MAX_RETRIES = 2


class LocalExecutor:
    """Tasks in this process: in order on one device, or one task per device with several."""

    def __init__(self, loaded: list[LoadedInputs]) -> None:
        self.loaded = loaded

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, tasks: list[CellTask], on_batch: Callable[[dict], None] | None = None) -> Iterator[CellOutcome]:
        """The outcomes in the order the cells finish."""
        if len(self.loaded) == 1:
            for task in tasks:
                yield from compute_cells(task, self.loaded[0], on_batch)
            return
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for task in tasks:
            todo.put(task)
        finished: queue.SimpleQueue = queue.SimpleQueue()

        def worker(loaded: LoadedInputs) -> None:
            if loaded.device.type == "cuda":
                torch.cuda.set_device(loaded.device)
            while True:
                try:
                    task = todo.get_nowait()
                except queue.Empty:
                    return
                for outcome in compute_cells(task, loaded):
                    finished.put(outcome)

        threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in self.loaded]
        for thread in threads:
            thread.start()
        for _ in range(sum(len(task.cells) for task in tasks)):
            yield finished.get()
        for thread in threads:
            thread.join()


# Per Ray worker process: the loaded inputs by (config file, dataset, device), so a worker loads each model once.
_WORKER_INPUTS: dict[tuple, LoadedInputs] = {}


def _ray_compute_cells(task: CellTask, device_type: str, threads: int) -> list[CellOutcome]:
    """A task's cells in a Ray worker: the GPU Ray gave it (visible as cuda:0), or the CPU with the driver's thread
    count (so the arithmetic, and the results, are those of the local executor)."""
    if device_type == "cuda":
        device = torch.device("cuda", 0)
        deterministic_cuda()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads)
    import_plugins(task.config.plugins, f"{task.config.source}: plugins")  # a worker registers them too
    key = (str(task.config.source), str(task.root), str(device))
    if key not in _WORKER_INPUTS:
        _WORKER_INPUTS[key] = LoadedInputs(task.config, task.root, device)
    return compute_cells(task, _WORKER_INPUTS[key])


class RayExecutor:
    """Cells as Ray tasks on the cluster at ``address`` (None: a Ray already started in this process, else a new
    local one)."""

    def __init__(self, devices: list[torch.device], address: str | None = None,
                 max_retries: int = RAY_MAX_RETRIES) -> None:
        try:
            import ray
        except ImportError:
            raise MedrobustError("--executor ray needs Ray: pip install 'medrobust[ray]'") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise MedrobustError(f"could not start or join {where}: {err}") from None
            self.started = True
        self.device_type = devices[0].type
        gpus = 1 if self.device_type == "cuda" else 0
        self.remote = ray.remote(num_gpus=gpus, max_retries=max_retries)(_ray_compute_cells)
        self.threads = torch.get_num_threads()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()

    def map(self, tasks: list[CellTask], on_batch: Callable[[dict], None] | None = None) -> Iterator[CellOutcome]:
        """The outcomes in the order the tasks finish (``on_batch`` is not reported across processes)."""
        ray = self.ray
        refs = {self.remote.remote(task, self.device_type, self.threads): task for task in tasks}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                task = refs.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except ray.exceptions.RayError as err:  # retries spent: the worker kept dying
                    outcomes = [CellOutcome(cell.id, "failed", {}, [], 0.0, f"{type(err).__name__}: {err}")
                                for cell in task.cells]
                yield from outcomes


# How long `--ray-address` may take to answer before the run is refused (Ray's own join waits minutes).
RAY_CONNECT_TIMEOUT_S = 10.0


def check_executor(name: str, ray_address: str | None = None, probe: bool = True) -> None:
    """Refuse an unknown executor, a Ray address without the Ray executor, a malformed one and, with ``probe``, one
    where nobody listens (within ``RAY_CONNECT_TIMEOUT_S``), before anything runs or is recorded."""
    if name not in EXECUTORS:
        raise MedrobustError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if ray_address is not None and name != "ray":
        raise MedrobustError("--ray-address goes with --executor ray")
    if ray_address is None or ray_address == "auto":
        return
    host, port = ray_endpoint(ray_address)
    if not probe:
        return
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise MedrobustError(f"--ray-address {ray_address}: nobody answers at {host}:{port} "
                             f"({err.strerror or type(err).__name__}); start the cluster (`ray start --head`) or fix "
                             f"the address") from None


def ray_endpoint(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address ``[ray://]host:port``, or a MedrobustError saying what is wrong with it."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise MedrobustError(f"--ray-address {address!r} is not [ray://]HOST:PORT (e.g. 10.0.0.5:6379), nor 'auto'")
    return host.strip("[]"), int(port)


def make_executor(name: str, loaded: LoadedInputs, devices: list[torch.device], ray_address: str | None = None):
    """The executor ``name`` for a run whose driver loaded ``loaded`` on ``devices[0]``."""
    check_executor(name, ray_address, probe=False)  # run() probed the address before anything started
    if name == "ray":
        return RayExecutor(devices, ray_address)
    others = [LoadedInputs(loaded.config, loaded.root, device) for device in devices[1:]]
    return LocalExecutor([loaded, *others])
