"""Gemma 3 270M: pruning table at 20 and 30 %, recovery of the best 20 % model, its GGUF in llama.cpp.

    python benchmarks/gemma3_table.py [--parts dense,prune,reload,recover,gguf] [--methods rcpu,...] [--ratios 0.2]
        [--device cpu]

Model: the built-in ``gemma3-270m`` (Gemma 3 270M, dequantised to fp32 from its Q4_K_M GGUF; 18
layers, 4 query heads over 1 KV head, MLP 2048, tied 262k-token embedding). Its tokenizer adds a
BOS token, so every calibration, recovery and evaluation window starts with BOS (never scored).

Protocol (CPU-sized; the SmolLM2 table uses 128 calibration windows and 16,384 evaluation tokens):

- calibration: 32 windows x 128 tokens (BOS + 127 text tokens) of the built-in calibration text,
  seed 0 (``NSAMPLES``); ridge-auto's lambda on 64 held-out calibration windows (its default);
- perplexity: the first 8,192 tokens of the built-in held-out text and of the Brown Corpus's eval
  part (``MAX_EVAL_TOKENS``), non-overlapping windows of BOS + 127 tokens (64 windows, 8,128
  scored tokens each), fp32, ``rcpu eval``;
- methods: rcpu, ridge-auto, flap-ridge (FLAP's score, ridge compensation, FLAP's global
  allocation over heads and MLP channels: with one KV group per layer a layer may keep 1 to 4
  heads) and flap-ridge with ``--allocation global_mlp`` (global over MLP channels only, heads
  as the uniform plan: none at 20 %, one per layer at 30 %);
- prune time: ``timings.prune_s`` of the pruned checkpoint's provenance (streamed ``rcpu prune``,
  calibration included, loading and saving not), on whatever CPU runs the script;
- reload: rcpu at 30 % pruned in memory (3 heads of 4: hidden 640 is no multiple of 3, so the
  stock config refuses it and rcpu saves ``rcpu_gemma3_text`` with its modeling file), saved,
  reloaded; identical logits, and the same weights as the streamed rcpu@0.3 cell;
- recovery: ``rcpu recover`` with its defaults and ``--autocast bfloat16`` for 100,000 tokens on
  the 20 % model with the lowest built-in perplexity (``--eval none``: the result is measured with
  ``rcpu eval`` like every other row);
- GGUF: the shipped Q4_K_M file, the dense model and the recovered (else best 20 %) model exported
  at q8_0 (``rcpu export``), perplexity in llama.cpp (node-llama-cpp, full next-token
  distributions) and under transformers on the first ``LLAMA_WINDOWS`` evaluation windows (BOS
  first); a model whose export fails is reported as skipped with the error, not guessed.

Models are written under outputs/gemma3/ (not in git; the Gemma weights are under the Gemma Terms
of Use). Results accumulate in benchmarks/results/gemma3/results.json with results.md beside it;
every step is resumable (finished cells are skipped, an interrupted prune or recovery continues
where it stopped). One heavy process at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
MODEL = "gemma3-270m"
OUT = ROOT / "outputs" / "gemma3"
RESULTS = HERE / "results" / "gemma3"
RATIOS = (0.2, 0.3)
#: name -> `rcpu prune` flags
METHODS: dict[str, list[str]] = {
    "rcpu": ["--method", "rcpu"],
    "ridge-auto": ["--method", "ridge-auto"],
    "flap-ridge": ["--method", "flap-ridge"],  # allocation global (its preset)
    "flap-ridge+global_mlp": ["--method", "flap-ridge", "--allocation", "global_mlp"],
}
NSAMPLES, SEQLEN = 32, 128
EVAL_TEXTS = ("builtin", "brown")
EVAL_SEQLEN, MAX_EVAL_TOKENS = 128, 8192
RECOVER_TOKENS = 100_000
RECOVER_FLAGS = ["--autocast", "bfloat16", "--eval", "none"]
GGUF_QUANT, LLAMA_WINDOWS, PROMPT = "q8_0", 16, "The capital of France is"


def _rcpu(*args: str) -> list[str]:
    return [sys.executable, "-m", "rcpu.cli", *args]


def _run(cmd: list[str], log: Path, check: bool = True) -> subprocess.CompletedProcess:
    line = " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd)
    print(f"$ {line}", flush=True)
    with open(log, "a") as fh:
        fh.write(f"\n$ {line}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {line}; see {log}")
    return proc


def _load() -> dict:
    path = RESULTS / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "results.json.partial"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(RESULTS / "results.json")
    (RESULTS / "results.md").write_text(markdown(results))


def evaluate(results: dict, key: str, model: str, device: str, log: Path) -> dict:
    """Perplexity of ``model`` on both texts (``rcpu eval``), stored under ``results["evals"][key]``."""
    if key in results["evals"]:
        return results["evals"][key]
    out = {}
    tmp = OUT / "eval.json"
    for text in EVAL_TEXTS:
        _run(_rcpu("eval", "--model", model, "--ppl", text, "--seqlen", str(EVAL_SEQLEN), "--max_eval_tokens",
                   str(MAX_EVAL_TOKENS), "--device", device, "--output", str(tmp), "-q"), log)
        (r,) = json.loads(tmp.read_text())["perplexity"]
        out[f"{text}@{r['seqlen']}"] = round(r["ppl"], 3)
        out[f"{text}@{r['seqlen']}:detail"] = {k: r[k] for k in ("n_windows", "n_tokens", "bos", "dtype")}
        print(f"  {key} {text}: ppl {r['ppl']:.2f} ({r['n_windows']} windows, {r['n_tokens']} tokens)", flush=True)
    results["evals"][key] = out
    _save(results)
    return out


def prune_cell(results: dict, method: str, ratio: float, device: str, log: Path) -> None:
    key = f"{method}@{ratio:g}"
    if key in results["cells"]:
        return
    path = OUT / "pruned" / f"{method}-{ratio:g}"
    started = time.time()
    if not (path / "rcpu_provenance.json").is_file():
        _run(_rcpu("prune", "--model", MODEL, *METHODS[method], "--pruning_ratio", str(ratio), "--nsamples",
                   str(NSAMPLES), "--seqlen", str(SEQLEN), "--eval", "none", "--save_model", str(path), "--resume",
                   "--device", device, "-q"), log)
    wall = time.time() - started
    prov = json.loads((path / "rcpu_provenance.json").read_text())
    evals = evaluate(results, key, str(path), device, log)
    results["cells"][key] = {
        "method": method, "flags": METHODS[method], "ratio": ratio, "path": str(path.relative_to(ROOT)),
        "prune_s": prov["timings"].get("prune_s"), "prune_command_wall_s": round(wall, 1),
        "params": prov["params"], "notes": prov.get("plan", {}).get("notes", []), "warnings": prov.get("warnings", []),
        "heads_per_layer": [len(layer["kept_heads"]) for layer in prov["layers"]],
        "mlp_per_layer": [len(layer["kept_channels"]) for layer in prov["layers"]],
        "calibration": {k: prov["calibration"].get(k) for k in ("nsamples", "seqlen", "seed", "bos", "windows_sha256")},
        "evals": evals,
    }
    _save(results)
    print(f"{key}: builtin {evals['builtin@128']:.2f}, brown {evals['brown@128']:.2f}, "
          f"prune {prov['timings'].get('prune_s', float('nan')):.0f} s", flush=True)


def reload_check(results: dict, device: str) -> None:
    """rcpu at 30 % in memory (one head of four cut: a 3-head config the stock Gemma3TextConfig
    refuses, saved as rcpu_gemma3_text with rcpu's modeling file), saved, reloaded: the logits must be
    identical, and the weights those of the streamed rcpu@0.3 cell when it exists."""
    if "reload" in results:
        return
    import torch
    from safetensors.torch import load_file

    from rcpu import data
    from rcpu.api import prune
    from rcpu.config import PruneConfig
    from rcpu.export import save_pruned
    from rcpu.loading import load_model

    loaded = load_model(MODEL)
    cfg = PruneConfig(method="rcpu", pruning_ratio=0.3, nsamples=NSAMPLES, seqlen=SEQLEN)
    model, report = prune(loaded.model, cfg, tokenizer=loaded.tokenizer, calib="builtin", device=device,
                          progress=False)
    out = save_pruned(model, loaded.tokenizer, OUT / "reload-check", report.to_dict(), overwrite=True)
    saved = json.loads((out / "config.json").read_text())
    reloaded = load_model(str(out)).model
    ids = data.tokenize(loaded.tokenizer, data.load_text("builtin", "eval"))
    x = data.consecutive_windows(ids, EVAL_SEQLEN, data.bos_token_id(loaded.tokenizer))[:2]
    with torch.no_grad():
        a, b = model(x).logits, reloaded(x).logits
    check = {"model_type": saved["model_type"], "num_attention_heads": saved.get("num_attention_heads"),
             "modeling_file": (out / "modeling_rcpu.py").is_file(), "reloaded_class": type(reloaded).__name__,
             "logits_identical": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}
    streamed = OUT / "pruned" / "rcpu-0.3"
    if (streamed / "rcpu_provenance.json").is_file():
        mine, theirs = {}, {}
        for f in sorted(out.glob("*.safetensors")):
            mine.update(load_file(str(f)))
        for f in sorted(streamed.glob("*.safetensors")):
            theirs.update(load_file(str(f)))
        check["streamed_weights_identical"] = mine.keys() == theirs.keys() and all(
            torch.equal(mine[k], theirs[k]) for k in mine)
    results["reload"] = check
    _save(results)
    print(f"reload check: {check}", flush=True)


def best_20(results: dict) -> str | None:
    cells = {k: c for k, c in results["cells"].items() if c["ratio"] == 0.2}
    if len(cells) < len(METHODS):
        return None
    return min(cells, key=lambda k: cells[k]["evals"]["builtin@128"])


def recover(results: dict, device: str, log: Path) -> None:
    if results.get("recovery", {}).get("evals"):
        return
    best = best_20(results)
    if best is None:
        print("recovery: waits until every 20 % cell is measured (it trains the best of them)", flush=True)
        return
    src = ROOT / results["cells"][best]["path"]
    dest = OUT / "recovered" / f"{best.replace('@', '-')}-{RECOVER_TOKENS}"
    started = time.time()
    if not (dest / "rcpu_provenance.json").is_file():
        _run(_rcpu("recover", "--model", str(src), "--tokens", str(RECOVER_TOKENS), "--save_model", str(dest),
                   "--device", device, "--resume", "-q", *RECOVER_FLAGS), log)
    wall = time.time() - started
    rec = json.loads((dest / "rcpu_provenance.json").read_text())["recovery"]
    results["recovery"] = {"pruned": best, "tokens": RECOVER_TOKENS, "flags": RECOVER_FLAGS,
                           "path": str(dest.relative_to(ROOT)), "config": rec["config"], "timing": rec["timing"],
                           "memory": rec["memory"], "command_wall_s": round(wall, 1),
                           "heldout_before": rec["evaluation"]["before"]["heldout"],
                           "heldout_after": rec["evaluation"]["after"]["heldout"]}
    _save(results)
    results["recovery"]["evals"] = evaluate(results, f"{best}+recovered{RECOVER_TOKENS // 1000}k", str(dest), device,
                                            log)
    _save(results)


def _node_modules() -> Path | None:
    for base in (os.environ.get("RCPU_NODE_MODULES"), Path.home() / ".cache" / "rcpu" / "node" / "node_modules"):
        if base and (Path(base) / "node-llama-cpp" / "package.json").is_file():
            return Path(base)
    return None


def gguf(results: dict, log: Path) -> None:
    """The shipped Q4_K_M file and q8_0 exports, under llama.cpp and transformers, BOS first."""
    import torch

    from rcpu import data
    from rcpu.evaluate import perplexity
    from rcpu.loading import _builtin_gguf, load_model, resolve_model_dir

    node = _node_modules()
    if node is None:
        print("gguf: node-llama-cpp not found (npm install node-llama-cpp@3.22.1 in ~/.cache/rcpu/node); skipped")
        return
    work = OUT / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"name": "dense", "quant": "Q4_K_M (as shipped)", "file": str(_builtin_gguf(MODEL)), "checkpoint": None}]
    sources = [("dense", resolve_model_dir(MODEL))]
    if results.get("recovery", {}).get("evals"):
        sources.append((f"{results['recovery']['pruned']} + recovery", str(ROOT / results["recovery"]["path"])))
    elif best_20(results):
        sources.append((best_20(results), str(ROOT / results["cells"][best_20(results)]["path"])))
    skipped = []
    for name, ckpt in sources:
        path = work / f"{name.replace(' ', '').replace('+', '_').replace('@', '-')}-{GGUF_QUANT}.gguf"
        if not path.is_file():
            proc = _run(_rcpu("export", "--model", ckpt, "--gguf", str(path), "--quant", GGUF_QUANT, "-q"), log,
                        check=False)
            if proc.returncode != 0:
                lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
                reason = lines[-1] if lines else f"exit {proc.returncode}"
                print(f"gguf: export of {name} failed, row skipped: {reason}", flush=True)
                skipped.append({"name": name, "quant": GGUF_QUANT, "reason": reason})
                continue
        rows.append({"name": name, "quant": GGUF_QUANT, "file": str(path), "checkpoint": ckpt})

    tok = load_model(MODEL).tokenizer
    bos = data.bos_token_id(tok)
    ids = data.tokenize(tok, data.load_text("builtin", "eval"))
    windows = data.consecutive_windows(ids, EVAL_SEQLEN, bos)[:LLAMA_WINDOWS]
    n_text = LLAMA_WINDOWS * data.window_span(EVAL_SEQLEN, bos)
    for row in rows:  # transformers on the same windows: the GGUF file through its reader, and the checkpoint
        for key, source in (("ppl_transformers", row["file"]), ("ppl_safetensors", row["checkpoint"])):
            if source is None:
                continue
            try:
                model = load_model(source, dtype=torch.float32).model
            except Exception as exc:  # noqa: BLE001 - a file transformers cannot read is reported, not fatal
                row[key] = None
                row[key + "_error"] = str(exc).splitlines()[0]
                continue
            res = perplexity(model, ids, EVAL_SEQLEN, max_tokens=n_text, bos=bos, progress=False)
            del model
            row[key] = res.ppl
            print(f"  transformers {Path(source).name}: {res.format()}", flush=True)
        row["bytes"] = Path(row["file"]).stat().st_size
    job = {"models": [r["file"] for r in rows], "windows": windows.tolist(), "prompts": [PROMPT], "max_tokens": 16,
           "threads": 2}
    job_path, node_out = work / "llama_cpp_job.json", work / "llama_cpp_out.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run(["node", str(HERE / "llama_cpp_eval.mjs"), str(job_path), str(node_out)],
                          env={**os.environ, "RCPU_NODE_MODULES": str(node)}, capture_output=True, text=True)
    print(proc.stdout, flush=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    llama = json.loads(node_out.read_text())
    for row, res in zip(rows, llama["results"], strict=True):
        row.update({"ppl_llama_cpp": res.get("ppl"), "scored_tokens": res.get("tokens"),
                    "completion": res["completions"][0]["text"] if res.get("completions") else None})
        row["file"] = Path(row["file"]).name
        row["checkpoint"] = row["checkpoint"] and str(Path(row["checkpoint"]).name)
    results["gguf"] = {"windows": LLAMA_WINDOWS, "seqlen": EVAL_SEQLEN, "bos": bos, "eval": "builtin:eval",
                       "rows": rows, "skipped": skipped,
                       "runtime": {k: llama.get(k) for k in ("runtime", "node_llama_cpp", "llama_cpp_release",
                                                              "threads")}}
    _save(results)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown(results: dict) -> str:
    ev = results.get("evals", {})
    dense = ev.get("dense", {})
    lines = [f"Gemma 3 270M, perplexity at {EVAL_SEQLEN}-token windows (BOS + {EVAL_SEQLEN - 1} tokens), first "
             f"{MAX_EVAL_TOKENS:,} tokens of each text; calibration {NSAMPLES} x {SEQLEN} tokens.", "",
             "| method | ratio | built-in | Brown | removed: attn+MLP / whole model | heads per layer | prune s |",
             "|---|---|---|---|---|---|---|",
             f"| dense | – | {_fmt(dense.get('builtin@128'))} | {_fmt(dense.get('brown@128'))} | – | 4 | – |"]
    for c in results.get("cells", {}).values():
        heads = sorted(set(c["heads_per_layer"]))
        heads_s = str(heads[0]) if len(heads) == 1 else f"{min(heads)}–{max(heads)} ({c['heads_per_layer']})"
        removed = f"{c['params']['ratio_attn_mlp']:.1%} / {c['params']['ratio_total']:.1%}"
        lines.append(f"| {c['method']} | {c['ratio']:.0%} | {_fmt(c['evals'].get('builtin@128'))} | "
                     f"{_fmt(c['evals'].get('brown@128'))} | {removed} | "
                     f"{heads_s} | {_fmt(c['prune_s'])} |")
    rec = results.get("recovery")
    if rec and rec.get("evals"):
        lines.append(f"| {rec['pruned']} + recovery {rec['tokens']:,} tokens | 20% | "
                     f"{_fmt(rec['evals'].get('builtin@128'))} | {_fmt(rec['evals'].get('brown@128'))} | | | "
                     f"train {rec['timing']['train_seconds']:.0f} s |")
    chk = results.get("reload")
    if chk:
        lines += ["", f"Reload check (rcpu 30 %, in memory): saved as `{chk['model_type']}` with "
                      f"{chk['num_attention_heads']} heads, reloaded as {chk['reloaded_class']}; logits identical: "
                      f"{chk['logits_identical']}; weights identical to the streamed cell: "
                      f"{chk.get('streamed_weights_identical', 'not compared')}."]
    g = results.get("gguf")
    if g:
        lines += ["", f"GGUF, perplexity on the first {g['windows']} windows of the built-in held-out text "
                      f"(BOS + {g['seqlen'] - 1} tokens):", "",
                  "| model | GGUF type | file MB | llama.cpp | transformers (GGUF) | transformers (safetensors) |",
                  "|---|---|---|---|---|---|"]
        for r in g["rows"]:
            lines.append(f"| {r['name']} | {r['quant']} | {r['bytes'] / 1e6:.1f} | {_fmt(r.get('ppl_llama_cpp'))} | "
                         f"{_fmt(r.get('ppl_transformers'))} | {_fmt(r.get('ppl_safetensors'))} |")
        for s in g.get("skipped", []):
            lines.append(f"| {s['name']} | {s['quant']} | skipped: {s['reason']} | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="dense,prune,reload,recover,gguf")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    methods, ratios = args.methods.split(","), [float(r) for r in args.ratios.split(",")]
    unknown = [m for m in methods if m not in METHODS] + [r for r in ratios if r not in RATIOS]
    if unknown:
        p.error(f"not cells of this benchmark: {unknown}; methods {list(METHODS)}, ratios {RATIOS}")
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "log.txt"
    results = _load()
    results.setdefault("evals", {})
    results.setdefault("cells", {})
    results["protocol"] = {
        "model": MODEL, "calibration": {"source": "builtin", "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": 0},
        "eval_texts": list(EVAL_TEXTS), "eval_seqlen": EVAL_SEQLEN, "max_eval_tokens": MAX_EVAL_TOKENS,
        "bos": "every window starts with the tokenizer's BOS (never scored)", "dtype": "float32",
        "device": args.device, "recovery": {"tokens": RECOVER_TOKENS, "flags": RECOVER_FLAGS},
        "command": "python benchmarks/gemma3_table.py",
    }
    parts = args.parts.split(",")
    if "dense" in parts:
        evaluate(results, "dense", MODEL, args.device, log)
    if "prune" in parts:
        for ratio in ratios:
            for method in methods:
                prune_cell(results, method, ratio, args.device, log)
    if "reload" in parts:
        reload_check(results, args.device)
    if "recover" in parts:
        recover(results, args.device, log)
    if "gguf" in parts:
        gguf(results, log)
    _save(results)
    print(markdown(results))


if __name__ == "__main__":
    main()
