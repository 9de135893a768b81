"""How student and teacher are placed across processes: whole on every rank (one process or DDP),
or sharded with FSDP2 (``fully_shard``) when they do not fit on one device.

Both strategies expose the same few operations, so the training loop has no per-strategy
branches: wrap the two models, lend the teacher's LM head to the loss, and move the trained
state in and out of a checkpoint as whole (unsharded) tensors on rank 0. Checkpoints therefore
do not depend on the number of processes that wrote them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .params import trainable_state, unwrap

__all__ = ["Replicated", "Sharded", "sharding_for"]


def _layers(model: nn.Module) -> list[nn.Module]:
    decoder = unwrap(model).get_decoder()
    return list(getattr(decoder, "layers", []))


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for key, per_param in state["state"].items():
        for name, value in per_param.items():
            tensors[f"{key}::{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list, int_keys: bool) -> dict:
    state: dict = {}
    for flat, value in tensors.items():
        key, name = flat.rsplit("::", 1)
        state.setdefault(int(key) if int_keys else key, {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


class Replicated:
    """Every rank holds whole models (one process, or DDP over the batch under torchrun)."""

    sharded = False

    def __init__(self, distributed: bool, device: torch.device):
        self.distributed = distributed  #: under torchrun: DDP, also for a single process
        self.device = device

    def wrap(self, loss_module: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            loss_module = DistributedDataParallel(loss_module, device_ids=[self.device] if self.device.type == "cuda"
                                                  else None)
        return loss_module, teacher

    @contextlib.contextmanager
    def teacher_head(self, teacher: nn.Module) -> Iterator[nn.Module]:
        yield unwrap(teacher.model).get_output_embeddings()

    def teacher_context(self):
        return torch.inference_mode()

    def trained_state(self, model: nn.Module, optimizer) -> tuple[dict, dict, list]:
        model = getattr(model, "module", model)  # names without DDP's prefix: any process count resumes
        opt_tensors, groups = _flatten_optimizer(optimizer.state_dict())
        return {k: v.cpu() for k, v in trainable_state(model).items()}, opt_tensors, groups

    def load_trained_state(self, model: nn.Module, optimizer, params: dict, opt_tensors: dict, groups: list) -> None:
        named = dict(getattr(model, "module", model).named_parameters())
        with torch.no_grad():
            for name, value in params.items():
                named[name].copy_(value.to(named[name].device, named[name].dtype))
        state = _unflatten_optimizer(opt_tensors, groups, int_keys=True)
        for per_param in state["state"].values():
            for name, value in per_param.items():
                if name != "step":
                    per_param[name] = value.to(self.device)
        optimizer.load_state_dict(state)

    def full_model(self, model: nn.Module, rebuild) -> nn.Module:
        return model


class Sharded(Replicated):
    """FSDP2: each decoder layer is one unit, the rest (embeddings, norm, head) the root unit;
    the teacher likewise. Gathers to whole tensors on rank 0 for checkpoints and the result."""

    sharded = True

    def wrap(self, loss_module: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        from torch.distributed.fsdp import fully_shard

        for module in (loss_module, teacher):
            for layer in _layers(module.model):
                fully_shard(layer)
            fully_shard(module)
        return loss_module, teacher

    @contextlib.contextmanager
    def teacher_head(self, teacher: nn.Module) -> Iterator[nn.Module]:
        teacher.unshard()  # the root unit holds the head; gather it for the loss
        try:
            yield unwrap(teacher.model).get_output_embeddings()
        finally:
            teacher.reshard()

    def teacher_context(self):
        return torch.no_grad()  # FSDP's gathers need ordinary tensors

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def trained_state(self, model: nn.Module, optimizer) -> tuple[dict, dict, list]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        full = get_model_state_dict(model, options=self._options())
        opt = get_optimizer_state_dict(model, optimizer, options=self._options())
        opt_tensors, groups = _flatten_optimizer(opt)
        return {k: v for k, v in full.items() if k in trained}, opt_tensors, groups

    def load_trained_state(self, model: nn.Module, optimizer, params: dict, opt_tensors: dict, groups: list) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(model, params, options=self._options(strict=False))
        set_optimizer_state_dict(model, optimizer, _unflatten_optimizer(opt_tensors, groups, int_keys=False),
                                 options=self._options())

    def full_model(self, model: nn.Module, rebuild) -> nn.Module | None:
        """Whole weights on rank 0, loaded into a freshly built unsharded copy (``rebuild()``)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=self._options())
        if dist.get_rank() != 0:
            return None
        fresh = rebuild()
        fresh.load_state_dict(full)
        return fresh


def sharding_for(fsdp: bool, distributed: bool, device: torch.device) -> Replicated:
    """FSDP2 with ``--fsdp`` under torchrun (any process count), else whole models (DDP under torchrun)."""
    return Sharded(distributed, device) if fsdp and distributed else Replicated(distributed, device)
