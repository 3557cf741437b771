"""SDAR's position choice (docs/algorithm.md §12): the per-step quota, its three strategies and the over-selection order.

SDAR's `block_diffusion_generate` writes, at denoising step `s` of a block, the greedy (or sampled) token at a set
of block positions chosen from the confidences (the chosen token's probability at masked positions, `-inf`
elsewhere):

* `sdar_static`: the top `n[s]` positions; `n[s] = B // S + (1 if s < B % S else 0)` depends on the step index
  only, never on how many tokens earlier steps wrote;
* `sdar_dynamic`: every masked position with confidence **strictly** above `tau` if there are at least `n[s]`,
  else the top `n[s]`;
* `sdar_sequential`: `n[s]` positions from the first masked one, clipped at the block end.

**Over-selection.** When fewer masks remain than `n[s]`, the reference's `torch.topk` also returns `-inf`
positions, and those are overwritten with their greedy token (possibly a prompt token of a partial prompt block).
Which ones comes from torch's CPU top-k: libstdc++ `std::nth_element` on `(value, index)` pairs. It is emulated
here in Python, so every device picks the same positions (the fixture README describes the rule). Among finite
confidences, ties go to the lowest index as everywhere else (docs/algorithm.md §2 step 5).
"""

from __future__ import annotations

import math

import torch

# --- libstdc++ (GCC) std::nth_element / heap_select on (value, index) pairs, as torch's CPU top-k calls them


def _greater(x: tuple[float, int], y: tuple[float, int]) -> bool:
    """torch's top-k comparator (largest): NaN is greatest, then greater value first."""
    return (math.isnan(x[0]) and not math.isnan(y[0])) or x[0] > y[0]


def _insertion_sort(a: list, first: int, last: int) -> None:
    if first == last:
        return
    for i in range(first + 1, last):
        val = a[i]
        if _greater(val, a[first]):
            a[first + 1 : i + 1] = a[first:i]
            a[first] = val
        else:  # __unguarded_linear_insert
            j = i
            while _greater(val, a[j - 1]):
                a[j] = a[j - 1]
                j -= 1
            a[j] = val


def _move_median_to_first(a: list, result: int, x: int, y: int, z: int) -> None:
    if _greater(a[x], a[y]):
        if _greater(a[y], a[z]):
            pick = y
        elif _greater(a[x], a[z]):
            pick = z
        else:
            pick = x
    elif _greater(a[x], a[z]):
        pick = x
    elif _greater(a[y], a[z]):
        pick = z
    else:
        pick = y
    a[result], a[pick] = a[pick], a[result]


def _unguarded_partition(a: list, first: int, last: int, pivot: int) -> int:
    while True:
        while _greater(a[first], a[pivot]):
            first += 1
        last -= 1
        while _greater(a[pivot], a[last]):
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _adjust_heap(a: list, first: int, hole: int, length: int, value) -> None:
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _greater(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2  # __push_heap
    while hole > top and _greater(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _heap_select(a: list, first: int, middle: int, last: int) -> None:
    length = middle - first
    if length >= 2:  # __make_heap
        for parent in range((length - 2) // 2, -1, -1):
            _adjust_heap(a, first, parent, length, a[first + parent])
    for i in range(middle, last):
        if _greater(a[i], a[first]):  # __pop_heap
            value, a[i] = a[i], a[first]
            _adjust_heap(a, first, 0, length, value)


def libstdcxx_topk_indices(values: list[float], k: int) -> list[int]:
    """The index set torch's CPU `topk(values, k)` returns (its first k elements before sorting).

    torch takes `std::partial_sort` when `k * 64 <= n`, else `std::nth_element` at `k - 1`; both are emulated
    with libstdc++'s algorithms, including the tie order among equal values.
    """
    n = len(values)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    a = [(float(v), i) for i, v in enumerate(values)]
    if k * 64 <= n:
        _heap_select(a, 0, k, n)
        return sorted(i for _, i in a[:k])
    nth, first, last = k - 1, 0, n
    depth = 2 * (n.bit_length() - 1)
    while last - first > 3:
        if depth == 0:
            _heap_select(a, first, nth + 1, last)
            a[first], a[nth] = a[nth], a[first]
            break
        depth -= 1
        _move_median_to_first(a, first, first + 1, first + (last - first) // 2, last - 1)
        cut = _unguarded_partition(a, first + 1, last, first)
        if cut <= nth:
            first = cut
        else:
            last = cut
    else:
        _insertion_sort(a, first, last)
    return sorted(i for _, i in a[:k])


# --- SDAR's selection


def step_quota(block_length: int, steps: int, step: int, masked_left: int) -> int:
    """`n[step]` of SDAR's schedule: `B // S`, plus one for the first `B % S` steps (docs/algorithm.md §12)."""
    if step >= steps:  # the reference's schedule lookup fails here (IndexError)
        raise RuntimeError(
            f"the block still has {masked_left} masked positions after steps_per_block={steps} "
            "denoising steps (the model predicted the mask id)"
        )
    return block_length // steps + (1 if step < block_length % steps else 0)


def top_positions(conf: torch.Tensor, k: int, n_masked: int) -> torch.Tensor:
    """The top-`k` positions of `conf` (Lb,): ties to the lowest index, or, when `k` exceeds the `n_masked`
    finite confidences, every masked position plus the `-inf` positions torch's CPU top-k would add."""
    if k <= n_masked:
        return torch.sort(conf, descending=True, stable=True).indices[:k]
    chosen = libstdcxx_topk_indices(conf.tolist(), min(k, conf.numel()))
    return torch.tensor(chosen, dtype=torch.long, device=conf.device)


def select_positions(
    rule: str,
    conf: torch.Tensor,
    masked: torch.Tensor,
    step: int,
    steps: int,
    tau: float | None,
) -> torch.Tensor:
    """Block positions SDAR's step `step` writes (a LongTensor), from the confidences `conf` (Lb,) float64
    (-inf at unmasked positions) and the mask `masked` (Lb,) of the block state."""
    n_masked = int(masked.sum())
    quota = step_quota(conf.numel(), steps, step, n_masked)
    if rule == "sdar_sequential":
        first = int(masked.nonzero()[0, 0])
        return torch.arange(first, min(first + quota, conf.numel()), device=conf.device)
    if rule == "sdar_dynamic":
        high = masked & (conf > tau)
        if int(high.sum()) >= quota:
            return high.nonzero().squeeze(-1)
    elif rule != "sdar_static":
        raise ValueError(f"rule={rule!r} is not an SDAR rule")
    return top_positions(conf, quota, n_masked)
