"""Inference speed of a pruned model against its baseline (prefill and decode throughput).

The numbers produced here are what users put next to the speed-ups reported in papers, so the protocol
is fixed and spelled out:

* **Same conditions.** Both models run in the same process, on the same device, in the same dtype
  (a mismatch is an error), on the same prompts: ``batch_size x prompt_len`` token ids drawn uniformly
  from a ``torch.Generator`` seeded with ``seed``, below the smaller of the two vocabularies.
* **Alternation.** Runs alternate ``model, baseline, model, baseline, ...``: round ``i`` times the model
  and then the baseline back to back, so slow drift in machine load (thermal throttling, other jobs,
  clock boosting) hits both about equally. Speed-ups are computed *per round* (the model's time against
  the baseline's time of the same round) and summarised by their median and min-max, which is much more
  robust than the ratio of two independently summarised medians.
* **Warm-up.** ``warmup`` untimed rounds (same alternation) come first, so one-off costs (CUDA context,
  kernel selection/autotuning, allocator growth, lazy initialisation) are not timed.
* **Prefill** is one forward pass over the whole prompt with ``use_cache=True``, exactly as generation
  does it: a fresh KV cache is filled, and when the model's ``forward`` accepts ``logits_to_keep`` only
  the last position's logits are computed (what ``generate()`` asks for too), followed by the argmax that
  picks the first new token. Throughput is ``batch_size * prompt_len / time``.
* **Decode** is a hand-written greedy loop, timed separately from the prefill: ``new_tokens`` forward
  passes of one token each through the KV cache that the prefill built, each consuming the previous
  greedy token and producing the next (argmax of the last logits). The token fed to the first step is the
  one the prefill produced, so the whole run emits ``new_tokens + 1`` tokens, identical to
  ``generate(do_sample=False, max_new_tokens=new_tokens + 1)`` without an early stop. Writing the loop
  ourselves keeps ``generate()``'s per-step bookkeeping (logits processors, stopping criteria, input
  preparation) out of the measurement, and needs no subtraction of two noisy timings. There is no
  early stop on EOS, so every round does the same work. Throughput is ``batch_size * new_tokens / time``.
* **Clocks.** ``time.perf_counter``; on CUDA ``torch.cuda.synchronize()`` is called before reading the
  clock at the start and end of each timed phase, and nothing inside a phase forces a host sync (the next
  token stays on the device), so the loop runs as it would in real generation. Everything runs under
  ``torch.inference_mode()``. Python's garbage collector is paused inside the timed phases (as
  :mod:`timeit` does) and run between runs, so a collection of the other model's garbage is not billed
  to this one.
* **Memory.** On CUDA both models live on the device at once, so the raw ``max_memory_allocated`` would
  count the *other* model's weights too. Instead the peak statistics are reset before each run, and a
  model's peak is ``its own parameter+buffer bytes + (max_memory_allocated during the run - memory
  allocated just before it)``, i.e. weights plus the transient peak of activations and KV cache; the
  maximum over that model's timed runs is reported (``memory_kind = "cuda_weights+run_peak"``). On other
  devices only the parameter+buffer bytes are reported (``memory_kind = "cpu_weights"``): process RSS
  would mix both models, the allocator's caching and Python's heap, and would be misleading.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import RcpuError

logger = logging.getLogger(__name__)

__all__ = ["SpeedComparison", "SpeedStats", "compare_speed"]

_MIB = float(1 << 20)


@dataclass
class SpeedStats:
    """Throughput of one model over the timed rounds of :func:`compare_speed`.

    ``prefill_times`` / ``decode_times`` keep the raw per-round seconds (in round order) so that
    speed-ups can be paired round by round and the summary can be checked or recomputed.
    """

    prefill_tokens_per_s: float  # median over repeats
    prefill_spread: tuple[float, float]  # (min, max) over repeats
    decode_tokens_per_s: float  # median over repeats
    decode_spread: tuple[float, float]  # (min, max) over repeats
    peak_memory_mib: float | None  # see memory_kind for what exactly is measured
    memory_kind: str  # "cuda_weights+run_peak" or "cpu_weights"
    params: int  # number of parameters (shared/tied tensors counted once)
    prefill_times: list[float] = field(default_factory=list)  # seconds per timed round
    decode_times: list[float] = field(default_factory=list)  # seconds per timed round
    prefill_tokens: int = 0  # tokens processed by one prefill (batch_size * prompt_len)
    decode_tokens: int = 0  # tokens produced by one decode phase (batch_size * new_tokens)
    weights_mib: float = 0.0  # parameter + buffer bytes
    prefill_logits: str = "last"  # "last" (logits_to_keep=1, as generate() does) or "all"

    @classmethod
    def from_times(
        cls,
        prefill_times: list[float],
        decode_times: list[float],
        *,
        prefill_tokens: int,
        decode_tokens: int,
        peak_memory_mib: float | None,
        memory_kind: str,
        params: int,
        weights_mib: float,
        prefill_logits: str,
    ) -> SpeedStats:
        """Summarise raw per-round timings into tokens/s (median and min-max)."""
        pre = [prefill_tokens / t for t in prefill_times]
        dec = [decode_tokens / t for t in decode_times]
        return cls(
            prefill_tokens_per_s=statistics.median(pre),
            prefill_spread=(min(pre), max(pre)),
            decode_tokens_per_s=statistics.median(dec),
            decode_spread=(min(dec), max(dec)),
            peak_memory_mib=peak_memory_mib,
            memory_kind=memory_kind,
            params=params,
            prefill_times=list(prefill_times),
            decode_times=list(decode_times),
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            weights_mib=weights_mib,
            prefill_logits=prefill_logits,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_spread"] = list(self.prefill_spread)
        d["decode_spread"] = list(self.decode_spread)
        return d

    def format(self) -> str:
        """One line, e.g. ``prefill 10,240 tok/s (9,900-10,400)  decode 312 tok/s (300-320)  ...``."""
        mem = "n/a" if self.peak_memory_mib is None else f"{self.peak_memory_mib:,.1f} MiB ({self.memory_kind})"
        return (
            f"prefill {_fmt_rate(self.prefill_tokens_per_s)} tok/s "
            f"({_fmt_rate(self.prefill_spread[0])}-{_fmt_rate(self.prefill_spread[1])})  "
            f"decode {_fmt_rate(self.decode_tokens_per_s)} tok/s "
            f"({_fmt_rate(self.decode_spread[0])}-{_fmt_rate(self.decode_spread[1])})  "
            f"memory {mem}  params {_fmt_count(self.params)}"
        )


@dataclass
class SpeedComparison:
    """Outcome of :func:`compare_speed`: both models' stats, measured in alternation, and the settings."""

    model: SpeedStats
    baseline: SpeedStats
    settings: dict

    def speedup(self) -> dict:
        """Per-round speed-ups of ``model`` over ``baseline``, summarised.

        For round ``i`` the ratio is ``model tokens/s / baseline tokens/s``, which (same token counts)
        is ``baseline_time[i] / model_time[i]``. Returns ``{"prefill": {...}, "decode": {...}}`` with
        ``median``, ``min``, ``max`` and the ``per_repeat`` ratios for each phase.
        """
        return {
            "prefill": _ratio_summary(
                self.model.prefill_times, self.baseline.prefill_times,
                self.model.prefill_tokens, self.baseline.prefill_tokens,
            ),
            "decode": _ratio_summary(
                self.model.decode_times, self.baseline.decode_times,
                self.model.decode_tokens, self.baseline.decode_tokens,
            ),
        }

    def to_dict(self) -> dict:
        return {
            "settings": dict(self.settings),
            "model": self.model.to_dict(),
            "baseline": self.baseline.to_dict(),
            "speedup": self.speedup(),
        }

    def format(self) -> str:
        """A few lines: settings, one line per model, and the speed-up line."""
        s = self.settings
        sp = self.speedup()
        pre, dec = sp["prefill"], sp["decode"]
        head = (
            f"speed: batch {s.get('batch_size')}, prompt {s.get('prompt_len')}, new tokens {s.get('new_tokens')}, "
            f"{s.get('repeats')} alternating repeats ({s.get('warmup')} warm-up), "
            f"{s.get('dtype')} on {s.get('device_name') or s.get('device')}"
        )
        lines = [
            head,
            f"  model    {self.model.format()}",
            f"  baseline {self.baseline.format()}",
            f"  prefill speed-up {pre['median']:.2f}x ({pre['min']:.2f}-{pre['max']:.2f})   "
            f"decode speed-up {dec['median']:.2f}x ({dec['min']:.2f}-{dec['max']:.2f})   "
            f"params {self.model.params / max(1, self.baseline.params):.1%} of baseline",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- helpers


def _fmt_rate(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}"


def _fmt_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _ratio_summary(model_times: list[float], base_times: list[float], model_tokens: int, base_tokens: int) -> dict:
    ratios = [(model_tokens / tm) / (base_tokens / tb) for tm, tb in zip(model_times, base_times, strict=True)]
    if not ratios:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "per_repeat": []}
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_repeat": ratios}


def _first_param(model: torch.nn.Module) -> torch.Tensor | None:
    for p in model.parameters():
        return p
    return None


def _float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return None


def _vocab_size(model) -> int:
    """Rows of the input embedding (what ids must stay below), falling back to ``config.vocab_size``."""
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
        except (AttributeError, NotImplementedError):
            emb = None
        n = getattr(emb, "num_embeddings", None)
        if n:
            return int(n)
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    if not n:
        raise RcpuError(f"cannot tell the vocabulary size of {type(model).__name__}; it needs input embeddings")
    return int(n)


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _weight_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in model.parameters()}
    tensors.update({id(t): t for t in model.buffers()})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def make_prompts(batch_size: int, prompt_len: int, vocab: int, seed: int) -> torch.Tensor:
    """The shared prompt: ``(batch_size, prompt_len)`` ids uniform in ``[0, vocab)`` from a seeded CPU generator.

    Drawn on the CPU so the same seed gives the same ids whatever the device.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randint(0, vocab, (batch_size, prompt_len), generator=gen, dtype=torch.long)


def greedy_run(
    model, prompt: torch.Tensor, new_tokens: int, *, device: torch.device, logits_to_keep: bool = True
) -> tuple[float, float, torch.Tensor]:
    """One timed prefill + decode of ``prompt`` (already on ``device``); returns ``(prefill_s, decode_s, tokens)``.

    ``tokens`` is ``(batch, new_tokens + 1)``: the token chosen from the prefill logits followed by the
    ``new_tokens`` tokens produced by the decode steps. Must be called under ``torch.inference_mode()``.
    """
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **extra)
        past = out.past_key_values
        token = out.logits[:, -1, :].argmax(dim=-1)
        _sync(device)
        t1 = time.perf_counter()
        if past is None:
            raise RcpuError(f"{type(model).__name__} returned no KV cache with use_cache=True; cannot time decoding")
        del out
        produced = [token]
        _sync(device)
        t2 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1, :].argmax(dim=-1)
            produced.append(token)
        _sync(device)
        t3 = time.perf_counter()
    finally:
        if gc_was_enabled:
            gc.enable()
    return t1 - t0, t3 - t2, torch.stack(produced, dim=1)


# --------------------------------------------------------------------------------------------- steps


def _check_arguments(model, baseline, batch_size: int, prompt_len: int, new_tokens: int, repeats: int,
                     warmup: int) -> None:
    """Reject bad counts before any model is moved or run, so a typo costs nothing."""
    for name, value, low in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1),
                             ("new_tokens", new_tokens, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RcpuError(f"compare_speed: {name} must be an integer >= {low}, got {value!r}")
    if model is baseline:
        logger.warning("compare_speed: model and baseline are the same object; the speed-up should be ~1")


def _place_models(model, baseline, device) -> torch.device:
    """The one device both models run on (same conditions); a model that is elsewhere is moved there."""
    p_model, p_base = _first_param(model), _first_param(baseline)
    if p_model is None or p_base is None:
        raise RcpuError("compare_speed: both models need parameters")
    if device is None:
        device = p_model.device
        if p_base.device != device:
            raise RcpuError(
                f"compare_speed: model is on {p_model.device} but baseline is on {p_base.device}; "
                "put both on the same device or pass device="
            )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for label, m, p in (("model", model, p_model), ("baseline", baseline, p_base)):
        if p.device != device:
            logger.info("compare_speed: moving %s from %s to %s", label, p.device, device)
            m.to(device)
    return device


def _shared_dtype_name(model, baseline) -> str:
    """The dtype both models share, e.g. ``"bfloat16"``; a mismatch would make the comparison unfair."""
    dt_model, dt_base = _float_dtype(model), _float_dtype(baseline)
    if dt_model != dt_base:
        raise RcpuError(
            f"compare_speed: model is {dt_model} but baseline is {dt_base}; load both in the same dtype "
            "for a fair comparison"
        )
    return str(dt_model).removeprefix("torch.")


def _shared_prompt(model, baseline, batch_size: int, prompt_len: int, new_tokens: int, seed: int,
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """The prompt both models get, on ``device``, and the vocabulary it was drawn below.

    Ids stay below the smaller vocabulary so that both models can embed them.
    """
    vocab = min(_vocab_size(model), _vocab_size(baseline))
    prompt = make_prompts(batch_size, prompt_len, vocab, seed).to(device)
    for label, m in (("model", model), ("baseline", baseline)):
        limit = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if limit and prompt_len + new_tokens > limit:
            logger.warning(
                "compare_speed: prompt_len + new_tokens = %d exceeds the %s's max_position_embeddings (%d)",
                prompt_len + new_tokens, label, limit,
            )
    return prompt, vocab


def _timed_in_eval_mode(models: dict, prompt: torch.Tensor, new_tokens: int, **rounds) -> tuple[dict, dict]:
    """:func:`_alternate_rounds` with every model in eval mode and inference mode on.

    The models' training flags are restored afterwards, even when a run fails.
    """
    training = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        with torch.inference_mode():
            return _alternate_rounds(models, prompt, new_tokens, **rounds)
    finally:
        for k, m in models.items():
            m.train(training[k])
        gc.collect()


def _alternate_rounds(
    models: dict,
    prompt: torch.Tensor,
    new_tokens: int,
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    keep_last: dict[str, bool],
    weight_bytes: dict[str, int],
    progress: bool,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """Warm-up then timed rounds, each running the model and then the baseline back to back.

    Alternating makes slow drift in machine load hit both models about equally. Returns the per-round
    ``{"prefill": [...], "decode": [...]}`` seconds of each model and its peak bytes on CUDA (weights plus
    the run's own peak above what was allocated just before it, so the other model is not counted).
    """
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    peak_bytes: dict[str, int] = {k: 0 for k in models}
    is_cuda = device.type == "cuda"
    with tqdm(total=warmup + repeats, desc="speed", unit="round", disable=not progress) as bar:
        for rnd in range(-warmup, repeats):
            for key in ("model", "baseline"):  # alternation: model, baseline, model, baseline, ...
                gc.collect()
                if is_cuda:
                    _sync(device)
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                pre_s, dec_s, _ = greedy_run(models[key], prompt, new_tokens, device=device,
                                             logits_to_keep=keep_last[key])
                if rnd < 0:
                    continue
                if is_cuda:
                    run_peak = torch.cuda.max_memory_allocated(device) - before
                    peak_bytes[key] = max(peak_bytes[key], weight_bytes[key] + run_peak)
                times[key]["prefill"].append(pre_s)
                times[key]["decode"].append(dec_s)
            bar.update(1)
    return times, peak_bytes


def _model_stats(
    key: str,
    model,
    times: dict[str, list[float]],
    *,
    peak_bytes: int,
    weight_bytes: int,
    keep_last: bool,
    device: torch.device,
    prefill_tokens: int,
    decode_tokens: int,
) -> SpeedStats:
    """One model's summary; warns when the clock was too coarse to time a phase."""
    if device.type == "cuda":
        peak, kind = peak_bytes / _MIB, "cuda_weights+run_peak"
    else:
        peak, kind = weight_bytes / _MIB, f"{device.type}_weights"
    stats = SpeedStats.from_times(
        times["prefill"],
        times["decode"],
        prefill_tokens=prefill_tokens,
        decode_tokens=decode_tokens,
        peak_memory_mib=peak,
        memory_kind=kind,
        params=_param_count(model),
        weights_mib=weight_bytes / _MIB,
        prefill_logits="last" if keep_last else "all",
    )
    bad = [t for t in times["prefill"] + times["decode"] if not (t > 0 and math.isfinite(t))]
    if bad:
        logger.warning("compare_speed: %s had non-positive timings %s; the clock is too coarse", key, bad)
    return stats


def _settings(*, batch_size: int, prompt_len: int, new_tokens: int, repeats: int, warmup: int, seed: int,
              vocab: int, dtype_name: str, device: torch.device) -> dict:
    """What was measured and with which software, so a reported number can be reproduced."""
    import transformers  # local: only for the version string

    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "vocab_sampled": vocab,
        "dtype": dtype_name,
        "device": str(device),
        "device_name": _device_name(device),
        "order": "alternating model, baseline per round",
        "decode": "hand-written greedy loop with KV cache, new_tokens single-token steps after the prefill",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# --------------------------------------------------------------------------------------------- main


def compare_speed(
    model,
    baseline,
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    device=None,
    seed: int = 0,
    progress: bool = False,
) -> SpeedComparison:
    """Time prefill and greedy decoding of ``model`` against ``baseline``, alternating runs.

    See the module docstring for the exact protocol. Both models are put in eval mode for the
    measurement and their previous training flags are restored afterwards.

    Args:
        model: the (pruned) causal LM to measure.
        baseline: the model to compare against (typically the dense original).
        batch_size: prompts per forward.
        prompt_len: prompt length in tokens (the prefill size).
        new_tokens: decode steps timed (one new token per sequence each).
        repeats: timed rounds; each round runs the model once and then the baseline once.
        warmup: untimed rounds run first, in the same alternation.
        device: where both models must be and the prompts go. Default: the device of the model's
            first parameter. A model that is elsewhere is moved there (in place), with a log line.
        seed: seed of the prompt generator.
        progress: show a tqdm progress bar over rounds.

    Raises:
        RcpuError: bad arguments, models in different dtypes or on different devices, or a model that
            does not return a KV cache.
    """
    _check_arguments(model, baseline, batch_size, prompt_len, new_tokens, repeats, warmup)
    device = _place_models(model, baseline, device)
    dtype_name = _shared_dtype_name(model, baseline)
    prompt, vocab = _shared_prompt(model, baseline, batch_size, prompt_len, new_tokens, seed, device)

    models = {"model": model, "baseline": baseline}
    keep_last = {k: _accepts_logits_to_keep(m) for k, m in models.items()}
    weight_bytes = {k: _weight_bytes(m) for k, m in models.items()}
    logger.debug("compare_speed: batch %d, prompt %d, new %d, %d repeats + %d warm-up, %s on %s",
                 batch_size, prompt_len, new_tokens, repeats, warmup, dtype_name, device)
    times, peak_bytes = _timed_in_eval_mode(
        models, prompt, new_tokens, repeats=repeats, warmup=warmup, device=device,
        keep_last=keep_last, weight_bytes=weight_bytes, progress=progress,
    )
    stats = {
        key: _model_stats(key, m, times[key], peak_bytes=peak_bytes[key], weight_bytes=weight_bytes[key],
                          keep_last=keep_last[key], device=device, prefill_tokens=batch_size * prompt_len,
                          decode_tokens=batch_size * new_tokens)
        for key, m in models.items()
    }
    settings = _settings(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                         warmup=warmup, seed=seed, vocab=vocab, dtype_name=dtype_name, device=device)
    result = SpeedComparison(model=stats["model"], baseline=stats["baseline"], settings=settings)
    logger.info("%s", result.format())
    return result
