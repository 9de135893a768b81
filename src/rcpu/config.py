"""One validated configuration object for a pruning run.

Method presets are named (score, compensation) pairs; any field given explicitly
overrides the preset, so ``method="rcpu", compensation="ridge"`` is a free
combination. ``validate`` fails fast, before any model is loaded or calibrated, and
returns a copy with the preset's settings filled in, so the pipeline reads plain fields.
The fields' metadata also defines the ``rcpu prune`` flags (``rcpu.cli._add_config_fields``).
"""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields, replace

import torch

from .allocation import ALLOCATIONS
from .compensations import COMPENSATIONS
from .errors import RcpuError
from .scores import SCORES
from .select import HEAD_UNITS

#: name -> settings it implies; see README "Methods". Explicit fields override them.
PRESETS: dict[str, dict[str, str | float]] = {
    "rcpu": {"score": "rcpu", "compensation": "rotation"},
    "rcpu-scaled": {"score": "rcpu", "compensation": "rotation_scale"},
    "ridge": {"score": "rcpu", "compensation": "ridge"},
    # ridge with lambda chosen per sublayer on held-out calibration windows
    "ridge-auto": {"score": "rcpu", "compensation": "ridge", "ridge_lambda": "auto"},
    "wanda-sp": {"score": "wanda-sp", "compensation": "none"},
    "magnitude-sp": {"score": "magnitude", "compensation": "none"},
    # FLAP (An et al. 2024): fluctuation score, global adaptive allocation (AL-AM),
    # bias compensation, all statistics from the dense model
    "flap": {"score": "fluctuation", "compensation": "bias", "allocation": "global", "statistics": "dense"},
    # the strongest combination of shipped parts: FLAP's global allocation with ridge-auto
    "flap-ridge": {"score": "fluctuation", "compensation": "ridge", "allocation": "global", "ridge_lambda": "auto"},
}
DEFAULTS = {"score": "rcpu", "compensation": "rotation", "allocation": "uniform", "statistics": "sequential",
            "ridge_lambda": 1e-2}
#: relative ridge penalties tried by ``ridge_lambda="auto"`` (on held-out calibration windows)
RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
STATISTICS = ("sequential", "dense")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}

#: how a rotation gets M = Y Z^T: from the Gram matrix, streamed from a second pass over the
#: inputs (no d_in^2 Gram matrix), or whichever costs fewer multiply-adds (MLP only)
ROTATION_PRODUCTS = ("auto", "gram", "direct")


def _number_or_auto(value: str) -> float | str:
    """``--ridge_lambda``'s text: a number, or ``auto``."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise RcpuError(f"--ridge_lambda must be a number or 'auto', got {value!r}") from None


@dataclass
class PruneConfig:
    """Everything that decides the pruned weights. Batch size changes only the order of
    float sums, except with layer refinement, where it sets the optimiser steps per epoch.

    Each field's metadata carries its ``rcpu prune`` flag: ``help``, and where needed
    ``choices``; ``negatable=False`` (a bool flag with no ``--no-`` form); ``flag`` with
    ``inverse=True`` (a flag under another name that sets the field to False); ``parse``
    (text -> value, raising RcpuError). Tuple fields take comma-separated values. Fields
    left None take the method preset's value; ``validate`` returns a copy with them filled in.
    """

    method: str = field(default="rcpu", metadata={"help": f"preset: {', '.join(PRESETS)} (default rcpu)"})
    pruning_ratio: float = field(default=0.2, metadata={"help": "fraction of heads/channels to remove"})
    score: str | None = field(default=None, metadata={
        "help": f"override the preset's importance score: {', '.join(SCORES)}"})
    compensation: str | None = field(default=None, metadata={
        "help": f"override the preset's compensation: {', '.join(COMPENSATIONS)}"})
    allocation: str | None = field(default=None, metadata={"choices": tuple(ALLOCATIONS), "help": (
        "same widths in every layer (RCPU), FLAP's global allocation, the same for MLP channels only "
        "(global_mlp: every layer loses the uniform plan's heads), or global allocation by the error left "
        "after compensation (default: the preset's)")})
    statistics: str | None = field(default=None, metadata={
        "choices": STATISTICS, "help": "statistics from the partly pruned model (RCPU) or the dense model (FLAP)"})
    compensate_attn: bool = field(default=True, metadata={"help": "compensate o_proj (default on)"})
    compensate_mlp: bool = field(default=True, metadata={"help": "compensate down_proj (default on)"})
    #: a number, or "auto"
    ridge_lambda: float | str | None = field(default=None, metadata={"parse": _number_or_auto, "help": (
        "ridge penalty, relative to tr(G)/d_in unless --ridge_lambda_absolute (default 0.01), or 'auto': "
        "chosen per sublayer on held-out calibration windows from --ridge_grid")})
    ridge_grid: tuple[float, ...] = field(default=RIDGE_GRID, metadata={"help": "comma-separated lambdas for auto"})
    nholdout: int = field(default=32, metadata={
        "help": "held-out calibration windows for --ridge_lambda auto and --refine_epochs"})
    ridge_lambda_relative: bool = field(default=True, metadata={
        "flag": "ridge_lambda_absolute", "inverse": True, "help": "use --ridge_lambda as an absolute penalty"})
    rotation_dtype: str = field(default="float64", metadata={
        "choices": ("float32", "float64"), "help": "precision of the Procrustes SVD (reference code: float32)"})
    gram_dtype: str = field(default="float64", metadata={"choices": ("float64", "float32"), "help": (
        "precision the Gram matrices are kept in (float32 halves a layer's largest buffer: d_ff^2 "
        "x 4 bytes instead of 8; solves still run in float64)")})
    rotation_products: str = field(default="auto", metadata={"choices": ROTATION_PRODUCTS, "help": (
        "how the MLP's rotation gets M = Y Z^T: from the Gram matrix, or from a second pass over the "
        "calibration inputs with no d_ff^2 Gram matrix (cheaper for wide MLPs and few tokens); auto: "
        "whichever costs fewer multiply-adds")})
    head_unit: str = field(default="auto", metadata={
        "choices": HEAD_UNITS, "help": "GQA: remove query heads evenly from every KV group, or whole KV groups"})
    rebalance: bool = field(default=True, metadata={
        "help": "move the budget heads are too coarse for to the MLP (default on)"})
    selection_lambda: float = field(default=1e-3, metadata={
        "help": "relative ridge penalty of --allocation error's greedy removal (default 1e-3)"})
    selection_block: int = field(default=32, metadata={
        "help": "MLP channels removed per greedy step of --allocation error (default 32; 1 = one at a time)"})
    refine_epochs: int = field(default=0, metadata={"help": (
        "after compensation, passes of Adam over the calibration batches that pull each pruned layer's "
        "outputs towards the unpruned layer's (0 = off, the default)")})
    refine_lr: float = field(default=1e-3, metadata={
        "help": "peak learning rate of the layer refinement (cosine decay to zero; default 1e-3)"})
    round_to: int = field(default=1, metadata={
        "help": "round kept MLP widths to a multiple of this (e.g. 64 or 128 for kernel-friendly shapes)"})
    nsamples: int = field(default=128, metadata={"help": "calibration windows (default 128)"})
    seqlen: int = field(default=128, metadata={"help": "calibration window length (default 128, the paper's)"})
    seed: int = field(default=0, metadata={"help": "seed for drawing calibration windows (default 0)"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward pass"})

    def _resolve(self, name: str) -> str | float:
        explicit = getattr(self, name)
        if explicit is not None:
            return explicit
        preset = PRESETS.get(self.method, {})
        return preset.get(name) or DEFAULTS[name]

    def resolve(self) -> PruneConfig:
        """A copy with every preset-dependent field (those in DEFAULTS) set: explicit values kept,
        the others from the method's preset, else DEFAULTS. Idempotent; ``validate`` returns it."""
        return replace(self, **{name: self._resolve(name) for name in DEFAULTS})

    @property
    def ridge_auto(self) -> bool:
        """Ridge with lambda picked on held-out windows."""
        return self._resolve("compensation") == "ridge" and self._resolve("ridge_lambda") == "auto"

    @property
    def needs_heldout(self) -> bool:
        """Held-out calibration windows travel through the layer loop: for ridge-auto's lambda
        and to measure the layer refinement on windows it was not fitted to."""
        return self.ridge_auto or self.refine_epochs > 0

    @property
    def direct_products_blocker(self) -> str | None:
        """Why the MLP's rotation products cannot be streamed from a second pass (None: they can).
        That pass sees the plain inputs of the unpruned layer's down_proj, nothing else."""
        needs = [(getattr(COMPENSATIONS.get(self._resolve("compensation")), "rotation", False),
                  "--compensation rotation or rotation_scale"),
                 (self._resolve("statistics") == "sequential", "--statistics sequential")]
        missing = [what for ok, what in needs if not ok]
        return f"needs {', '.join(missing)}" if missing else None

    def validate(self) -> PruneConfig:
        """Fail fast on a bad setting; returns the resolved copy (see ``resolve``) the pipeline reads."""
        if self.method not in PRESETS and not (self.score and self.compensation):
            raise RcpuError(f"unknown method {self.method!r}; choose from {', '.join(PRESETS)} "
                            "or give both --score and --compensation")
        cfg = self.resolve()
        for ok, message in cfg._checks():
            if not ok:
                raise RcpuError(message)
        return cfg

    def _checks(self):
        """(ok, message) per check of a resolved config, in order; lazy, so a check runs only
        once those before it passed."""
        yield (isinstance(self.pruning_ratio, (int, float)) and 0 <= self.pruning_ratio < 1,
               f"--pruning_ratio must be in [0, 1), got {self.pruning_ratio}")
        lam = self.ridge_lambda
        for name, allowed in (("score", tuple(SCORES)), ("compensation", tuple(COMPENSATIONS))):
            yield (getattr(self, name) in allowed,
                   f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(allowed)}")
        for name, allowed in (("allocation", tuple(ALLOCATIONS)), ("statistics", STATISTICS),
                              ("head_unit", HEAD_UNITS), ("rotation_products", ROTATION_PRODUCTS)):
            yield (getattr(self, name) in allowed,
                   f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        yield (isinstance(self.selection_lambda, (int, float)) and self.selection_lambda >= 0,
               f"--selection_lambda must be a number >= 0, got {self.selection_lambda!r}")
        for name in ("gram_dtype", "rotation_dtype"):
            yield (getattr(self, name) in ("float32", "float64"),
                   f"--{name} must be float32 or float64, got {getattr(self, name)!r}")
        yield (not (self.rotation_products == "direct" and self.direct_products_blocker),
               f"--rotation_products direct {self.direct_products_blocker}")
        yield (lam == "auto" or not (isinstance(lam, str) or lam < 0),
               f"--ridge_lambda must be a number >= 0 or 'auto', got {lam!r}")
        yield (not (self.ridge_auto and (not self.ridge_grid or min(self.ridge_grid) < 0)),  # --nholdout: below
               "--ridge_lambda auto needs a non-empty grid of lambdas >= 0")
        for name in ("nsamples", "batch_size", "nholdout", "round_to", "selection_block"):
            yield getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}"
        yield (isinstance(self.refine_epochs, int) and self.refine_epochs >= 0,
               f"--refine_epochs must be an integer >= 0, got {self.refine_epochs!r}")
        yield (isinstance(self.refine_lr, (int, float)) and self.refine_lr > 0,
               f"--refine_lr must be a number > 0, got {self.refine_lr!r}")
        yield self.seqlen >= 2, f"--seqlen must be >= 2, got {self.seqlen}"

    def to_dict(self) -> dict:
        """The settings with every preset-dependent one resolved (what the provenance records)."""
        return asdict(self.resolve())

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def parse_floats(text: str, label: str) -> list[float]:
    """Comma-separated numbers (``0.1,0.2``), with a one-line error naming ``label``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RcpuError(f"{label} must be comma-separated numbers, got {text!r}") from None


def field_from_text(f: Field, text: str, label: str) -> object:
    """A config field's value from its text (a flag's argument, or a ``+field=value`` override of
    ``rcpu compare``), so both spell values alike: the field's ``parse`` if it has one, ``true`` /
    ``false`` for a bool, comma-separated items for a tuple, a number for an int or float field,
    else the text. ``label`` names the input in the error."""
    default = f.default
    if "parse" in f.metadata:
        return f.metadata["parse"](text)
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise RcpuError(f"{label} must be true or false, got {text!r}")
        return text.lower() == "true"
    if isinstance(default, tuple):
        if default and isinstance(default[0], (int, float)):
            return tuple(parse_floats(text, label))
        return tuple(x.strip() for x in text.split(",") if x.strip())
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise RcpuError(f"{label} must be {'an integer' if isinstance(default, int) else 'a number'}, "
                            f"got {text!r}") from None
    return text


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise RcpuError(f"unknown --dtype {name!r}; choose from float32, bfloat16, float16") from None
