"""Prefill / decode throughput of a pruned checkpoint against its baseline.

    python benchmarks/speed.py --model out/pruned --baseline smollm2-135m --device cuda --dtype bfloat16

Both models are loaded into the same process with the same dtype and device, and measured with
:func:`rcpu.evaluate.speed.compare_speed` (alternating runs, shared seeded prompts, warm-up, per-round
speed-ups; see that module's docstring for the protocol). The summary is printed and, with
``--output``, written as JSON together with the settings, both models' raw per-round timings and the
software/hardware versions needed to interpret the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch
import transformers

from rcpu.errors import RcpuError
from rcpu.evaluate.speed import compare_speed
from rcpu.loading import load_model

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="pruned checkpoint (directory, built-in name or hub id)")
    p.add_argument("--baseline", required=True, help="baseline checkpoint (directory, built-in name or hub id)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RcpuError("--device cuda requested but CUDA is not available; use --device cpu")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        dtype = _DTYPES[args.dtype]
        model = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
        baseline = load_model(args.baseline, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
        result = compare_speed(
            model.model,
            baseline.model,
            batch_size=args.batch_size,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            seed=args.seed,
            progress=not args.quiet,
        )
    except RcpuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(f"model:    {args.model}")
    print(f"baseline: {args.baseline}")
    print(result.format())
    if args.output is not None:
        record = result.to_dict()
        record["sources"] = {"model": args.model, "baseline": args.baseline}
        record["environment"] = _environment(device)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
