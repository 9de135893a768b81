"""Side-by-side comparison of pruning methods under one protocol.

Every cell (method x ratio x calibration size) starts from the same dense weights, is
calibrated on the same windows (the first ``n`` of one seeded draw, so smaller
calibration sets are prefixes of larger ones) and evaluated on the same tokens.
Finished cells are stored in ``results.json`` after each one, so an interrupted run
resumes where it stopped. Cells run one after another here by default, or in parallel
(one per GPU, or as Ray tasks across machines; see :mod:`rcpu.executors`); either way
only this process writes ``results.json``. Outputs: ``results.json``, ``results.md`` (tables, dense
row included) and ``ppl.png`` (perplexity against ratio, one line per method; against nsamples for a
calibration-size curve at one ratio).

A method is a preset name, optionally with overrides of :class:`PruneConfig` fields:
``rcpu+compensate_attn=false``, ``ridge+ridge_lambda=0.1``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from . import data, executors
from .api import check_saveable, prune
from .config import PRESETS, PruneConfig, field_from_text
from .errors import RcpuError
from .evaluate import perplexity
from .report import count_params, versions

logger = logging.getLogger(__name__)

RESULTS = "results.json"


def parse_method(spec: str) -> dict:
    """``preset+field=value+...`` -> PruneConfig keyword arguments."""
    name, *overrides = spec.split("+")
    if name not in PRESETS:
        raise RcpuError(f"unknown method {name!r} in {spec!r}; choose from {', '.join(PRESETS)}")
    kwargs: dict = {"method": name}
    config_fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in config_fields or key in ("method", "pruning_ratio", "nsamples", "seqlen", "seed"):
            raise RcpuError(f"bad override {item!r} in {spec!r}; use field=value with a PruneConfig field")
        kwargs[key] = field_from_text(config_fields[key], value, f"{key} in {spec!r}")
    return kwargs


def split_methods(text: str) -> list[str]:
    """``rcpu compare --methods``: comma-separated specs, where the items of a tuple override
    (``ridge-auto+ridge_grid=0.1,1,10,rcpu``) stay with the spec they belong to."""
    tuple_fields = {f.name for f in dataclasses.fields(PruneConfig) if isinstance(f.default, tuple)}
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        last_key = specs[-1].rsplit("+", 1)[-1].partition("=")[0] if specs else None
        if last_key in tuple_fields and piece.split("+")[0] not in PRESETS:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def cell_key(method: str, ratio: float, nsamples: int) -> str:
    return f"{method}@{ratio:g}/n{nsamples}"


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _ppls(model, eval_ids, eval_seqlens, max_eval_tokens, device, label, progress, bos=None) -> dict:
    out = {}
    for seqlen in eval_seqlens:
        res = perplexity(model, eval_ids, seqlen, max_tokens=max_eval_tokens, device=device, source=label,
                         progress=progress, bos=bos)
        logger.info("%s", res.format())
        out[str(seqlen)] = res.to_dict()
    return out


@dataclasses.dataclass(frozen=True)
class CellJob:
    """One cell as plain, picklable data, so any executor (this process, a GPU worker
    process, a Ray task on another machine) can compute it from the model source alone.
    Token tensors are named (``windows``, ``heldout``, ``eval``) rather than embedded so
    an executor ships each of them once, not once per cell."""

    key: str
    method: str
    config: dict | None  # PruneConfig keyword arguments; None for the dense model
    model_source: str
    dtype: str
    device: str
    eval_seqlens: tuple[int, ...]
    max_eval_tokens: int | None
    eval_label: str
    windows: str | None = None
    heldout: str | None = None
    progress: bool = False
    bos: int | None = None  # the tokenizer's BOS, first in every evaluation window (None: no BOS)


def worker_info(device: torch.device) -> dict:
    """Where a cell ran, recorded with it: results from several machines stay traceable."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(device),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return info


def run_cell(job: CellJob, tensors: Mapping[str, torch.Tensor], model: torch.nn.Module | None = None) -> dict:
    """Prune (unless dense) and evaluate one cell -> the JSON-serialisable dict stored in
    results.json. ``model`` is a private dense copy to prune in place; without it the
    model is loaded from ``job.model_source``, as a worker on another machine must."""
    logger.info("== %s", job.key)
    device = torch.device(job.device)
    if model is None:
        from .loading import load_model

        model = load_model(job.model_source, dtype=getattr(torch, job.dtype), device="cpu").model
    eval_ids = tensors["eval"]
    if job.config is None:
        model.to(device)
        cell = {"method": "dense", "ppl": _ppls(model, eval_ids, job.eval_seqlens, job.max_eval_tokens, device,
                                                job.eval_label, job.progress, job.bos)}
    else:
        cfg = PruneConfig(**job.config)
        model, report = prune(model, cfg, windows=tensors[job.windows],
                              heldout_windows=tensors[job.heldout] if job.heldout else None, device=device,
                              progress=job.progress)
        model.to(device)
        ppl = _ppls(model, eval_ids, job.eval_seqlens, job.max_eval_tokens, device, job.eval_label, job.progress,
                    job.bos)
        chosen = sorted({f"{layer[part]['lambda']:g}" for layer in report.layers for part in ("attn", "mlp")
                         if "lambda" in layer[part]})
        cell = {
            "method": job.method, "ratio": cfg.pruning_ratio, "nsamples": cfg.nsamples, "config": report.config,
            "ppl": ppl, "params": report.params, "prune_s": report.timings["prune_s"], "memory": report.memory,
            "warnings": report.warnings, "notes": report.plan.get("notes", []), "ridge_lambdas": chosen or None,
        }
    cell["worker"] = worker_info(device)
    return cell


def run_compare(model_source: str, methods: list[str], ratios: list[float], output: str | os.PathLike, *,
                calib: str = "builtin", eval_source: str = "builtin", nsamples: list[int] = (128,),
                seqlen: int = 128, seed: int = 0, eval_seqlens: list[int] = (128,),
                max_eval_tokens: int | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = 8, progress: bool = True,
                executor: str = "local", gpus: list[int] | None = None, ray_address: str | None = None,
                ray_num_cpus: float = 1) -> dict:
    """Prune and evaluate every method x ratio x nsamples cell; returns the results dict.

    ``executor`` says where cells run: ``local`` (one after another in this process),
    ``gpus`` (one worker process per GPU, ``gpus`` picks them) or ``ray`` (tasks on the
    Ray cluster at ``ray_address``, or a local instance; ``ray_num_cpus`` per task). Only
    this process writes results.json, after every finished cell. ``gpus`` spawns its
    workers, so a script that calls this needs the usual ``if __name__ == "__main__":``.
    """
    from .loading import load_model

    specs = _checked_specs(model_source, methods, ratios)
    device = torch.device(device)
    execute = executors.make(executor, device, gpus=gpus, ray_address=ray_address, ray_num_cpus=ray_num_cpus)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    protocol = {"model": model_source, "calib": calib, "eval": eval_source, "seqlen": seqlen, "seed": seed,
                "eval_seqlens": list(eval_seqlens), "max_eval_tokens": max_eval_tokens,
                "dtype": str(dtype).replace("torch.", "")}
    results = _open_results(path, protocol)

    loaded = load_model(model_source, dtype=dtype, device="cpu")
    dense, tok = loaded.model, loaded.tokenizer
    for kwargs in specs.values():  # uniform widths this architecture cannot save fail now, not cells later
        for ratio in ratios:
            cfg = PruneConfig(**kwargs, pruning_ratio=ratio)
            if cfg.resolve().allocation == "uniform":
                check_saveable(dense, cfg)
    calib_ids = data.tokenize(tok, data.load_text(calib, "calib"))
    eval_ids = data.tokenize(tok, data.load_text(eval_source, "eval"))
    bos = data.bos_token_id(tok)
    all_windows = data.calibration_windows(calib_ids, max(nsamples), seqlen, seed, bos)
    cuda_name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
    results["protocol_details"] = {
        "calib": data.describe_source(calib, "calib"), "eval": data.describe_source(eval_source, "eval"),
        "calib_tokens": int(calib_ids.numel()), "eval_tokens": int(eval_ids.numel()),
        "windows_sha256": data.token_hash(all_windows), "params_dense": count_params(dense), "versions": versions(),
        "device": str(device) + (f" ({cuda_name})" if cuda_name else ""), "executor": executor,
        "bos": bos,  # first in every calibration and evaluation window (None: no BOS)
    }

    local = executor == "local"
    job_device = str(device) if local or device.type != "cuda" else "cuda"  # workers see their own GPU as cuda
    source_path = Path(os.path.expanduser(model_source))
    job_source = model_source if local or not source_path.exists() else str(source_path.resolve())  # workers' cwd differs
    common = dict(model_source=job_source, dtype=protocol["dtype"], device=job_device,
                  eval_seqlens=tuple(eval_seqlens), max_eval_tokens=max_eval_tokens,
                  eval_label=f"{eval_source}:eval", progress=progress and local, bos=bos)
    jobs, tensors = _jobs(specs, ratios, nsamples, all_windows, calib_ids, eval_ids,
                          dict(batch_size=batch_size, seqlen=seqlen, seed=seed, bos=bos), common)
    for job in jobs:
        if job.key in results["cells"]:
            logger.info("%s: done earlier, skipped", job.key)
    todo = [job for job in jobs if job.key not in results["cells"]]
    order = {job.key: i for i, job in enumerate(jobs)}
    earlier = dict(results["cells"])
    finished: dict[str, dict] = {}

    def on_done(job: CellJob, cell: dict) -> None:
        """Merge a finished cell and replace results.json: keep the cells of earlier runs
        first and this run's in table order, whatever order the workers finish in."""
        cell["worker"]["executor"] = executor
        finished[job.key] = cell
        results["cells"] = {**earlier, **{k: finished[k] for k in sorted(finished, key=order.__getitem__)}}
        _atomic_json(path, results)

    t_all = time.perf_counter()
    if todo:
        logger.info("%d cells to run (%d done earlier), executor %s", len(todo), len(jobs) - len(todo), executor)
    if local:
        executors.run_local(todo, tensors, run_cell, on_done, dense)
    else:
        del dense, loaded  # workers load their own copy
        execute(todo, tensors, run_cell, on_done)
    results["cells_this_run"] = [job.key for job in todo]
    results["wall_s_this_run"] = round(time.perf_counter() - t_all, 1)
    _atomic_json(path, results)
    return _write_outputs(results, out)


def _checked_specs(model_source: str, methods: list[str], ratios: list[float]) -> dict[str, dict]:
    """method spec -> PruneConfig keyword arguments, every combination validated before any
    model loads (an architecture rcpu cannot prune fails too, from its config)."""
    from .loading import check_supported_architecture

    check_supported_architecture(model_source)
    specs = {m: parse_method(m) for m in methods}
    for ratio in ratios:
        if not 0 <= ratio < 1:
            raise RcpuError(f"pruning ratios must be in [0, 1), got {ratio}")
    for kwargs in specs.values():  # fail fast on bad combinations
        PruneConfig(**kwargs, pruning_ratio=ratios[0]).validate()
    return specs


def _open_results(path: Path, protocol: dict) -> dict:
    """The results of earlier runs at ``path`` (refused if made with another protocol), or a new record."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if results and results.get("protocol") != protocol:
        raise RcpuError(f"{path} was made with another protocol {results.get('protocol')}; "
                        "use another --output or delete it")
    results.setdefault("protocol", protocol)
    results.setdefault("cells", {})
    return results


def _jobs(specs: dict[str, dict], ratios: list[float], nsamples: list[int], all_windows: torch.Tensor,
          calib_ids: torch.Tensor, eval_ids: torch.Tensor, run: dict, common: dict
          ) -> tuple[list[CellJob], dict[str, torch.Tensor]]:
    """The jobs, in table order, and the tensors they name (built once, here). ``run``: the
    run's batch_size, seqlen, seed and BOS (None: windows without one)."""
    tensors: dict[str, torch.Tensor] = {"eval": eval_ids}
    jobs = [CellJob(key="dense", method="dense", config=None, **common)]
    for n in nsamples:
        tensors[f"windows/n{n}"] = all_windows[:n].clone()
        for method, kwargs in specs.items():
            for ratio in ratios:
                # a method's own batch_size (``+batch_size=2``) overrides the run's: with layer
                # refinement it sets the optimiser steps per epoch
                cfg = PruneConfig(**{"batch_size": run["batch_size"], **kwargs}, pruning_ratio=ratio, nsamples=n,
                                  seqlen=run["seqlen"], seed=run["seed"])
                heldout = None
                if cfg.needs_heldout:
                    heldout = f"heldout/{cfg.nholdout}"
                    if heldout not in tensors:
                        tensors[heldout] = data.heldout_windows(calib_ids, cfg.nholdout, max(nsamples),
                                                                run["seqlen"], run["seed"], run["bos"])
                jobs.append(CellJob(key=cell_key(method, ratio, n), method=method,
                                    config=dataclasses.asdict(cfg), windows=f"windows/n{n}", heldout=heldout,
                                    **common))
    return jobs, tensors


def _write_outputs(results: dict, out: Path) -> dict:
    """results.md and the plot beside results.json; returns ``results``."""
    write_table(results, out / "results.md")
    try:
        plot(results, out / "ppl.png")
        results["plot"] = str(out / "ppl.png")
    except ImportError:
        logger.warning("matplotlib is not installed; no plot (pip install 'rcpu[eval]')")
        results["plot"] = None  # not saved in results.json: it says what this run wrote
    return results


def _fmt(x: float) -> str:
    return f"{x:.2f}" if x < 1000 else f"{x:.3g}"


def write_table(results: dict, path: Path) -> str:
    """Markdown: one perplexity table per eval window length, then ratios and timings."""
    cells = results["cells"]
    proto = results["protocol"]
    rows = [c for k, c in cells.items() if k != "dense"]
    ratios = sorted({c["ratio"] for c in rows})
    methods = list(dict.fromkeys(c["method"] for c in rows))
    labels = sorted(dict.fromkeys((c["method"], c["nsamples"]) for c in rows),
                    key=lambda mn: (mn[1], methods.index(mn[0])))
    multi_n = len({n for _, n in labels}) > 1
    lines = [f"Model `{proto['model']}`, calibration `{proto['calib']}` ({proto['seqlen']}-token windows, "
             f"seed {proto['seed']}), evaluation `{proto['eval']}`"
             + (f" (first {proto['max_eval_tokens']:,} tokens)" if proto.get("max_eval_tokens") else "")
             + f", {proto['dtype']}.", ""]
    for seqlen in proto["eval_seqlens"]:
        s = str(seqlen)
        lines += [f"Perplexity, {seqlen}-token windows:", "",
                  "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        if "dense" in cells:
            d = _fmt(cells["dense"]["ppl"][s]["ppl"])
            lines.append("| dense | " + " | ".join(d for _ in ratios) + " |")
        for method, n in labels:
            vals = []
            for r in ratios:
                c = cells.get(cell_key(method, r, n))
                vals.append(_fmt(c["ppl"][s]["ppl"]) if c else "—")
            lines.append(f"| {method}{f' (n={n})' if multi_n else ''} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["Achieved parameter reduction (attention+MLP / whole model), pruning time, peak memory growth:", "",
              "| method | ratio | attn+MLP | whole | prune s | peak MiB | ridge λ chosen |", "|---|---|---|---|---|---|---|"]
    for c in sorted(rows, key=lambda c: (c["nsamples"], methods.index(c["method"]), c["ratio"])):
        mem = c["memory"].get("peak_cuda_growth_mib", c["memory"].get("peak_rss_growth_mib"))
        lam = ", ".join(c["ridge_lambdas"]) if c.get("ridge_lambdas") else ""
        n_label = f" (n={c['nsamples']})" if multi_n else ""
        lines.append(f"| {c['method']}{n_label} | {c['ratio']:.0%} | "
                     f"{c['params']['ratio_attn_mlp']:.1%} | {c['params']['ratio_total']:.1%} | {c['prune_s']:.0f} | "
                     f"{mem:,.0f} | {lam} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    seqlen = str(results["protocol"]["eval_seqlens"][0])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    pruned = [c for k, c in cells.items() if k != "dense"]
    multi_n = len({c["nsamples"] for c in pruned}) > 1
    # a calibration-size curve (several sizes, one ratio) is perplexity against nsamples, one line per method
    size_curve = multi_n and len({c["ratio"] for c in pruned}) == 1
    groups: dict = {}
    for c in pruned:
        if size_curve:
            groups.setdefault((c["method"], None), []).append((c["nsamples"], c["ppl"][seqlen]["ppl"]))
        else:
            groups.setdefault((c["method"], c["nsamples"]), []).append((c["ratio"], c["ppl"][seqlen]["ppl"]))
    for i, ((method, n), pts) in enumerate(groups.items()):
        pts.sort()
        label = method + (f" n={n}" if multi_n and not size_curve else "")
        cycle = (i // 10) % 4  # the colour cycle has 10 colours: past them, another line style and marker
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^"[cycle], linestyle=("-", "--", "-.", ":")[cycle],
                label=label)
    if "dense" in cells:
        ax.axhline(cells["dense"]["ppl"][seqlen]["ppl"], color="k", linestyle="--", linewidth=1, label="dense")
    if size_curve:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"calibration windows (nsamples), pruning ratio {pruned[0]['ratio']:g}")
    else:
        ax.set_xlabel("pruning ratio")
    ax.set_ylabel(f"perplexity ({seqlen}-token windows)")
    ax.set_yscale("log")
    ax.set_title(results["protocol"]["model"])
    ax.grid(alpha=0.3)
    # beside the axes, not on them: a grid of many methods would otherwise hide its own points
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
