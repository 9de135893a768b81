"""The table of record: the RCPU paper's Table 1 layout on SmolLM2-135M, plus the
compensation ablation and a calibration-size curve.

    python benchmarks/table1.py [--device cuda] [--max_eval_tokens 16384] [--output benchmarks/results]

Calibration: 128 windows x 128 tokens from the built-in calibration text (seed 0).
Evaluation: the built-in held-out text (first --max_eval_tokens tokens), 128- and
512-token windows. Each part is resumable (re-run the same command). Prints the
Markdown tables and writes results.json / results.md / ppl.png per part.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from rcpu.compare import run_compare

PARTS = {
    # name: (methods, ratios, nsamples, eval window lengths)
    "main": (["wanda-sp", "flap", "ridge-auto", "rcpu", "rcpu-scaled"], [0.1, 0.2, 0.3], [128], [128, 512]),
    # SmolLM2 has 3 query heads per KV group: heads are only cut at ratio >= 1/3, so the
    # ablation runs at 0.4 (1 head per group + MLP) to give o_proj something to compensate
    "ablation": (["rcpu+compensation=none", "rcpu+compensate_mlp=false", "rcpu+compensate_attn=false", "rcpu"],
                 [0.4], [128], [128]),
    # smaller calibration sets are prefixes of the same seeded draw; ridge with the fixed
    # default lambda keeps this part cheap on a CPU (ridge-auto at n=128 is in "main")
    "calib_curve": (["rcpu", "ridge"], [0.2], [16, 32, 64, 128, 512], [128]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max_eval_tokens", type=int, default=16384, help="0 = the whole evaluation text")
    p.add_argument("--output", default="benchmarks/results")
    p.add_argument("--parts", default=",".join(PARTS))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in args.parts.split(","):
        methods, ratios, nsamples, eval_seqlens = PARTS[name]
        t0 = time.perf_counter()
        run_compare(args.model, methods, ratios, Path(args.output) / name, nsamples=nsamples, seqlen=128, seed=0,
                    eval_seqlens=eval_seqlens, max_eval_tokens=args.max_eval_tokens or None, device=args.device,
                    progress=False)
        print(f"## {name} ({time.perf_counter() - t0:.0f} s)\n")
        print((Path(args.output) / name / "results.md").read_text())


if __name__ == "__main__":
    main()
