"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (a thin bridge).

The in-memory model (pruned or not) is wrapped in ``lm_eval``'s ``HFLM`` and scored
by ``lm_eval.simple_evaluate``; nothing about prompting or scoring is re-implemented
here, so numbers are the harness's own and comparable with published tables that
used the same harness version.

Which metric is reported per task follows the FLAP paper (An et al., 2024), which
copies the LLM-Pruner convention that structured-pruning papers compare against:

* ``acc``      for boolq, piqa, winogrande;
* ``acc_norm`` for hellaswag, arc_easy, arc_challenge, openbookqa.

(FLAP's dense LLaMA-7B row -- ARC-e 72.89, ARC-c 44.71, HellaSwag 76.20, OBQA 44.40,
PIQA 79.16 -- matches the harness's ``acc_norm`` for the first four and ``acc`` for
PIQA.) Wanda reports plain ``acc`` for every task; pass ``metrics={...}`` to
:func:`zero_shot` to follow that convention instead. Every scalar metric the harness
computed is kept in the result as well, so both conventions can be read off one run.

lm-eval 0.4.13 indexes all ~14k built-in task YAMLs whenever a ``TaskManager`` is
created (15-30 s), so managers are cached per ``include_path`` (the cache notices
YAML files added, removed or edited under that path).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ..errors import RcpuError

logger = logging.getLogger(__name__)

__all__ = ["PAPER_METRICS", "PAPER_TASKS", "ZeroShotResult", "select_metric", "zero_shot"]

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

# The metric the FLAP / LLM-Pruner tables report for each paper task (see the module docstring).
PAPER_METRICS: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}

_INSTALL_HINT = "zero-shot evaluation needs lm-eval: pip install 'rcpu[eval]'"
# Keys of a task's results entry that are not metrics.
_NON_METRIC_KEYS = {"alias", "name", "sample_len", " ", ""}
# Packages whose exceptions mean "the dataset could not be fetched or read".
_DATASET_ERROR_PACKAGES = {"datasets", "huggingface_hub", "requests", "urllib3", "httpx", "fsspec", "pyarrow", "aiohttp"}
# ... and of those, the ones that mean "the hub could not be reached".
_NETWORK_ERROR_PACKAGES = {"huggingface_hub", "requests", "urllib3", "httpx", "aiohttp"}
_TASK_MANAGER_CACHE_SIZE = 2


@dataclass(frozen=True)
class ZeroShotResult:
    """Outcome of :func:`zero_shot`.

    ``tasks`` maps each evaluated lm-eval task to ``{"metric", "value", "stderr", "n",
    "metrics"}``: the reported metric's name, value (a fraction in [0, 1] for accuracies)
    and standard error (``None`` when the harness gives none), the number of documents
    scored, and every scalar metric the harness computed (e.g. both ``acc`` and
    ``acc_norm``).
    """

    tasks: dict[str, dict]
    mean: float  # mean of the reported metric over the tasks
    harness_version: str
    num_fewshot: int
    limit: int | None

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A small table: one row per task (metric, value, stderr, docs) and the mean."""
        width = max([len("task"), len("mean"), *(len(t) for t in self.tasks)])
        mwidth = max([len("metric"), *(len(r["metric"]) for r in self.tasks.values())])
        limit = "all docs" if self.limit is None else f"limit {self.limit}"
        lines = [
            f"lm-eval {self.harness_version}, {self.num_fewshot}-shot, {limit}",
            f"{'task':<{width}}  {'metric':<{mwidth}}  {'value':>7}  {'stderr':>7}  {'n':>6}",
        ]
        for task, row in self.tasks.items():
            stderr = "" if row["stderr"] is None else f"{row['stderr']:.4f}"
            n = "" if row["n"] is None else f"{row['n']}"
            lines.append(
                f"{task:<{width}}  {row['metric']:<{mwidth}}  {row['value']:>7.4f}  {stderr:>7}  {n:>6}"
            )
        lines.append(f"{'mean':<{width}}  {'':<{mwidth}}  {self.mean:>7.4f}")
        return "\n".join(lines)


def select_metric(task: str, available: Iterable[str] = ("acc", "acc_norm"),
                  metrics: Mapping[str, str] | None = None) -> str:
    """The metric to report for ``task``, given the metric names the harness computed.

    Order of preference: ``metrics[task]`` (the caller's override), the paper's choice
    for the known paper tasks (:data:`PAPER_METRICS`), then ``acc_norm``, then ``acc``.

    Raises:
        RcpuError: the override is not among ``available``, or the task has neither
            ``acc_norm`` nor ``acc`` and no override names its metric.
    """
    available = list(available)
    if metrics and task in metrics:
        wanted = metrics[task]
        if wanted not in available:
            raise RcpuError(
                f"zero-shot: task {task!r} has no metric {wanted!r} (it reports: {', '.join(available) or 'none'}); "
                "fix the metrics override"
            )
        return wanted
    paper = PAPER_METRICS.get(task)
    if paper is not None and paper in available:
        return paper
    for candidate in ("acc_norm", "acc"):
        if candidate in available:
            return candidate
    raise RcpuError(
        f"zero-shot: task {task!r} reports neither acc_norm nor acc (it reports: {', '.join(available) or 'none'}); "
        f"pass metrics={{{task!r}: '<metric>'}} to choose one"
    )


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        detail = "" if getattr(err, "name", None) == "lm_eval" else f" (import failed: {err})"
        raise RcpuError(_INSTALL_HINT + detail) from err
    return lm_eval, HFLM, TaskManager


def _harness_version(lm_eval) -> str:
    version = getattr(lm_eval, "__version__", None)
    if not version:
        try:
            version = metadata.version("lm_eval")
        except metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def _include_signature(include_path: str | None) -> tuple:
    """Cache key for a TaskManager: the include path and the state of its YAML files."""
    if include_path is None:
        return (None,)
    root = Path(include_path).expanduser().resolve()
    if not root.exists():
        raise RcpuError(f"zero-shot: include_path {include_path} does not exist; point it at a folder of task YAMLs")
    if not root.is_dir():
        raise RcpuError(
            f"zero-shot: include_path {include_path} is not a folder; pass a folder of task YAMLs "
            "(a single YAML file can be given as a task name instead)"
        )
    files = sorted(root.rglob("*.yaml"))
    state = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        state.append((str(f), st.st_mtime_ns, st.st_size))
    return (str(root), tuple(state))


_task_managers: dict[tuple, object] = {}


def _task_manager(TaskManager, include_path: str | None):
    key = _include_signature(include_path)
    manager = _task_managers.get(key)
    if manager is None:
        logger.info("zero-shot: indexing lm-eval tasks%s", f" (+ {include_path})" if include_path else "")
        manager = TaskManager(include_path=include_path)
        while len(_task_managers) >= _TASK_MANAGER_CACHE_SIZE:
            _task_managers.pop(next(iter(_task_managers)))
        _task_managers[key] = manager
    return manager


def _save_rng() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_rng(state: tuple) -> None:
    py, np_state, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _task_names(tasks: Sequence[str] | str) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names: list[str] = []
    for name in tasks:
        if not isinstance(name, str):
            raise RcpuError(f"zero-shot: task names must be strings, got {type(name).__name__}")
        name = name.strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise RcpuError("zero-shot: no tasks given; name at least one lm-eval task, e.g. " + ",".join(PAPER_TASKS))
    return names


def _check_known(name: str, manager) -> None:
    if name in manager.all_tasks:
        return
    if name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file():
        return  # lm-eval also accepts a path to a task YAML
    close = difflib.get_close_matches(name, manager.all_tasks, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise RcpuError(
        f"zero-shot: unknown lm-eval task {name!r}{hint}; list tasks with `lm-eval ls tasks`, "
        "or pass include_path= a folder holding its YAML"
    )


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _is_dataset_error(err: BaseException) -> bool:
    """True if ``err`` (or what caused it) comes from fetching or reading a dataset."""
    try:
        import datasets

        datasets_dir = os.path.dirname(datasets.__file__) + os.sep
    except ImportError:
        datasets_dir = None
    for e in _chain(err):
        if isinstance(e, OSError):  # ConnectionError, FileNotFoundError, hub "not found" errors, ...
            return True
        if type(e).__module__.split(".")[0] in _DATASET_ERROR_PACKAGES:
            return True
        tb = e.__traceback__
        while datasets_dir and tb is not None:  # raised from inside `datasets`
            if tb.tb_frame.f_code.co_filename.startswith(datasets_dir):
                return True
            tb = tb.tb_next
    return False


def _is_network_error(err: BaseException) -> bool:
    """True if fetching from the hub (not reading a local file) is what failed."""
    for e in _chain(err):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if type(e).__module__.split(".")[0] in _NETWORK_ERROR_PACKAGES:
            return True
        if "on the Hub" in str(e) or "huggingface.co" in str(e):
            return True
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _load_tasks(manager, names: list[str]) -> list:
    """Build the lm-eval Task objects (this is where datasets are downloaded)."""
    for name in names:  # all names first, so a typo does not cost the earlier downloads
        _check_known(name, manager)
    loaded: dict[str, object] = {}
    for name in names:
        try:
            built = manager.load([name])
        except Exception as err:
            if _is_dataset_error(err):
                hint = (
                    "is the Hugging Face hub reachable? Datasets are cached after one online run "
                    "(HF_DATASETS_OFFLINE=1 then reads the cache)"
                    if _is_network_error(err)
                    else "check the task's dataset_path / data files"
                )
                raise RcpuError(
                    f"zero-shot: could not load the dataset for task {name!r} ({_first_line(err)}); {hint}"
                ) from err
            raise RcpuError(f"zero-shot: could not build lm-eval task {name!r} ({_first_line(err)})") from err
        for task_name, task in built["tasks"].items():
            loaded.setdefault(task_name, task)
    return list(loaded.values())


def _parse_metrics(entry: Mapping) -> dict[str, tuple[float, float | None]]:
    """``{"acc,none": .5, "acc_stderr,none": .1}`` -> ``{"acc": (.5, .1)}``.

    Metrics under lm-eval's default ``none`` filter are keyed by their bare name; those
    under other filters by ``"metric,filter"`` (and by the bare name too when no
    ``none``-filtered value exists).
    """
    values: dict[tuple[str, str], float] = {}
    stderrs: dict[tuple[str, str], float | None] = {}
    for key, value in entry.items():
        if not isinstance(key, str) or key in _NON_METRIC_KEYS:
            continue
        metric, _, filt = key.partition(",")
        filt = filt or "none"
        if metric.endswith("_stderr"):
            try:
                stderr = float(value)
            except (TypeError, ValueError):
                stderr = None  # the harness writes "N/A" when it has none
            stderrs[(metric.removesuffix("_stderr"), filt)] = stderr
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[(metric, filt)] = float(value)

    out: dict[str, tuple[float, float | None]] = {}
    for (metric, filt), value in values.items():
        if filt == "none":
            out[metric] = (value, stderrs.get((metric, filt)))
    for (metric, filt), value in values.items():
        if filt != "none":
            out[f"{metric},{filt}"] = (value, stderrs.get((metric, filt)))
            out.setdefault(metric, out[f"{metric},{filt}"])
    return out


def _check_batch_size(batch_size: int | str) -> int | str:
    """A positive int, ``"auto"`` or ``"auto:N"``; a digit string becomes an int, as on the command line."""
    if isinstance(batch_size, str):
        text = batch_size.strip()
        if text.isdigit():
            batch_size = int(text)
        elif not (text == "auto" or (text.startswith("auto:") and text[5:].replace(".", "", 1).isdigit())):
            raise RcpuError(f"zero-shot: batch_size must be a positive integer, 'auto' or 'auto:N', got {batch_size!r}")
        else:
            batch_size = text
    if isinstance(batch_size, bool) or (isinstance(batch_size, int) and batch_size < 1):
        raise RcpuError(f"zero-shot: batch_size must be at least 1, got {batch_size!r}")
    return batch_size


def _check_counts(limit: int | None, num_fewshot: int) -> None:
    """Reject a bad ``limit`` or ``num_fewshot`` before lm-eval is imported and tasks are indexed."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RcpuError(f"zero-shot: limit must be a positive integer or None, got {limit!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise RcpuError(f"zero-shot: num_fewshot must be a non-negative integer, got {num_fewshot!r}")


def _run_harness(
    lm_eval,
    HFLM,
    model,
    tokenizer,
    task_objects: list,
    manager,
    *,
    batch_size: int | str,
    device,
    limit: int | None,
    num_fewshot: int,
    version: str,
) -> dict:
    """``lm_eval.simple_evaluate`` on the in-memory model; its raw output.

    The model's training flag and the global random generators (which ``simple_evaluate``
    reseeds) are restored afterwards, so scoring leaves no trace on the caller's state.
    """
    was_training = model.training
    rng_state = _save_rng()  # simple_evaluate reseeds the global Python / NumPy / torch generators
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if device is not None:
            # HFLM ignores `device` for a pre-built model and sends inputs to model.device.
            lm._device = torch.device(device)
        logger.info(
            "zero-shot: %s (%d-shot%s) with lm-eval %s",
            ", ".join(t.task_name for t in task_objects),
            num_fewshot,
            "" if limit is None else f", limit {limit}",
            version,
        )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_objects,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    finally:
        model.train(was_training)
        _restore_rng(rng_state)
    if out is None:  # only happens on non-zero ranks of a distributed run
        raise RcpuError("zero-shot: lm-eval returned no results (non-zero rank?); run it in a single process")
    return out


def _result_rows(out: Mapping, task_objects: list, metrics: Mapping[str, str] | None,
                 num_fewshot: int) -> dict[str, dict]:
    """One :class:`ZeroShotResult` row per evaluated task, from the harness's output.

    Warns where a task's config pinned another shot count, and where a metrics override
    names a task that was not evaluated, since either would silently change what is reported.
    """
    results = out.get("results", {})
    n_samples = out.get("n-samples", {})
    rows: dict[str, dict] = {}
    for task in task_objects:
        name = task.task_name
        parsed = _parse_metrics(results.get(name, {}))
        metric = select_metric(name, parsed, metrics)
        value, stderr = parsed[metric]
        n = n_samples.get(name, {}).get("effective")
        rows[name] = {
            "metric": metric,
            "value": value,
            "stderr": stderr,
            "n": int(n) if n is not None else None,
            "metrics": {m: v for m, (v, _) in parsed.items()},
        }
        shots = out.get("n-shot", {}).get(name)
        if shots is not None and shots != num_fewshot:
            logger.warning("zero-shot: task %s ran %s-shot (its config pins it), not %d-shot", name, shots, num_fewshot)
    for name in (metrics or {}):
        if name not in rows:
            logger.warning("zero-shot: metrics override for %r ignored; that task was not evaluated", name)
    return rows


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] | str,
    *,
    batch_size: int | str = 8,
    device=None,
    limit: int | None = None,
    num_fewshot: int = 0,
    include_path: str | None = None,
    metrics: dict[str, str] | None = None,
) -> ZeroShotResult:
    """Zero-shot (or few-shot) accuracy of an in-memory HF causal LM via lm-evaluation-harness.

    Args:
        model: a ``transformers`` causal LM; it is scored where it lives (put in eval mode
            for the run, its training flag restored afterwards).
        tokenizer: the model's tokenizer (lm-eval sets a pad token on it if it has none).
        tasks: lm-eval task names (or tags/groups, scored per leaf task), as a sequence or
            a comma-separated string, e.g. :data:`PAPER_TASKS`.
        batch_size: requests per forward pass, or ``"auto"`` / ``"auto:N"``.
        device: where inputs go; defaults to the model's device. The model is not moved.
        limit: score only the first ``limit`` documents of each task (for quick checks;
            numbers are then not comparable with papers).
        num_fewshot: in-context examples per prompt (the papers use 0).
        include_path: a folder of extra task YAMLs (e.g. tasks on local data files); a single
            task YAML can also be named directly in ``tasks`` by its path.
        metrics: ``{task: metric}`` overrides of :func:`select_metric`'s choice.

    Raises:
        RcpuError: lm-eval missing, bad arguments, an unknown task, a dataset that cannot
            be downloaded, or a metric override the task does not report.
    """
    batch_size = _check_batch_size(batch_size)
    _check_counts(limit, num_fewshot)
    names = _task_names(tasks)

    lm_eval, HFLM, TaskManager = _import_lm_eval()
    version = _harness_version(lm_eval)
    manager = _task_manager(TaskManager, os.fspath(include_path) if include_path is not None else None)
    task_objects = _load_tasks(manager, names)

    out = _run_harness(
        lm_eval, HFLM, model, tokenizer, task_objects, manager,
        batch_size=batch_size, device=device, limit=limit, num_fewshot=num_fewshot, version=version,
    )
    rows = _result_rows(out, task_objects, metrics, num_fewshot)

    values = [row["value"] for row in rows.values()]
    mean = math.fsum(values) / len(values) if values else math.nan
    return ZeroShotResult(
        tasks=rows,
        mean=mean,
        harness_version=version,
        num_fewshot=num_fewshot,
        limit=limit,
    )
