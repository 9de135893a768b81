"""rcpu: structured pruning of LLMs with rotation-constrained error compensation."""

__version__ = "0.1.0"

from .errors import RcpuError  # noqa: E402

__all__ = ["RcpuError", "__version__"]
