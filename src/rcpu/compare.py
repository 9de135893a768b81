"""Side-by-side comparison of pruning methods under one protocol.

Every cell (method x ratio x calibration size) starts from the same dense weights, is
calibrated on the same windows (the first ``n`` of one seeded draw, so smaller
calibration sets are prefixes of larger ones) and evaluated on the same tokens.
Finished cells are stored in ``results.json`` after each one, so an interrupted run
resumes where it stopped. Outputs: ``results.json``, ``results.md`` (tables, dense
row included) and ``ppl.png`` (perplexity against ratio, one line per method; against nsamples for a
calibration-size curve at one ratio).

A method is a preset name, optionally with overrides of :class:`PruneConfig` fields:
``rcpu+compensate_attn=false``, ``ridge+ridge_lambda=0.1``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

from . import data
from .api import prune
from .config import PRESETS, PruneConfig
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
    types = {f.name: f.type for f in dataclasses.fields(PruneConfig)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in types or key in ("method", "pruning_ratio", "nsamples", "seqlen", "seed"):
            raise RcpuError(f"bad override {item!r} in {spec!r}; use field=value with a PruneConfig field")
        if value.lower() in ("true", "false"):
            kwargs[key] = value.lower() == "true"
        else:
            try:
                kwargs[key] = float(value) if "." in value or "e" in value.lower() else int(value)
            except ValueError:
                kwargs[key] = value
    return kwargs


def cell_key(method: str, ratio: float, nsamples: int) -> str:
    return f"{method}@{ratio:g}/n{nsamples}"


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _ppls(model, eval_ids, eval_seqlens, max_eval_tokens, device, label, progress) -> dict:
    out = {}
    for seqlen in eval_seqlens:
        res = perplexity(model, eval_ids, seqlen, max_tokens=max_eval_tokens, device=device, source=label,
                         progress=progress)
        logger.info("%s", res.format())
        out[str(seqlen)] = res.to_dict()
    return out


def run_compare(model_source: str, methods: list[str], ratios: list[float], output: str | os.PathLike, *,
                calib: str = "builtin", eval_source: str = "builtin", nsamples: list[int] = (128,),
                seqlen: int = 128, seed: int = 0, eval_seqlens: list[int] = (128,),
                max_eval_tokens: int | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = 8, progress: bool = True) -> dict:
    """Prune and evaluate every method x ratio x nsamples cell; returns the results dict."""
    from .loading import load_model

    specs = {m: parse_method(m) for m in methods}
    for ratio in ratios:
        if not 0 <= ratio < 1:
            raise RcpuError(f"pruning ratios must be in [0, 1), got {ratio}")
    for kwargs in specs.values():  # fail fast on bad combinations
        PruneConfig(**kwargs, pruning_ratio=ratios[0]).validate()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    protocol = {"model": model_source, "calib": calib, "eval": eval_source, "seqlen": seqlen, "seed": seed,
                "eval_seqlens": list(eval_seqlens), "max_eval_tokens": max_eval_tokens,
                "dtype": str(dtype).replace("torch.", "")}
    results = json.loads(path.read_text()) if path.exists() else {}
    if results and results.get("protocol") != protocol:
        raise RcpuError(f"{path} was made with another protocol {results.get('protocol')}; "
                        "use another --output or delete it")
    results.setdefault("protocol", protocol)
    results.setdefault("cells", {})
    device = torch.device(device)

    loaded = load_model(model_source, dtype=dtype, device="cpu")
    dense, tok = loaded.model, loaded.tokenizer
    calib_ids = data.tokenize(tok, data.load_text(calib, "calib"))
    eval_ids = data.tokenize(tok, data.load_text(eval_source, "eval"))
    all_windows = data.calibration_windows(calib_ids, max(nsamples), seqlen, seed)
    results["protocol_details"] = {
        "calib": data.describe_source(calib, "calib"), "eval": data.describe_source(eval_source, "eval"),
        "calib_tokens": int(calib_ids.numel()), "eval_tokens": int(eval_ids.numel()),
        "windows_sha256": data.token_hash(all_windows), "params_dense": count_params(dense), "versions": versions(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    }
    if "dense" not in results["cells"]:
        dense.to(device)
        results["cells"]["dense"] = {"method": "dense", "ppl": _ppls(dense, eval_ids, eval_seqlens, max_eval_tokens,
                                                                      device, f"{eval_source}:eval", progress)}
        dense.to("cpu")
        _atomic_json(path, results)

    t_all = time.perf_counter()
    for n in nsamples:
        windows = all_windows[:n]
        for method, kwargs in specs.items():
            for ratio in ratios:
                key = cell_key(method, ratio, n)
                if key in results["cells"]:
                    logger.info("%s: done earlier, skipped", key)
                    continue
                cfg = PruneConfig(**kwargs, pruning_ratio=ratio, nsamples=n, seqlen=seqlen, seed=seed,
                                  batch_size=batch_size)
                heldout = (data.heldout_windows(calib_ids, cfg.nholdout, max(nsamples), seqlen, seed)
                           if cfg.ridge_auto else None)
                logger.info("== %s", key)
                model = copy.deepcopy(dense)
                model, report = prune(model, cfg, windows=windows, heldout_windows=heldout, device=device,
                                      progress=progress)
                model.to(device)
                ppl = _ppls(model, eval_ids, eval_seqlens, max_eval_tokens, device, f"{eval_source}:eval", progress)
                chosen = sorted({f"{layer[part]['lambda']:g}" for layer in report.layers for part in ("attn", "mlp")
                                 if "lambda" in layer[part]})
                results["cells"][key] = {
                    "method": method, "ratio": ratio, "nsamples": n, "config": report.config, "ppl": ppl,
                    "params": report.params, "prune_s": report.timings["prune_s"], "memory": report.memory,
                    "warnings": report.warnings, "notes": report.plan.get("notes", []),
                    "ridge_lambdas": chosen or None,
                }
                del model
                _atomic_json(path, results)
    results["wall_s_this_run"] = round(time.perf_counter() - t_all, 1)
    _atomic_json(path, results)
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
    for (method, n), pts in groups.items():
        pts.sort()
        label = method + (f" n={n}" if multi_n and not size_curve else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
