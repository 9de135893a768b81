"""One validated configuration object for a pruning run.

Method presets are named (score, compensation) pairs; any field given explicitly
overrides the preset, so ``method="rcpu", compensation="ridge"`` is a free
combination. ``validate`` fails fast, before any model is loaded or calibrated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from .compensate import COMPENSATIONS, NEEDS_GRAM, ROTATIONS
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
    # ours: FLAP's global allocation; heads and channels removed greedily by the error left
    # after least-squares compensation; kept weights fitted to the dense model's outputs
    # (cross-Gram), MLP statistics re-captured after the layer's attention is pruned;
    # ridge lambda chosen on held-out calibration windows
    "obs-ridge": {"score": "fluctuation", "compensation": "ridge", "allocation": "global", "ridge_lambda": "auto",
                  "selection": "greedy", "targets": "dense", "mlp_stats": "after_attention"},
}
DEFAULTS = {"score": "rcpu", "compensation": "rotation", "allocation": "uniform", "statistics": "sequential",
            "ridge_lambda": 1e-2, "selection": "score", "targets": "sequential", "mlp_stats": "before_attention",
            "token_weights": "none"}
#: the scores ``--score auto`` chooses among, per sublayer, by held-out error after compensation
SCORE_CANDIDATES = ("fluctuation", "wanda-sp", "rcpu")
#: relative ridge penalties tried by ``ridge_lambda="auto"`` (on held-out calibration windows)
RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
#: "global": FLAP's standardised scores; "global_mlp": the same for MLP channels only, with the
#: uniform plan's heads; "global_split": FLAP's ranking within heads and within MLP channels,
#: each losing the ratio of its own parameters; "global_even": the same with every layer losing
#: floor(ratio x its head units) or one more; "error": error left after compensation (rcpu.obs);
#: "loss": probed next-token loss on held-out calibration windows (rcpu.sensitivity)
ALLOCATIONS = ("uniform", "global", "global_mlp", "global_split", "global_even", "error", "loss")
STATISTICS = ("sequential", "dense")
#: "score": top-k of the importance score; "greedy": remove the unit with the smallest
#: error left after least-squares compensation, one at a time (see rcpu.obs)
SELECTIONS = ("score", "greedy")
#: compensation targets: the unpruned sublayer on the pruned model's inputs (RCPU); the
#: dense model's sublayer outputs on dense inputs ("dense"); or those plus the residual-stream
#: error before the sublayer ("residual": each sublayer also undoes the error of the layers below)
TARGETS = ("sequential", "dense", "residual")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}

MLP_STATS = ("before_attention", "after_attention")
#: how a rotation gets M = Y Z^T: from the Gram matrix, streamed from a second pass over the
#: inputs (no d_in^2 Gram matrix), or whichever costs fewer multiply-adds (MLP only)
ROTATION_PRODUCTS = ("auto", "gram", "direct")
#: per-token weights of the least-squares statistics: none, or 1 / rms(residual stream)^2
TOKEN_WEIGHTS = ("none", "inverse_rms")


@dataclass
class PruneConfig:
    """Everything that decides the pruned weights. Batch size changes only the order of
    float sums, except with layer refinement, where it sets the optimiser steps per epoch."""

    method: str = "rcpu"
    pruning_ratio: float = 0.2
    score: str | None = None
    compensation: str | None = None
    allocation: str | None = None
    statistics: str | None = None
    compensate_attn: bool = True
    compensate_mlp: bool = True
    ridge_lambda: float | str | None = None  # a number, or "auto"
    ridge_grid: tuple[float, ...] = RIDGE_GRID
    nholdout: int = 32
    ridge_lambda_relative: bool = True
    rotation_dtype: str = "float64"
    gram_dtype: str = "float64"
    rotation_products: str = "auto"
    #: proximal Procrustes: pull Q towards I by this multiple of M's mean singular value (0: RCPU)
    rotation_proximal: float = 0.0
    rotation_proper: bool = False
    head_unit: str = "auto"
    rebalance: bool = True
    mlp_stats: str | None = None
    selection: str | None = None
    selection_lambda: float = 1e-3
    selection_block: int = 32
    targets: str | None = None
    token_weights: str | None = None
    #: fit an output bias with the least-squares / rotation compensation (on centred statistics)
    intercept: bool = False
    #: with a held-out choice (ridge-auto, compensation auto): choose per output row, not per matrix
    choice_per_row: bool = False
    refine_epochs: int = 0
    refine_lr: float = 1e-3
    round_to: int = 1
    nsamples: int = 128
    seqlen: int = 128
    seed: int = 0
    batch_size: int = 8

    def _resolve(self, name: str) -> str:
        explicit = getattr(self, name)
        if explicit is not None:
            return explicit
        preset = PRESETS.get(self.method, {})
        return preset.get(name) or DEFAULTS[name]

    @property
    def resolved_score(self) -> str:
        return self._resolve("score")

    @property
    def allocation_score(self) -> str:
        """The score that global allocation standardises: with ``--score auto``, FLAP's."""
        score = self.resolved_score
        return "fluctuation" if score == "auto" else score

    @property
    def resolved_compensation(self) -> str:
        return self._resolve("compensation")

    @property
    def resolved_ridge_lambda(self) -> float | str:
        return self._resolve("ridge_lambda")

    @property
    def ridge_auto(self) -> bool:
        """Ridge with lambda picked on held-out windows: ridge-auto, or among compensation auto's candidates."""
        comp = self.resolved_compensation
        return (comp == "ridge" and self.resolved_ridge_lambda == "auto") or comp == "auto"

    @property
    def resolved_allocation(self) -> str:
        return self._resolve("allocation")

    @property
    def heldout_in_loop(self) -> bool:
        """The layer loop carries held-out hidden states: for ridge-auto's lambda and to
        measure the layer refinement on windows it was not fitted to."""
        return self.ridge_auto or self.refine_epochs > 0

    @property
    def needs_heldout(self) -> bool:
        """Held-out calibration windows are drawn for the layer loop and for loss allocation."""
        return self.heldout_in_loop or self.resolved_allocation == "loss"

    @property
    def resolved_statistics(self) -> str:
        return self._resolve("statistics")

    @property
    def resolved_selection(self) -> str:
        return self._resolve("selection")

    @property
    def resolved_targets(self) -> str:
        return self._resolve("targets")

    @property
    def resolved_mlp_stats(self) -> str:
        return self._resolve("mlp_stats")

    @property
    def resolved_token_weights(self) -> str:
        return self._resolve("token_weights")

    @property
    def direct_products_blocker(self) -> str | None:
        """Why the MLP's rotation products cannot be streamed from a second pass (None: they can).
        That pass sees the plain inputs of the unpruned layer's down_proj, nothing else."""
        needs = [(self.resolved_compensation in ROTATIONS, "--compensation rotation or rotation_scale"),
                 (self.resolved_selection == "score" and self.resolved_score != "auto",
                  "--selection score with a fixed --score"),
                 (not self.intercept, "no --intercept"),
                 (self.resolved_targets == "sequential", "--targets sequential"),
                 (self.resolved_statistics == "sequential", "--statistics sequential"),
                 (self.resolved_token_weights == "none", "--token_weights none"),
                 (self.resolved_mlp_stats == "before_attention", "--mlp_stats before_attention")]
        missing = [what for ok, what in needs if not ok]
        return f"needs {', '.join(missing)}" if missing else None

    def validate(self) -> PruneConfig:
        if self.method not in PRESETS and not (self.score and self.compensation):
            raise RcpuError(f"unknown method {self.method!r}; choose from {', '.join(PRESETS)} "
                            "or give both --score and --compensation")
        if not (isinstance(self.pruning_ratio, (int, float)) and 0 <= self.pruning_ratio < 1):
            raise RcpuError(f"--pruning_ratio must be in [0, 1), got {self.pruning_ratio}")
        if self.resolved_score not in (*SCORES, "auto"):
            raise RcpuError(f"unknown score {self.resolved_score!r}; choose from {', '.join(SCORES)}, auto")
        if self.resolved_score == "auto" and not self.ridge_auto:
            raise RcpuError("--score auto compares the candidate scores by held-out error after compensation: "
                            "it needs --ridge_lambda auto or --compensation auto")
        if self.resolved_score == "auto" and self.resolved_selection != "score":
            raise RcpuError("--score auto chooses among scores; it cannot be combined with --selection greedy")
        if self.resolved_compensation not in COMPENSATIONS:
            raise RcpuError(f"unknown compensation {self.resolved_compensation!r}; "
                            f"choose from {', '.join(COMPENSATIONS)}")
        if self.resolved_allocation not in ALLOCATIONS:
            raise RcpuError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.resolved_allocation!r}")
        if self.resolved_statistics not in STATISTICS:
            raise RcpuError(f"--statistics must be one of {', '.join(STATISTICS)}, got {self.resolved_statistics!r}")
        if self.resolved_statistics == "dense" and self.resolved_mlp_stats == "after_attention":
            raise RcpuError("--mlp_stats after_attention needs --statistics sequential")
        if self.resolved_selection not in SELECTIONS:
            raise RcpuError(f"--selection must be one of {', '.join(SELECTIONS)}, got {self.resolved_selection!r}")
        if self.resolved_targets not in TARGETS:
            raise RcpuError(f"--targets must be one of {', '.join(TARGETS)}, got {self.resolved_targets!r}")
        targets = self.resolved_targets
        if targets != "sequential" and self.resolved_statistics == "dense":
            raise RcpuError(f"--targets {targets} needs --statistics sequential "
                            "(dense statistics already fit the dense model)")
        fitted = ", ".join(c for c in COMPENSATIONS if c in NEEDS_GRAM)
        if targets != "sequential" and self.resolved_compensation not in NEEDS_GRAM:
            raise RcpuError(f"--targets {targets} needs a least-squares or rotation compensation ({fitted})")
        if self.intercept and self.resolved_compensation not in NEEDS_GRAM:
            raise RcpuError(f"--intercept needs a least-squares or rotation compensation ({fitted}), not "
                            f"{self.resolved_compensation}; bias compensation fits a bias alone")
        if self.intercept and (targets != "sequential" or self.resolved_token_weights != "none"):
            raise RcpuError("--intercept needs --targets sequential and --token_weights none (it centres the "
                            "statistics with the inputs' unweighted mean)")
        if not (isinstance(self.selection_lambda, (int, float)) and self.selection_lambda >= 0):
            raise RcpuError(f"--selection_lambda must be a number >= 0, got {self.selection_lambda!r}")
        if self.head_unit not in HEAD_UNITS:
            raise RcpuError(f"--head_unit must be one of {', '.join(HEAD_UNITS)}, got {self.head_unit!r}")
        if self.resolved_token_weights not in TOKEN_WEIGHTS:
            raise RcpuError(f"--token_weights must be one of {', '.join(TOKEN_WEIGHTS)}, "
                            f"got {self.resolved_token_weights!r}")
        if self.resolved_mlp_stats not in MLP_STATS:
            raise RcpuError(f"--mlp_stats must be one of {', '.join(MLP_STATS)}, got {self.resolved_mlp_stats!r}")
        if self.gram_dtype not in ("float32", "float64"):
            raise RcpuError(f"--gram_dtype must be float32 or float64, got {self.gram_dtype!r}")
        if self.rotation_dtype not in ("float32", "float64"):
            raise RcpuError(f"--rotation_dtype must be float32 or float64, got {self.rotation_dtype!r}")
        if not (isinstance(self.rotation_proximal, (int, float)) and self.rotation_proximal >= 0):
            raise RcpuError(f"--rotation_proximal must be a number >= 0, got {self.rotation_proximal!r}")
        if self.rotation_products not in ROTATION_PRODUCTS:
            raise RcpuError(f"--rotation_products must be one of {', '.join(ROTATION_PRODUCTS)}, "
                            f"got {self.rotation_products!r}")
        if self.rotation_products == "direct" and self.direct_products_blocker:
            raise RcpuError(f"--rotation_products direct {self.direct_products_blocker}")
        lam = self.resolved_ridge_lambda
        if lam != "auto" and (isinstance(lam, str) or lam < 0):
            raise RcpuError(f"--ridge_lambda must be a number >= 0 or 'auto', got {lam!r}")
        if self.ridge_auto and (not self.ridge_grid or min(self.ridge_grid) < 0):  # --nholdout >= 1: below
            raise RcpuError("--ridge_lambda auto needs a non-empty grid of lambdas >= 0")
        if self.choice_per_row and not self.ridge_auto:
            raise RcpuError("--choice_per_row needs a held-out choice: --ridge_lambda auto or --compensation auto")
        for name in ("nsamples", "batch_size", "nholdout", "round_to", "selection_block"):
            if getattr(self, name) < 1:
                raise RcpuError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not (isinstance(self.refine_epochs, int) and self.refine_epochs >= 0):
            raise RcpuError(f"--refine_epochs must be an integer >= 0, got {self.refine_epochs!r}")
        if not (isinstance(self.refine_lr, (int, float)) and self.refine_lr > 0):
            raise RcpuError(f"--refine_lr must be a number > 0, got {self.refine_lr!r}")
        if self.seqlen < 2:
            raise RcpuError(f"--seqlen must be >= 2, got {self.seqlen}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"] = self.resolved_score
        d["compensation"] = self.resolved_compensation
        d["allocation"] = self.resolved_allocation
        d["statistics"] = self.resolved_statistics
        d["ridge_lambda"] = self.resolved_ridge_lambda
        d["selection"] = self.resolved_selection
        d["targets"] = self.resolved_targets
        d["mlp_stats"] = self.resolved_mlp_stats
        d["token_weights"] = self.resolved_token_weights
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise RcpuError(f"unknown --dtype {name!r}; choose from float32, bfloat16, float16") from None
