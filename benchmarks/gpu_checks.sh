#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go:
#   1. the CUDA tests (tests/test_cuda.py);
#   2. a randomly initialised 7B-shaped checkpoint (bf16, one shard per layer), pruned by rcpu at
#      20 % on the GPU in bfloat16, streamed layer by layer, with its time and memory record;
#   3. the speed of that pruned model against the dense one on the GPU (batch 1 decode-bound,
#      batch 16 with long prompts), and of the same prune with --round_to 64;
#   4. recovery of that pruned model under torchrun (rcpu recover, 16 steps of 8 x 128 tokens of a
#      synthetic text): with two or more GPUs, 2 processes with DDP (LoRA), FSDP (every weight) and
#      FSDP (ALLoRA); with one GPU, one process with DDP and one with FSDP (the same wrapping code on
#      one device). Each run's report must name the strategy and process count it ran with;
#   5. the whole test suite with the GPU visible (the CLI then defaults to CUDA).
# A failing step does not stop the later ones; the exit status says whether all passed.
#
#     bash benchmarks/gpu_checks.sh [OUTPUT_DIR]      # default benchmarks/results/gpu
#
# Environment: SHAPE (random_checkpoint.py shape, default llama-7b), LAYERS (default 8),
# TOKENIZER (tokenizer directory; default the built-in SmolLM2's), DEVICE (default cuda),
# NSAMPLES (calibration windows of 128 tokens, default 128), PYTEST_ARGS (extra arguments for
# the whole-suite run, e.g. '-m "not slow"' where the built-in model cannot be downloaded; with
# pytest-xdist's -n 14 on one H100, two rcpu compare tests ran past a 150 s timeout, so the
# default is one process), SUITE_THREADS (torch threads per test process; set it to the cores over
# the xdist workers, since every process otherwise takes all cores), SKIP (space-separated step
# names to leave out, e.g. "speed_b1").
# Needs the package and its test extras (pip install -e ".[test]").
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
device="${DEVICE:-cuda}"
shape="${SHAPE:-llama-7b}"
layers="${LAYERS:-8}"
nsamples="${NSAMPLES:-128}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()

step() {  # step NAME COMMAND...: run, time and record one step
    local name="$1" t0=$SECONDS rc
    shift
    if [[ " ${SKIP:-} " == *" $name "* ]]; then
        echo "== $name: skipped (SKIP)"
        return
    fi
    echo "== $name"
    "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

environment() {
    python - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.1f} GiB")
EOF
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
}

if [ "$device" = cuda ]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')" || exit 1
fi
environment | tee "$out/environment.txt"

step cuda_tests bash -o pipefail -c "python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee '$out/test_cuda.log'"

tok=()
[ -n "${TOKENIZER:-}" ] && tok=(--tokenizer "$TOKENIZER")
step checkpoint python benchmarks/random_checkpoint.py --shape "$shape" --layers "$layers" --dtype bfloat16 \
    "${tok[@]}" --out "$work/dense"
step prune bash -o pipefail -c "python -m rcpu.cli prune --model '$work/dense' --method rcpu --pruning_ratio 0.2 \
    --dtype bfloat16 --device '$device' --nsamples '$nsamples' --seqlen 128 --eval none \
    --save_model '$work/rcpu20' 2>&1 | tee '$out/prune.log'"
[ -f "$work/rcpu20/rcpu_provenance.json" ] && cp "$work/rcpu20/rcpu_provenance.json" "$out/prune_provenance.json"
step speed_b1 python benchmarks/speed.py --model "$work/rcpu20" --baseline "$work/dense" --device "$device" \
    --dtype bfloat16 --batch_size 1 --prompt_len 128 --new_tokens 64 --quiet --output "$out/speed_b1.json"
step speed_b16 python benchmarks/speed.py --model "$work/rcpu20" --baseline "$work/dense" --device "$device" \
    --dtype bfloat16 --batch_size 16 --prompt_len 512 --new_tokens 32 --quiet --output "$out/speed_b16.json"
# the same with the kept MLP width rounded to a multiple of 64 (8807 -> 8832 for the 7B shape)
step prune_round64 bash -o pipefail -c "python -m rcpu.cli prune --model '$work/dense' --method rcpu \
    --pruning_ratio 0.2 --round_to 64 --dtype bfloat16 --device '$device' --nsamples '$nsamples' --seqlen 128 \
    --eval none --save_model '$work/rcpu20r64' 2>&1 | tail -n 12 | tee '$out/prune_round64.log'"
step speed_b16_round64 python benchmarks/speed.py --model "$work/rcpu20r64" --baseline "$work/dense" \
    --device "$device" --dtype bfloat16 --batch_size 16 --prompt_len 512 --new_tokens 32 --quiet \
    --output "$out/speed_b16_round64.json"
# recovery under torchrun: a synthetic text (seeded random words; train and eval from other seeds)
python - "$work" <<'EOF'
import builtins, keyword, random, sys
words = sorted(set(keyword.kwlist) | {w.lower() for w in dir(builtins) if w.isalpha()})
for name, seed, n in (("train", 0, 40000), ("eval", 1, 8000)):
    rng = random.Random(seed)
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(n // 60))
    open(f"{sys.argv[1]}/{name}.txt", "w").write(text)
EOF
recover_run() {  # recover_run NAME NPROC STRATEGY FLAGS...: a torchrun recovery, then its report checked
    local name="$1" nproc="$2" strategy="$3"
    shift 3
    torchrun --standalone --nproc_per_node "$nproc" -m rcpu.cli recover --model "$work/rcpu20" \
        --teacher "$work/dense" --data "$work/train.txt" --eval "$work/eval.txt" --device cuda --dtype float32 \
        --autocast bfloat16 --tokens 16384 --seqlen 128 --batch_size 8 --eval_seqlen 128 --max_eval_tokens 4096 \
        --heldout 8 --eval_every 8 --save_every 8 "$@" --save_model "$work/$name" --report "$out/$name.json" \
        2>&1 | tee "$out/$name.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
    rm -rf "$work/$name"
    python - "$out/$name.json" "$strategy" "$nproc" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["distributed"]
want = (sys.argv[2], int(sys.argv[3]), "cuda:0")
sys.exit(0 if (r["strategy"], r["world_size"], r["device"]) == want else f"ran as {r}, expected {want}")
EOF
}
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then  # two processes, one per GPU (cuda:LOCAL_RANK)
    step recover_ddp2 recover_run recover_ddp2 2 ddp --parameters lora --lr 1e-3
    step recover_fsdp2 recover_run recover_fsdp2 2 fsdp --fsdp --parameters full --gradient_checkpointing
    step recover_fsdp2_allora recover_run recover_fsdp2_allora 2 fsdp --fsdp --parameters allora --lr 1e-3
else  # one process under torchrun still wraps the models with DDP / FSDP
    step recover_ddp1 recover_run recover_ddp1 1 ddp --parameters lora --lr 1e-3
    step recover_fsdp1 recover_run recover_fsdp1 1 fsdp --fsdp --parameters full --gradient_checkpointing
fi
rm -rf "$work/dense" "$work/rcpu20" "$work/rcpu20r64"

step test_suite env ${SUITE_THREADS:+OMP_NUM_THREADS=$SUITE_THREADS} bash -o pipefail -c "python -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee '$out/test_all.log'"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
