"""Training text as packed windows: a held-out set, and a seeded order of the rest, epoch by epoch.

The text is tokenised once and cut into consecutive ``seqlen``-token windows (documents are
packed: a window may span a document boundary, as in the pre-training of these models); for a
tokenizer that adds a BOS token every window is that BOS and ``seqlen - 1`` text tokens
(:func:`rcpu.data.consecutive_windows`). A
seeded permutation puts ``heldout`` windows aside, never trained on; the others are visited in
a fresh seeded order each epoch. Batch ``k`` is a pure function of (windows, seed, k), which is
what makes a resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import consecutive_windows
from ..errors import RcpuError

__all__ = ["TrainingWindows", "pack_windows"]

_HELDOUT_SEED = 7_919  #: offset of the held-out draw's seed from the run's seed


def pack_windows(ids: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """``[len(ids) // seqlen, seqlen]`` consecutive windows (the tail that does not fill one is dropped);
    with ``bos``, ``[len(ids) // (seqlen - 1), seqlen]`` windows that start with it."""
    return consecutive_windows(ids, seqlen, bos)


@dataclass
class TrainingWindows:
    train: torch.Tensor  #: [n_train, seqlen]
    heldout: torch.Tensor  #: [n_heldout, seqlen]
    seed: int

    @classmethod
    def from_ids(cls, ids: torch.Tensor, seqlen: int, heldout: int, seed: int, source: str = "the training text",
                 bos: int | None = None) -> TrainingWindows:
        windows = pack_windows(ids, seqlen, bos)
        if windows.shape[0] < heldout + 1:
            raise RcpuError(
                f"{source} has {ids.numel():,} tokens: {windows.shape[0]} window(s) of --seqlen {seqlen}, too few "
                f"for {heldout} held-out window(s) and one to train on; use a longer text, a smaller --seqlen or "
                f"fewer --heldout")
        gen = torch.Generator().manual_seed(int(seed) + _HELDOUT_SEED)
        perm = torch.randperm(windows.shape[0], generator=gen)
        return cls(train=windows[perm[heldout:].sort().values], heldout=windows[perm[:heldout].sort().values],
                   seed=int(seed))

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.train.shape[0], generator=gen)

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The ``step``-th global batch (0-based): ``batch_size`` windows, crossing epochs as needed."""
        n = self.train.shape[0]
        picks = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(i, n)
            picks.append(self._epoch_order(epoch)[pos])
        return self.train[torch.stack(picks)]

    def visited(self, steps: int, batch_size: int) -> torch.Tensor:
        """The training windows the first ``steps`` global batches visit (each once, in index order)."""
        total = steps * batch_size
        if total >= self.train.shape[0]:
            return self.train
        return self.train[self._epoch_order(0)[:total].sort().values]

    def epochs(self, steps: int, batch_size: int) -> float:
        return steps * batch_size / self.train.shape[0]
