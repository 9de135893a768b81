"""Does the error left after compensation, on held-out calibration windows, rank the
channel scores the way perplexity does?

For every chosen decoder layer of the *dense* model, with uniform 20 % counts, each score
(FLAP's fluctuation, Wanda's, RCPU's) picks the heads / MLP channels to drop; the kept
columns are compensated with ridge over a λ grid and with RCPU's rotation (fitted on the
calibration windows), and the relative reconstruction error of o_proj / down_proj is
measured on held-out calibration windows. A per-sublayer choice of score (or of
compensation) by this error is only useful where it agrees with perplexity.

    python benchmarks/score_heldout.py --model smollm2-135m --nsamples 128
    python benchmarks/score_heldout.py --model qwen2.5-coder-1.5b --nsamples 32 --layers 2,9,16,23 --grid 0.01,0.1,1

Writes benchmarks/results/score_heldout/<model>.json (one file per model; a rerun recomputes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from rcpu import compensate as comp
from rcpu import data
from rcpu.config import PruneConfig
from rcpu.layer_io import capture_layer_inputs, run_layer
from rcpu.loading import load_model
from rcpu.models import get_adapter
from rcpu.pipeline import _collect, _heldout_choice
from rcpu.report import versions
from rcpu.scores import channel_scores, group_scores
from rcpu.select import head_channels, plan_uniform, select_channels, select_heads

SCORES = ("fluctuation", "wanda-sp", "rcpu")
logger = logging.getLogger("score_heldout")


def sublayer_errors(weight: torch.Tensor, stats, heldout, kept: torch.Tensor, cfg: PruneConfig) -> dict:
    res = _heldout_choice(weight, stats, heldout, kept, cfg, rotations=True)
    errs = res.info["heldout_errors"]
    return {"ridge": min(v for k, v in errs.items() if not k.startswith("rotation")),
            "ridge_lambda": min((k for k in errs if not k.startswith("rotation")), key=errs.get),
            "rotation": errs.get("rotation"),
            "none": comp.reconstruction_errors(weight, heldout.gram, kept, [weight[:, kept]])[0]}


def summarize(rows: list[dict]) -> dict:
    """Per sublayer kind and compensation: in how many sublayers each score leaves the lowest
    held-out error (every score that ties for the lowest counts), and in how many all three
    scores tie; per score, in how many sublayers the rotation beats ridge."""
    summary: dict = {}
    for part in ("attn", "mlp"):
        cells = [r for r in rows if f"{part}/{SCORES[0]}" in r]
        if not cells:
            continue
        for metric in ("ridge", "rotation"):
            lowest = {s: 0 for s in SCORES}
            ties = 0
            for r in cells:
                errs = {s: r[f"{part}/{s}"][metric] for s in SCORES}
                best = min(errs.values())
                for s, e in errs.items():
                    lowest[s] += e == best
                ties += len(set(errs.values())) == 1
            summary[f"{part}/{metric}: lowest held-out error (ties count for each)"] = lowest
            summary[f"{part}/{metric}: all scores tie"] = ties
        for score in SCORES:
            summary[f"{part}/{score}: rotation below ridge"] = sum(
                r[f"{part}/{score}"]["rotation"] < r[f"{part}/{score}"]["ridge"] for r in cells)
        summary[f"{part}: sublayers"] = len(cells)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--nholdout", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--layers", default="all", help="comma-separated layer indices, or all")
    p.add_argument("--grid", default=None, help="ridge lambdas (default: ridge-auto's grid)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "score_heldout"))
    p.add_argument("--resummarize", action="store_true",
                   help="only recompute the summary of the model's existing JSON from its per-layer rows")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.resummarize:
        path = Path(args.output) / f"{args.model}.json"
        result = json.loads(path.read_text())
        result["summary"] = summarize(result["layers"])
        _write(path, result)
        print(json.dumps(result["summary"], indent=1))
        return
    grid = tuple(float(x) for x in args.grid.split(",")) if args.grid else PruneConfig().ridge_grid
    cfg = PruneConfig(method="ridge-auto", pruning_ratio=args.ratio, nsamples=args.nsamples, ridge_grid=grid,
                      nholdout=args.nholdout).validate()
    device = torch.device(args.device)
    loaded = load_model(args.model, device=device)
    model, adapter = loaded.model, get_adapter(loaded.model)
    ids = data.tokenize(loaded.tokenizer, data.load_text("builtin", "calib"))
    windows = data.calibration_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed)
    heldout = data.heldout_windows(ids, cfg.nholdout, cfg.nsamples, cfg.seqlen, cfg.seed)
    calib_b = capture_layer_inputs(model, adapter, windows, cfg.batch_size, device)
    held_b = capture_layer_inputs(model, adapter, heldout, cfg.batch_size, device)
    n_layers = len(adapter.layers)
    wanted = list(range(n_layers)) if args.layers == "all" else sorted(int(x) for x in args.layers.split(","))
    rows = []
    for i, layer in enumerate(adapter.layers):
        if i > wanted[-1]:
            break
        if i in wanted:
            t0 = time.perf_counter()
            mods = {"attn": adapter.attn_out(layer), "mlp": adapter.mlp_out(layer)}
            stats, _, _ = _collect(layer, mods, {"attn": True, "mlp": True}, calib_b, False)
            stats_ho, _, _ = _collect(layer, mods, {"attn": True, "mlp": True}, held_b, False)
            geom = adapter.geometry(layer)
            plan = plan_uniform(adapter.layer_shape(layer), cfg.pruning_ratio, cfg.head_unit, cfg.rebalance,
                                cfg.round_to)
            row: dict = {"layer": i}
            for part, module in mods.items():
                if part == "attn" and plan.heads_removed(geom) == 0:
                    continue
                for score in SCORES:
                    s = channel_scores(score, module.weight, stats[part])
                    if part == "attn":
                        heads, _ = select_heads(group_scores(s, geom.head_dim), geom, plan)
                        kept = head_channels(heads, geom.head_dim)
                    else:
                        kept = select_channels(s, plan.channels_removed)
                    row[f"{part}/{score}"] = sublayer_errors(module.weight, stats[part], stats_ho[part], kept, cfg)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            logger.info("%s", json.dumps(row))
            rows.append(row)
        calib_b = run_layer(layer, calib_b, True)  # the dense model's inputs of the next layer
        held_b = run_layer(layer, held_b, True)
    summary = summarize(rows)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "nsamples": cfg.nsamples, "nholdout": cfg.nholdout, "seqlen": cfg.seqlen,
              "seed": cfg.seed, "ratio": cfg.pruning_ratio, "grid": list(grid), "statistics": "dense model",
              "calib": "builtin", "layers": rows, "summary": summary, "versions": versions()}
    _write(out / f"{args.model}.json", result)
    print(json.dumps(summary, indent=1))


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
