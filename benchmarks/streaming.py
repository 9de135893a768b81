"""Streamed (layer-by-layer) pruning: memory and time, against the in-memory path; resume.

Parts (each stored in the JSON as it finishes; finished parts are skipped when rerun):

- ``smollm2``: SmolLM2-135M, rcpu at 20 %, 128 x 128 calibration tokens, streamed vs in-memory
  (``--no-stream``), each in its own process: peak RSS, wall time, pruning time, identical bytes.
- ``resume``: the streamed SmolLM2 run killed with SIGKILL after a few layers, then ``--resume``:
  the result must be byte-identical to the uninterrupted streamed run.
- ``13b-wanda``: a randomly initialised Llama-2-13B-shaped checkpoint (40 layers, bf16, one shard
  per layer, about 26 GB; larger than this machine's RAM), written shard by shard without ever
  holding it; wanda-sp over the full depth, streamed, with 8 x 128 calibration tokens.
- ``13b-rcpu``: rcpu on the first 3 layers of the same shapes, with the time per layer, the
  compensation (solve / SVD) share of it, and the extrapolation to 40 layers. With 8 x 128
  tokens, fewer than the rotation needs (min(d_out, |K|) = 4096 and 5120), every sublayer
  takes the documented fallback, which is known before any Gram matrix is collected.
- ``13b-rcpu-rotation``: the same with 48 x 128 = 6144 calibration tokens, so that the
  rotation runs in every sublayer (5120^2 SVDs). With that few tokens the MLP's products are
  streamed from a second pass (``--rotation_products auto`` picks it as the cheaper route).
- ``13b-rcpu-rotation-gram``: that with ``--rotation_products gram`` (down_proj's 13824^2
  Gram matrix, 1.46 GiB in float64), and ``13b-rcpu-rotation-gram32`` with it in float32.
- ``eval-7b``: ``rcpu prune --save_model`` with the perplexity before and after (the default
  ``--eval builtin``) on a randomly initialised Llama checkpoint with Mistral-7B's widths and 12
  layers (bf16, 6.0 GB), against the same command with ``--eval none``: peak RSS and time. With
  ``--before-src DIR`` (the ``src`` folder of an older rcpu), the command with the default
  evaluation is run with that code too and recorded under ``before``.

    python benchmarks/streaming.py [--parts smollm2,resume,13b-wanda,13b-rcpu,13b-rcpu-rotation,...] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "streaming" / "results.json"
PARTS = ("smollm2", "resume", "13b-wanda", "13b-rcpu", "13b-rcpu-rotation", "13b-rcpu-rotation-gram",
         "13b-rcpu-rotation-gram32", "eval-7b")


def _run(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time -v; return wall seconds, peak RSS and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for k in ("User", "System"))
    # CPU seconds (user + system) are less sensitive than wall time to other load on the machine
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": round(rss_kib / 1024, 1),
            "stdout": proc.stdout}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _identical(a: Path, b: Path) -> bool:
    import torch

    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _prov(path: Path) -> dict:
    return json.loads((path / "rcpu_provenance.json").read_text())


def _prune_cmd(model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rcpu.cli", "prune", "--model", model, "--save_model", str(out),
            "--eval", "none", "--device", "cpu", "-q", "--overwrite", *extra]


def part_smollm2(work: Path) -> dict:
    res = {}
    for mode, extra in (("streamed", []), ("in_memory", ["--no-stream"])):
        out = work / f"smol-{mode}"
        r = _run(_prune_cmd("smollm2-135m", out, "--method", "rcpu", "--pruning_ratio", "0.2", *extra))
        prov = _prov(out)
        res[mode] = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss_mib": r["peak_rss_mib"],
                     "prune_s": prov["timings"]["prune_s"],
                     "per_layer_s_mean": round(sum(x["seconds"] for x in prov["layers"]) / len(prov["layers"]), 2)}
        print(mode, res[mode], flush=True)
    res["identical_bytes"] = _identical(work / "smol-streamed", work / "smol-in_memory")
    res["settings"] = "rcpu, ratio 0.2, 128 x 128 calibration tokens (built-in text), float32, CPU, --eval none"
    return res


def part_resume(work: Path) -> dict:
    out = work / "smol-resumed"
    shutil.rmtree(out, ignore_errors=True)
    partial = out.with_name(f".{out.name}.rcpu-partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = _prune_cmd("smollm2-135m", out, "--method", "rcpu", "--pruning_ratio", "0.2")
    cmd.remove("--overwrite")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = partial / "rcpu_resume.json"
    killed_at = 0
    while proc.poll() is None:
        if state.is_file():
            try:
                killed_at = json.loads(state.read_text())["next_layer"]
            except (ValueError, KeyError):
                pass
            if killed_at >= 10:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    killed_at = json.loads(state.read_text())["next_layer"]
    r = _run(cmd + ["--resume"])
    line = next(x for x in r["stdout"].splitlines() if x.startswith("resuming at layer"))
    res = {"killed_after_layers": killed_at, "signal": "SIGKILL", "printed": line, "resume_wall_s": r["wall_s"],
           "work_dir_removed": not partial.exists(),
           "identical_to_uninterrupted": _identical(out, work / "smol-streamed")}
    print(res, flush=True)
    return res


def _make_13b(work: Path, layers: int) -> Path:
    path = work / f"llama2-13b-{layers}l-bf16"
    if not (path / "config.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "random_checkpoint.py"), "--shape", "llama2-13b", "--layers",
                        str(layers), "--dtype", "bfloat16", "--out", str(path)], check=True)
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _dir_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9, 2)


def part_13b(work: Path, method: str, layers: int, *extra: str, nsamples: int = 8) -> dict:
    src = _make_13b(work, layers)
    out = work / f"13b-{method}-out"
    r = _run(_prune_cmd(str(src), out, "--method", method, "--pruning_ratio", "0.2", "--nsamples", str(nsamples),
                        "--seqlen", "128", "--dtype", "bfloat16", *extra))
    prov = _prov(out)
    secs = [x["seconds"] for x in prov["layers"]]
    comp = [x["attn"].get("compensate_s", 0) + x["mlp"].get("compensate_s", 0) for x in prov["layers"]]
    res = {"checkpoint_gb": _dir_gb(src), "layers": layers, "output_gb": _dir_gb(out),
           "peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
           "prune_s": prov["timings"]["prune_s"],
           "per_layer_s": [round(s, 2) for s in secs], "per_layer_s_mean": round(sum(secs) / len(secs), 2),
           "compensate_share": round(sum(comp) / sum(secs), 3) if sum(secs) else 0,
           "per_layer_peak_rss_mib": [x["memory"].get("peak_rss_mib") for x in prov["layers"]],
           # solve / SVD (with the Gram route, the products too) per sublayer; the MLP's
           # products pass when they are streamed
           "attn_compensate_s": [x["attn"].get("compensate_s") for x in prov["layers"]],
           "mlp_compensate_s": [x["mlp"].get("compensate_s") for x in prov["layers"]],
           "mlp_products_pass_s": [x["mlp"].get("products_pass_s") for x in prov["layers"]],
           "memory": prov["memory"], "params": {k: prov["params"][k] for k in ("total_before", "total_after")},
           "fallbacks": sum(sub in x and "fallback" in x[sub] for x in prov["layers"] for sub in ("attn", "mlp")),
           "settings": f"{method}, ratio 0.2, {nsamples} x 128 calibration tokens, bfloat16, CPU, --eval none"
                       + "".join(f" {x}" for x in extra)}
    if layers < 40:
        res["extrapolated_40_layers_s"] = round(res["per_layer_s_mean"] * 40, 0)
    shutil.rmtree(out)
    print({k: v for k, v in res.items() if k not in ("per_layer_s", "per_layer_peak_rss_mib")}, flush=True)
    return res


def _make_7b(work: Path, layers: int = 12) -> Path:
    path = work / f"llama-7b-shape-{layers}l-bf16"
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "random_checkpoint.py"), "--shape", "mistral-7b-as-llama",
                        "--layers", str(layers), "--dtype", "bfloat16", "--out", str(path)], check=True)
    return path


def _ppl_line(stdout: str, which: str) -> str | None:
    return next((x.split(":", 1)[1].strip() for x in stdout.splitlines() if x.startswith(which)), None)


def part_eval_7b(work: Path, before_src: str | None) -> dict:
    """Peak RSS of a streamed prune with and without the perplexity before and after."""
    src = _make_7b(work)
    # few tokens: bfloat16 matrix products are slow on a CPU, and the peak is the weights'
    settings = ["--method", "wanda-sp", "--pruning_ratio", "0.2", "--nsamples", "2", "--seqlen", "64",
                "--dtype", "bfloat16", "--eval_seqlen", "64", "--max_eval_tokens", "128"]
    res: dict = {"checkpoint_gb": _dir_gb(src), "layers": 12,
                 "settings": "wanda-sp, ratio 0.2, 2 x 64 calibration tokens, bfloat16, CPU, "
                             "perplexity on 128 built-in tokens (2 windows of 64)"}
    # the older code is run with the default evaluation only: its --eval none path is this one's
    runs = [("after", None, "eval_builtin"), ("after", None, "eval_none")]
    if before_src:
        runs.append(("before", before_src, "eval_builtin"))
    for code, path, mode in runs:
        env = None if path is None else {**os.environ, "PYTHONPATH": path}
        res.setdefault(code, {})
        cmd = _prune_cmd(str(src), work / "7b-out", *settings)
        if mode == "eval_builtin":  # the default evaluation: drop _prune_cmd's --eval none
            i = cmd.index("--eval")
            del cmd[i:i + 2]
        r = _run(cmd, env=env)
        res[code][mode] = {"peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                           "dense": _ppl_line(r["stdout"], "dense"), "pruned": _ppl_line(r["stdout"], "pruned")}
        print(code, mode, res[code][mode], flush=True)
    res["command"] = " ".join(["rcpu prune --model", str(src), "--save_model OUT", *settings, "--device cpu"])
    shutil.rmtree(work / "7b-out", ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/rcpu/bench-streaming"))
    ap.add_argument("--redo", action="store_true", help="rerun parts already in the JSON")
    ap.add_argument("--before-src", default=None,
                    help="eval-7b: also run with the rcpu in this src folder (an older version), as 'before'")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    from rcpu.report import versions

    results["machine"] = {"cpus": os.cpu_count(), "versions": versions()}
    for part in args.parts.split(","):
        if part in results and not args.redo:
            print(f"{part}: done earlier, skipped")
            continue
        if part == "smollm2":
            results[part] = part_smollm2(work)
        elif part == "resume":
            results[part] = part_resume(work)
        elif part == "13b-wanda":
            results[part] = part_13b(work, "wanda-sp", 40)
        elif part == "13b-rcpu":
            results[part] = part_13b(work, "rcpu", 3)
        elif part == "13b-rcpu-rotation":
            results[part] = part_13b(work, "rcpu", 3, nsamples=48)
        elif part == "13b-rcpu-rotation-gram":
            results[part] = part_13b(work, "rcpu", 3, "--rotation_products", "gram", nsamples=48)
        elif part == "13b-rcpu-rotation-gram32":
            results[part] = part_13b(work, "rcpu", 3, "--rotation_products", "gram", "--gram_dtype", "float32",
                                     nsamples=48)
        elif part == "eval-7b":
            results[part] = part_eval_7b(work, args.before_src)
        else:
            raise SystemExit(f"unknown part {part}; choose from {', '.join(PARTS)}")
        tmp = OUT.with_name(OUT.name + ".partial")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, OUT)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
