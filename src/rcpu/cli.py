"""Command line: ``rcpu prune``, ``recover``, ``eval``, ``compare``, ``bench`` and ``export``. Thin: parse, call the API, print.

Flag spellings follow the SparseGPT/Wanda/FLAP/RCPU lineage (``--pruning_ratio``,
``--nsamples``, ``--save_model``...); the dashed forms are accepted too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .config import PruneConfig, field_from_text, parse_dtype, parse_floats
from .errors import RcpuError

logger = logging.getLogger("rcpu")

DEFAULT_MODEL = "smollm2-135m"
#: GGUF tensor types (kept in sync with rcpu.gguf_export.GGUF_QUANTS; listed here so --help needs no gguf import)
GGUF_QUANT_NAMES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def _add(parser: argparse.ArgumentParser, name: str, **kw) -> None:
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **kw)


def _common(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    _add(p, "model", default=None if model_help else DEFAULT_MODEL,
         help=model_help or f"local HF directory, .gguf file, hub id, or built-in name (default {DEFAULT_MODEL})")
    _add(p, "device", default=None, help="compute device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    _add(p, "dtype", default="float32", help="float32 (default), bfloat16 or float16")
    _add(p, "trust_remote_code", action="store_true", help="allow modeling code shipped with the checkpoint")
    _add(p, "max_eval_tokens", type=int, default=None,
         help="evaluate perplexity on the first N tokens only (0 = all)")
    _add(p, "eval_batch_size", type=int, default=None, help="windows per forward pass in evaluation")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcpu", description="Structured pruning of LLMs with RCPU and baselines.")
    sub = parser.add_subparsers(dest="command")
    for add in (_prune_parser, _recover_parser, _eval_parser, _compare_parser, _export_parser, _bench_parser):
        add(sub)
    return parser


def _prune_parser(sub) -> None:
    """``rcpu prune``: the config's fields, then inputs, outputs, streaming, GGUF and recovery."""
    p = sub.add_parser("prune", help="prune a model (no flags: the built-in demo)")
    _common(p)
    _add_config_fields(p, PruneConfig)  # --method ... --batch_size, from the fields' metadata
    _add(p, "calib", default="builtin", help="calibration text: builtin, wikitext2, or a .txt/.jsonl file")
    _add(p, "eval", default="builtin", help="perplexity text before/after (builtin, wikitext2, file, or none)")
    _add(p, "eval_seqlen", type=int, default=128, help="perplexity window length (default 128)")
    _add(p, "save_model", default=None, help="write the pruned checkpoint to this directory")
    _add(p, "overwrite", action="store_true", help="replace an existing --save_model directory")
    _add(p, "report", default=None, help="also write the JSON report to this file")
    _add(p, "stream", action=argparse.BooleanOptionalAction, default=True,
         help="with --save_model and a local safetensors directory (or built-in model): read, prune and write "
              "one decoder layer at a time, so models larger than memory fit (default on)")
    _add(p, "hidden_states", default="auto", choices=["auto", "device", "cpu"],
         help="where calibration hidden states live: on the compute device when they fit (auto), or always "
              "there / on the CPU (moved per batch)")
    _add(p, "max_hidden_gib", type=float, default=None,
         help="with --hidden_states auto: keep hidden states on the device only up to this size")
    _add(p, "resume", action="store_true",
         help="continue an interrupted streamed run into the same --save_model from its last finished layer")
    _add(p, "save_gguf", default=None, help="also write the pruned model as a GGUF file (llama.cpp, Ollama)")
    _add(p, "gguf_quant", default="q8_0", choices=GGUF_QUANT_NAMES, help="tensor type for --save_gguf (default q8_0)")

    _add(p, "recover_tokens", type=int, default=None,
         help="then recover the pruned model by distilling the dense one into it for this many tokens "
              "(rcpu recover's defaults; needs --save_model for a streamed run)")


def _recover_parser(sub) -> None:
    """``rcpu recover``: teacher, data, evaluation and the recovery config's fields."""
    r = sub.add_parser("recover", help="distil the dense model into a pruned one (recovery training)")
    _common(r, model_help="the pruned checkpoint to recover (a directory rcpu prune wrote, or any model source)")
    _add(r, "teacher", default=None, help="the dense model (default: the source in the pruned model's provenance)")
    _add(r, "teacher_dtype", default=None,
         help="dtype of the frozen teacher (default bfloat16 on CUDA, else --dtype)")
    _add(r, "data", default="builtin",
         help="training text: builtin or brown (their calibration parts), wikitext2 (train), or a .txt/.jsonl file")
    _add(r, "eval", default="builtin",
         help="perplexity text before/after (builtin, brown, wikitext2, file, or none; their eval parts)")
    _add(r, "eval_seqlen", type=int, nargs="+", default=[128], help="perplexity window length(s)")
    _add(r, "autocast", default="none", choices=["none", "bfloat16", "float16"],
         help="run both models' forward passes under torch.autocast in this dtype")
    _add(r, "teacher_cache", default=None,
         help="a directory for the teacher's top logits over the training windows: written once (the teacher "
              "runs), then read by later runs with the same text and windows instead of loading the teacher")
    _add(r, "teacher_topk", type=int, default=None,
         help="with --teacher_cache: logits per position kept and distilled from (default 64)")
    _add_recover_fields(r)
    _add(r, "save_model", default=None, help="write the recovered checkpoint to this directory")
    _add(r, "overwrite", action="store_true", help="replace an existing --save_model directory")
    _add(r, "resume", action="store_true", help="continue an interrupted run into the same --save_model")
    _add(r, "report", default=None, help="also write the recovery record as JSON to this file")


def _eval_parser(sub) -> None:
    """``rcpu eval``: perplexity texts and window lengths, lm-eval tasks."""
    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model")
    _common(e)
    _add(e, "ppl", default="builtin", help="evaluation text: builtin, wikitext2, a .txt/.jsonl file, or none")
    _add(e, "seqlen", type=int, nargs="+", default=[128], help="window length(s), e.g. --seqlen 128 2048")
    _add(e, "tasks", default=None,
         help="lm-evaluation-harness tasks, e.g. boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa "
              "(or 'paper' for those seven)")
    _add(e, "include_path", default=None, help="directory of extra lm-eval task YAMLs")
    _add(e, "limit", type=int, default=None, help="at most N examples per task (quick checks only)")
    _add(e, "num_fewshot", type=int, default=0, help="few-shot examples (default 0)")
    _add(e, "output", default=None, help="write the results as JSON to this file")


def _compare_parser(sub) -> None:
    """``rcpu compare``: the grid of methods x ratios x sample counts and where its cells run."""
    c = sub.add_parser("compare", help="prune and evaluate several methods x ratios under one protocol")
    _common(c)
    _add(c, "methods", default="wanda-sp,flap,ridge-auto,rcpu,rcpu-scaled",
         help="comma-separated presets, each optionally with +field=value overrides (a tuple field's "
              "values comma-separated too: ridge-auto+ridge_grid=0.1,1,10)")
    _add(c, "pruning_ratios", default="0.1,0.2,0.3", help="comma-separated ratios")
    _add(c, "nsamples", default="128", help="calibration windows; a comma-separated list gives a size curve")
    _add(c, "seqlen", type=int, default=128, help="calibration window length")
    _add(c, "seed", type=int, default=0)
    _add(c, "batch_size", type=int, default=8)
    _add(c, "calib", default="builtin")
    _add(c, "eval", default="builtin")
    _add(c, "eval_seqlens", default="128", help="comma-separated perplexity window lengths")
    _add(c, "output", required=True, help="directory for results.json, results.md and ppl.png (resumable)")
    _add(c, "executor", default="local", choices=["local", "gpus", "ray"],
         help="where cells run: one after another here (default), one worker process per GPU, or a Ray cluster")
    _add(c, "gpus", default=None, help="--executor gpus: comma-separated CUDA device indices (default: all)")
    _add(c, "ray_address", default=None,
         help="--executor ray: cluster address for ray.init, e.g. auto or HEAD_IP:6379 (default: a local instance)")
    _add(c, "ray_num_cpus", type=float, default=1, help="--executor ray: CPUs reserved per cell (default 1)")


def _export_parser(sub) -> None:
    """``rcpu export``: a model to one GGUF file."""
    x = sub.add_parser("export", help="write a model (e.g. a pruned checkpoint) as a GGUF file for llama.cpp")
    _add(x, "model", required=True, help="a checkpoint rcpu wrote, a supported HF directory, or a built-in name")
    _add(x, "gguf", required=True, help="output .gguf file")
    _add(x, "quant", default="f16", choices=GGUF_QUANT_NAMES, help="tensor type of the weight matrices (default f16)")
    _add(x, "pad_to", type=int, default=None,
         help="pad MLP widths with zero channels (same function) to a multiple of this (default: 32 for the "
              "block types q8_0 ... q5_1, so that every matrix quantises; 1 = no padding)")
    _add(x, "tensor_type", action="append", default=[], metavar="PATTERN=TYPE",
         help="store the weight matrices whose llama.cpp name matches the regular expression PATTERN as TYPE "
              "instead of --quant, like llama-quantize's --tensor-type; repeatable, first match wins "
              "(e.g. 'blk\\.29\\.ffn_down=q8_0')")
    _add(x, "tokenizer_gguf", default=None,
         help="copy the tokenizer from this GGUF file (default: the GGUF the model came from, if any, "
              "else built from the HF tokenizer)")
    _add(x, "trust_remote_code", action="store_true", help="allow modeling code shipped with the checkpoint")
    _add(x, "overwrite", action="store_true", help="replace an existing output file")
    x.add_argument("-q", "--quiet", action="store_true", help="warnings only")


def _bench_parser(sub) -> None:
    """``rcpu bench``: prefill / decode speed against the dense baseline."""
    b = sub.add_parser("bench", help="prefill/decode speed of a pruned model against its dense baseline")
    _common(b)
    _add(b, "baseline", required=True, help="the dense model (same forms as --model)")
    _add(b, "batch_size", type=int, default=1)
    _add(b, "prompt_len", type=int, default=128)
    _add(b, "new_tokens", type=int, default=64)
    _add(b, "repeats", type=int, default=5)
    _add(b, "output", default=None, help="write the results as JSON to this file")

def _add_config_fields(parser: argparse.ArgumentParser, cls, *, skip=(), choices: dict | None = None,
                       default_in_help: bool = False) -> None:
    """One flag per field of the config dataclass ``cls``, in field order, from its metadata: ``help``,
    ``choices``, ``negatable`` (False: a bool with no ``--no-`` form), ``flag`` with ``inverse`` (a
    store_true flag under another name that sets the field to False). Defaults are the fields';
    a tuple is given comma-separated. ``choices`` adds choices by field name; ``default_in_help``
    appends "(default X)" to the help of non-bool, non-tuple fields."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta, default = f.metadata, f.default
        kw: dict = {"default": default, "help": meta.get("help", "")}
        if meta.get("inverse"):  # e.g. --ridge_lambda_absolute for ridge_lambda_relative=False
            kw.update(action="store_true", default=not default)
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction if meta.get("negatable", True) else "store_true"
        elif isinstance(default, tuple):
            kw["default"] = ",".join(map(str, default))
        else:
            if isinstance(default, (int, float)):
                kw["type"] = type(default)
            if default_in_help:
                kw["help"] += f" (default {default})"
        allowed = meta.get("choices") or (choices or {}).get(f.name)
        if allowed:
            kw["choices"] = list(allowed)
        _add(parser, meta.get("flag", f.name), **kw)


def _config_values(cls, args) -> dict:
    """The fields of ``cls`` that parsed ``args`` carry (flags made by :func:`_add_config_fields`):
    inverse flags negated, text parsed by the field's ``parse``, comma-separated tuples split."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(cls):
        dest = f.metadata.get("flag", f.name)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if f.metadata.get("inverse"):
            value = not value
        elif isinstance(value, str):
            value = field_from_text(f, value, f"--{dest}")
        values[f.name] = value
    return values


def _config_from_args(cls, args):
    """The validated config (``cls(...).validate()``) the parsed flags describe."""
    return cls(**_config_values(cls, args)).validate()


def _add_recover_fields(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`RecoverConfig` field, with its default and help from the dataclass."""
    from .recover.config import PARAMETERS, QUANT_AWARE, RecoverConfig

    _add_config_fields(parser, RecoverConfig, skip=("chunk_elements",),
                       choices={"parameters": PARAMETERS, "quant_aware": QUANT_AWARE}, default_in_help=True)


def _recover_config(args):
    from .recover.config import RecoverConfig

    return _config_from_args(RecoverConfig, args)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
                        if quiet else "%(message)s", stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()
    if quiet:
        transformers.utils.logging.disable_progress_bar()


def _eval_ids(tokenizer, source: str):
    """The evaluation text's token ids and the BOS that starts every window (None: none)."""
    from . import data

    return data.tokenize(tokenizer, data.load_text(source, "eval")), data.bos_token_id(tokenizer)


def _ppl(model, eval_ids, seqlen, args, device, label):
    from .evaluate import perplexity

    ids, bos = eval_ids
    max_tokens = args.max_eval_tokens or None
    return perplexity(model, ids, seqlen, batch_size=args.eval_batch_size, max_tokens=max_tokens,
                      device=device, source=label, progress=not args.quiet, bos=bos)


def _ppl_streamed(checkpoint, eval_ids, seqlen, args, dtype, device, label):
    """Perplexity of a checkpoint on disk, read one decoder layer at a time (see :func:`_ppl`)."""
    from .evaluate.streamed import perplexity_streamed

    ids, bos = eval_ids
    return perplexity_streamed(checkpoint, ids, seqlen, bos=bos, batch_size=args.eval_batch_size,
                               max_tokens=args.max_eval_tokens or None, dtype=dtype, device=device,
                               hidden_states=args.hidden_states, max_hidden_gib=args.max_hidden_gib,
                               trust_remote_code=args.trust_remote_code, source=label, progress=not args.quiet)


def _check_gguf_exportable(args, config, cfg: PruneConfig) -> None:
    """With --save_gguf: a model llama.cpp could not run as pruned fails now, before the pruning run."""
    if args.save_gguf:
        from .gguf_export import check_exportable

        check_exportable(config, cfg)


def _save_gguf(args, model, tok, report) -> None:
    from .gguf_export import export_gguf, source_gguf_for

    model.to("cpu")
    res = export_gguf(model, tok, args.save_gguf, quant=args.gguf_quant, provenance=report.to_dict(),
                      tokenizer_gguf=source_gguf_for(args.model), overwrite=args.overwrite)
    report.gguf = res.to_dict()
    for line in res.summary_lines():
        print(line)


def _finish_prune(args, report, dense, pruned, t_start: float) -> None:
    if pruned is not None:
        print(f"pruned: {pruned.format()}")
        report.evaluation = {"dense": dense.to_dict(), "pruned": pruned.to_dict()}
    print("memory: " + ", ".join(f"{k} {v:,.0f}" if isinstance(v, (int, float)) else f"{k} {v}"
                                 for k, v in report.memory.items()))
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(report.to_dict(), fh, indent=2, default=str)
    print(f"total time {time.perf_counter() - t_start:.1f} s")


def _check_prune_args(args) -> tuple[PruneConfig, object, str]:
    """Every input of ``rcpu prune`` checked before a model is loaded: config, model source, outputs,
    texts. Returns the config, the dtype and the resolved device."""
    from .api import resolve_device
    from .export import check_output_dir
    from .loading import check_model_source, check_supported_architecture

    cfg = _config_from_args(PruneConfig, args)
    check_model_source(args.model)
    check_supported_architecture(args.model, args.trust_remote_code)
    dtype = parse_dtype(args.dtype)
    device = resolve_device(args.device)
    if args.recover_tokens is not None:
        _check_recover_for_prune(args)
    if args.save_model:
        check_output_dir(args.save_model, args.overwrite)
    elif args.resume:
        raise RcpuError("--resume continues an interrupted --save_model run; give the same --save_model")
    if args.save_gguf:
        from .gguf_export import check_gguf_target

        check_gguf_target(args.save_gguf, args.overwrite)
    if args.max_eval_tokens is None:
        args.max_eval_tokens = 16384  # a quick before/after check; `rcpu eval` uses all tokens
    from . import data

    for source, split in ((args.calib, "calib"), (args.eval, "eval")):  # fail fast, before loading
        if source != "none":
            data.describe_source(source, split)
    return cfg, dtype, device


def _print_report(report) -> None:
    for line in report.summary_lines():
        print(line)
    for w in report.warnings:
        print(f"warning: {w}")


def _eval_label(args) -> str:
    return f"{args.eval}:eval"


def cmd_prune(args) -> int:
    """Prune in memory, or layer by layer from disk into --save_model (``_prune_streaming``)."""
    from .loading import streamable_dir

    t_start = time.perf_counter()
    cfg, dtype, device = _check_prune_args(args)
    stream_dir = streamable_dir(args.model, args.trust_remote_code) if args.save_model and args.stream else None
    if stream_dir is not None:
        report, dense, pruned = _prune_streaming(args, cfg, stream_dir, dtype, device)
    elif args.resume:
        raise RcpuError("--resume needs a streamed run: a local safetensors directory, GGUF file or built-in model "
                        "with --save_model (and without --no-stream)")
    else:
        report, dense, pruned = _prune_in_memory(args, cfg, dtype, device)
    _finish_prune(args, report, dense, pruned, t_start)
    return 0


def _prune_in_memory(args, cfg: PruneConfig, dtype, device):
    """Load the whole model, prune it, evaluate, recover, save: (report, dense ppl, pruned ppl)."""
    from .api import check_saveable, check_seqlen, prune
    from .export import save_pruned
    from .loading import load_model, source_record
    from .report import count_params

    loaded = load_model(args.model, dtype=dtype, device="cpu", trust_remote_code=args.trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    _check_gguf_exportable(args, model.config, cfg)
    check_seqlen(model.config, cfg.seqlen)
    check_seqlen(model.config, args.eval_seqlen, "--eval_seqlen")
    if cfg.allocation == "uniform":
        check_saveable(model, cfg)  # an unsaveable setting fails now, not after the run
    print(f"model {args.model}: {type(model).__name__}, {model.config.num_hidden_layers} layers, "
          f"{count_params(model):,} parameters, {args.dtype}, device {device}")
    eval_ids = None if args.eval == "none" else _eval_ids(tok, args.eval)
    dense = pruned = None
    if eval_ids is not None:
        model.to(device)
        dense = _ppl(model, eval_ids, args.eval_seqlen, args, device, _eval_label(args))
        model.to("cpu")
        print(f"dense : {dense.format()}")
    model, report = prune(model, cfg, tokenizer=tok, calib=args.calib, device=device, progress=not args.quiet,
                          hidden_states=args.hidden_states, max_hidden_gib=args.max_hidden_gib)
    report.model.update(source_record(args.model))  # the streamed path records it when it writes the provenance
    _print_report(report)
    if eval_ids is not None:
        model.to(device)
        pruned = _ppl(model, eval_ids, args.eval_seqlen, args, device, _eval_label(args))
    provenance = report.to_dict()
    if pruned is not None:
        provenance["evaluation"] = {"dense": dense.to_dict(), "pruned": pruned.to_dict()}
    if args.recover_tokens:
        model = _recover_after_prune(args, model, tok, dtype, device, provenance)
        report.recovery = provenance["recovery"]
    if args.save_model:
        model.to("cpu")
        out = save_pruned(model, tok, args.save_model, provenance, overwrite=args.overwrite)
        print(f"saved to {out}")
        if args.recover_tokens:  # the result is in place: the recovery checkpoints can go
            import shutil

            from .recover import work_dir_for

            shutil.rmtree(work_dir_for(args.save_model), ignore_errors=True)
    if args.save_gguf:
        _save_gguf(args, model, tok, report)
    return report, dense, pruned


def _prune_streaming(args, cfg: PruneConfig, path, dtype, device):
    """Layer by layer from disk into --save_model, and the perplexities before and after layer
    by layer too; only --recover_tokens (training) and --save_gguf load a whole (pruned) model.
    Returns (report, dense ppl, pruned ppl)."""
    from .api import calibration_windows_for, check_seqlen
    from .export import PROVENANCE
    from .loading import load_model
    from .streaming import load_source_config, prune_checkpoint

    config, tok, _ = load_source_config(path, args.trust_remote_code)
    _check_gguf_exportable(args, config, cfg)
    check_seqlen(config, cfg.seqlen)
    check_seqlen(config, args.eval_seqlen, "--eval_seqlen")
    print(f"model {args.model}: {config.model_type}, {config.num_hidden_layers} layers, {args.dtype}, "
          f"device {device}, streamed from {path}")
    windows, heldout, calib_info = calibration_windows_for(tok, cfg, args.calib)
    eval_ids = None if args.eval == "none" else _eval_ids(tok, args.eval)
    dense = pruned = None
    if eval_ids is not None:
        dense = _ppl_streamed(path, eval_ids, args.eval_seqlen, args, dtype, device, _eval_label(args))
        print(f"dense : {dense.format()}")
    target = _pruned_dir_for(args.save_model) if args.recover_tokens else args.save_model
    res = prune_checkpoint(path, cfg, target, windows=windows, heldout_windows=heldout,
                           calib_info={"source": args.calib, **calib_info}, dtype=dtype, device=device,
                           resume=args.resume, overwrite=args.overwrite or bool(args.recover_tokens),
                           trust_remote_code=args.trust_remote_code, progress=not args.quiet,
                           hidden_states=args.hidden_states,
                           max_hidden_gib=args.max_hidden_gib, announce=print, source_name=args.model)
    report = res.report
    _print_report(report)
    print(f"saved to {res.path}")
    if eval_ids is not None:
        pruned = _ppl_streamed(res.path, eval_ids, args.eval_seqlen, args, dtype, device, _eval_label(args))
        report.evaluation = {"dense": dense.to_dict(), "pruned": pruned.to_dict()}
        tmp = res.path / (PROVENANCE + ".partial")
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str))
        tmp.replace(res.path / PROVENANCE)
    if args.recover_tokens:  # the pruned checkpoint is the student; the result goes to --save_model
        from .recover import recover_checkpoint

        _, record, final = recover_checkpoint(
            str(res.path), args.save_model, _recover_config_for_prune(args), _recover_inputs(args, [args.eval_seqlen]),
            teacher=args.model, device=device, dtype=dtype, overwrite=args.overwrite, resume=args.resume,
            trust_remote_code=args.trust_remote_code, progress=not args.quiet,
            provenance=json.loads((res.path / PROVENANCE).read_text()))
        _print_recovery(record, final)
        report.recovery = record.to_dict()
        import shutil

        shutil.rmtree(res.path, ignore_errors=True)
        res.path = final
    if args.save_gguf:  # from the written checkpoint: this loads the pruned model
        pruned_model = load_model(str(res.path), dtype=dtype, trust_remote_code=True).model
        _save_gguf(args, pruned_model, tok, report)
        del pruned_model
    return report, dense, pruned


def _recover_inputs(args, eval_seqlens):
    from .recover import RecoverInputs

    autocast = None if getattr(args, "autocast", "none") == "none" else parse_dtype(args.autocast)
    return RecoverInputs(data=args.data if args.command == "recover" else args.calib,  # prune trains on --calib
                         eval=args.eval, eval_seqlens=tuple(eval_seqlens),
                         max_eval_tokens=16384 if args.max_eval_tokens is None else (args.max_eval_tokens or None),
                         autocast=autocast, teacher_cache=getattr(args, "teacher_cache", None),
                         teacher_topk=getattr(args, "teacher_topk", None) or 64)


def _print_recovery(record, path) -> None:
    from .recover import summary_lines

    for line in summary_lines(record):
        print(line)
    if path is not None:
        print(f"saved to {path}")


def _recover_config_for_prune(args):
    from .recover import RecoverConfig

    return RecoverConfig(tokens=args.recover_tokens, seed=args.seed).validate()


def _check_recover_for_prune(args) -> None:
    """``prune --recover_tokens``: a bad budget, overlapping texts or leftover checkpoints fail
    before pruning, not after it."""
    from .recover import check_texts, check_work_dir, work_dir_for

    _recover_config_for_prune(args)
    check_texts(_recover_inputs(args, [args.eval_seqlen]))
    if args.save_model:
        check_work_dir(work_dir_for(args.save_model), args.resume)


def _pruned_dir_for(save_model: str):
    """Where a streamed ``prune --recover_tokens`` run writes the unrecovered pruned checkpoint."""
    from pathlib import Path

    out = Path(save_model).expanduser().resolve()
    return out.parent / f".{out.name}.rcpu-pruned"


def _recover_after_prune(args, model, tok, dtype, device, provenance: dict):
    """``prune --recover_tokens`` on an in-memory model: distil the dense model (reloaded) into it.
    Its checkpoints (with --save_model) stay until the caller has saved the result."""
    from .loading import load_model, source_record
    from .recover import default_teacher_dtype, recover_model, work_dir_for

    tdtype = default_teacher_dtype(device, dtype)
    teacher = load_model(args.model, dtype=tdtype, device="cpu", trust_remote_code=args.trust_remote_code).model
    info = {"source": source_record(args.model)["source"], "dtype": str(tdtype).removeprefix("torch.")}
    model, record = recover_model(model, tok, teacher, info, _recover_config_for_prune(args),
                                  _recover_inputs(args, [args.eval_seqlen]), device=device,
                                  work_dir=work_dir_for(args.save_model) if args.save_model else None,
                                  resume=args.resume, progress=not args.quiet)
    _print_recovery(record, None)
    provenance["recovery"] = record.to_dict()
    return model


def cmd_recover(args) -> int:
    from .api import resolve_device
    from .recover import recover_checkpoint
    from .recover.run import check_report_path, check_teacher_cache
    from .recover.train import distributed

    if not args.model:
        raise RcpuError("rcpu recover needs --model: the pruned checkpoint to recover")
    cfg = _recover_config(args)
    if args.report:
        check_report_path(args.report)  # written last: its folder is checked first
    device = resolve_device(args.device)
    if any(s < 2 for s in args.eval_seqlen):
        raise RcpuError("--eval_seqlen values must be >= 2")
    if args.teacher_topk is not None and not args.teacher_cache:
        raise RcpuError("--teacher_topk sets how many teacher logits --teacher_cache keeps; give --teacher_cache DIR")
    if args.teacher_topk is not None and args.teacher_topk < 1:
        raise RcpuError(f"--teacher_topk is {args.teacher_topk}; keep at least 1 logit per position")
    inputs = _recover_inputs(args, args.eval_seqlen)
    check_teacher_cache(inputs, cfg)  # (again in recover_checkpoint) before a process group is joined
    with distributed(device) as ctx:  # under torchrun: one process per GPU, the group destroyed at the end
        _, record, path = recover_checkpoint(
            args.model, args.save_model, cfg, inputs, teacher=args.teacher,
            device=device, dtype=parse_dtype(args.dtype),
            teacher_dtype=parse_dtype(args.teacher_dtype) if args.teacher_dtype else None, overwrite=args.overwrite,
            resume=args.resume, trust_remote_code=args.trust_remote_code, progress=not args.quiet)
        if ctx.main:  # under torchrun, one report
            _print_recovery(record, path)
            if args.report:
                with open(args.report, "w") as fh:
                    json.dump(record.to_dict(), fh, indent=2, default=str)
    return 0


def cmd_eval(args) -> int:

    from .api import resolve_device
    from .loading import load_model
    from .report import count_params

    dtype = parse_dtype(args.dtype)
    device = resolve_device(args.device)
    if any(s < 2 for s in args.seqlen):
        raise RcpuError("--seqlen values must be >= 2")
    loaded = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
    print(f"model {args.model}: {type(loaded.model).__name__}, {count_params(loaded.model):,} parameters")
    out: dict = {"model": args.model, "dtype": args.dtype, "device": str(device), "perplexity": [], "zero_shot": None}
    if args.ppl != "none":
        ids = _eval_ids(loaded.tokenizer, args.ppl)
        for seqlen in args.seqlen:
            res = _ppl(loaded.model, ids, seqlen, args, device, f"{args.ppl}:eval")
            out["perplexity"].append(res.to_dict())
            print(res.format())
    if args.tasks:
        from .evaluate import PAPER_TASKS, zero_shot

        tasks = list(PAPER_TASKS) if args.tasks == "paper" else args.tasks
        res = zero_shot(loaded.model, loaded.tokenizer, tasks, batch_size=args.eval_batch_size or 8, device=device,
                        limit=args.limit, num_fewshot=args.num_fewshot, include_path=args.include_path)
        out["zero_shot"] = res.to_dict()
        print(res.format())
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(out, fh, indent=2, default=str)
    return 0


def cmd_compare(args) -> int:

    from .api import resolve_device
    from .compare import run_compare, split_methods

    device = resolve_device(args.device)
    results = run_compare(
        args.model, split_methods(args.methods),
        parse_floats(args.pruning_ratios, "--pruning_ratios"), args.output, calib=args.calib, eval_source=args.eval,
        nsamples=[int(x) for x in parse_floats(args.nsamples, "--nsamples")], seqlen=args.seqlen, seed=args.seed,
        eval_seqlens=[int(x) for x in parse_floats(args.eval_seqlens, "--eval_seqlens")],
        max_eval_tokens=args.max_eval_tokens or None, device=device, dtype=parse_dtype(args.dtype),
        batch_size=args.batch_size, progress=not args.quiet, executor=args.executor,
        gpus=[int(x) for x in parse_floats(args.gpus, "--gpus")] if args.gpus else None, ray_address=args.ray_address,
        ray_num_cpus=args.ray_num_cpus)
    from pathlib import Path

    print((Path(args.output) / "results.md").read_text())
    written = "results.json, results.md" + (", ppl.png" if results.get("plot") else " (no ppl.png: matplotlib missing)")
    print(f"wrote {args.output}/{written} ({results.get('wall_s_this_run', 0):.0f} s)")
    return 0


def cmd_export(args) -> int:
    import torch

    from .gguf_export import (
        check_gguf_target,
        export_gguf,
        load_provenance,
        parse_tensor_types,
        source_gguf_for,
    )
    from .loading import load_model

    check_gguf_target(args.gguf, args.overwrite)
    parse_tensor_types(args.tensor_type)  # refuse a bad spec before the model loads
    loaded = load_model(args.model, dtype=torch.float32, device="cpu", trust_remote_code=args.trust_remote_code)
    provenance = load_provenance(loaded.path) if loaded.kind in ("dir", "builtin") else None
    tok_gguf = args.tokenizer_gguf
    if tok_gguf is None:  # the GGUF the model came from: the model itself, or the source of a pruning run
        tok_gguf = source_gguf_for(args.model) or source_gguf_for(((provenance or {}).get("model") or {}).get("source"))
    res = export_gguf(loaded.model, loaded.tokenizer, args.gguf, quant=args.quant, tokenizer_gguf=tok_gguf,
                      provenance=provenance, overwrite=args.overwrite, pad_to=args.pad_to,
                      tensor_types=args.tensor_type)
    for line in res.summary_lines():
        print(line)
    return 0


def cmd_bench(args) -> int:

    from .api import resolve_device
    from .evaluate import compare_speed
    from .loading import load_model

    dtype = parse_dtype(args.dtype)
    device = resolve_device(args.device)
    model = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code).model
    base = load_model(args.baseline, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code).model
    res = compare_speed(model, base, batch_size=args.batch_size, prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, repeats=args.repeats, device=device, progress=not args.quiet)
    print(res.format())
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"model": args.model, "baseline": args.baseline, **res.to_dict()}, fh, indent=2, default=str)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["prune"]  # the built-in demo
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.quiet)
    try:
        commands = {"prune": cmd_prune, "recover": cmd_recover, "eval": cmd_eval, "compare": cmd_compare, "bench": cmd_bench,
                    "export": cmd_export}
        return commands[args.command](args)
    except RcpuError as exc:
        print(f"rcpu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the last checkpoint of a --save_model run stays usable with --resume
        print("rcpu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
