"""The distillation loop: frozen teacher, trained student, held-out measurements, checkpoints, DDP.

One process, or one per device under ``torchrun`` (``WORLD_SIZE`` set): every rank builds the
same models and windows and takes its slice of each global batch; DDP averages the gradients
(or FSDP2 shards both models, ``--fsdp``), so N processes compute the one-process step for the
same global batch. Rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import RcpuError
from ..report import PeakMemory
from .config import RecoverConfig
from .loss import distillation_loss, loss_terms
from .params import attach_trainable, merge_trainable, unwrap
from .sharding import Replicated, sharding_for
from .state import load_checkpoint, save_checkpoint
from .windows import TrainingWindows

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "Pair", "StudentLoss", "TeacherHidden", "dist_context", "train"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world


def dist_context(device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` set up (NCCL on CUDA, gloo on the CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, LM head) of a causal LM, or of the model inside a peft wrapper."""
    core = unwrap(model)
    try:
        return core.get_decoder(), core.get_output_embeddings()
    except (AttributeError, NotImplementedError) as exc:
        raise RcpuError(f"{type(core).__name__} has no decoder / output head to distil through") from exc


def _hidden(decoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = decoder(input_ids=ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class TeacherHidden(nn.Module):
    """The teacher's final hidden states at the scored positions (the head is applied in the loss)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.model = teacher

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _hidden(_parts(self.model)[0], ids)[:, :-1]


class StudentLoss(nn.Module):
    """The student and its loss as one module, so DDP / FSDP see the forward that makes the gradients.

    ``measure=True`` returns summed held-out terms instead (KL, both models' NLL) without gradients.
    """

    def __init__(self, student: nn.Module, cfg: RecoverConfig):
        super().__init__()
        self.model = student
        self.cfg = cfg

    def forward(self, ids: torch.Tensor, teacher_hidden: torch.Tensor | None, teacher_head: nn.Module,
                measure: bool = False):
        decoder, head = _parts(self.model)
        hidden = _hidden(decoder, ids)[:, :-1]
        if measure:
            return loss_terms(hidden, head.weight, head.bias, ids[:, 1:], teacher_hidden, teacher_head.weight,
                              teacher_head.bias, self.cfg.chunk_elements)
        return distillation_loss(
            hidden, head.weight, head.bias, ids[:, 1:],
            teacher_hidden=teacher_hidden, teacher_weight=teacher_head.weight, teacher_bias=teacher_head.bias,
            alpha=self.cfg.alpha, temperature=self.cfg.temperature, chunk_elements=self.cfg.chunk_elements)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class Pair:
    """Student (inside its loss module) and teacher, wrapped for the placement in use."""

    student: nn.Module  #: StudentLoss, possibly DDP / FSDP-wrapped
    teacher: nn.Module  #: TeacherHidden, possibly FSDP-wrapped
    sharding: Replicated
    device: torch.device
    autocast: torch.dtype | None = None
    #: the frozen teacher's hidden states on measured windows, computed once per batch
    _measured: dict = field(default_factory=dict)

    @classmethod
    def build(cls, student: nn.Module, teacher: nn.Module, cfg: RecoverConfig, sharding: Replicated,
              device: torch.device, autocast: torch.dtype | None = None) -> Pair:
        loss_module, teacher_module = sharding.wrap(StudentLoss(student, cfg), TeacherHidden(teacher))
        return cls(loss_module, teacher_module, sharding, device, autocast)

    @property
    def inner(self) -> StudentLoss:
        return getattr(self.student, "module", self.student)  # DDP keeps the module inside

    def teacher_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        with self.sharding.teacher_context(), _autocast(self.device, self.autocast):
            hidden = self.teacher(ids)
        return hidden.clone()  # an ordinary tensor (not an inference tensor), usable by autograd

    def loss(self, ids: torch.Tensor, alpha: float) -> torch.Tensor:
        hidden = self.teacher_hidden(ids) if alpha > 0 else None
        with self.sharding.teacher_head(self.teacher) as head, _autocast(self.device, self.autocast):
            return self.student(ids, hidden, head)

    @torch.no_grad()
    def measure(self, windows: torch.Tensor, batch_size: int) -> dict[str, float]:
        """Mean per-token KL(teacher || student), both models' loss and the student's perplexity on
        ``windows`` (every rank takes part: sharded models gather their weights collectively)."""
        target = self.student if self.sharding.sharded else self.inner  # DDP's forward would sync buffers
        was = target.training
        target.eval()
        sums = {"kl": 0.0, "nll": 0.0, "teacher_nll": 0.0, "tokens": 0}
        try:
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start:start + batch_size].to(self.device)
                key = (windows.data_ptr(), tuple(windows.shape), start, batch_size)
                if key not in self._measured:
                    self._measured[key] = self.teacher_hidden(ids)
                hidden = self._measured[key]
                with self.sharding.teacher_head(self.teacher) as head, _autocast(self.device, self.autocast):
                    part = target(ids, hidden, head, measure=True)
                for k in sums:
                    sums[k] += part[k]
        finally:
            target.train(was)
        n = max(1, sums["tokens"])
        return {"kl": sums["kl"] / n, "loss": sums["nll"] / n, "teacher_loss": sums["teacher_nll"] / n,
                "ppl": math.exp(min(sums["nll"] / n, 700.0)), "teacher_ppl": math.exp(min(sums["teacher_nll"] / n, 700.0)),
                "tokens": sums["tokens"]}


def _schedule(optimizer: torch.optim.Optimizer, cfg: RecoverConfig, steps: int, done: int):
    from transformers import get_cosine_schedule_with_warmup

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.lr)
    return get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup * steps), steps, last_epoch=done - 1)


@dataclass
class TrainResult:
    model: nn.Module | None  #: the student with adapters merged, frozen, in eval mode (None off rank 0 under FSDP)
    curve: list  #: per step: step, tokens, loss, lr
    heldout_curve: list  #: every eval_every steps: step, tokens and held-out metrics
    steps: int
    resumed_at: int
    train_seconds: float  #: training time (no measurements or checkpoints), summed over resumed parts
    tokens: int
    memory: dict
    before: dict  #: eval set name -> metrics before training (rank 0)
    after: dict  #: the same after training


def train(student: nn.Module, teacher: nn.Module, windows: TrainingWindows, cfg: RecoverConfig, *,
          device: torch.device, ctx: DistContext, work_dir: Path | None = None, resume: bool = False,
          digest: str = "", autocast: torch.dtype | None = None, progress: bool = True,
          rebuild: Callable[[], nn.Module] | None = None, eval_sets: dict[str, torch.Tensor] | None = None
          ) -> TrainResult:
    """Distil ``teacher`` into ``student`` for ``cfg.steps()`` global batches; see the module docstring.

    ``rebuild`` makes a fresh copy of the untrained student (needed with ``cfg.fsdp`` to gather the
    result on rank 0). ``eval_sets`` (name -> windows) are measured before and after training.
    """
    eval_sets = eval_sets or {}
    steps = cfg.steps()
    if cfg.batch_size % ctx.world:
        raise RcpuError(f"--batch_size {cfg.batch_size} is not divisible by the {ctx.world} processes; "
                        "give a global batch that splits evenly")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = attach_trainable(student, cfg)
    model.train()
    if cfg.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sharding = sharding_for(cfg.fsdp, ctx.world, device)
    pair = Pair.build(model, teacher, cfg, sharding, device, autocast)
    params = [p for p in pair.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    done, curve, heldout_curve, seconds, before = 0, [], [], 0.0, {}
    if resume and work_dir is not None and (work_dir / "checkpoint").exists():
        meta = load_checkpoint(work_dir, pair.student, optimizer, sharding)
        if meta.get("digest") != digest:
            raise RcpuError(f"{work_dir} was written with other settings or another model; remove it, or resume with "
                            "the settings it was started with")
        done, curve, heldout_curve = meta["step"], meta["curve"], meta["heldout_curve"]
        seconds, before = meta["train_seconds"], meta.get("before", {})
        if ctx.main:
            logger.info("resuming recovery at step %d of %d", done, steps)
    scheduler = _schedule(optimizer, cfg, steps, done)

    def measure(step: int) -> None:
        if not (ctx.main or sharding.sharded):
            return ctx.barrier()
        m = pair.measure(windows.heldout, cfg.batch_size)
        if ctx.main:
            heldout_curve.append({"step": step, "tokens": step * cfg.window_tokens(), **m})
            logger.info("step %d: held-out KL %.4f, loss %.4f (teacher %.4f)", step, m["kl"], m["loss"],
                        m["teacher_loss"])
        ctx.barrier()

    def checkpoint(step: int, elapsed: float) -> None:
        if work_dir is not None:
            state = sharding.trained_state(pair.student, optimizer)  # collective under FSDP
            if ctx.main:
                save_checkpoint(work_dir, *state, {"step": step, "digest": digest, "curve": curve,
                                                   "heldout_curve": heldout_curve, "train_seconds": elapsed,
                                                   "steps": steps, "before": before})
        ctx.barrier()

    def measure_sets() -> dict:
        if not (ctx.main or sharding.sharded):
            return {}
        return {name: pair.measure(w, cfg.batch_size) for name, w in eval_sets.items()}

    if done == 0:
        before = measure_sets()
        measure(0)
    bar = tqdm(total=steps, initial=done, desc="recover", unit="step", disable=not (progress and ctx.main),
               dynamic_ncols=True)
    start_time, side = time.perf_counter(), [0.0]
    per = cfg.batch_size // ctx.world
    with PeakMemory(device) as peak:
        try:
            for step in range(done, steps):
                batch = windows.batch(step, cfg.batch_size)[ctx.rank * per:(ctx.rank + 1) * per].to(device)
                loss = pair.loss(batch, cfg.alpha)
                loss.backward()
                if cfg.max_grad_norm > 0:  # DTensor gradients under FSDP: the norm of the whole gradient
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                value = ctx.mean(float(loss.detach()), device)
                elapsed = seconds + time.perf_counter() - start_time - side[0]
                curve.append({"step": step + 1, "tokens": (step + 1) * cfg.window_tokens(), "loss": value,
                              "lr": scheduler.get_last_lr()[0], "seconds": round(elapsed, 3)})
                rate = (step + 1 - done) * cfg.window_tokens() / max(1e-9, elapsed - seconds)
                bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{rate:,.0f}")
                bar.update(1)
                last = step + 1 == steps
                t_side = time.perf_counter()  # measuring and checkpointing are not training time
                if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                    measure(step + 1)
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
                    checkpoint(step + 1, elapsed)
                side[0] += time.perf_counter() - t_side
        except KeyboardInterrupt:
            if ctx.main and work_dir is not None:
                logger.warning("interrupted; the last checkpoint in %s continues with --resume", work_dir)
            raise
        finally:
            bar.close()
    seconds += time.perf_counter() - start_time - side[0]
    after = measure_sets()
    ctx.barrier()
    full = sharding.full_model(pair.inner if not sharding.sharded else pair.student, rebuild)
    merged = None if full is None else merge_trainable(getattr(full, "model", full))
    return TrainResult(model=merged, curve=curve, heldout_curve=heldout_curve, steps=steps, resumed_at=done,
                       train_seconds=seconds, tokens=steps * cfg.window_tokens(), memory=peak.result,
                       before=before, after=after)
