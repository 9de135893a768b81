"""Candidate methods against every shipped method and the strongest combination of shipped
parts (flap-ridge): an ablation that adds one ingredient at a time to flap-ridge, and other
combinations of shipped settings.

    python benchmarks/method_table.py [--parts main,ablation,refinement,refine_steps,combinations,global_mlp,lowdata] [--device cuda]

Same protocol as benchmarks/table1.py (SmolLM2-135M, 128 calibration windows x 128
tokens, seed 0, first 16,384 held-out tokens, 128- and 512-token windows). All parts
share benchmarks/results/method/results.json, so cells present there (e.g. copied from
benchmarks/results/main, same settings and keys) are not recomputed. Resumable.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from rcpu.compare import run_compare

SHIPPED = ["wanda-sp", "flap", "ridge-auto", "rcpu", "rcpu-scaled"]
PARTS = {
    # name: (methods, ratios)
    "main": (["flap-ridge", *SHIPPED], [0.1, 0.2, 0.3]),
    # flap-ridge plus one ingredient at a time (the ingredients that measured no gain were
    # removed from rcpu; their cells and commands are in docs/experiments.md)
    "ablation": (["flap-ridge", "flap-ridge+allocation=error",
                  "flap-ridge+allocation=error+selection_block=1+selection_lambda=0.1",
                  "flap-ridge+refine_epochs=2", "flap-ridge+refine_epochs=4",
                  "flap-ridge+allocation=error+refine_epochs=4", "flap-ridge+allocation=error+refine_epochs=8"], [0.2]),
    # layer refinement on top of flap-ridge at every ratio
    "refinement": (["flap-ridge", "flap-ridge+refine_epochs=4"], [0.1, 0.2, 0.3]),
    # more optimiser steps per epoch: 2 or 1 windows per batch instead of 8
    "refine_steps": (["flap-ridge+refine_epochs=2+batch_size=2", "flap-ridge+refine_epochs=1+batch_size=1"], [0.2]),
    # other combinations of shipped score / allocation / statistics / compensation settings
    "combinations": (["flap-ridge+score=rcpu", "flap-ridge+head_unit=group", "flap-ridge+statistics=dense",
                      "flap-ridge+compensation=rotation_scale", "flap-ridge+score=wanda-sp",
                      "ridge-auto+score=wanda-sp", "ridge-auto+score=fluctuation"], [0.2]),
    # FLAP's allocation for the MLP channels only (uniform head counts), at every ratio
    "global_mlp": (["flap-ridge+allocation=global_mlp"], [0.1, 0.2, 0.3]),
    # few calibration tokens (32 windows), where the rotation could beat least squares
    # (its own results file: another protocol)
    "lowdata": (["rcpu", "ridge-auto", "flap-ridge"], [0.2], 32),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max_eval_tokens", type=int, default=16384, help="0 = the whole evaluation text")
    p.add_argument("--output", default="benchmarks/results/method")
    p.add_argument("--parts", default=",".join(PARTS))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in args.parts.split(","):
        methods, ratios, *rest = PARTS[name]
        nsamples = rest[0] if rest else 128
        output = args.output if nsamples == 128 else f"{args.output}_n{nsamples}"
        t0 = time.perf_counter()
        run_compare(args.model, methods, ratios, output, nsamples=[nsamples], seqlen=128, seed=0,
                    eval_seqlens=[128, 512], max_eval_tokens=args.max_eval_tokens or None, device=args.device,
                    progress=False)
        print(f"## {name} ({time.perf_counter() - t0:.0f} s)\n")
        print((Path(output) / "results.md").read_text())


if __name__ == "__main__":
    main()
