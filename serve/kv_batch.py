"""The running batch's KV cache as plain tensors, so rows can join and leave between decode steps.

Rows are left-padded to a common length; an attention mask marks the real positions and each row's position
ids are its count of real tokens. Joining pads the shorter side on the left and concatenates; leaving selects
rows and drops columns that became padding for every row. Only full-attention layers (DynamicLayer)
are handled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class KVBatch:
    """Per-layer keys/values `[rows, heads, length, head_dim]` plus the `[rows, length]` attention mask."""

    cache: DynamicCache
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def _layers(self) -> list:
        return list(self.cache.layers)

    def positions(self) -> torch.Tensor:
        """Position id of the next token of each row: its number of real tokens so far."""
        return self.mask.sum(dim=1, keepdim=True)

    def grow_mask(self) -> torch.Tensor:
        """Mask for one decode step (the new token is real for every row); becomes the batch's mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def select(self, keep: list[int]) -> KVBatch:
        """Keep these rows, then drop leading columns that no kept row uses."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        mask = mask[:, start:]
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self.mask = mask
        return self

    @staticmethod
    def concat(a: KVBatch, b: KVBatch) -> KVBatch:
        """Rows of `a` then rows of `b`, left-padded to the longer of the two."""
        length = max(a.length, b.length)
        pa, pb = length - a.length, length - b.length
        for la, lb in zip(a._layers(), b._layers(), strict=True):
            la.keys = torch.cat([_pad_left(la.keys, pa, 2), _pad_left(lb.keys, pb, 2)], dim=0)
            la.values = torch.cat([_pad_left(la.values, pa, 2), _pad_left(lb.values, pb, 2)], dim=0)
        a.mask = torch.cat([_pad_left(a.mask, pa, 1), _pad_left(b.mask, pb, 1)], dim=0)
        return a
