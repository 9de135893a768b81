"""The distillation loop: frozen teacher, trained student, held-out measurements, checkpoints, DDP.

One process, or one per device under ``torchrun`` (``WORLD_SIZE`` and ``LOCAL_RANK`` set; on
GPUs each process on ``cuda:LOCAL_RANK``): every rank builds the same models and windows and
takes its slice of each global batch; DDP averages the gradients (or FSDP2 shards both models,
``--fsdp``), so N processes compute the one-process step for the same global batch. Rank 0 (the
process group's) writes checkpoints and shows progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
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
from .params import attach_trainable, build_optimizer, merge_trainable, unwrap
from .sharding import Replicated, sharding_for
from .state import has_checkpoint, load_checkpoint, save_checkpoint
from .windows import TrainingWindows

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "Pair", "StudentLoss", "TeacherHidden", "dist_context", "distributed", "process_device",
           "train", "under_torchrun"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: its rank (from the process group), the process count,
    ``LOCAL_RANK`` and the device it computes on (``cuda:LOCAL_RANK`` under ``torchrun`` on GPUs).
    ``distributed`` is true under ``torchrun`` (a process group is in use, even with one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world


def under_torchrun() -> bool:
    """Whether ``torchrun`` (or another launcher setting its variables) started this process."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def process_device(device: torch.device) -> torch.device:
    """The device this process computes on: ``device`` alone, ``cuda:LOCAL_RANK`` under torchrun."""
    device = torch.device(device)
    if device.type != "cuda" or not under_torchrun():
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.index is not None and device.index != local:
        raise RcpuError(f"--device {device} under torchrun: each process uses the GPU of its LOCAL_RANK "
                        f"(this one cuda:{local}); pass --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if local >= count:
        raise RcpuError(f"LOCAL_RANK {local} but {count} CUDA device(s) visible; start at most {count} processes "
                        "per node (torchrun --nproc_per_node)")
    return torch.device("cuda", local)


def dist_context(device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` set up (NCCL on CUDA, gloo on the CPU), or run alone.

    Under torchrun each process is bound to ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``) before
    the group is created, so NCCL and FSDP's device mesh use that GPU; the rank is the group's."""
    if not under_torchrun():
        return DistContext(device=torch.device(device))
    device = process_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=int(os.environ["LOCAL_RANK"]), device=device, distributed=True)


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[DistContext]:
    """:func:`dist_context` for the length of a ``with`` block; the process group is destroyed at its
    end (also on an error) when this block created it."""
    created = under_torchrun() and not dist.is_initialized()
    ctx = dist_context(device)
    try:
        yield ctx
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


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
                measure: bool = False, teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None):
        decoder, head = _parts(self.model)
        hidden = _hidden(decoder, ids)[:, :-1]
        if measure:
            return loss_terms(hidden, head.weight, head.bias, ids[:, 1:], teacher_hidden, teacher_head.weight,
                              teacher_head.bias, self.cfg.chunk_elements)
        return distillation_loss(
            hidden, head.weight, head.bias, ids[:, 1:],
            teacher_hidden=teacher_hidden, teacher_weight=teacher_head.weight, teacher_bias=teacher_head.bias,
            alpha=self.cfg.alpha, temperature=self.cfg.temperature, chunk_elements=self.cfg.chunk_elements,
            teacher_topk=teacher_topk)


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
        from .teacher_cache import CachedTeacher

        cached = isinstance(teacher, CachedTeacher)  # read from --teacher_cache: one process, nothing to wrap
        loss_module, teacher_module = sharding.wrap(StudentLoss(student, cfg), teacher if cached else TeacherHidden(teacher))
        return cls(loss_module, teacher_module, sharding, device, autocast)

    @property
    def inner(self) -> StudentLoss:
        return getattr(self.student, "module", self.student)  # DDP keeps the module inside

    def teacher_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        with self.sharding.teacher_context(), _autocast(self.device, self.autocast):
            hidden = self.teacher(ids)
        return hidden.clone()  # an ordinary tensor (not an inference tensor), usable by autograd

    def loss(self, ids: torch.Tensor, alpha: float) -> torch.Tensor:
        topk = getattr(self.teacher, "topk", None)  # a teacher cache: its top-k logits instead of a forward pass
        if topk is not None:
            with self.sharding.teacher_head(self.teacher) as head, _autocast(self.device, self.autocast):
                return self.student(ids, None, head, teacher_topk=topk(ids) if alpha > 0 else None)
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


@dataclass
class _Run:
    """One run's models, optimiser, clock and records: the state the step, measurement and checkpoint
    helpers share, so each stays small; a checkpoint saves the records."""

    pair: Pair
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    windows: TrainingWindows
    cfg: RecoverConfig
    ctx: DistContext
    device: torch.device
    steps: int
    work_dir: Path | None
    digest: str
    eval_sets: dict[str, torch.Tensor]
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    done: int = 0  #: steps already taken when this process started (resume)
    curve: list = field(default_factory=list)
    heldout_curve: list = field(default_factory=list)
    seconds: float = 0.0  #: training time of the earlier (resumed) parts
    before: dict = field(default_factory=dict)
    start_time: float = 0.0  #: perf_counter when this process's loop began
    side: float = 0.0  #: time since then spent measuring and checkpointing, which is not training time

    def resume(self) -> None:
        """Continue from the checkpoint in ``work_dir``: weights, optimiser state and the records so far."""
        meta = load_checkpoint(self.work_dir, self.pair.student, self.optimizer, self.pair.sharding)
        if meta.get("digest") != self.digest:
            raise RcpuError(f"{self.work_dir} was written with other settings or another model; remove it, or "
                            "resume with the settings it was started with")
        self.done, self.curve, self.heldout_curve = meta["step"], meta["curve"], meta["heldout_curve"]
        self.seconds, self.before = meta["train_seconds"], meta.get("before", {})
        if self.ctx.main:
            logger.info("resuming recovery at step %d of %d", self.done, self.steps)

    def measure(self, step: int) -> None:
        """Held-out metrics after ``step`` steps, recorded on rank 0 (sharded models measure on every rank)."""
        if not (self.ctx.main or self.pair.sharding.sharded):
            return self.ctx.barrier()
        m = self.pair.measure(self.windows.heldout, self.cfg.batch_size)
        if self.ctx.main:
            self.heldout_curve.append({**m, "step": step, "tokens": step * self.cfg.window_tokens(),
                                       "heldout_tokens": m["tokens"]})
            logger.info("step %d: held-out KL %.4f, loss %.4f (teacher %.4f)", step, m["kl"], m["loss"],
                        m["teacher_loss"])
        self.ctx.barrier()

    def checkpoint(self, step: int, elapsed: float) -> None:
        """Save weights, optimiser and records after ``step`` steps (rank 0 writes; all ranks wait)."""
        if self.work_dir is not None:
            state = self.pair.sharding.trained_state(self.pair.student, self.optimizer)  # collective under FSDP
            if self.ctx.main:
                save_checkpoint(self.work_dir, *state, {
                    "step": step, "digest": self.digest, "curve": self.curve, "heldout_curve": self.heldout_curve,
                    "train_seconds": elapsed, "steps": self.steps, "before": self.before})
        self.ctx.barrier()

    def measure_sets(self) -> dict:
        """Metrics on every eval set, by name ({} on ranks that do not measure)."""
        if not (self.ctx.main or self.pair.sharding.sharded):
            return {}
        return {name: self.pair.measure(w, self.cfg.batch_size) for name, w in self.eval_sets.items()}

    def update(self, step: int) -> float:
        """One optimiser step on this rank's slice of global batch ``step``; the loss averaged over ranks."""
        per = self.cfg.batch_size // self.ctx.world
        batch = self.windows.batch(step, self.cfg.batch_size)[self.ctx.rank * per:(self.ctx.rank + 1) * per]
        loss = self.pair.loss(batch.to(self.device), self.cfg.alpha)
        loss.backward()
        if self.cfg.max_grad_norm > 0:  # DTensor gradients under FSDP: the norm of the whole gradient
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.ctx.mean(float(loss.detach()), self.device)

    def step(self, step: int, bar: tqdm) -> None:
        """Train on global batch ``step``, record it, then measure / checkpoint where due (off the clock)."""
        value = self.update(step)
        elapsed = self.seconds + time.perf_counter() - self.start_time - self.side
        self.curve.append({"step": step + 1, "tokens": (step + 1) * self.cfg.window_tokens(), "loss": value,
                           "lr": self.scheduler.get_last_lr()[0], "seconds": round(elapsed, 3)})
        rate = (step + 1 - self.done) * self.cfg.window_tokens() / max(1e-9, elapsed - self.seconds)
        bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{rate:,.0f}")
        bar.update(1)
        last = step + 1 == self.steps
        t_side = time.perf_counter()  # measuring and checkpointing are not training time
        if last or (self.cfg.eval_every and (step + 1) % self.cfg.eval_every == 0):
            self.measure(step + 1)
        if self.cfg.save_every and (step + 1) % self.cfg.save_every == 0 and not last:
            self.checkpoint(step + 1, elapsed)
        self.side += time.perf_counter() - t_side

    def result(self, rebuild: Callable[[], nn.Module] | None, memory: dict) -> TrainResult:
        """Measure the eval sets again and gather the trained student, adapters merged, on rank 0."""
        after = self.measure_sets()
        self.ctx.barrier()
        sharding = self.pair.sharding
        full = sharding.full_model(self.pair.inner if not sharding.sharded else self.pair.student, rebuild)
        merged = None if full is None else merge_trainable(getattr(full, "model", full))
        return TrainResult(model=merged, curve=self.curve, heldout_curve=self.heldout_curve, steps=self.steps,
                           resumed_at=self.done, train_seconds=self.seconds,
                           tokens=self.steps * self.cfg.window_tokens(), memory=memory, before=self.before,
                           after=after)


def _prepare(student: nn.Module, teacher: nn.Module, cfg: RecoverConfig, ctx: DistContext, device: torch.device,
             autocast: torch.dtype | None) -> tuple[Pair, list[nn.Parameter], torch.optim.Optimizer]:
    """Freeze the teacher, make the student's chosen parameters trainable, wrap both for the placement
    in use, and build the optimiser over what trains."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = attach_trainable(student, cfg)
    model.train()
    if cfg.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sharding = sharding_for(cfg.fsdp, ctx.distributed, device)
    pair = Pair.build(model, teacher, cfg, sharding, device, autocast)
    params, optimizer = build_optimizer(pair.student, cfg)  # after wrapping: the parameters DDP / FSDP train
    return pair, params, optimizer


def train(student: nn.Module, teacher: nn.Module, windows: TrainingWindows, cfg: RecoverConfig, *,
          device: torch.device, ctx: DistContext, work_dir: Path | None = None, resume: bool = False,
          digest: str = "", autocast: torch.dtype | None = None, progress: bool = True,
          rebuild: Callable[[], nn.Module] | None = None, eval_sets: dict[str, torch.Tensor] | None = None
          ) -> TrainResult:
    """Distil ``teacher`` into ``student`` for ``cfg.steps()`` global batches; see the module docstring.

    ``rebuild`` makes a fresh copy of the untrained student (needed with ``cfg.fsdp`` to gather the
    result on rank 0). ``eval_sets`` (name -> windows) are measured before and after training.
    """
    steps = cfg.steps()
    if cfg.batch_size % ctx.world:
        raise RcpuError(f"--batch_size {cfg.batch_size} is not divisible by the {ctx.world} processes; "
                        "give a global batch that splits evenly")
    pair, params, optimizer = _prepare(student, teacher, cfg, ctx, device, autocast)
    run = _Run(pair, params, optimizer, windows, cfg, ctx, device, steps, work_dir, digest, eval_sets or {})
    if resume and has_checkpoint(work_dir):  # also the .old one a kill between its two renames leaves
        run.resume()
    run.scheduler = _schedule(optimizer, cfg, steps, run.done)
    if run.done == 0:
        run.before = run.measure_sets()
        run.measure(0)
    bar = tqdm(total=steps, initial=run.done, desc="recover", unit="step", disable=not (progress and ctx.main),
               dynamic_ncols=True)
    run.start_time, run.side = time.perf_counter(), 0.0
    with PeakMemory(device) as peak:
        try:
            for step in range(run.done, steps):
                run.step(step, bar)
        except KeyboardInterrupt:
            if ctx.main and work_dir is not None:
                logger.warning("interrupted; the last checkpoint in %s continues with --resume", work_dir)
            raise
        finally:
            bar.close()
    run.seconds += time.perf_counter() - run.start_time - run.side
    return run.result(rebuild, peak.result)
