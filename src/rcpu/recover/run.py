"""``rcpu recover``: check every input, load student and teacher, distil, measure, write the checkpoint.

Everything that can be wrong with the inputs (budget, text sources, the output directory, a
missing teacher) is checked before a model is loaded; a teacher with another vocabulary and
training text too short for one window are refused before any training step. The result is
written through :func:`rcpu.export.save_pruned`, so it has the pruned model's format (a stock
checkpoint for uniform widths, rcpu's per-layer classes otherwise) and appears at
``--save_model`` only when complete. Checkpoints live in ``.<name>.rcpu-recover`` beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import data
from ..errors import RcpuError
from ..report import count_params, versions
from .config import RecoverConfig, RecoverRecord
from .train import StudentLoss, distributed, process_device, train
from .windows import TrainingWindows

logger = logging.getLogger(__name__)

__all__ = ["PreparedData", "RecoverInputs", "check_texts", "check_work_dir", "default_teacher_dtype", "prepare_data", "recover_model", "recover_checkpoint", "teacher_for", "work_dir_for"]

WORK_SUFFIX = ".rcpu-recover"


@dataclass
class RecoverInputs:
    """Where the training and evaluation text come from and how the result is measured."""

    data: str = "builtin"
    eval: str = "builtin"
    eval_seqlens: tuple[int, ...] = (128,)
    max_eval_tokens: int | None = 16384
    autocast: torch.dtype | None = None
    #: a directory for the teacher's top-k logits over the training windows (read if there, else written)
    teacher_cache: str | None = None
    #: logits per position kept in and read from the teacher cache
    teacher_topk: int = 64


def work_dir_for(out: str | Path) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}{WORK_SUFFIX}"


def check_work_dir(work: Path | None, resume: bool) -> None:
    """Refuse to start over an interrupted run's checkpoints unless asked to resume them."""
    if work is not None and work.exists() and not resume:
        raise RcpuError(f"{work} holds an interrupted recovery; pass --resume to continue it, or remove it")


def default_teacher_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """bfloat16 on GPUs (the teacher only runs forward), else the student's dtype."""
    return torch.bfloat16 if device.type == "cuda" else dtype


def teacher_for(provenance: dict | None, teacher: str | None, where: str, model_dir: Path | None = None) -> str:
    """The teacher to use: ``--teacher``, else the source model in the student's provenance.

    ``rcpu prune`` records a local source as an absolute path, and says which kind of source it
    was (``source_kind``). Older checkpoints may name a local model by a path relative to where
    pruning ran: that is looked for beside the pruned directory ``model_dir`` (in the folder that
    holds it, then inside it), and a relative name found in neither place is refused rather than
    looked up on the hub, unless the provenance says it is a hub id."""
    from ..loading import _builtin_key

    if teacher:
        return teacher
    model_info = (provenance or {}).get("model") or {}
    source = model_info.get("source")
    if not source:
        raise RcpuError(f"{where} has no rcpu_provenance.json naming the model it was pruned from; "
                        "pass --teacher with the dense model")
    source, kind = str(source), model_info.get("source_kind")
    if kind in ("hub", "builtin") or _builtin_key(source) is not None:
        return source
    path = Path(os.path.expanduser(source))
    if path.is_absolute():
        if not path.exists():
            raise RcpuError(f"the teacher {source}, from the provenance of {where}, does not exist (moved or deleted?); "
                            "pass --teacher with the dense model")
        return source
    tried = [d / path for d in (model_dir.parent, model_dir)] if model_dir is not None else []
    for candidate in tried:
        if candidate.exists():
            return str(candidate.resolve())
    looked = " or ".join(str(c) for c in tried) or "beside it"
    raise RcpuError(f"the provenance of {where} names its teacher by the relative path {source!r}, which is not in "
                    f"{looked}; pass --teacher with the dense model (a hub id too)")


def check_teacher_path(teacher: str) -> None:
    """A teacher path that does not exist, or a file that is not .gguf, fails before any model loads
    (the texts are checked by :func:`check_texts`)."""
    from ..loading import check_model_source

    try:
        check_model_source(teacher)
    except RcpuError as exc:
        raise RcpuError(f"teacher: {exc}") from None


def check_report_path(report: str) -> None:
    """``--report`` must name a file in a folder that exists and is writable (it is written last)."""
    path = Path(report).expanduser()
    if path.is_dir():
        raise RcpuError(f"--report {report} is a directory; name a file")
    parent = path.parent.resolve()
    if not parent.is_dir():
        raise RcpuError(f"--report {report}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise RcpuError(f"--report {report}: cannot write to {parent}")


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_texts(inputs: RecoverInputs) -> tuple[str, str | None, dict]:
    """Load the training and evaluation text, refusing training text that contains any passage of
    the evaluation text (runs of words compared, whatever the files or the whitespace:
    :mod:`rcpu.recover.overlap`)."""
    from .overlap import NGRAM, find_overlap

    train_text = data.load_text(inputs.data, "calib")
    eval_text = None if inputs.eval == "none" else data.load_text(inputs.eval, "eval")
    shared = find_overlap(train_text, eval_text) if eval_text is not None else None
    if shared:
        raise RcpuError(f"--data {inputs.data} contains the evaluation text (--eval {inputs.eval}): {shared.eval_runs:,} "
                        f"of its {shared.eval_total:,} runs of {NGRAM} words, e.g. \"{shared.example[:80]}\"; train on "
                        "text without it, e.g. --data builtin (its calibration part) with --eval builtin (its held-out "
                        "part)")
    info = {"source": inputs.data, **data.describe_source(inputs.data, "calib"), "text_sha256": _text_hash(train_text)}
    return train_text, eval_text, info


def check_vocabulary(student: nn.Module, student_tok, teacher: nn.Module, teacher_tok) -> None:
    s_rows = student.get_output_embeddings().weight.shape[0]
    t_rows = teacher.get_output_embeddings().weight.shape[0]
    if s_rows != t_rows or student_tok.get_vocab() != teacher_tok.get_vocab():
        raise RcpuError(f"the teacher's vocabulary ({len(teacher_tok):,} tokens, head {t_rows:,}) is not the student's "
                        f"({len(student_tok):,}, head {s_rows:,}); distil from the model the student was pruned from")


@dataclass
class PreparedData:
    windows: TrainingWindows
    eval_ids: torch.Tensor | None
    info: dict


def prepare_data(tokenizer, cfg: RecoverConfig, inputs: RecoverInputs, texts: tuple | None = None) -> PreparedData:
    """Tokenise and window the training text (refusing one too short) and tokenise the evaluation text."""
    train_text, eval_text, info = texts if texts is not None else check_texts(inputs)
    ids = data.tokenize(tokenizer, train_text)
    bos = data.bos_token_id(tokenizer)
    windows = TrainingWindows.from_ids(ids, cfg.seqlen, cfg.heldout, cfg.seed, source=f"--data {inputs.data}",
                                       bos=bos)
    eval_ids = None if eval_text is None else data.tokenize(tokenizer, eval_text)
    info = {**info, "tokens": int(ids.numel()), "seqlen": cfg.seqlen, "bos": bos,
            "train_windows": int(windows.train.shape[0]),
            "heldout_windows": int(windows.heldout.shape[0]), "heldout_hash": data.token_hash(windows.heldout),
            "epochs": round(windows.epochs(cfg.steps(), cfg.batch_size), 4)}
    return PreparedData(windows, eval_ids, info)


def eval_windows(ids: torch.Tensor | None, seqlens, max_tokens: int | None,
                 bos: int | None = None) -> dict[int, torch.Tensor]:
    """Non-overlapping windows of the first ``max_tokens`` evaluation tokens, per window length (each
    after ``bos`` when given): the windows :func:`rcpu.evaluate.perplexity` scores, so the
    perplexities agree with ``rcpu eval``."""
    if ids is None:
        return {}
    ids = ids[:max_tokens] if max_tokens else ids
    out = {}
    for s in seqlens:
        windows = data.consecutive_windows(ids, s, bos)
        if windows.shape[0] == 0:
            raise RcpuError(f"the evaluation text has {ids.numel():,} tokens, fewer than one --eval_seqlen {s} window")
        out[s] = windows
    return out


def recover_model(student: nn.Module, tokenizer, teacher: nn.Module, teacher_info: dict, cfg: RecoverConfig,
                  inputs: RecoverInputs, *, device: torch.device, work_dir: Path | None = None,
                  resume: bool = False, progress: bool = True, prepared: PreparedData | None = None,
                  rebuild=None) -> tuple[nn.Module | None, RecoverRecord]:
    """Distil ``teacher`` into ``student`` (both loaded); returns the merged student (None on ranks
    other than 0 under FSDP) and its record. ``rebuild`` makes a fresh untrained student (FSDP)."""
    with distributed(device) as ctx:
        return _recover_model(student, tokenizer, teacher, teacher_info, cfg, inputs, ctx=ctx, work_dir=work_dir,
                              resume=resume, progress=progress, prepared=prepared, rebuild=rebuild)


def _recover_model(student, tokenizer, teacher, teacher_info, cfg, inputs, *, ctx, work_dir, resume, progress,
                   prepared, rebuild):
    device = ctx.device
    check_work_dir(work_dir, resume)
    ctx.barrier()  # every rank has looked before rank 0 writes into the work directory
    if cfg.fsdp and ctx.distributed and rebuild is None:
        raise RcpuError("--fsdp needs a way to rebuild the student on rank 0; use recover_checkpoint")
    prepared = prepared or prepare_data(tokenizer, cfg, inputs)
    windows, data_info = prepared.windows, prepared.info
    sets = eval_windows(prepared.eval_ids, inputs.eval_seqlens, inputs.max_eval_tokens, prepared.info.get("bos"))
    label = f"{inputs.eval}:eval"
    cache = ["teacher_topk", inputs.teacher_topk] if inputs.teacher_cache else []  # the top k trains other weights
    digest = cfg.digest(teacher_info, data_info["text_sha256"], count_params(student), str(getattr(student, "dtype", "")),
                        str(inputs.autocast), ctx.world if cfg.fsdp else 1, *cache)
    if not (cfg.fsdp and ctx.distributed):  # FSDP moves each shard to the device itself
        student.to(device)
        teacher.to(device)
    if inputs.teacher_cache:
        record_cache = {"path": str(Path(inputs.teacher_cache).expanduser().resolve()), "topk": inputs.teacher_topk}
    record = RecoverRecord(config=cfg.to_dict(), teacher=teacher_info, data=data_info, versions=versions())
    record.config["steps"] = cfg.steps()
    record.config["autocast"] = None if inputs.autocast is None else str(inputs.autocast).removeprefix("torch.")
    if inputs.teacher_cache:
        record.config["teacher_cache"] = record_cache
    res = train(student, teacher, windows, cfg, device=device, ctx=ctx, work_dir=work_dir, resume=resume,
                digest=digest, autocast=inputs.autocast, progress=progress, rebuild=rebuild,
                eval_sets={str(s): w for s, w in sets.items()})

    def perplexities(measured: dict) -> list[dict]:
        return [{"source": label, "seqlen": s, "ppl": m["ppl"], "nll": m["loss"], "teacher_ppl": m["teacher_ppl"],
                 "kl": m["kl"], "n_tokens": m["tokens"], "n_windows": int(sets[s].shape[0])}
                for s, m in ((int(k), v) for k, v in measured.items())]

    def heldout(point: dict | None) -> dict:
        return {k: v for k, v in (point or {}).items() if k not in ("step", "tokens")}

    record.evaluation = {
        "before": {"perplexity": perplexities(res.before),
                   "heldout": heldout(res.heldout_curve[0] if res.heldout_curve else None)},
        "after": {"perplexity": perplexities(res.after),
                  "heldout": heldout(res.heldout_curve[-1] if res.heldout_curve else None)},
        "eval_source": inputs.eval, "max_eval_tokens": inputs.max_eval_tokens,
    }
    record.curve = res.curve
    record.heldout_curve = res.heldout_curve
    record.timing = {"train_seconds": round(res.train_seconds, 2), "tokens": res.tokens, "steps": res.steps,
                     "tokens_per_second": round(res.tokens / max(res.train_seconds, 1e-9), 2),
                     "resumed_at_step": res.resumed_at}
    record.memory = res.memory
    record.distributed = {"world_size": ctx.world, "device": str(device),
                          "strategy": ("fsdp" if cfg.fsdp else "ddp") if ctx.distributed else "single"}
    return res.model, record


def _load(source: str, dtype, trust_remote_code: bool):
    from ..loading import load_model

    return load_model(source, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)


def recover_checkpoint(model: str, save_model: str | None, cfg: RecoverConfig, inputs: RecoverInputs, *,
                       teacher: str | None = None, device: torch.device, dtype: torch.dtype,
                       teacher_dtype: torch.dtype | None = None, overwrite: bool = False, resume: bool = False,
                       trust_remote_code: bool = False, progress: bool = True, announce=print,
                       provenance: dict | None = None) -> tuple[nn.Module, RecoverRecord, Path | None]:
    """Load the pruned ``model`` and its teacher, recover it, and write it to ``save_model`` (if given).

    Every input (settings, student, teacher, texts, output) is checked before a model loads. A run
    that fails leaves nothing behind but the checkpoints it completed (for ``--resume``): no empty
    work directory, no parent folder of ``save_model`` it created. Under torchrun each process runs
    on ``cuda:LOCAL_RANK`` (GPUs) and the process group this call creates is destroyed when it
    returns; the merged model is None off rank 0 under FSDP."""
    from ..export import check_output_dir, save_pruned
    from ..gguf_export import load_provenance
    from ..loading import check_model_source

    t0 = time.perf_counter()
    cfg.validate()
    check_model_source(model)
    out = check_output_dir(save_model, overwrite, create=False) if save_model else None
    work = work_dir_for(out) if out is not None else None
    if resume and out is None:
        raise RcpuError("--resume continues an interrupted --save_model run; give the same --save_model")
    check_work_dir(work, resume)
    cached = check_teacher_cache(inputs, cfg)
    local = Path(os.path.expanduser(model))
    if provenance is None:
        provenance = load_provenance(local) if local.is_dir() else None
    try:
        teacher_source = teacher_for(provenance, teacher, model, local if local.is_dir() else None)
    except RcpuError:
        if cached is None:
            raise
        teacher_source = cached["teacher"]["source"]  # the cache names the teacher it was written from
    if cached is None:
        check_teacher_path(teacher_source)
    elif teacher_source != cached["teacher"]["source"]:
        raise RcpuError(f"--teacher_cache {inputs.teacher_cache} was written from the teacher "
                        f"{cached['teacher']['source']}, not {teacher_source}; use another directory")
    texts = check_texts(inputs)  # unreadable, empty or overlapping texts fail before any model loads
    device = process_device(device)  # cuda:LOCAL_RANK under torchrun; a conflicting --device fails here
    with distributed(device) as ctx, _nothing_left_on_failure(out, work, ctx):
        merged, record, tokenizer = _load_and_recover(model, teacher_source, cfg, inputs, ctx=ctx, dtype=dtype,
                                                      teacher_dtype=teacher_dtype, texts=texts, work=work,
                                                      resume=resume, trust_remote_code=trust_remote_code,
                                                      progress=progress, announce=announce)
        record.timing["total_seconds"] = round(time.perf_counter() - t0, 2)
        record.config["student"] = model
        record.config["dtype"] = str(dtype).removeprefix("torch.")
        path = None
        if out is not None and ctx.main:
            prov = dict(provenance or {})
            prov["recovery"] = record.to_dict()
            merged.to("cpu")
            path = save_pruned(merged, tokenizer, out, prov, overwrite=overwrite)
            shutil.rmtree(work, ignore_errors=True)
        ctx.barrier()
    return merged, record, path


def check_teacher_cache(inputs: RecoverInputs, cfg: RecoverConfig) -> dict | None:
    """``--teacher_cache`` / ``--teacher_topk`` checked before a model loads; the cache's meta when the
    directory holds one already."""
    from .teacher_cache import META, check_cache_dir
    from .train import under_torchrun

    if not inputs.teacher_cache:
        return None
    if inputs.teacher_topk < 1:
        raise RcpuError(f"--teacher_topk is {inputs.teacher_topk}; keep at least 1 logit per position")
    if under_torchrun():
        raise RcpuError("--teacher_cache runs in one process; start rcpu recover without torchrun")
    if cfg.alpha == 0:
        raise RcpuError("--teacher_cache with --alpha 0: the LM loss needs no teacher; drop --teacher_cache")
    path = check_cache_dir(inputs.teacher_cache)
    if not (path / META).is_file():
        return None
    try:
        meta = json.loads((path / META).read_text())
    except ValueError as exc:
        raise RcpuError(f"the teacher cache in {path} is unreadable ({exc}); remove it and run again") from exc
    if inputs.teacher_topk > meta.get("topk", 0):
        raise RcpuError(f"--teacher_topk {inputs.teacher_topk} is more than the {meta.get('topk')} logits per position "
                        f"the teacher cache in {path} holds; use at most {meta.get('topk')} or another --teacher_cache")
    return meta


def _cached_teacher(student, teacher_source: str, tdtype, cfg: RecoverConfig, inputs: RecoverInputs,
                    prepared: PreparedData, *, device, trust_remote_code: bool, progress: bool, announce):
    """The teacher read from ``--teacher_cache``, written first (loading the teacher) when the
    directory holds none; refuses a cache without this run's windows or of another vocabulary."""
    from .teacher_cache import build_cache, load_cache, remove_partial, vocab_digest

    path = Path(inputs.teacher_cache).expanduser().resolve()
    rows = student.model.get_output_embeddings().weight.shape[0]
    if inputs.teacher_topk > rows:
        raise RcpuError(f"--teacher_topk {inputs.teacher_topk} is more than the vocabulary's {rows:,} tokens")
    windows = prepared.windows
    measured = {"heldout": windows.heldout,
                **{f"eval{s}": w for s, w in eval_windows(prepared.eval_ids, inputs.eval_seqlens,
                                                          inputs.max_eval_tokens).items()}}
    visited = windows.visited(cfg.steps(), cfg.batch_size)
    cached = load_cache(path, inputs.teacher_topk)
    if cached is None:
        teacher_loaded = _load(teacher_source, tdtype, trust_remote_code)
        check_vocabulary(student.model, student.tokenizer, teacher_loaded.model, teacher_loaded.tokenizer)
        info = {"source": teacher_source, "dtype": str(tdtype).removeprefix("torch."),
                "parameters": count_params(teacher_loaded.model)}
        announce(f"writing the teacher cache {path}: top {inputs.teacher_topk} logits of {visited.shape[0]:,} windows")
        existed, created, t0 = path.exists(), _missing_parents(path), time.perf_counter()
        try:
            build_cache(path, teacher_loaded.model, info, vocab_digest(student.tokenizer), visited, measured,
                        inputs.teacher_topk, device=device, batch_size=cfg.batch_size, autocast=inputs.autocast,
                        progress=progress)
        except BaseException:
            remove_partial(path, existed)
            for folder in created if not path.exists() else []:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        logger.info("teacher cache written in %.1f s", time.perf_counter() - t0)
        del teacher_loaded
        cached = load_cache(path, inputs.teacher_topk)
    if cached.meta["vocab"] != vocab_digest(student.tokenizer) or cached.model.head.weight.shape[0] != rows:
        raise RcpuError(f"the teacher cache in {path} was written for another vocabulary than the student's")
    train_missing, measured_missing = cached.missing(visited, list(measured.values()))
    if train_missing or measured_missing:
        raise RcpuError(f"the teacher cache in {path} lacks {train_missing:,} of this run's {visited.shape[0]:,} training "
                        f"windows and {measured_missing:,} measured ones: it was written for other text, --seqlen, "
                        "--seed, --heldout, evaluation or a smaller --tokens; use another directory")
    return cached, dict(cached.meta["teacher"])


def _missing_parents(out: Path | None) -> list[Path]:
    """The folders above ``out`` that do not exist yet, deepest first."""
    missing = []
    parent = out.parent if out is not None else None
    while parent is not None and not parent.exists():
        missing.append(parent)
        parent = parent.parent if parent.parent != parent else None
    return missing


@contextlib.contextmanager
def _nothing_left_on_failure(out: Path | None, work: Path | None, ctx):
    """On an error (Ctrl-C included): remove the work directory unless it holds a checkpoint to resume
    from, and the parent folders of ``out`` this run created, if empty (rank 0 does it)."""
    from .state import has_checkpoint

    created = _missing_parents(out)
    had_work = work is not None and work.exists()
    try:
        yield
    except BaseException:
        if ctx.main:
            if work is not None and not had_work and work.exists() and not has_checkpoint(work):
                shutil.rmtree(work, ignore_errors=True)
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:  # not empty (a checkpoint kept for --resume), or gone
                    break
        raise


def _load_and_recover(model: str, teacher_source: str, cfg: RecoverConfig, inputs: RecoverInputs, *, ctx, dtype,
                      teacher_dtype, texts, work, resume, trust_remote_code, progress, announce):
    """Load student and teacher (every input already checked), then recover: (merged, record, tokenizer)."""
    from ..api import check_seqlen

    device = ctx.device
    student = _load(model, dtype, trust_remote_code)
    check_seqlen(student.model.config, cfg.seqlen)
    for s in inputs.eval_seqlens:
        check_seqlen(student.model.config, s, "--eval_seqlen")
    prepared = prepare_data(student.tokenizer, cfg, inputs, texts)  # too little text fails before the teacher loads
    tdtype = teacher_dtype or default_teacher_dtype(device, dtype)
    if inputs.teacher_cache:
        teacher_model, teacher_info = _cached_teacher(student, teacher_source, tdtype, cfg, inputs, prepared,
                                                      device=device, trust_remote_code=trust_remote_code,
                                                      progress=progress and ctx.main, announce=announce)
    else:
        teacher_loaded = _load(teacher_source, tdtype, trust_remote_code)
        check_vocabulary(student.model, student.tokenizer, teacher_loaded.model, teacher_loaded.tokenizer)
        teacher_model = teacher_loaded.model
        teacher_info = {"source": teacher_source, "dtype": str(tdtype).removeprefix("torch."),
                        "parameters": count_params(teacher_model)}
    if ctx.main:
        announce(f"student {model}: {count_params(student.model):,} parameters; teacher {teacher_source}: "
                 f"{teacher_info['parameters']:,} parameters ({teacher_info['dtype']})"
                 + (f", read from {inputs.teacher_cache} (top {inputs.teacher_topk} logits)" if inputs.teacher_cache
                    else "") + f"; {cfg.steps()} steps of {cfg.batch_size} x {cfg.seqlen} tokens, training "
                 f"{cfg.parameters}, device {device}" + (f" (rank 0 of {ctx.world})" if ctx.distributed else ""))

    def rebuild() -> nn.Module:  # a fresh untrained student in its loss module, for gathering FSDP shards
        from .params import attach_trainable

        return StudentLoss(attach_trainable(_load(model, dtype, trust_remote_code).model, cfg), cfg)

    merged, record = recover_model(student.model, student.tokenizer, teacher_model, teacher_info, cfg, inputs,
                                   device=device, work_dir=work, resume=resume, progress=progress, prepared=prepared,
                                   rebuild=rebuild)
    return merged, record, student.tokenizer


def summary_lines(record: RecoverRecord) -> list[str]:
    ev = record.evaluation
    lines = []
    for b, a in zip(ev["before"]["perplexity"], ev["after"]["perplexity"], strict=True):
        lines.append(f"perplexity ({b['source']}, seqlen {b['seqlen']}): {b['ppl']:.2f} -> {a['ppl']:.2f}")
    hb, ha = ev["before"]["heldout"], ev["after"]["heldout"]
    if hb and ha:
        lines.append(f"held-out KL to the teacher: {hb['kl']:.4f} -> {ha['kl']:.4f}; loss {hb['loss']:.4f} -> "
                     f"{ha['loss']:.4f} (teacher {ha['teacher_loss']:.4f})")
    t = record.timing
    lines.append(f"trained {t['tokens']:,} tokens in {t['train_seconds']:.1f} s ({t['tokens_per_second']:,.1f} tokens/s)"
                 + (f", resumed at step {t['resumed_at_step']}" if t.get("resumed_at_step") else ""))
    return lines
