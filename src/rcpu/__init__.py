"""rcpu: structured pruning of LLMs with rotation-constrained error compensation.

>>> from rcpu import PruneConfig, prune
>>> model, report = prune("smollm2-135m", PruneConfig(method="rcpu", pruning_ratio=0.2))  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .api import prune  # noqa: E402
from .config import PRESETS, PruneConfig  # noqa: E402
from .errors import RcpuError  # noqa: E402
from .export import save_pruned  # noqa: E402
from .loading import load_model  # noqa: E402

__all__ = ["PRESETS", "PruneConfig", "RcpuError", "__version__", "load_model", "prune", "save_pruned"]
