"""The running batch's KV cache in preallocated slots, written in place: rows join and leave between steps.

Row `i` of the batch owns slot `i` of every layer's `[rows, kv_heads, columns, head_dim]` buffers. All rows
write their next token at one shared column, so a decode step appends one column and attends over a view of
the buffers (no copy, unlike a cache that grows by concatenation). A joining prompt is written right-aligned
to that column, its left padding masked out; a row that leaves is replaced by the last row (one slot copied).
When the column reaches the end, leading columns that no row uses are dropped (one shift of the live cache),
and only when every column is in use do the buffers grow.

It plugs into transformers as a `Cache` whose layers return views into the slots, with a 4D boolean mask
built here: the model's own mask code is skipped. Full-attention layers only (the engine checks the config).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

MIN_COLUMNS = 256


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values; `update` writes where the shared `SlotCache.state` says."""

    is_compileable = False
    is_sliding = False
    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner
        self.keys = torch.empty(0)
        self.values = torch.empty(0)
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, columns = self.owner.max_rows, self.owner.columns
        _, heads, _, dim = key_states.shape
        self.keys = key_states.new_zeros(rows, heads, columns, dim)
        self.values = value_states.new_zeros(rows, heads, columns, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if owner.prefill_rows is not None:  # joiners: written into their slots, attend among themselves only
            first, count = owner.prefill_rows
            width = key_states.shape[2]
            start = owner.column - width
            self.keys[first : first + count, :, start : owner.column] = key_states
            self.values[first : first + count, :, start : owner.column] = value_states
            return key_states, value_states
        rows, col = owner.rows, owner.column
        self.keys[:rows, :, col] = key_states[:, :, 0]
        self.values[:rows, :, col] = value_states[:, :, 0]
        return self.keys[:rows, :, : col + 1], self.values[:rows, :, : col + 1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.column + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.column

    def get_max_length(self) -> int:
        return self.owner.columns

    def relayout(self, columns: int, rows: int, src: int, dst: int, width: int) -> None:
        """Move the live block `[:rows, :, src : src + width]` to column `dst`, in buffers of `columns` columns."""
        if not self.is_initialized:
            return
        for attr in ("keys", "values"):
            old = getattr(self, attr)
            block = old[:rows, :, src : src + width].clone()
            new = old if columns == old.shape[2] else old.new_zeros(old.shape[0], old.shape[1], columns, old.shape[3])
            new[:rows, :, dst : dst + width] = block
            setattr(self, attr, new)

    def move_row(self, src: int, dst: int, width: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :width] = self.keys[src, :, :width]
            self.values[dst, :, :width] = self.values[src, :, :width]

    def copy_row(self, src: int, dst: int, end: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :end] = self.keys[src, :, :end]
            self.values[dst, :, :end] = self.values[src, :, :end]

    def clear(self, first: int, count: int, end: int) -> None:
        """Zero these slots' columns before `end`: masked columns still enter attention as `0 * value`, and a
        slot must not pass on what an earlier row (say one with NaN weights) left there."""
        if self.is_initialized:
            self.keys[first : first + count, :, :end].zero_()
            self.values[first : first + count, :, :end].zero_()


class SlotCache(Cache):
    """Slots for up to `max_rows` rows. `rows` are live; every live row writes its next token at `column`."""

    def __init__(self, num_layers: int, max_rows: int, device: torch.device, max_columns: int) -> None:
        self.max_rows = max_rows
        self.max_columns = max_columns
        self.columns = min(MIN_COLUMNS, max_columns)
        self.rows = 0
        self.column = 0
        self.prefill_rows: tuple[int, int] | None = None
        self.mask = torch.zeros(max_rows, self.columns, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=device)  # real tokens per row
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def slot_layers(self) -> list[SlotLayer]:
        return self.layers  # type: ignore[return-value]

    # geometry -------------------------------------------------------------------------------------

    def _first_used(self) -> int:
        """The first column any live row uses (`column` when none)."""
        if self.rows == 0:
            return self.column
        used = self.mask[: self.rows, : self.column].any(dim=0).nonzero()
        return int(used[0]) if used.numel() else self.column

    def reserve(self, right: int, left: int = 0) -> None:
        """Make room: `right` free columns from `column` on, and `column >= left` (a joiner's prompt width).

        Leading columns no live row uses are dropped first; the buffers grow (doubling) only when that is not
        enough. Either way the live block is copied once.
        """
        if self.column >= left and self.column + right <= self.columns:
            return
        shift = self._first_used()
        width = self.column - shift
        column = max(width, left)
        need = column + right
        if need > self.max_columns:
            raise ValueError(f"the batch needs {need} cache columns, more than {self.max_columns}")
        columns = self.columns
        while columns < need:
            columns = min(columns * 2, self.max_columns)
        self._move(columns, shift, column - width)

    def _move(self, columns: int, src: int, dst: int) -> None:
        """The live block `[src, column)` moves to start at `dst`, in buffers of `columns` columns."""
        width = self.column - src
        for layer in self.slot_layers:
            layer.relayout(columns, self.rows, src, dst, width)
        mask = self.mask.new_zeros(self.max_rows, columns)
        mask[: self.rows, dst : dst + width] = self.mask[: self.rows, src : self.column]
        self.mask, self.columns, self.column = mask, columns, dst + width

    # rows -----------------------------------------------------------------------------------------

    def begin_prefill(self, count: int, width: int, real: torch.Tensor) -> torch.Tensor:
        """Rows `rows .. rows+count` take prompts of `width` (left-padded; `real` marks real tokens).

        Returns the 4D mask of the prefill pass: causal among each prompt's real tokens (pad positions see
        only themselves, so no row is fully masked).
        """
        self.reserve(right=1, left=width)
        first = self.rows
        start = self.column - width
        for layer in self.slot_layers:
            layer.clear(first, count, start)
        self.mask[first : first + count, :] = False
        self.mask[first : first + count, start : self.column] = real
        self.lengths[first : first + count] = real.sum(dim=1)
        self.prefill_rows = (first, count)
        causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
        mask = causal[None, None] & real[:, None, None, :]
        return mask | torch.eye(width, dtype=torch.bool, device=real.device)[None, None]

    def end_prefill(self) -> None:
        assert self.prefill_rows is not None
        self.rows += self.prefill_rows[1]
        self.prefill_rows = None

    def abandon_prefill(self) -> None:
        self.prefill_rows = None

    def duplicate(self, src: int) -> int:
        """A new row with `src`'s cache (another choice of the same prompt); returns its index."""
        dst = self.rows
        for layer in self.slot_layers:
            layer.copy_row(src, dst, self.column)
        self.mask[dst] = self.mask[src]
        self.lengths[dst] = self.lengths[src]
        self.rows += 1
        return dst

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids for one decode step of every live row (makes room for it first)."""
        self.reserve(right=1)
        rows, col = self.rows, self.column
        self.mask[:rows, col] = True
        positions = self.lengths[:rows].unsqueeze(1).clone()
        return self.mask[:rows, None, None, : col + 1], positions

    def end_decode(self) -> None:
        self.lengths[: self.rows] += 1
        self.column += 1

    def remove(self, leaving: list[int]) -> list[int]:
        """Drop these rows; the last live rows fill the holes. Returns the new order as old row indices."""
        order = list(range(self.rows))
        gone = set(leaving)
        keep = [i for i in order if i not in gone]
        new_order: list[int] = []
        tail = [i for i in reversed(keep) if i >= len(keep)]  # live rows that must move into holes
        holes = [i for i in range(len(keep)) if i in gone]
        moves = dict(zip(holes, tail, strict=True))
        for dst in range(len(keep)):
            src = moves.get(dst, dst)
            if src != dst:
                for layer in self.slot_layers:
                    layer.move_row(src, dst, self.column)
                self.mask[dst] = self.mask[src]
                self.lengths[dst] = self.lengths[src]
            new_order.append(src)
        self.rows = len(keep)
        if self.rows == 0:
            self.column = 0
        elif 2 * self._first_used() > self.column:  # most columns are padding now: attend over fewer
            self._move(self.columns, self._first_used(), 0)
        return new_order
