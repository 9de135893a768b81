"""Recovery by distillation (rcpu recover): the loss, the adapters, the checkpoint, resume, DDP, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_text, make_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rcpu import RcpuError
from rcpu.cli import main
from rcpu.recover import RecoverConfig, distillation_loss, reference_distillation_loss
from rcpu.recover.params import attach_trainable, merge_trainable
from rcpu.recover.run import work_dir_for
from rcpu.recover.windows import TrainingWindows

# ----------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.0, 1.0), (0.3, 2.0)])
@pytest.mark.parametrize("chunk_elements", [7 * 50, 1 << 30])  # 7 positions per chunk, or all at once
def test_loss_and_gradients_equal_the_direct_computation(alpha, temperature, chunk_elements):
    torch.manual_seed(0)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    loss = distillation_loss(hidden, weight, bias, labels, teacher_hidden=t_hidden, teacher_weight=t_weight,
                             alpha=alpha, temperature=temperature, chunk_elements=chunk_elements)
    grads = torch.autograd.grad(loss, [hidden, weight, bias])

    z, zt = F.linear(hidden, weight, bias), t_hidden @ t_weight.T  # direct, in float64
    direct = (1 - alpha) * F.cross_entropy(z, labels)
    direct = direct + alpha * temperature**2 * F.kl_div(torch.log_softmax(z / temperature, -1),
                                                       torch.log_softmax(zt / temperature, -1),
                                                       reduction="batchmean", log_target=True)
    expected = torch.autograd.grad(direct, [hidden, weight, bias])
    assert abs(loss.item() - direct.item()) < 1e-5 * max(1.0, abs(direct.item()))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert abs(reference_distillation_loss(z, zt, labels, alpha, temperature).item() - direct.item()) < 1e-4


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4)  # frozen (LoRA leaves the head alone)
    loss = distillation_loss(hidden, weight, None, torch.zeros(5, dtype=torch.long), teacher_hidden=torch.randn(5, 4),
                             teacher_weight=torch.randn(9, 4))
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0 and weight.grad is None


# ------------------------------------------------------------------------------------------ adapters


def test_merged_lora_gives_the_adapter_models_logits():
    model = make_model("qwen2", layers=2)
    peft_model = attach_trainable(model, RecoverConfig(parameters="lora", lora_rank=4))
    with torch.no_grad():  # B starts at zero: give the adapters something to merge
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 128, (2, 16))
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    merged = merge_trainable(peft_model)
    assert type(merged).__name__ == "Qwen2ForCausalLM" and not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def _adapter_steps(cfg: RecoverConfig, steps: int) -> tuple[list[dict], list[dict]]:
    """Train a tiny model's adapters for ``steps`` AdamW steps as recovery builds them: the adapter
    tensors before each step and after the last, and the gradient each step saw."""
    from rcpu.recover.params import build_optimizer

    model = attach_trainable(make_model("llama", layers=1), cfg)
    _, optimizer = build_optimizer(model, cfg)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    states, grads = [{n: p.detach().clone() for n, p in named.items()}], []
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in named.items()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        states.append({n: p.detach().clone() for n, p in named.items()})
    return states, grads


def test_allora_is_the_papers_per_row_learning_rate_under_adamw():
    """ALLoRA (arXiv:2410.09692): each row of an adapter matrix learns at lr / sqrt(|row|^2 + 1/eta^2).
    Under AdamW that must change the update itself: scaling the gradient before Adam would cancel."""
    eta, lr, wd = 3.0, 1e-2, 0.1
    cfg = RecoverConfig(parameters="allora", lora_rank=4, lora_targets=("q_proj", "v_proj"), allora_eta=eta,
                        lr=lr, weight_decay=wd)
    states, grads = _adapter_steps(cfg, 3)
    # the rule computed directly: AdamW's moments from the gradients, each row's step scaled by its coefficient
    b1, b2, eps = 0.9, 0.999, 1e-8
    for name in states[0]:
        m = v = torch.zeros_like(states[0][name])
        for t, g in enumerate((gr[name] for gr in grads), start=1):
            theta = states[t - 1][name]
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            adam = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            row_lr = lr / torch.sqrt(theta.pow(2).sum(1, keepdim=True) + 1 / eta**2)
            torch.testing.assert_close(states[t][name], theta - row_lr * (wd * theta + adam), rtol=1e-5, atol=1e-7)
    # LoRA at scale 1 (lora_alpha = rank) from the same start sees the same first gradient, and moves less:
    # B starts at zero, so its rows learn at eta * lr under ALLoRA and at lr under LoRA
    lora, lora_grads = _adapter_steps(RecoverConfig(parameters="lora", lora_rank=4, lora_alpha=4.0,
                                                    lora_targets=("q_proj", "v_proj"), lr=lr, weight_decay=wd), 1)
    b_name = next(n for n in states[0] if "lora_B" in n)
    torch.testing.assert_close(lora_grads[0][b_name], grads[0][b_name])
    step_allora, step_lora = states[1][b_name] - states[0][b_name], lora[1][b_name] - lora[0][b_name]
    assert step_lora.abs().max() > 0
    torch.testing.assert_close(step_allora, eta * step_lora, rtol=1e-4, atol=1e-9)


def test_lora_targets_follow_the_family_layout():
    """--lora_targets names Llama's seven projections; on Phi-3 they are its fused qkv_proj and
    gate_up_proj (which peft, matching names, would have skipped), and the fused names work on
    an unfused family. Adapters go exactly on those modules."""
    from rcpu.recover.params import lora_modules

    llama, phi3 = make_model("llama", layers=2), make_model("phi3", layers=2)
    default = RecoverConfig().lora_targets
    assert lora_modules(phi3, default)[0] == ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                              "mlp.down_proj"]
    assert lora_modules(phi3, ("v_proj", "up_proj"))[0] == ["self_attn.qkv_proj", "mlp.gate_up_proj"]
    assert lora_modules(llama, ("qkv_proj",))[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert lora_modules(llama, default)[0] == [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    peft_model = attach_trainable(phi3, RecoverConfig(parameters="lora", lora_rank=2))
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n, p in peft_model.named_parameters()
               if p.requires_grad}
    assert adapted == {f"model.layers.{i}.{m}" for i in range(2) for m in lora_modules(phi3, default)[0]}
    with pytest.raises(RcpuError, match="unknown projections"):
        RecoverConfig(lora_targets=("qkv",)).validate()


def test_windows_hold_out_and_batch_reproducibly():
    ids = torch.arange(1000)
    w = TrainingWindows.from_ids(ids, 10, heldout=5, seed=3)
    assert w.train.shape == (95, 10) and w.heldout.shape == (5, 10)
    train_starts = set(w.train[:, 0].tolist())
    assert not train_starts & set(w.heldout[:, 0].tolist())
    again = TrainingWindows.from_ids(ids, 10, heldout=5, seed=3)
    for step in (0, 7, 30):  # 30 x 4 windows crosses an epoch
        assert torch.equal(w.batch(step, 4), again.batch(step, 4))
    epoch = torch.cat([w.batch(s, 5) for s in range(19)])  # one epoch visits every window once
    assert sorted(epoch[:, 0].tolist()) == sorted(train_starts)


# ------------------------------------------------------------------------ evaluation text in training


@pytest.mark.parametrize("chunk", [1 << 23, 97])  # one piece, or many (runs crossing the pieces' borders)
def test_training_text_holding_evaluation_passages_is_found_whatever_the_whitespace(monkeypatch, chunk):
    from rcpu.recover import overlap

    monkeypatch.setattr(overlap, "_CHUNK", chunk)
    train, ev = make_text(3000, seed=0), make_text(1500, seed=5)
    ev_words = ev.split()
    passage = " ".join(ev_words[700:740])  # 40 words: about one evaluation window of these words
    leaks = {
        "train + eval": train + "\n\n" + ev,
        "eval + train": ev + train,  # no separator: a file boundary mid-line
        "extra newlines": ev.replace(" w1", "\n\nw1"),
        "changed spaces": "  ".join(ev_words[:200]).replace("w2", "\tw2 "),
        "one passage inside": train[:5000] + " " + passage.replace(" ", "\n", 3) + " " + train[5000:],
    }
    for name, leaked in leaks.items():
        found = overlap.find_overlap(leaked, ev)
        assert found and found.example, name
        assert " ".join(found.example.split()) in " ".join(ev.split()), name
    whole = overlap.find_overlap(train + "\n" + ev, ev)
    assert whole.eval_runs == whole.eval_total  # every run of the evaluation text is there
    clean = overlap.find_overlap(train, ev)
    assert not clean and clean.runs == 0 and clean.eval_total == len(overlap.words(ev)) - overlap.NGRAM + 1
    assert not overlap.find_overlap(train, " ".join(ev_words[:overlap.NGRAM - 1]))  # shorter than a run


def test_recover_refuses_training_text_with_evaluation_passages(pruned, tmp_path, capsys):
    out = tmp_path / "never"
    ev = (pruned / "eval.txt").read_text()
    words = ev.split()
    cases = {"concatenated": (pruned / "train.txt").read_text() + ev,
             "reflowed": "\n".join(" ".join(words[i:i + 7]) for i in range(0, len(words), 7)),
             "a window inside": (pruned / "train.txt").read_text() + "  ".join(words[1000:1040])}
    for name, text in cases.items():
        (tmp_path / f"{name}.txt").write_text(text)
        args = _recover_args(pruned, out)
        args[args.index("--data") + 1] = str(tmp_path / f"{name}.txt")
        _fails(capsys, args, "contains the evaluation text")
    assert not out.exists() and not work_dir_for(out).exists()
    from rcpu.recover import RecoverInputs, check_texts

    check_texts(RecoverInputs(data=str(pruned / "train.txt"), eval=str(pruned / "eval.txt")))  # the clean pair passes


# ------------------------------------------------------------------------------- end to end (CLI)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny model, its 50 %-pruned checkpoint (rcpu, with provenance), and two texts."""
    root = tmp_path_factory.mktemp("recover")
    model = make_model("llama", layers=2, initializer_range=0.2)
    model.save_pretrained(root / "dense")
    make_tokenizer().save_pretrained(root / "dense")
    (root / "train.txt").write_text(make_text(12000, seed=0))
    (root / "eval.txt").write_text(make_text(3000, seed=5))
    assert main(["prune", "--model", str(root / "dense"), "--calib", str(root / "train.txt"), "--eval", "none",
                 "--nsamples", "16", "--seqlen", "32", "--pruning_ratio", "0.5", "--save_model", str(root / "pruned"),
                 "-q"]) == 0
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _recover_args(root, out, *extra):
    return ["recover", "--model", str(root / "pruned"), "--data", str(root / "train.txt"), "--eval",
            str(root / "eval.txt"), "--seqlen", "32", "--eval_seqlen", "32", "--batch_size", "4", "--lr", "3e-3",
            "--save_model", str(out), "-q", *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_recover_lowers_heldout_kl_and_reloads_with_identical_logits(pruned, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(_recover_args(pruned, out, "--tokens", "8000", "--parameters", "lora", "--lora_rank", "4", "--lr", "2e-2",
                              "--alpha", "1")) == 0
    text = capsys.readouterr().out
    assert "held-out KL to the teacher" in text and "tokens/s" in text
    prov = json.loads((out / "rcpu_provenance.json").read_text())
    rec = prov["recovery"]
    assert prov["config"]["pruning_ratio"] == 0.5  # the pruning record is kept
    assert rec["teacher"]["source"] == str(pruned / "dense")  # from the pruned model's provenance
    assert rec["config"]["parameters"] == "lora" and rec["config"]["tokens"] == 8000
    assert rec["data"]["sha256"] and rec["data"]["train_windows"] > 0 and rec["versions"]["torch"]
    before, after = rec["evaluation"]["before"], rec["evaluation"]["after"]
    assert after["heldout"]["kl"] < 0.8 * before["heldout"]["kl"]
    assert after["perplexity"][0]["ppl"] < before["perplexity"][0]["ppl"]
    assert len(rec["curve"]) == rec["timing"]["steps"] and rec["timing"]["tokens_per_second"] > 0
    curve = rec["heldout_curve"]  # training tokens at each measurement, and how many held-out tokens it scored
    assert [h["tokens"] for h in curve] == [h["step"] * 4 * 32 for h in curve] and curve[-1]["tokens"] > 0
    assert len({h["heldout_tokens"] for h in curve}) == 1
    assert not work_dir_for(out).exists()

    stock = AutoModelForCausalLM.from_pretrained(out)  # uniform widths: stock transformers
    assert not any("lora" in k for k in _weights(out))
    pruned_model = AutoModelForCausalLM.from_pretrained(pruned / "pruned")
    assert stock.config.intermediate_size == pruned_model.config.intermediate_size
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert not torch.equal(stock(input_ids=ids).logits, pruned_model(input_ids=ids).logits)  # it did train
    from rcpu.loading import load_model

    again = load_model(str(out)).model
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_recover_per_layer_widths_reloads_with_remote_code(pruned, tmp_path):
    src = tmp_path / "flap"
    assert main(["prune", "--model", str(pruned / "dense"), "--calib", str(pruned / "train.txt"), "--eval", "none",
                 "--nsamples", "16", "--seqlen", "32", "--method", "flap", "--pruning_ratio", "0.4",
                 "--save_model", str(src), "-q"]) == 0
    if not (src / "modeling_rcpu.py").exists():
        pytest.skip("FLAP gave equal widths on this model")
    out = tmp_path / "rec"
    args = _recover_args(pruned, out, "--tokens", "2000")
    args[args.index("--model") + 1] = str(src)
    assert main(args) == 0
    assert (out / "modeling_rcpu.py").exists()
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    from rcpu.loading import load_model

    ours = load_model(str(out)).model
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(remote(input_ids=ids).logits, ours(input_ids=ids).logits)
    widths = json.loads((out / "config.json").read_text())
    assert widths["model_type"].startswith("rcpu_")


def test_prune_with_recover_tokens(pruned, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["prune", "--model", str(pruned / "dense"), "--calib", str(pruned / "train.txt"), "--eval",
                 str(pruned / "eval.txt"), "--nsamples", "16", "--seqlen", "32", "--eval_seqlen", "32",
                 "--pruning_ratio", "0.5", "--recover_tokens", "3000", "--save_model", str(out), "-q"]) == 0
    assert "held-out KL to the teacher" in capsys.readouterr().out
    prov = json.loads((out / "rcpu_provenance.json").read_text())
    assert prov["recovery"]["config"]["tokens"] == 3000 and prov["layers"]
    assert not list(tmp_path.glob(".both*"))  # the pruned intermediate and the work directory are gone
    AutoModelForCausalLM.from_pretrained(out)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start_and_wait_for_step(cmd: list[str], out: Path, step: int) -> tuple[subprocess.Popen, Path]:
    """Start a recovery run and return once its checkpoint has reached ``step`` (still running)."""
    # SIGINT at its default: a shell starts background jobs with it ignored, and Python keeps an inherited
    # ignore, so the suite run with `&` (or under nohup) would otherwise never see the Ctrl-C it sends
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = work_dir_for(out) / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= step:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    return proc, state


@pytest.mark.parametrize("extra", [[], ["--quant_aware", "q4_0"]], ids=["plain", "quant_aware"])
def test_resume_after_sigkill_gives_identical_weights(pruned, tmp_path, extra):
    """A real process is killed with SIGKILL mid-training; --resume finishes with the same bits as an
    uninterrupted run (both sides run as subprocesses with the same thread count). Quantisation-aware
    training checkpoints the unrounded weights under their parametrized names."""
    common = _recover_args(pruned, tmp_path / "x", "--tokens", "24000", "--save_every", "1", "--eval_every", "0",
                           *extra)
    ref, out = tmp_path / "ref", tmp_path / "out"

    def cmd(target):
        args = list(common)
        args[args.index("--save_model") + 1] = str(target)
        return [sys.executable, "-m", "rcpu.cli", *args]

    run = subprocess.run(cmd(ref), capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr
    proc, state = _start_and_wait_for_step(cmd(out), out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and work_dir_for(out).exists()
    killed_at = json.loads(state.read_text())["step"]

    again = subprocess.run(cmd(out), capture_output=True, text=True, env=_env())  # no --resume: refused
    assert again.returncode == 2 and "--resume" in again.stderr and not out.exists()
    resumed = subprocess.run(cmd(out) + ["--resume"], capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {killed_at}" in resumed.stdout
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not work_dir_for(out).exists()


#: run the CLI with the checkpoint of step 3 killed between its two renames (the old one moved aside,
#: the new one not yet in place): what a power cut there leaves
_KILL_BETWEEN_RENAMES = """
import json, os, sys
from pathlib import Path
rename = Path.rename
def killing_rename(self, target):
    if Path(target).name == "checkpoint" and json.loads((self / "state.json").read_text())["step"] == 3:
        os._exit(9)
    return rename(self, target)
Path.rename = killing_rename
from rcpu.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_a_kill_between_the_checkpoint_renames(pruned, tmp_path):
    common = _recover_args(pruned, tmp_path / "x", "--tokens", "1280", "--save_every", "1", "--eval_every", "0")
    ref, out = tmp_path / "ref", tmp_path / "out"

    def args(target):
        a = list(common)
        a[a.index("--save_model") + 1] = str(target)
        return a

    run = subprocess.run([sys.executable, "-m", "rcpu.cli", *args(ref)], capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr
    killed = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, *args(out)], capture_output=True, text=True,
                            env=_env())
    assert killed.returncode == 9, killed.stderr
    work = work_dir_for(out)
    assert not (work / "checkpoint").exists() and (work / ".checkpoint.old" / "state.json").is_file()
    resumed = subprocess.run([sys.executable, "-m", "rcpu.cli", *args(out), "--resume"], capture_output=True,
                             text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 2" in resumed.stdout  # from the old checkpoint, not from step 0
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not work.exists()


def test_ctrl_c_leaves_a_checkpoint_that_resumes(pruned, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rcpu.cli",
           *_recover_args(pruned, out, "--tokens", "24000", "--save_every", "1", "--eval_every", "0")]
    proc, _ = _start_and_wait_for_step(cmd, out, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout and (out / "rcpu_provenance.json").is_file()


@pytest.mark.parametrize("nproc,strategy,extra", [
    (2, "ddp", []), (2, "fsdp", ["--fsdp"]), (2, "fsdp", ["--fsdp", "--parameters", "lora", "--lr", "1e-2"]),
    (2, "fsdp", ["--fsdp", "--parameters", "allora", "--lr", "3e-3"]), (1, "fsdp", ["--fsdp"])],
    ids=["ddp", "fsdp", "fsdp-lora", "fsdp-allora", "fsdp-1"])
def test_cpu_processes_equal_one(pruned, tmp_path, nproc, strategy, extra):
    """torchrun with gloo processes (DDP, or FSDP2 sharding both models; one process under torchrun
    still wraps) gives the one-process weights for the same global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    base = _recover_args(pruned, one, "--tokens", "2560", "--eval_every", "0", *extra)
    run = subprocess.run([sys.executable, "-m", "rcpu.cli", *base], capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr
    args = list(base)
    args[args.index("--save_model") + 1] = str(two)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(nproc), "-m", "rcpu.cli", *args], capture_output=True, text=True, env=_env(), timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("saved to") == 1  # one report, from rank 0
    rec = json.loads((two / "rcpu_provenance.json").read_text())["recovery"]
    assert rec["distributed"]["world_size"] == nproc and rec["distributed"]["strategy"] == strategy
    single = json.loads((one / "rcpu_provenance.json").read_text())["recovery"]
    assert single["distributed"]["strategy"] == "single"
    for a, b in zip(single["curve"], rec["curve"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, a["loss"])
    assert abs(single["evaluation"]["after"]["perplexity"][0]["ppl"] - rec["evaluation"]["after"]["perplexity"][0]["ppl"]) < 1e-3
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    dense = _weights(pruned / "pruned")
    assert max((a[k] - dense[k]).abs().max().item() for k in a) > 1e-3  # the comparison is between trained weights


# ------------------------------------------------------------------------------------------- errors


def _fails(capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err


def test_bad_input_is_one_line_and_writes_nothing(pruned, tmp_path, capsys):
    out = tmp_path / "never"
    _fails(capsys, _recover_args(pruned, out, "--tokens", "0"), "--tokens is 0")
    same = _recover_args(pruned, out)
    same[same.index("--eval") + 1] = str(pruned / "train.txt")
    _fails(capsys, same, "contains the evaluation text")
    (tmp_path / "short.txt").write_text("w1 w2 w3 w4 w5")
    short = _recover_args(pruned, out)
    short[short.index("--data") + 1] = str(tmp_path / "short.txt")
    _fails(capsys, short, "too few")
    # no provenance, no --teacher
    bare = tmp_path / "bare"
    shutil.copytree(pruned / "pruned", bare)
    (bare / "rcpu_provenance.json").unlink()
    nop = _recover_args(pruned, out)
    nop[nop.index("--model") + 1] = str(bare)
    _fails(capsys, nop, "pass --teacher")
    # a teacher with another vocabulary
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                                 num_key_value_heads=2, head_dim=8, vocab_size=140)).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    _fails(capsys, _recover_args(pruned, out, "--teacher", str(other)), "vocabulary")
    # prune --recover_tokens refuses overlapping texts before it prunes
    _fails(capsys, ["prune", "--model", str(pruned / "dense"), "--calib", str(pruned / "train.txt"), "--eval",
                    str(pruned / "train.txt"), "--recover_tokens", "1000", "--save_model", str(out), "-q"],
           "contains the evaluation text")
    # an existing output directory
    (tmp_path / "exists").mkdir()
    _fails(capsys, _recover_args(pruned, tmp_path / "exists"), "already exists")
    assert not out.exists() and not work_dir_for(out).exists()


def pruned_for_export(tmp_path: Path, *prune_flags: str) -> tuple[Path, Path]:
    """A tiny BPE-tokenised model pruned with ``prune_flags`` (into tmp_path/pruned), its calibration
    text tmp_path/text.txt and a second text tmp_path/other.txt; returns (pruned dir, calibration text)."""
    from test_gguf_export import _checkpoint

    model_dir = _checkpoint(tmp_path)
    text = tmp_path / "text.txt"
    (tmp_path / "other.txt").write_text(" ".join(f"the x{i % 7} w{i % 29}." for i in range(800)))
    assert main(["prune", "--model", str(model_dir), "--calib", str(text), "--eval", "none", "--nsamples", "8",
                 "--seqlen", "32", *prune_flags, "--save_model", str(tmp_path / "pruned"), "-q"]) == 0
    return tmp_path / "pruned", text


def test_recovered_checkpoint_exports_to_gguf(tmp_path):
    from test_gguf_export import fields

    pruned_dir, text = pruned_for_export(tmp_path, "--pruning_ratio", "0.5", "--round_to", "32")
    rec = tmp_path / "rec"
    assert main(["recover", "--model", str(pruned_dir), "--data", str(text), "--eval", str(tmp_path / "other.txt"),
                 "--tokens", "1024", "--seqlen", "32", "--eval_seqlen", "32", "--heldout", "4", "--save_model",
                 str(rec), "-q"]) == 0
    out = tmp_path / "rec.gguf"
    assert main(["export", "--model", str(rec), "--gguf", str(out), "--quant", "f32", "-q"]) == 0
    meta = fields(out)
    assert meta["llama.feed_forward_length"] == 64 and meta["general.rcpu.method"] == "rcpu"
    assert meta["general.rcpu.recovery_tokens"] == 1024 and meta["general.rcpu.recovery_parameters"] == "full"
    ppl = []
    for model in (str(rec), str(out)):
        assert main(["eval", "--model", model, "--ppl", str(tmp_path / "other.txt"), "--seqlen", "32",
                     "--max_eval_tokens", "512", "--device", "cpu", "-q", "--output", str(tmp_path / "e.json")]) == 0
        ppl.append(json.loads((tmp_path / "e.json").read_text())["perplexity"][0]["ppl"])
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)


# ------------------------------------------------------------------------------------- process placement


class _FakeGroup:
    """torch.distributed and torch.cuda as torchrun on a 4-GPU node would show them to one process."""

    def __init__(self, monkeypatch, rank: int, world: int = 4, gpus: int = 4):
        import torch.distributed as dist

        self.rank, self.world, self.initialized = rank, world, False
        self.calls: list = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.calls.append(("set_device", torch.device(d))))
        monkeypatch.setattr(dist, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(dist, "init_process_group", self._init)
        monkeypatch.setattr(dist, "destroy_process_group", self._destroy)
        monkeypatch.setattr(dist, "get_rank", lambda: self.rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: self.world)

    def _init(self, backend, **kw):
        self.calls.append(("init", backend, kw.get("device_id")))
        self.initialized = True

    def _destroy(self):
        self.calls.append(("destroy",))
        self.initialized = False


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_each_torchrun_process_runs_on_its_local_rank_gpu(monkeypatch, local_rank):
    from rcpu.recover.train import distributed

    # the rank comes from the process group; the environment's RANK (here deliberately another number) is not used
    group = _FakeGroup(monkeypatch, rank=4 + local_rank, world=8)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with distributed(torch.device("cuda")) as ctx:
        assert ctx.device == torch.device("cuda", local_rank) and ctx.local_rank == local_rank
        assert ctx.rank == 4 + local_rank and ctx.world == 8 and not ctx.main and ctx.distributed
        assert group.calls[:2] == [("set_device", torch.device("cuda", local_rank)),
                                   ("init", "nccl", torch.device("cuda", local_rank))]
    assert group.calls[-1] == ("destroy",) and not group.initialized  # the group it created is destroyed


def test_rank_zero_is_the_groups_and_a_group_made_elsewhere_is_left_alone(monkeypatch):
    from rcpu.recover.train import distributed

    group = _FakeGroup(monkeypatch, rank=0, world=2)
    group.initialized = True  # the caller created it
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with distributed(torch.device("cuda")) as ctx:
        assert ctx.main and ctx.device == torch.device("cuda", 1)
    assert ("destroy",) not in group.calls and not any(c[0] == "init" for c in group.calls)


def test_torchrun_device_errors_and_cpu_processes(monkeypatch):
    from rcpu.errors import RcpuError
    from rcpu.recover.train import dist_context, distributed

    group = _FakeGroup(monkeypatch, rank=1, world=2, gpus=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RcpuError, match="LOCAL_RANK"):  # --device cuda:0 on the process of GPU 1
        dist_context(torch.device("cuda", 0))
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RcpuError, match="2 CUDA device"):  # more processes than GPUs
        dist_context(torch.device("cuda"))
    assert not group.calls  # nothing was bound or joined
    monkeypatch.setenv("LOCAL_RANK", "1")
    with distributed(torch.device("cpu")) as ctx:  # CPU processes: gloo, no GPU binding
        assert ctx.device == torch.device("cpu") and ctx.rank == 1
    assert group.calls == [("init", "gloo", None), ("destroy",)]
    monkeypatch.delenv("WORLD_SIZE")  # not under torchrun: one process, the device as given, no group
    ctx = dist_context(torch.device("cuda", 1))
    assert ctx.device == torch.device("cuda", 1) and not ctx.distributed and ctx.main


# ------------------------------------------------------------------------------ teacher and paths


def test_prune_records_the_source_absolute_and_recover_resolves_older_relative_ones(pruned, tmp_path, monkeypatch):
    from rcpu.errors import RcpuError
    from rcpu.recover import teacher_for

    monkeypatch.chdir(pruned)
    out = tmp_path / "rel"
    assert main(["prune", "--model", "dense", "--calib", "train.txt", "--eval", "none", "--nsamples", "8",
                 "--seqlen", "32", "--pruning_ratio", "0.5", "--save_model", str(out), "--no-stream", "-q"]) == 0
    model = json.loads((out / "rcpu_provenance.json").read_text())["model"]
    assert model["source"] == str(pruned / "dense") and model["source_kind"] == "local"
    monkeypatch.chdir(tmp_path)  # another working directory: the recorded path still names the teacher
    assert teacher_for(json.loads((out / "rcpu_provenance.json").read_text()), None, str(out), out) == str(pruned / "dense")

    # a checkpoint from before: the source relative to where pruning ran, no kind; found beside the checkpoint
    old = {"model": {"source": "dense"}}
    assert teacher_for(old, None, "p", pruned / "pruned") == str(pruned / "dense")
    # not found there: refused, never looked up on the hub
    with pytest.raises(RcpuError, match="relative path 'models/dense'.*pass --teacher"):
        teacher_for({"model": {"source": "models/dense"}}, None, "p", pruned / "pruned")
    with pytest.raises(RcpuError, match="does not exist"):
        teacher_for({"model": {"source": str(tmp_path / "moved")}}, None, "p", pruned / "pruned")
    # hub ids and built-in names recorded as such stay what they are
    assert teacher_for({"model": {"source": "org/model", "source_kind": "hub"}}, None, "p", None) == "org/model"
    assert teacher_for({"model": {"source": "smollm2-135m"}}, None, "p", None) == "smollm2-135m"
    assert teacher_for(old, "given", "p", None) == "given"


def test_every_path_is_checked_before_loading_and_a_failed_run_leaves_nothing(pruned, tmp_path, capsys, monkeypatch):
    from rcpu.recover import run as recover_run

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    out = tmp_path / "a" / "b" / "out"  # its parent folders do not exist yet
    with monkeypatch.context() as m:
        m.setattr(recover_run, "_load", no_loading)
        _fails(capsys, _recover_args(pruned, out, "--teacher", str(tmp_path / "nope")), "teacher: model path")
        _fails(capsys, _recover_args(pruned, out, "--teacher", str(pruned / "train.txt")), "not a .gguf file")
        missing = _recover_args(pruned, out)
        missing[missing.index("--data") + 1] = str(tmp_path / "missing.txt")
        _fails(capsys, missing, "text file not found")
        missing = _recover_args(pruned, out)
        missing[missing.index("--eval") + 1] = str(tmp_path / "missing.txt")
        _fails(capsys, missing, "text file not found")
        _fails(capsys, _recover_args(pruned, out, "--report", str(tmp_path / "no" / "r.json")), "does not exist")
        _fails(capsys, _recover_args(pruned, out, "--report", str(tmp_path)), "is a directory")
        # the provenance's teacher moved away
        moved = tmp_path / "moved"
        shutil.copytree(pruned / "pruned", moved)
        prov = json.loads((moved / "rcpu_provenance.json").read_text())
        prov["model"]["source"] = str(tmp_path / "gone")
        (moved / "rcpu_provenance.json").write_text(json.dumps(prov))
        args = _recover_args(pruned, out)
        args[args.index("--model") + 1] = str(moved)
        _fails(capsys, args, "does not exist (moved or deleted?)")
    assert not (tmp_path / "a").exists()

    # failing after the models loaded (another vocabulary) and interrupted before any checkpoint: nothing left
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                                 num_key_value_heads=2, head_dim=8, vocab_size=140)).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    _fails(capsys, _recover_args(pruned, out, "--teacher", str(other)), "vocabulary")
    assert not (tmp_path / "a").exists()
    from rcpu.recover.train import _Run

    step = _Run.step

    def interrupted(self, i, bar):
        if i == 3:
            raise KeyboardInterrupt
        step(self, i, bar)

    monkeypatch.setattr(_Run, "step", interrupted)
    assert main(_recover_args(pruned, out, "--tokens", "2000", "--save_every", "0", "--eval_every", "0")) == 130
    assert not (tmp_path / "a").exists()
    # with a checkpoint written, the interrupted run keeps it (and its folders) for --resume
    assert main(_recover_args(pruned, out, "--tokens", "2000", "--save_every", "2", "--eval_every", "0")) == 130
    assert (work_dir_for(out) / "checkpoint" / "state.json").is_file() and not out.exists()


def test_top_k_teacher_loss_is_the_kl_to_the_renormalised_top_k():
    """With all V logits the top-k loss is the full one; with k < V it is the KL to the teacher's
    softmax over its k largest logits, gradients included."""
    torch.manual_seed(0)
    n, h, v, alpha, temperature = 23, 8, 40, 0.6, 2.0
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    zt = t_hidden @ t_weight.T
    full = distillation_loss(hidden, weight, None, labels, teacher_hidden=t_hidden, teacher_weight=t_weight,
                             alpha=alpha, temperature=temperature, chunk_elements=5 * v)
    every = distillation_loss(hidden, weight, None, labels, teacher_topk=torch.topk(zt, v), alpha=alpha,
                              temperature=temperature, chunk_elements=5 * v)
    assert abs(every.item() - full.item()) < 1e-6 * max(1.0, full.item())
    torch.testing.assert_close(torch.autograd.grad(every, [hidden, weight]), torch.autograd.grad(full, [hidden, weight]))
    k = 6
    top = torch.topk(zt, k)
    got = distillation_loss(hidden, weight, None, labels, teacher_topk=top, alpha=alpha, temperature=temperature,
                            chunk_elements=5 * v)
    z = F.linear(hidden, weight)  # direct: the teacher's logits outside its top k at minus infinity
    masked = torch.full_like(zt, float("-inf")).scatter(1, top.indices, top.values)
    p = torch.softmax(masked / temperature, -1)
    kl = (p * (torch.log_softmax(masked / temperature, -1).nan_to_num(neginf=0.0)
               - torch.log_softmax(z / temperature, -1))).sum(-1).mean()
    direct = alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(z, labels)
    assert abs(got.item() - direct.item()) < 1e-5 * max(1.0, direct.item())
    torch.testing.assert_close(torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(direct, [hidden, weight]))


# ------------------------------------------------------------------------------------- teacher cache


def test_teacher_cache_is_written_once_then_read_without_the_teacher(pruned, tmp_path, monkeypatch):
    from rcpu.recover import run as recover_run

    cache = tmp_path / "cache"
    common = ("--tokens", "1500", "--eval_every", "0")
    assert main(_recover_args(pruned, tmp_path / "full", *common)) == 0
    # k = the whole (tiny) vocabulary: the same training as with the teacher running
    assert main(_recover_args(pruned, tmp_path / "a", *common, "--teacher_cache", str(cache),
                              "--teacher_topk", "128")) == 0
    assert (cache / "meta.json").is_file()
    load = recover_run._load

    def student_only(source, *a, **k):
        assert source != str(pruned / "dense"), "the teacher was loaded although the cache holds its logits"
        return load(source, *a, **k)

    monkeypatch.setattr(recover_run, "_load", student_only)
    assert main(_recover_args(pruned, tmp_path / "b", *common, "--teacher_cache", str(cache), "--teacher_topk",
                              "128")) == 0
    assert main(_recover_args(pruned, tmp_path / "k8", *common, "--teacher_cache", str(cache), "--teacher_topk",
                              "8")) == 0  # fewer logits from the same cache
    full, a, b, k8 = (_weights(tmp_path / n) for n in ("full", "a", "b", "k8"))
    for name in full:
        assert torch.equal(a[name], b[name])
        torch.testing.assert_close(a[name], full[name], rtol=1e-3, atol=1e-5)  # summed in another order
    assert any(not torch.allclose(k8[n], a[n], rtol=1e-3, atol=1e-5) for n in a)  # the top 8 train otherwise
    rec = json.loads((tmp_path / "k8" / "rcpu_provenance.json").read_text())["recovery"]
    assert rec["config"]["teacher_cache"] == {"path": str(cache), "topk": 8}
    assert rec["teacher"]["source"] == str(pruned / "dense")
    full_rec = json.loads((tmp_path / "full" / "rcpu_provenance.json").read_text())["recovery"]
    assert rec["evaluation"]["before"] == full_rec["evaluation"]["before"]  # measured over the whole vocabulary


def test_teacher_cache_bad_input_is_one_line_and_writes_nothing(pruned, tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "never", tmp_path / "cache"

    def args(*extra):
        return _recover_args(pruned, out, "--tokens", "600", "--teacher_cache", str(cache), *extra)

    _fails(capsys, args("--teacher_topk", "0"), "--teacher_topk is 0")
    _fails(capsys, _recover_args(pruned, out, "--teacher_topk", "8"), "give --teacher_cache")
    _fails(capsys, args("--teacher_topk", "129"), "more than the vocabulary's 128")
    _fails(capsys, args("--alpha", "0"), "needs no teacher")
    (tmp_path / "file").write_text("x")
    _fails(capsys, _recover_args(pruned, out, "--teacher_cache", str(tmp_path / "file")), "is a file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _fails(capsys, _recover_args(pruned, out, "--teacher_cache", str(tmp_path / "full")), "holds no teacher cache")
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "2")
        m.setenv("LOCAL_RANK", "0")
        _fails(capsys, args(), "without torchrun")
    assert not out.exists() and not cache.exists() and not work_dir_for(out).exists()
    assert main(args("--teacher_topk", "16", "--save_model", str(tmp_path / "ok"))) == 0  # writes the cache
    _fails(capsys, args("--teacher_topk", "32"), "holds")  # more logits than it keeps
    _fails(capsys, args("--teacher_topk", "16", "--seqlen", "16", "--eval_seqlen", "16"), "lacks")  # other windows
    _fails(capsys, args("--teacher_topk", "16", "--tokens", "5000"), "lacks")  # a larger budget: windows it lacks
    _fails(capsys, args("--teacher_topk", "16", "--teacher", str(tmp_path / "elsewhere")), "was written from the teacher")
    assert not out.exists() and not work_dir_for(out).exists()
