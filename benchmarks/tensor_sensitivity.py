"""Which weight matrices does a GGUF block type hurt most? One matrix rounded at a time.

    python benchmarks/tensor_sensitivity.py --model DIR [--quant q4_1] [--kinds down_proj] [--top 2]

Each selected matrix is rounded to ``--quant`` with ``rcpu.quantgrid`` (bit-exact with the gguf
package's quantiser, so with the exported file) while every other weight stays as it is, and the
model's perplexity is measured on ``--windows`` x 128-token windows of the built-in text's
*calibration* part, so that the choice is made without the held-out text the GGUF table scores.
Prints the matrices by the perplexity they cost alone, and the ``rcpu export --tensor_type``
pattern that keeps the ``--top`` worst at q8_0. Writes results.json to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rcpu import data
from rcpu.evaluate import perplexity
from rcpu.gguf_export import llama_cpp_names
from rcpu.loading import load_model
from rcpu.quantgrid import fake_quantize
from rcpu.recover.config import ALL_PROJECTIONS

HERE = Path(__file__).resolve().parent
SEQLEN = 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint directory (pruned, recovered) or a built-in name")
    p.add_argument("--quant", default="q4_1", help="GGUF block type: q4_0, q4_1, q5_0, q5_1, q8_0")
    p.add_argument("--kinds", default="down_proj", help=f"comma-separated, from {', '.join(ALL_PROJECTIONS)}")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(HERE / "results" / "tensor_sensitivity"))
    args = p.parse_args()
    kinds = args.kinds.split(",")
    if unknown := [k for k in kinds if k not in ALL_PROJECTIONS]:
        sys.exit(f"--kinds: unknown {unknown}; choose from {', '.join(ALL_PROJECTIONS)}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model, trust_remote_code=True)
    model = loaded.model.eval()
    ids = data.tokenize(loaded.tokenizer, data.load_text("builtin", "calib"))
    n = args.windows * SEQLEN

    def ppl() -> float:
        return perplexity(model, ids, SEQLEN, max_tokens=n, device="cpu", progress=False).ppl

    base = ppl()
    chosen = {name: m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in name and name.rsplit(".", 1)[-1] in kinds}
    names = llama_cpp_names([f"{n}.weight" for n in chosen], model.config.num_hidden_layers)
    rows = []
    for module, tensor in zip(chosen.values(), names, strict=True):
        original = module.weight.detach().clone()
        with torch.no_grad():
            module.weight.copy_(fake_quantize(original, args.quant))
        rows.append({"tensor": tensor, "ppl": ppl()})
        with torch.no_grad():
            module.weight.copy_(original)
        print(f"{tensor}: {rows[-1]['ppl']:.3f} (unrounded {base:.3f})", flush=True)
    rows.sort(key=lambda r: -r["ppl"])
    worst = rows[:args.top]
    by_kind: dict[str, list[str]] = {}
    for r in worst:
        _, layer, kind, _ = r["tensor"].split(".")
        by_kind.setdefault(kind, []).append(layer)
    patterns = [f"blk\\.({'|'.join(sorted(v, key=int))})\\.{k}=q8_0" for k, v in by_kind.items()]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "quant": args.quant, "kinds": kinds, "eval": "builtin:calib",
              "windows": args.windows, "seqlen": SEQLEN, "unrounded_ppl": base, "rows": rows,
              "top": args.top, "tensor_types": patterns, "wall_s": time.perf_counter() - t0,
              "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nmost sensitive to {args.quant} alone: "
          + ", ".join(f"{r['tensor']} {r['ppl']:.3f}" for r in worst))
    print("rcpu export " + " ".join(f"--tensor_type '{t}'" for t in patterns))


if __name__ == "__main__":
    main()
