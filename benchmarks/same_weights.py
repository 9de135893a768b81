"""Does a change alter what rcpu computes? Prune SmolLM2-135M with every kept preset (and the
options that take their own code paths) and print a hash of the pruned weights; run it on two
checkouts and compare the files.

    PYTHONPATH=<checkout>/src python benchmarks/same_weights.py OUT.json [CASE ...]

One thread, 32 calibration windows of 128 tokens, 20 %: a few minutes per case on a CPU.
Equal hashes mean bit-identical pruned weights, hence identical perplexities.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch

from rcpu import PruneConfig, prune
from rcpu.loading import load_model

CASES = {
    "rcpu": dict(method="rcpu"),
    "rcpu-scaled": dict(method="rcpu-scaled"),
    "ridge": dict(method="ridge"),
    "ridge-auto": dict(method="ridge-auto"),
    "wanda-sp": dict(method="wanda-sp"),
    "magnitude-sp": dict(method="magnitude-sp"),
    "flap": dict(method="flap"),
    "flap-ridge": dict(method="flap-ridge"),
    "flap-ridge-global_mlp": dict(method="flap-ridge", allocation="global_mlp"),
    "ridge-auto-error-refine1": dict(method="ridge-auto", allocation="error", refine_epochs=1),
    "rcpu-direct": dict(method="rcpu", rotation_products="direct"),
}


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    torch.set_num_threads(1)
    out, names = sys.argv[1], sys.argv[2:] or list(CASES)
    hashes = {}
    for name in names:
        loaded = load_model("smollm2-135m")
        t0 = time.time()
        model, _ = prune(loaded.model, PruneConfig(pruning_ratio=0.2, nsamples=32, **CASES[name]),
                         tokenizer=loaded.tokenizer, device="cpu", progress=False)
        hashes[name] = weights_hash(model)
        print(name, hashes[name], f"{time.time() - t0:.0f} s", flush=True)
    with open(out, "w") as fh:
        json.dump(hashes, fh, indent=1)


if __name__ == "__main__":
    main()
