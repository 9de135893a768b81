"""Where ``rcpu compare`` computes its cells: in this process, one process per GPU, or Ray.

Every executor takes the pending cells as plain jobs plus a table of named token tensors,
runs a cell function on them, and hands each finished cell back to the caller in this
process (``on_done``), which alone writes results.json. Workers never write files, so a
run interrupted at any point resumes from the cells already merged.

A parallel executor keeps going when one cell fails: the other cells are still merged,
the failure is logged with its traceback, and one error at the end names the failed cells
(rerunning the same command computes just those).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .errors import RcpuError

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "gpus", "ray")

CellFn = Callable[..., dict]
OnDone = Callable[[Any, dict], None]
Execute = Callable[[Sequence[Any], Mapping[str, torch.Tensor], CellFn, OnDone], None]


def run_local(jobs: Sequence[Any], tensors: Mapping[str, torch.Tensor], cell_fn: CellFn, on_done: OnDone,
              dense: torch.nn.Module) -> None:
    """One cell after another in this process, each on a deep copy of the loaded dense
    model (loading it again per cell would cost more than copying it)."""
    for job in jobs:
        if job.config is None:
            cell = cell_fn(job, tensors, model=dense)
            dense.to("cpu")
        else:
            cell = cell_fn(job, tensors, model=copy.deepcopy(dense))
        on_done(job, cell)


def _raise_failures(failed: dict[str, str], total: int) -> None:
    if failed:
        first, err = next(iter(failed.items()))
        last_line = err.strip().splitlines()[-1] if err.strip() else "unknown error"
        raise RcpuError(f"{len(failed)} of {total} cells failed ({', '.join(failed)}); first: {first}: {last_line}; "
                        "finished cells are saved, run the same command again to retry the rest")


# --- one worker process per GPU ---------------------------------------------------------

def _process_worker(visible: str | None, threads: int, tensors: Mapping[str, torch.Tensor], cell_fn: CellFn,
                    tasks: Any, results: Any) -> None:
    """Runs in a spawned process: pin it to one GPU, then compute cells until told to stop."""
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before the first CUDA call in this process
    torch.set_num_threads(threads)  # the workers share the host's cores instead of each taking all of them
    while (job := tasks.get()) is not None:
        try:
            results.put((job.key, cell_fn(job, tensors), None))
        except Exception:  # reported to the driver, which decides
            results.put((job.key, None, traceback.format_exc()))
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the next cell starts from a clean allocator (after an OOM too)


def run_processes(jobs: Sequence[Any], tensors: Mapping[str, torch.Tensor], cell_fn: CellFn, on_done: OnDone,
                  slots: Sequence[str | None], *, poll_s: float = 2.0) -> None:
    """One spawned worker per slot (a ``CUDA_VISIBLE_DEVICES`` value, or None to leave it
    alone); workers take the next job from a shared queue as soon as they are free."""
    if not jobs:
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    tasks, results = ctx.Queue(), ctx.Queue()
    for job in jobs:
        tasks.put(job)
    slots = slots[:len(jobs)]
    threads = max(1, torch.get_num_threads() // len(slots))
    procs = [ctx.Process(target=_process_worker, args=(slot, threads, tensors, cell_fn, tasks, results), daemon=True)
             for slot in slots]
    for _ in procs:
        tasks.put(None)
    by_key = {job.key: job for job in jobs}
    failed: dict[str, str] = {}
    try:
        for p in procs:
            p.start()
        while by_key:
            try:
                key, cell, err = results.get(timeout=poll_s)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    codes = ", ".join(str(p.exitcode) for p in procs)
                    raise RcpuError(f"every worker process exited (exit codes {codes}) with cells {', '.join(by_key)} "
                                    "unfinished; finished cells are saved, run the same command again") from None
                continue
            job = by_key.pop(key)
            if err is not None:
                logger.error("cell %s failed:\n%s", key, err)
                failed[key] = err
            else:
                on_done(job, cell)
    finally:
        if by_key:  # interrupted: stop the work in flight, and do not wait to flush unread jobs
            tasks.cancel_join_thread()
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join(timeout=30)
    _raise_failures(failed, len(jobs))


def gpu_slots(gpus: Sequence[int] | None) -> list[str]:
    """The GPUs to use, as ``CUDA_VISIBLE_DEVICES`` values; RcpuError if CUDA is absent."""
    if not torch.cuda.is_available():
        raise RcpuError("--executor gpus needs CUDA, which is not available here; use --executor local or ray")
    count = torch.cuda.device_count()
    chosen = list(range(count)) if not gpus else list(gpus)
    bad = [g for g in chosen if not 0 <= g < count]
    if bad:
        raise RcpuError(f"--gpus {','.join(map(str, bad))}: only {count} CUDA device(s) visible (0..{count - 1})")
    if len(set(chosen)) != len(chosen):
        raise RcpuError(f"--gpus lists a GPU twice: {','.join(map(str, chosen))}")
    # CUDA_VISIBLE_DEVICES may already remap indices; keep the user's view of them
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(count)]
    return [names[g] for g in chosen]


# --- Ray ----------------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        raise RcpuError("--executor ray needs Ray, which is not installed: pip install 'rcpu[ray]'") from None
    return ray


def _ray_cell(cell_fn: CellFn, job: Any, windows: torch.Tensor | None, heldout: torch.Tensor | None,
              eval_ids: torch.Tensor) -> dict:
    """A Ray task: the tensors arrive as resolved object references."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))  # as many threads as CPUs reserved for the task
    tensors = {"eval": eval_ids}
    if windows is not None:
        tensors[job.windows] = windows
    if heldout is not None:
        tensors[job.heldout] = heldout
    cell = cell_fn(job, tensors)
    cell["worker"]["ray_node"] = ray.util.get_node_ip_address()
    if torch.device(job.device).type == "cuda":
        cell["worker"]["ray_gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
        torch.cuda.empty_cache()
    return cell


def run_ray(jobs: Sequence[Any], tensors: Mapping[str, torch.Tensor], cell_fn: CellFn, on_done: OnDone, *,
            address: str | None, num_cpus: float, num_gpus: float) -> None:
    """Submit every job as a Ray task and merge cells as they finish.

    Workers load the model from its source string themselves, so the model must be
    reachable from every node (a shared path, a hub id or a built-in name) and rcpu
    installed there. Joins a Ray session already initialised in this process, else calls
    ``ray.init(address)`` (``None``: ``$RAY_ADDRESS``, or a new local instance) and shuts
    it down again at the end.
    """
    if not jobs:
        return
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        # no address: RAY_ADDRESS if set, else a new local instance (never a stale cluster file)
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs = {"include_dashboard": False} if address == "local" else {}
        try:
            ray.init(address=address, logging_level=logging.WARNING, **kwargs)
        except ConnectionError as exc:
            cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
            raise RcpuError(f"cannot connect to the Ray cluster at {address}{cause}; check --ray_address (auto on a "
                            "cluster node) and, for clusters with token authentication, RAY_AUTH_MODE=token and "
                            "the cluster's token on this machine") from exc
    pending: dict = {}
    failed: dict[str, str] = {}
    try:
        have = ray.cluster_resources()
        for name, need in (("GPU", num_gpus), ("CPU", num_cpus)):
            if need and have.get(name, 0) < need:  # an autoscaling cluster may still add nodes: warn only
                logger.warning("each cell asks for %g %s, the Ray cluster has %g now; cells wait until a node "
                               "with enough joins", need, name, have.get(name, 0))
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_ray_cell)
        refs = {name: ray.put(t) for name, t in tensors.items()}
        for job in jobs:
            ref = task.remote(cell_fn, job, refs.get(job.windows), refs.get(job.heldout), refs["eval"])
            pending[ref] = job
        logger.info("submitted %d cells to Ray (%s CPUs, %s GPUs each)", len(jobs), num_cpus, num_gpus)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    cell = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    logger.error("cell %s failed:\n%s", job.key, exc)
                    failed[job.key] = str(exc)
                    continue
                on_done(job, cell)
    finally:
        for ref in pending:  # interrupted: do not leave work running on the cluster
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    _raise_failures(failed, len(jobs))


def make(name: str, device: torch.device, *, gpus: Sequence[int] | None = None, ray_address: str | None = None,
         ray_num_cpus: float = 1) -> Execute | None:
    """Check the executor can run here (before any model is loaded) and return it; None
    for ``local``, which the caller runs with its loaded model."""
    if name == "local":
        if gpus or ray_address:
            raise RcpuError("--gpus and --ray_address need --executor gpus or ray")
        return None
    if name == "gpus":
        if device.type != "cuda" and torch.cuda.is_available():
            raise RcpuError(f"--executor gpus runs every cell on a GPU; drop --device {device} or use --executor local")
        slots = gpu_slots(gpus)
        if device.index is not None:
            raise RcpuError("--executor gpus chooses the GPUs itself; use --gpus 0,1 rather than --device cuda:N")
        logger.info("one worker process per GPU: %s", ", ".join(slots))
        return lambda jobs, tensors, cell_fn, on_done: run_processes(jobs, tensors, cell_fn, on_done, slots)
    if name == "ray":
        import_ray()
        if gpus:
            raise RcpuError("--gpus is for --executor gpus; Ray gives each task one GPU of its own")
        if ray_num_cpus <= 0:
            raise RcpuError(f"--ray_num_cpus must be positive, got {ray_num_cpus}")
        num_gpus = 1 if device.type == "cuda" else 0
        return lambda jobs, tensors, cell_fn, on_done: run_ray(jobs, tensors, cell_fn, on_done, address=ray_address,
                                                               num_cpus=ray_num_cpus, num_gpus=num_gpus)
    raise RcpuError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
