"""LLaDA2's samplers as transition rules of the one block loop (docs/llada2.md): 2.0's threshold, 2.1's token editing.

LLaDA2's `generate` decodes block-causally in blocks aligned to absolute positions (as SDAR, docs/algorithm.md §12);
at each call it takes the greedy (or sampled) token `x0` and its probability `p` at every block position.

* `llada2_threshold` (LLaDA2.0): step `s` has the quota `n[s] = B // S + (1 if s < B % S else 0)`
  (`S = steps_per_block`, LLaDA2's `steps`); if at least `n[s]` masked positions have `p > tau` all of them are
  written, else the top `min(n[s], masked)`. With `eos_early_stop` the block (and, through the stop id, the
  request) ends as soon as a step writes the EOS id with no mask before the first EOS.
* `llada2_edit` (LLaDA2.1): the same unmasking with a fixed `num_to_transfer` (no quota schedule), plus **editing**:
  a generated, already-unmasked position whose `x0` differs from its token with `p > editing_threshold` is
  rewritten. A block that has no mask left keeps calling the model ("post" calls) until a call edits nothing or
  `max_post_steps` post calls were made.

Thresholds compare in float32 with a strict `>`, as the reference. 2.1's end of block depends on how many post
calls the block made; the block loop counts them (`PostCounter`), and Spiffy's drafts always hold a mask, so
every row of one forward shares that count (docs/llada2.md, "Spiffy over LLaDA2.1").
"""

from __future__ import annotations

import torch


def float32_threshold(value: float) -> float:
    """The reference compares float32 probabilities with `torch.float32(threshold)`: the same value here."""
    return torch.tensor(value, dtype=torch.float32).item()


def threshold_quota(block_length: int, steps: int, step: int, masked_left: int) -> int:
    """`n[step]` of LLaDA2.0's schedule (`B // S` plus one for the first `B % S` steps)."""
    if (
        step >= steps
    ):  # the reference leaves the block with masks here; it never happens without a mask argmax
        raise RuntimeError(
            f"the block still has {masked_left} masked positions after steps_per_block={steps} "
            "steps (the model predicted the mask id)"
        )
    return block_length // steps + (1 if step < block_length % steps else 0)


def unmask_positions(
    conf: torch.Tensor, masked: torch.Tensor, quota: int, tau: float
) -> torch.Tensor:
    """Masked positions with `conf > tau` if at least `quota` of them, else the top `min(quota, masked)` by
    `conf` (ties to the lowest index). `conf` (Lb,) is -inf at unmasked positions."""
    high = masked & (conf > float32_threshold(tau))
    if int(high.sum()) >= quota:
        return high.nonzero().squeeze(-1)
    count = min(quota, int(masked.sum()))
    return torch.sort(conf, descending=True, stable=True).indices[:count]


def edited_positions(
    p: torch.Tensor,
    x0: torch.Tensor,
    state: torch.Tensor,
    masked: torch.Tensor,
    prompt_in_block: int,
    editing_threshold: float,
) -> torch.Tensor:
    """LLaDA2.1's edits (Lb,) bool: generated positions unmasked at the start of the step whose prediction
    differs from their token with probability above `editing_threshold`."""
    editable = ~masked
    editable[:prompt_in_block] = False  # the prompt part of a partial first block is never edited
    return editable & (x0 != state) & (p > float32_threshold(editing_threshold))


def eos_stop_rows(
    states: torch.Tensor, new: torch.Tensor, eos_id: int, mask_id: int, prompt_in_block: int
) -> torch.Tensor:
    """LLaDA2.0's `eos_early_stop` (N,) bool: this step wrote an EOS and no mask precedes the first EOS of
    the generated part of the block (earlier blocks hold neither: they would have stopped the request)."""
    gen_new, gen_old = new[:, prompt_in_block:], states[:, prompt_in_block:]
    wrote_eos = ((gen_new != gen_old) & (gen_new == eos_id)).any(1)
    is_eos = (gen_new == eos_id).to(torch.int8)
    first = torch.where(is_eos.any(1), is_eos.argmax(1), gen_new.shape[1])
    before = torch.arange(gen_new.shape[1], device=new.device)[None] < first[:, None]
    return wrote_eos & ~((gen_new == mask_id) & before).any(1)


def eos_stopped(start: torch.Tensor, new: torch.Tensor, ctx) -> bool:
    """Whether the transition `start` -> `new` (Lb,) ended the block through `eos_early_stop` (host read)."""
    prompt = new.numel() - ctx.masked_at_start
    spec = ctx.spec
    return bool(eos_stop_rows(start[None], new[None], spec.eos_id, spec.mask_id, prompt)[0])


class PostCounter:
    """LLaDA2.1's post calls of the current block: calls made on a block state without a mask."""

    def __init__(self) -> None:
        self.calls = 0

    def note_forward(self, state: torch.Tensor, mask_id: int) -> None:
        """Count the forward about to be walked from the real state `state` (Lb,) (one host read)."""
        self.calls += int(not bool((state == mask_id).any()))


def edit_complete_rows(
    states: torch.Tensor, new: torch.Tensor, mask_id: int, post_calls: int, max_post_steps: int
) -> torch.Tensor:
    """LLaDA2.1's end of block after one call per row (N,) bool: a call on a mask-free state that edited
    nothing, or a mask-free result when the next call would exceed `max_post_steps` post calls."""
    free_before = (states != mask_id).all(1)
    free_after = (new != mask_id).all(1)
    unchanged = (new == states).all(1)
    return (free_before & unchanged) | (free_after & (post_calls + 1 > max_post_steps))
