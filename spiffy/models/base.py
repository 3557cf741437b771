"""The model contract decoders rely on (docs/algorithm.md §4, §5.3, §9): a typed `Protocol` every family adapter implements.

A decoder calls a model in exactly one way:

    out = model(input_ids, position_ids=..., attention_mask=..., kv_cache=..., return_kv=..., logits_at=...)

- `input_ids` (B, Q): the query tokens. B is the number of block states verified together (1 for a base step).
- `position_ids`: absolute RoPE positions, passed explicitly (never derived from a cache length). A `range` is
  shared by every row and is validated on the host; a tensor (Q,) or (B, Q) is validated with one device read.
  None means the range that continues at `kv_cache.insert_at` (0 without a cache).
- `attention_mask`: bool (B, Q, K), True = attend; the key axis is `[cached keys (L_c), this row's fresh keys (Q)]`.
- `kv_cache`: a frozen `KVCache` (batch 1) that all B rows share; no forward writes into it.
- `return_kv`: also return this call's fresh post-RoPE K/V per layer (the block-start forward that fills a cache).
- `store_kv` (block-causal families, docs/algorithm.md §12; others reject it): return in `kv_cache` a new cache
  that also holds this call's K/V (batch 1: SDAR's prefill of the prompt blocks); `kv_cache` itself is unchanged.
- `logits_at`: the query rows (a slice, a LongTensor (P,), or (B, P) for rows of their own) whose
  *position-aligned* logits the caller reads; None = every row. The LM head runs on those rows only: a shifted family (Dream) maps each row to the hidden
  state it needs, or to the cache's `boundary_logits` for the first cached-out position.

It returns a `DiffusionLMOutput` with logits (B, P, V). For batched decoding (docs/algorithm.md §13) a model also
gives its default attention as an explicit mask, `model.default_attention_mask(positions (B, Q), kv_cache)`
(B, Q, L_c + Q), and accepts a stacked `KVCache` (`spiffy.models.kv.stack_caches`). A new family (SDAR, ...) implements this signature and
registers its config class in `spiffy.models.loading`; decoders need nothing else from it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from spiffy.models.kv import KVCache

Positions = torch.Tensor | range
LogitsRows = slice | torch.Tensor


@dataclass
class DiffusionLMOutput:
    """Logits `(B, P, V)` at the requested query rows and, if requested, their fresh per-layer K/V
    (`return_kv`) and the grown cache (`store_kv`)."""

    logits: torch.Tensor
    present: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    kv_cache: KVCache | None = None


@runtime_checkable
class DiffusionLM(Protocol):
    """What a decoder needs from a model: a config with token ids, and the call documented above."""

    config: Any

    def __call__(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: Positions | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        logits_at: LogitsRows | None = None,
        store_kv: bool = False,
    ) -> DiffusionLMOutput: ...

    def default_attention_mask(
        self, positions: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor: ...


def position_tensor(
    position_ids: Positions | None, q_len: int, start: int, limit: tuple[str, int], device
) -> tuple[torch.Tensor | None, range | None]:
    """Positions as a tensor (1 or B, Q), or None with the host-known range when they are one; raises
    `ValueError` for positions at or beyond `limit = (config key, value)`. Only a tensor argument costs a
    device read."""
    name, bound = limit
    if position_ids is None:
        position_ids = range(start, start + q_len)
    if torch.compiler.is_compiling():  # compiled forwards: the decoder validated the canvas length
        if isinstance(position_ids, range):
            position_ids = torch.arange(position_ids.start, position_ids.stop, device=device)
        return (position_ids if position_ids.dim() == 2 else position_ids[None]), None
    if isinstance(position_ids, range):
        if len(position_ids) != q_len or position_ids.step != 1:
            raise ValueError(f"position_ids={position_ids!r} must be a unit-step range of {q_len}")
        if position_ids.stop > bound:
            raise ValueError(
                f"position {position_ids.stop - 1} exceeds {name}={bound} of this model"
            )
        return torch.arange(position_ids.start, position_ids.stop, device=device)[
            None
        ], position_ids
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    top = int(position_ids.max())
    if top >= bound:
        raise ValueError(f"position {top} exceeds {name}={bound} of this model")
    return position_ids, None


def row_slice(logits_at: LogitsRows | None, q_len: int) -> slice | None:
    """`logits_at` as a normalised unit-step slice of the query rows, or None when it is an index tensor."""
    if logits_at is None:
        return slice(0, q_len)
    if isinstance(logits_at, slice):
        start, stop, step = logits_at.indices(q_len)
        if step != 1 or stop <= start:
            raise ValueError(f"logits_at={logits_at!r} must be a non-empty unit-step slice")
        return slice(start, stop)
    return None


def select_rows(x: torch.Tensor, logits_at: LogitsRows | None) -> torch.Tensor:
    """Rows `logits_at` of hidden states `x` (B, Q, d): a slice or (P,) index shared by every batch row, or
    (B, P) indices of each row's own."""
    rows = row_slice(logits_at, x.shape[1])
    if rows is not None:
        return x[:, rows]
    if logits_at.dim() == 2:
        return x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
    return x.index_select(1, logits_at)


class RopeTables:
    """Memoised RoPE tables per (position range, device, dtype): a block's steps reuse one range, so its
    tables are computed once (`build(positions (1, Q)) -> tables`). Tensor positions are never memoised."""

    def __init__(self, build: Callable[[torch.Tensor], tuple], size: int = 8):
        self.build, self.size, self._tables = build, size, OrderedDict()

    def __call__(self, positions: torch.Tensor | None, span: range | None, device, *key) -> tuple:
        if span is None:
            return self.build(positions)
        k = (span.start, span.stop, device, *key)
        if k not in self._tables:
            self._tables[k] = self.build(torch.arange(span.start, span.stop, device=device)[None])
            if len(self._tables) > self.size:
                self._tables.popitem(last=False)
        self._tables.move_to_end(k)
        return self._tables[k]
