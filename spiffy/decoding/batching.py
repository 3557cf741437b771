"""Batched decoding (docs/algorithm.md §13): many requests per forward, every request's output unchanged.

Every request is a state machine (`BlockDecoder.step`) that returns its next `ModelCall` instead of running it;
`spiffy.decoding.engine.Engine` collects the live requests' calls (a *round*), stacks them into as few forwards as
it can (`CallStacker`, here) and hands every request its own rows back. A request's steps never know it is
batched; a finished request leaves at once and the next one joins (continuous batching), so requests finish
independently with their own NFE.

Stacking keeps every call's own shapes: its rows, its query length, its positions, its mask and its cache.

* Calls with a cache (prefix, dual, block-causal) are padded to the round's widest call in rows (inert copies of
  the call's row 0) and their caches are stacked (`spiffy.models.kv.stack_caches`, zero-padded to the longest
  and masked), so attention folds all rows of one request into one product with that request's cache, as alone.
* Query lengths: calls are bucketed by query length (within `tolerance` of the bucket's longest) and padded at the
  end; padded keys are masked out for every row, padded rows are dropped.
* Positions are per row, the attention mask is the call's own (or the model's default made explicit,
  `default_attention_mask`), and the logits rows are per row (`logits_at` of shape (B, P)).

So prompts of different lengths need no left padding: each request keeps its own canvas, its absolute positions
and its block boundaries (block-causal models need them aligned to absolute positions, docs/algorithm.md §12).
Why the output is unchanged: a row's attention reads only its own request's keys (the others are masked out or in
another cache), its positions are its own, and keyed noise (docs/algorithm.md §2.1) depends on the request id, not
on the batch. What can change is rounding: a stacked product may sum in another order than the batch-of-one one
(padding, other kernel shapes), so the equality is tested in float64 (`tests/decoding/test_batching.py`), where a
rounding difference does not move an argmax or a sampled token; a call alone in its bucket runs exactly as alone.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from spiffy.models.base import DiffusionLM, DiffusionLMOutput
from spiffy.models.kv import KVCache, stack_caches


@dataclass
class ModelCall:
    """One request's model call as the decoder made it (`input_ids` (N, Q) and the model's keyword arguments),
    with what stacking reads from it; `order` (the request's place in the engine) orders calls in a forward;
    `out` and `seconds` are filled by whoever runs it."""

    order: int
    input_ids: torch.Tensor
    kwargs: dict[str, Any]
    out: DiffusionLMOutput | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        kw = self.kwargs
        self.cache: KVCache | None = kw.get("kv_cache")
        self.mask: torch.Tensor | None = kw.get("attention_mask")
        self.return_kv = bool(kw.get("return_kv"))
        self.solo = bool(kw.get("store_kv"))  # a call that stores into a cache runs alone
        n, q = self.input_ids.shape
        positions = kw.get("position_ids")
        if positions is None:
            start = self.cache.insert_at if self.cache is not None else 0
            positions = range(start, start + q)
        self.span = positions if isinstance(positions, range) else None
        self._positions = None if self.span is not None else positions
        rows = kw.get("logits_at")
        self.rows_slice = (
            slice(*(slice(0, q) if rows is None else rows).indices(q))
            if (rows is None or isinstance(rows, slice))
            else None
        )
        self._rows = rows if self.rows_slice is None else None

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    @property
    def q(self) -> int:
        return self.input_ids.shape[1]

    @property
    def p(self) -> int:
        """Rows projected."""
        if self.rows_slice is not None:
            return len(range(*self.rows_slice.indices(self.q)))
        return self._rows.numel()

    def positions(self) -> torch.Tensor:
        """Positions (N, Q)."""
        pos = self._positions
        if pos is None:
            pos = torch.arange(self.span.start, self.span.stop, device=self.input_ids.device)
        return (pos if pos.dim() == 2 else pos[None]).expand(self.n, self.q)

    def rows(self) -> torch.Tensor:
        """Projected rows (P,)."""
        if self._rows is not None:
            return self._rows
        return torch.arange(*self.rows_slice.indices(self.q), device=self.input_ids.device)


@dataclass
class BatchStats:
    """How a batch ran: forwards, and per forward the requests (calls) and query rows it carried."""

    forwards: int = 0
    calls_per_forward: list[int] = field(default_factory=list)
    rows_per_forward: list[int] = field(default_factory=list)
    model_s: float = 0.0
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        n = max(self.forwards, 1)
        return {
            "forwards": self.forwards,
            "calls_per_forward": sum(self.calls_per_forward) / n,
            "rows_per_forward": sum(self.rows_per_forward) / n,
            "model_s": self.model_s,
            "wall_s": self.wall_s,
        }


class CallStacker:
    """Runs a round's calls as few forwards: bucketed by cache presence and query length, then stacked."""

    def __init__(
        self,
        model: DiffusionLM,
        *,
        block_causal: bool,
        tolerance: float = 0.25,
        max_tokens: int | None = None,
    ):
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance={tolerance!r} must be in [0, 1)")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens!r} must be None or a positive integer")
        self.model, self.block_causal, self.tolerance = model, block_causal, tolerance
        self.max_tokens = max_tokens
        self._stacked: OrderedDict[tuple, KVCache] = OrderedDict()

    def buckets(self, calls: list[ModelCall]) -> list[list[ModelCall]]:
        """Groups of calls that share one forward (each call in exactly one, in request order within)."""
        out: list[list[ModelCall]] = []
        kinds: dict[tuple, list[ModelCall]] = {}
        for call in calls:
            if call.solo:
                out.append([call])
            else:
                kinds.setdefault((call.cache is not None, call.return_kv), []).append(call)
        for group in kinds.values():
            group = sorted(group, key=lambda c: (-c.q, c.order))
            while group:
                longest = group[0].q
                take = [c for c in group if c.q >= (1 - self.tolerance) * longest]
                out.extend(self._chunks(sorted(take, key=lambda c: c.order), longest))
                group = group[len(take) :]
        return out

    def _chunks(self, calls: list[ModelCall], q: int) -> list[list[ModelCall]]:
        """`calls` split so that no forward carries more than `max_tokens` query tokens (rows x padded length;
        a call's rows never split)."""
        if self.max_tokens is None:
            return [calls]
        out, chunk, rows = [], [], 0
        for call in calls:
            if chunk and (rows + call.n) * q > self.max_tokens:
                out.append(chunk)
                chunk, rows = [], 0
            chunk.append(call)
            rows += call.n
        return [*out, chunk]

    def run(self, calls: list[ModelCall]) -> None:
        """One forward for `calls`; sets each call's `out` (its own rows, query length and projected rows)."""
        if len(calls) == 1:
            call = calls[0]
            call.out = self.model(call.input_ids, **call.kwargs)
            return
        ids, positions, mask, rows, cache, widths = self._stack(calls)
        out = self.model(
            ids,
            position_ids=positions,
            attention_mask=mask,
            kv_cache=cache,
            return_kv=calls[0].return_kv,
            logits_at=rows,
        )
        start = 0
        for call, width in zip(calls, widths, strict=True):
            stop = start + call.n
            present = None
            if call.return_kv:
                present = tuple(
                    (k[start:stop, :, : call.q], v[start:stop, :, : call.q]) for k, v in out.present
                )
            call.out = DiffusionLMOutput(out.logits[start:stop, : call.p], present)
            start += width

    def _stack(self, calls: list[ModelCall]):
        """Ids (B, Q), positions, mask (B, Q, L + Q) or None, rows, stacked cache and each call's row count."""
        has_cache = calls[0].cache is not None
        q = max(c.q for c in calls)
        group = max(c.n for c in calls) if has_cache else 0
        cache = self._stack_caches([c.cache for c in calls], group) if has_cache else None
        n_cache = cache.length if cache is not None else 0
        widths = [group or c.n for c in calls]
        device = calls[0].input_ids.device
        ids = torch.cat(
            [_pad(_pad_rows(c.input_ids, w - c.n), q, dim=1) for c, w in zip(calls, widths)]
        )
        if all(c.span is not None for c in calls):  # host-known positions: one small product
            starts = [c.span.start for c, w in zip(calls, widths) for _ in range(w)]
            positions = torch.tensor(starts, device=device)[:, None] + torch.arange(
                q, device=device
            )
            for c, w, at in zip(calls, widths, _offsets(widths)):
                if c.q < q:  # padded query rows: any valid position
                    positions[at : at + w, c.q :] = c.span.start
        else:
            positions = torch.cat(
                [
                    _pad(_pad_rows(c.positions(), w - c.n), q, dim=1, value=0)
                    for c, w in zip(calls, widths)
                ]
            )
        shared = calls[0].rows_slice
        if shared is not None and all(c.rows_slice == shared for c in calls):
            rows = shared
        else:
            p = max(c.p for c in calls)
            rows = torch.cat(
                [_pad(c.rows(), p, dim=0, value=0).expand(w, p) for c, w in zip(calls, widths)]
            )
        if (
            not has_cache
            and not self.block_causal
            and all(c.mask is None and c.q == q for c in calls)
        ):
            mask = None  # every key visible: the model's unmasked attention
        elif not self.block_causal and all(c.mask is None for c in calls):
            mask = self._key_mask(calls, widths, q, n_cache)
        else:
            mask = torch.cat([self._mask(c, w, q, n_cache) for c, w in zip(calls, widths)])
        return ids, positions, mask, rows, cache, widths

    def _key_mask(self, calls, widths, q: int, n_cache: int) -> torch.Tensor:
        """Bidirectional default attention (every query row of a call sees the same keys), (B, Q, L + Q):
        a call's visible cached keys (all but a recomputed block, not the padding) and its own fresh keys."""
        device = calls[0].input_ids.device
        key = torch.arange(n_cache + q, device=device)
        bounds = []
        for c in calls:
            length = c.cache.length if c.cache is not None else 0
            lo, hi = (c.cache.insert_at, c.cache.insert_at + c.cache.replace) if length else (0, 0)
            bounds.append((length, lo, hi, n_cache + c.q))
        length, lo, hi, own = torch.tensor(bounds, device=device).T[..., None]
        cached = (key < length) & ((key < lo) | (key >= hi))
        visible = cached | ((key >= n_cache) & (key < own))  # (C, L + Q)
        counts = torch.tensor(widths, device=device)
        return visible.repeat_interleave(counts, dim=0)[:, None].expand(-1, q, -1)

    def _mask(self, call: ModelCall, width: int, q: int, n_cache: int) -> torch.Tensor:
        """The call's mask (width, q, n_cache + q) over the stacked keys `[cache (n_cache), fresh (q)]`."""
        own = call.mask
        if own is None:
            own = self.model.default_attention_mask(call.positions(), call.cache)
        own = own.expand(call.n, -1, -1)
        c = call.cache.length if call.cache is not None else 0
        out = torch.zeros(width, q, n_cache + q, dtype=torch.bool, device=own.device)
        out[: call.n, : call.q, :c] = own[:, :, :c]
        out[: call.n, : call.q, n_cache : n_cache + call.q] = own[:, :, c:]
        out[call.n :] = out[:1]  # inert copies of row 0
        pad = torch.arange(call.q, q, device=own.device)
        out[:, pad, n_cache + pad] = True  # padded query rows see themselves only (dropped)
        return out

    def _stack_caches(self, caches: list[KVCache], group: int) -> KVCache:
        key = tuple(id(c) for c in caches)
        stacked = self._stacked.get(key)
        if stacked is None:
            stacked = stack_caches(caches, group)
            self._stacked[key] = stacked  # holds the parts: their ids stay unique while memoised
            if len(self._stacked) > 2:
                self._stacked.popitem(last=False)
        if stacked.group != group:
            stacked = dataclasses.replace(stacked, group=group, _masks={})
        return stacked


def _offsets(widths: list[int]) -> list[int]:
    out, at = [], 0
    for w in widths:
        out.append(at)
        at += w
    return out


def _pad_rows(t: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([t, t[:1].expand(extra, *t.shape[1:])]) if extra else t


def _pad(t: torch.Tensor, size: int, dim: int, value: int | None = None) -> torch.Tensor:
    """`t` padded at the end of `dim` to `size` with `value` (None: its first element along `dim`)."""
    missing = size - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    fill = t.narrow(dim, 0, 1).expand(shape) if value is None else t.new_full(shape, value)
    return torch.cat([t, fill], dim=dim)


def parse_batch_size(value) -> int | str:
    """A positive integer or "auto" (lm-eval passes strings: "16", "auto"; "auto:N" reads as "auto")."""
    text = str(value)
    if text.startswith("auto"):
        return "auto"
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1 or isinstance(value, bool) or (isinstance(value, float) and value != size):
        raise ValueError(f"batch_size={value!r} must be a positive integer or 'auto'")
    return size


def default_max_tokens(device: torch.device) -> int | None:
    """Query tokens per forward that batched decoding stops at by default: 1024 on a CPU, where a longer stacked
    forward outgrows the caches (docs/results.md "Batched decoding", `results/bench/token_cap_*.md`), and no limit on
    an accelerator, which wants the largest forwards."""
    return 1024 if torch.device(device).type == "cpu" else None
