"""Hidden-size pruning of SmolLM2-135M: each channel score, without and with compensation.

    nice python benchmarks/hidden_size.py [--ratios 0.1,0.2] [--nsamples 32] [--eval_tokens 8192] [--resume]

Removes 10 % and 20 % of the 576 residual channels (rounded to a multiple of the 9 attention heads,
which a stock Llama config requires), chosen by each score of ``rcpu.hidden`` on ``--nsamples``
random 128-token windows of the built-in calibration text (seed 0), with each compensation, and
measures perplexity on the first ``--eval_tokens`` tokens of the built-in held-out text in
non-overlapping 128-token windows (float32, CPU). Prints one line per case and rewrites results.json
and results.md in ``--output`` after each case; ``--resume`` keeps the cases already there (same
settings) and runs the others, so the table can be filled in several runs (the scores are cached
in scores.json beside it).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from rcpu import data
from rcpu.evaluate import perplexity
from rcpu.hidden import COMPENSATIONS, SCORES, channel_scores, channels_to_keep, prune_hidden
from rcpu.loading import load_model

HERE = Path(__file__).resolve().parent
SEQLEN = 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", default="0.1,0.2")
    p.add_argument("--scores", default=",".join(SCORES))
    p.add_argument("--compensations", default=",".join(COMPENSATIONS))
    p.add_argument("--ridge_lambda", type=float, default=1e-2)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--eval_tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(HERE / "results" / "hidden_size"))
    p.add_argument("--resume", action="store_true", help="keep the cases in --output's results.json")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model.float().eval()
    calib = data.tokenize(loaded.tokenizer, data.load_text("builtin", "calib"))
    windows = data.calibration_windows(calib, args.nsamples, SEQLEN, seed=0)
    eval_ids = data.tokenize(loaded.tokenizer, data.load_text("builtin", "eval"))

    def ppl(m) -> float:
        return perplexity(m, eval_ids, SEQLEN, max_tokens=args.eval_tokens, device="cpu", progress=False).ppl

    d, heads = model.config.hidden_size, model.config.num_attention_heads
    settings = {"model": args.model, "hidden_size": d, "eval": "builtin:eval", "eval_tokens": args.eval_tokens,
                "seqlen": SEQLEN, "dtype": "float32",
                "calibration": {"source": "builtin:calib", "windows": args.nsamples, "seqlen": SEQLEN, "seed": 0},
                "ridge_lambda": args.ridge_lambda}
    previous = json.loads((out / "results.json").read_text()) if args.resume and (out / "results.json").exists() else {}
    if previous and any(previous.get(k) != v for k, v in settings.items()):
        raise SystemExit(f"--resume: {out / 'results.json'} was written with other settings")
    rows = previous.get("rows", [])
    dense = previous.get("dense_ppl") or ppl(model)
    print(f"{args.model}: hidden {d}, dense perplexity {dense:.3f} ({args.eval_tokens} held-out tokens, "
          f"{SEQLEN}-token windows, float32)", flush=True)
    cache = out / "scores.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("calibration") != settings["calibration"] or cached.get("model") != args.model:
        cached = {"model": args.model, "calibration": settings["calibration"], "scores": {}}
    scores = {}
    for name in args.scores.split(","):
        if name not in cached["scores"]:
            t0 = time.perf_counter()
            cached["scores"][name] = channel_scores(model, windows, name, batch_size=8).tolist()
            print(f"score {name}: {time.perf_counter() - t0:.1f} s", flush=True)
            cache.write_text(json.dumps(cached) + "\n")
        scores[name] = torch.tensor(cached["scores"][name], dtype=torch.float64)
    for ratio in (float(r) for r in args.ratios.split(",")):
        keep = max(heads, round(d * (1 - ratio) / heads) * heads)
        for name, s in scores.items():
            kept = channels_to_keep(s, keep)
            for compensation in args.compensations.split(","):
                if any((r["ratio"], r["score"], r["compensation"]) == (ratio, name, compensation) for r in rows):
                    continue
                pruned = copy.deepcopy(model)
                t0 = time.perf_counter()
                info = prune_hidden(pruned, kept, windows, compensation=compensation, ridge_lambda=args.ridge_lambda,
                                    batch_size=8)
                seconds = time.perf_counter() - t0
                errors = {part: [layer[part]["rel_error"] for layer in info["layers"]] for part in ("attn", "mlp")}
                row = {"ratio": ratio, "hidden_size": keep, "removed": d - keep, "score": name,
                       "compensation": compensation, "ppl": ppl(pruned), "seconds": round(seconds, 1),
                       "mean_rel_error": {k: sum(v) / len(v) for k, v in errors.items() if v}}
                rows.append(row)
                print(f"ratio {ratio:.2f} (hidden {keep}, -{d - keep}) score {name:13s} compensation "
                      f"{compensation:17s} ppl {row['ppl']:8.3f}  ({seconds:.0f} s)", flush=True)
                del pruned
                _write(out, {**settings, "dense_ppl": dense, "torch": torch.__version__, "rows": rows})
    _write(out, {**settings, "dense_ppl": dense, "torch": torch.__version__, "rows": rows})
    print(f"wrote {out / 'results.json'}")


def _write(out: Path, result: dict) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = result["rows"]
    lines = [f"# Hidden-size pruning, {result['model']}", "",
             f"Perplexity on the first {result['eval_tokens']} tokens of the built-in held-out text, {SEQLEN}-token "
             f"windows, float32; dense {result['dense_ppl']:.3f}. Calibration: {result['calibration']['windows']} x "
             f"{SEQLEN} tokens of the built-in calibration text (seed 0); ridge lambda {result['ridge_lambda']:g} "
             "(relative). Compensation seconds on 2 shared CPU cores. Written by benchmarks/hidden_size.py.", "",
             "| removed | hidden | score | compensation | perplexity | seconds |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["score"], COMPENSATIONS.index(r["compensation"]))):
        lines.append(f"| {r['ratio']:.0%} ({r['removed']}) | {r['hidden_size']} | {r['score']} | {r['compensation']} | "
                     f"{r['ppl']:.2f} | {r['seconds']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
