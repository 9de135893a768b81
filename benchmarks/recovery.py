"""Recovery after pruning on SmolLM2-135M: budgets, an ablation of loss and trained parameters, cost;
and Qwen2.5-Coder-1.5B at a CPU-sized budget.

    python benchmarks/recovery.py [--parts cost,ablation_quick,budget20,budget30,ablation] [--device cuda] [--redo CELL,...] [--cells CELL,...]
    python benchmarks/recovery.py --model qwen2.5-coder-1.5b [--parts qwen] [--device cuda]

Every model is written under outputs/recovery/ (not in git): pruned models with `rcpu prune`,
recovered ones with `rcpu recover --resume` (so a killed benchmark continues inside a training
run), each evaluated with `rcpu eval` on the built-in held-out text and on the Brown Corpus's
eval part (first 16,384 tokens of each, 128- and 512-token windows; no training step sees
either: training uses the built-in text's calibration part). Results accumulate in
benchmarks/results/recovery/results.json (resumable: finished cells are skipped) with
results.md and ppl_vs_tokens.png beside it.

Qwen2.5-Coder-1.5B (``--model qwen2.5-coder-1.5b``) follows its pruning table's protocol
(benchmarks/results/qwen2.5-1.5b: 32 x 128 calibration tokens, first 8,192 tokens of each
evaluation text, 128-token windows) and is pruned with the best training-free method measured
there (flap-ridge + global_mlp allocation). Its models go under outputs/recovery_qwen/, its
results into benchmarks/results/recovery_qwen/.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DENSE = "smollm2-135m"
EVAL_TEXTS = ("builtin", "brown")

FULL = ["--parameters", "full", "--alpha", "1"]
#: the first recipe (rcpu recover's default until the recipe part): KL only, fp32, lr 1e-4
KL_FP32 = ["--alpha", "1", "--lr", "1e-4"]
#: the recipe part's winner, rcpu recover's default loss and lr since, under bf16 autocast
MIX = ["--lr", "3e-4", "--alpha", "0.5"]
BF16 = ["--autocast", "bfloat16"]
MIX_BF16 = ["--parameters", "full", *BF16, *MIX]
LORA8 = ["--parameters", "lora", "--lora_rank", "8", "--lr", "1e-3", "--alpha", "1"]
#: `rcpu export --tensor_type` of the GGUF rows of the quant_aware part (benchmarks/tensor_sensitivity.py's choice)
SPARED = r"blk\.(11|29)\.ffn_down=q8_0"
#: part -> list of (pruned model "method-ratio", tokens, variant name, recover flags)
PARTS: dict[str, list[tuple[str, int, str, list[str]]]] = {
    # tokens/s of each way of training, 8 steps of 8 x 128 tokens (quality comes from the ablation)
    "cost": [("rcpu-0.2", 8192, name, [*flags, "--eval", "none", "--eval_every", "0"]) for name, flags in [
        ("full-fp32", FULL), ("full-bf16", [*FULL, "--autocast", "bfloat16"]), ("lora8-fp32", LORA8),
        ("lora8-bf16", [*LORA8, "--autocast", "bfloat16"]), ("lora64-fp32", ["--parameters", "lora", "--lora_rank", "64", "--alpha", "1"]),
        ("full-fp32-ckpt", [*FULL, "--gradient_checkpointing"])]],
    # a cheap first look at learning rates and trained parameters (50k tokens)
    "ablation_quick": [("rcpu-0.2", 50_000, name, flags) for name, flags in [
        ("full-lr3e-4", [*FULL, "--lr", "3e-4"]), ("lora8-lr1e-3", LORA8), ("full-lr1e-4", [*FULL, "--lr", "1e-4"]),
        ("full-lr1e-3", [*FULL, "--lr", "1e-3"]),
        ("lora8-lr3e-3", ["--parameters", "lora", "--lora_rank", "8", "--lr", "3e-3", "--alpha", "1"]),
        ("allora8-lr1e-3", ["--parameters", "allora", "--lora_rank", "8", "--lr", "1e-3", "--alpha", "1"])]],
    # bf16 autocast at the same budget as ablation_quick (is it as good as fp32?), and its learning rate
    "recipe": [("rcpu-0.2", 50_000, name, ["--parameters", "full", "--autocast", "bfloat16", *flags]) for name, flags in [
        ("full-bf16-lr1e-4", ["--lr", "1e-4", "--alpha", "1"]), ("full-bf16-lr3e-4", ["--lr", "3e-4", "--alpha", "1"]),
        ("mix-bf16-lr3e-4", MIX)]],
    "budget20": [(m, t, "kl-fp32-lr1e-4", KL_FP32) for m in ("rcpu-0.2", "flap-ridge-0.2") for t in (100_000, 300_000, 1_000_000)],
    # the 1M budget with the recipe part's winner (bf16 autocast: 1.7x the tokens/s at fp32's quality),
    # for both 20 % models
    "budget20_bf16": [(m, 1_000_000, "mix-bf16-lr3e-4", [*MIX_BF16, "--eval_every", "100", "--save_every", "100"])
                      for m in ("flap-ridge-0.2", "rcpu-0.2")],
    # control: the dense model trained the same way (how much of the gain is adapting to the training text)
    "control": [("dense", 50_000, "mix-bf16-lr3e-4", ["--teacher", DENSE, *MIX_BF16])],
    "budget30": [(m, t, "kl-fp32-lr1e-4", KL_FP32) for m in ("rcpu-0.3", "flap-ridge-0.3") for t in (100_000, 300_000)],
    # the 1M model trained 25k tokens further (lr 1e-4), plainly and through q4_0's rounding: does
    # quantisation-aware training remove what re-quantising to 4 bits costs?
    "quant_aware": [("flap-ridge-0.2+1M", 25_000, name, ["--parameters", "full", *BF16, "--lr", "1e-4", "--alpha", "0.5", *flags])
                    for name, flags in [("mix-bf16-lr1e-4", []), ("q4_0-aware-mix-bf16-lr1e-4", ["--quant_aware", "q4_0"]),
                                        # q5_1 with the two ffn_down matrices tensor_sensitivity.py finds kept at q8_0
                                        ("q5_1-aware-down11+29-q8_0-mix-bf16-lr1e-4",
                                         ["--quant_aware", "q5_1", "--quant_aware_tensor_type", SPARED])]],
    # the default recipe at the budgets, both methods, 20 and 30 %
    "budget_mix": [(m, t, "mix-bf16-lr3e-4", MIX_BF16) for m in ("flap-ridge-0.3", "flap-ridge-0.2", "rcpu-0.3", "rcpu-0.2")
                   for t in (300_000, 100_000)],
    # under bf16 autocast (as good as fp32 at 1.7x the tokens/s): the loss (every weight, lr 3e-4),
    # then the trained parameters (the mix loss, lr 1e-3 for adapters). The mix row is budget_mix's
    # rcpu-0.2 cell at 300k (same name, same flags: computed once)
    "ablation": [("rcpu-0.2", 300_000, name, flags) for name, flags in [
        ("kl-bf16-lr3e-4", ["--parameters", "full", *BF16, "--lr", "3e-4", "--alpha", "1"]),
        ("lm-bf16-lr3e-4", ["--parameters", "full", *BF16, "--lr", "3e-4", "--alpha", "0"]),
        ("mix-bf16-lr3e-4", MIX_BF16),
        ("lora8-mix-bf16-lr1e-3", ["--parameters", "lora", "--lora_rank", "8", *BF16, "--lr", "1e-3", "--alpha", "0.5"]),
        ("lora64-mix-bf16-lr1e-3", ["--parameters", "lora", "--lora_rank", "64", *BF16, "--lr", "1e-3", "--alpha", "0.5"]),
        ("allora8-mix-bf16-lr1e-3", ["--parameters", "allora", "--lora_rank", "8", *BF16, "--lr", "1e-3",
                                     "--alpha", "0.5"])]],
}
#: variants plotted as budget curves (perplexity against tokens)
BUDGET_VARIANTS = ("kl-fp32-lr1e-4", "mix-bf16-lr3e-4")


@dataclass(frozen=True)
class Setup:
    """One model's benchmark: where its models and results go, its evaluation protocol, its parts."""

    dense: str
    out: Path
    results: Path
    eval_seqlens: tuple[int, ...]
    max_eval_tokens: int
    parts: dict[str, list[tuple[str, int, str, list[str]]]]
    #: pruned key -> `rcpu prune` flags; keys not listed are "method-ratio" with the defaults
    prune_flags: dict[str, list[str]] = field(default_factory=dict)
    #: start points that are earlier cells' models (key -> cell name), trained further
    continued: dict[str, str] = field(default_factory=dict)


QWEN = "qwen2.5-coder-1.5b"
#: LoRA rank 8 on all seven projections: full-weight AdamW on a 1.5B student (weights, gradients and
#: two moments in fp32, ~24 GB) plus its teacher does not fit a 24 GB machine; the teacher runs in bf16
QWEN_LORA = ["--parameters", "lora", "--lora_rank", "8", "--lr", "1e-3", "--alpha", "0.5", "--autocast", "bfloat16",
             "--teacher_dtype", "bfloat16", "--eval", "none", "--heldout", "16", "--eval_every", "0",
             "--save_every", "10"]
SETUPS = {
    DENSE: Setup(DENSE, ROOT / "outputs" / "recovery", Path(__file__).resolve().parent / "results" / "recovery",
                 (128, 512), 16384, PARTS, continued={"flap-ridge-0.2+1M": "flap-ridge-0.2/1000000/mix-bf16-lr3e-4"}),
    QWEN: Setup(QWEN, ROOT / "outputs" / "recovery_qwen", Path(__file__).resolve().parent / "results" / "recovery_qwen",
                (128,), 8192, {"qwen": [("flap-ridge-global_mlp-0.2", 25_000, "lora8-mix-bf16-lr1e-3", QWEN_LORA)]},
                {"flap-ridge-global_mlp-0.2": ["--method", "flap-ridge", "--allocation", "global_mlp",
                                               "--pruning_ratio", "0.2", "--nsamples", "32"]}),
}


def _run(cmd: list[str], log: Path) -> None:
    logging_cmd = " ".join(cmd)
    with open(log, "a") as fh:
        fh.write(f"\n$ {logging_cmd}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {logging_cmd}; see {log}")


def _rcpu(*args: str) -> list[str]:
    return [sys.executable, "-m", "rcpu.cli", *args]


def _load(s: Setup) -> dict:
    path = s.results / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {"protocol": {}, "evals": {}, "cells": {}}


def _save(s: Setup, results: dict) -> None:
    """Write the results, merged with what another run of this script saved meanwhile (so two
    runs with different --cells can share the file): under a lock, cells on disk that this run
    does not hold are added to ``results``; this run's own cells win."""
    s.results.mkdir(parents=True, exist_ok=True)
    with open(s.results / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = _load(s)
        for section in ("evals", "cells"):
            results[section] = {**on_disk.get(section, {}), **results[section]}
        tmp = s.results / "results.json.partial"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(s.results / "results.json")
        (s.results / "results.md").write_text(_markdown(s, results))
        _plot(s, results)


def pruned_model(s: Setup, key: str, device: str, log: Path) -> Path:
    if key in s.continued:
        path = s.out / "models" / s.continued[key].replace("/", "_")
        if not (path / "rcpu_provenance.json").is_file():
            raise SystemExit(f"{key} continues the cell {s.continued[key]}, whose model is not in {path}; run it first")
        return path
    path = s.out / "pruned" / key
    if not (path / "rcpu_provenance.json").is_file():
        method, ratio = key.rsplit("-", 1)
        flags = s.prune_flags.get(key, ["--method", method, "--pruning_ratio", ratio])
        _run(_rcpu("prune", "--model", s.dense, *flags, "--save_model", str(path), "--eval", "none",
                   "--device", device, "--overwrite", "-q"), log)
    return path


def evaluate(s: Setup, results: dict, key: str, model: str, device: str, log: Path) -> dict:
    if key in results["evals"]:
        return results["evals"][key]
    out = {}
    for text in EVAL_TEXTS:
        tmp = s.out / "eval.json"
        _run(_rcpu("eval", "--model", model, "--ppl", text, "--seqlen", *map(str, s.eval_seqlens), "--max_eval_tokens",
                   str(s.max_eval_tokens), "--device", device, "--output", str(tmp), "-q"), log)
        for r in json.loads(tmp.read_text())["perplexity"]:
            out[f"{text}@{r['seqlen']}"] = round(r["ppl"], 3)
    results["evals"][key] = out
    _save(s, results)
    return out


def cell(s: Setup, results: dict, pruned_key: str, tokens: int, variant: str, flags: list[str], device: str,
         log: Path, redo: set[str], *, measure: bool = True) -> None:
    """Recover ``pruned_key`` with ``flags`` for ``tokens``; ``measure``: evaluate the result on both texts."""
    name = f"{pruned_key}/{tokens}/{variant}"
    if name in results["cells"] and name not in redo:
        return
    src = s.dense if pruned_key == "dense" else pruned_model(s, pruned_key, device, log)
    if pruned_key in s.continued and s.continued[pruned_key] in results["cells"]:  # measured as that cell
        results["evals"].setdefault(pruned_key, results["cells"][s.continued[pruned_key]]["evals"])
    evaluate(s, results, pruned_key, str(src), device, log)
    dest = s.out / "models" / name.replace("/", "_")
    if name in redo and dest.exists():
        import shutil

        shutil.rmtree(dest)
    if not dest.is_dir():
        args = _rcpu("recover", "--model", str(src), "--tokens", str(tokens), "--save_model", str(dest), "--device",
                     device, "--max_eval_tokens", str(s.max_eval_tokens), "--resume", "-q", *flags)
        started = time.time()
        print(f"{name}: training ...", flush=True)
        _run(args, log)
        print(f"{name}: trained in {time.time() - started:.0f} s", flush=True)
    rec = json.loads((dest / "rcpu_provenance.json").read_text())["recovery"]
    evals = evaluate(s, results, name, str(dest), device, log) if measure else {}
    results["cells"][name] = {
        "pruned": pruned_key, "tokens": tokens, "variant": variant, "flags": flags, "evals": evals,
        "config": rec["config"], "timing": rec["timing"], "memory": rec["memory"],
        "heldout_before": rec["evaluation"]["before"]["heldout"], "heldout_after": rec["evaluation"]["after"]["heldout"],
        "heldout_curve": [{k: h[k] for k in ("step", "tokens", "kl", "loss")} for h in rec["heldout_curve"]],
        "versions": rec["versions"], "device": rec["distributed"]["device"],
    }
    _save(s, results)
    print(f"{name}: {evals or ''} {rec['timing']['tokens_per_second']} tokens/s", flush=True)


def _markdown(s: Setup, results: dict) -> str:
    cols = [f"{t}@{n}" for t in EVAL_TEXTS for n in s.eval_seqlens]
    lines = ["| model | tokens | variant | " + " | ".join(cols) + " | held-out KL | tokens/s | train s |",
             "|---" * (len(cols) + 6) + "|"]
    for key, ev in results["evals"].items():
        if "/" not in key:
            lines.append(f"| {key} | 0 | – | " + " | ".join(f"{ev.get(c, float('nan')):.2f}" for c in cols) + " | | | |")
    for c in results["cells"].values():
        ev = c["evals"]
        vals = " | ".join(f"{ev[c2]:.2f}" if c2 in ev else "–" for c2 in cols)
        lines.append(f"| {c['pruned']} | {c['tokens']:,} | {c['variant']} | {vals} | "
                     f"{c['heldout_before'].get('kl', float('nan')):.3f} → {c['heldout_after'].get('kl', float('nan')):.3f} | "
                     f"{c['timing']['tokens_per_second']:.1f} | {c['timing']['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(s: Setup, results: dict) -> None:
    """Perplexity against recovery tokens, one panel per evaluation text: colour = pruned model,
    solid = the default recipe, dashed = the first one (KL, fp32)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    series: dict[tuple[str, str], list[dict]] = {}
    for c in results["cells"].values():
        if c["variant"] in BUDGET_VARIANTS and c["pruned"] != "dense":
            series.setdefault((c["pruned"], c["variant"]), []).append(c)
    texts = [t for t in EVAL_TEXTS if any(f"{t}@128" in c["evals"] for cs in series.values() for c in cs)]
    if not texts:
        return
    colours = {m: f"C{i}" for i, m in enumerate(sorted({m for m, _ in series}))}
    styles = dict(zip(BUDGET_VARIANTS, ("--", "-"), strict=True))
    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4.5), squeeze=False)
    for ax, text in zip(axes[0], texts, strict=True):
        key = f"{text}@128"
        for (model, variant), cells in sorted(series.items()):
            before = results["evals"].get(model, {}).get(key)
            pts = sorted(([(0, before)] if before else []) + [(c["tokens"], c["evals"][key]) for c in cells
                                                             if key in c["evals"]])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[model],
                    ls=styles[variant], label=f"{model} ({variant})")
        dense = results["evals"].get("dense", {}).get(key)
        if dense:
            ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
            if text == "builtin":
                ax.axhline(1.15 * dense, color="grey", ls=":", label="1.15 x dense (target)")
        ax.set_xscale("symlog", linthresh=1e5)
        ax.set_xlabel("recovery tokens")
        ax.set_ylabel(f"perplexity ({text} held-out, 128-token windows)")
        ax.set_title(text)
    fig.tight_layout()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0),
               ncol=3, fontsize="small", frameon=False)
    fig.savefig(s.results / "ppl_vs_tokens.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DENSE, choices=list(SETUPS))
    p.add_argument("--parts", default=None, help="default: every part of --model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--redo", default="", help="comma-separated cell names to recompute")
    p.add_argument("--variants", default="", help="run only these variants of the parts (comma-separated)")
    p.add_argument("--cells", default="", help="run only these cells, named method-ratio/tokens/variant (comma-separated)")
    args = p.parse_args()
    s = SETUPS[args.model]
    parts = args.parts or ",".join(s.parts)
    s.out.mkdir(parents=True, exist_ok=True)
    log = s.out / "log.txt"
    results = _load(s)
    results["protocol"] = {"model": s.dense, "train_data": "builtin (calibration part)",
                           "eval_texts": list(EVAL_TEXTS), "eval_seqlens": list(s.eval_seqlens),
                           "max_eval_tokens": s.max_eval_tokens, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
                           "command": f"python benchmarks/recovery.py --model {args.model} --parts {parts}"}
    evaluate(s, results, "dense", s.dense, args.device, log)
    redo = {x for x in args.redo.split(",") if x}
    for part in parts.split(","):
        for pruned_key, tokens, variant, flags in s.parts[part]:
            if args.variants and variant not in args.variants.split(","):
                continue
            if args.cells and f"{pruned_key}/{tokens}/{variant}" not in args.cells.split(","):
                continue
            cell(s, results, pruned_key, tokens, variant, flags, args.device, log, redo, measure=part != "cost")


if __name__ == "__main__":
    main()
