"""Measuring the decode step: host reads (device synchronisations) and peak memory of one call.

Host reads: every operation that makes the host wait for a device value.

On a GPU each of these blocks the host until the queue drains: reading a scalar (`item`, `bool`, `int`,
`float`, which dispatch `aten._local_scalar_dense`), `tolist` / `numpy`, `torch.equal`, and every operation
whose output shape depends on the data (`nonzero`, `unique`, `masked_select`, boolean-mask indexing,
`repeat_interleave` with tensor repeats). The counter sees them through a `TorchDispatchMode` (plus a patch of
`Tensor.tolist` / `Tensor.numpy`, which read memory without dispatching), so it works on CPU as well, where
the same calls are the ones that would synchronise on a GPU.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READS = {
    aten._local_scalar_dense,
    aten.equal,
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
}


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as c: ...` then `c.count`; `c.marks` records `c.count` at each `mark()`."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.marks: list[int] = []
        self._patched: dict = {}

    def mark(self, *_args, **_kwargs) -> None:
        self.marks.append(self.count)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in READS or func is aten.repeat_interleave.Tensor:
            self.count += 1
        elif packet is aten.index and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def counted(tensor, *a, _original=original, **k):
                self.count += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)


def reads_between_forwards(model: torch.nn.Module, run) -> tuple[list[int], int, int]:
    """Run `run()` counting host reads; returns the reads between consecutive model calls (and after the
    last one), the reads inside model calls, and the total."""
    counter = SyncCounter()
    inside: list[int] = []
    pre = model.register_forward_pre_hook(lambda *a: counter.mark())
    post = model.register_forward_hook(lambda *a: inside.append(counter.count))
    try:
        with counter:
            run()
            counter.mark()
    finally:
        pre.remove()
        post.remove()
    marks = counter.marks
    between = [marks[i + 1] - inside[i] for i in range(len(inside))]
    within = sum(inside[i] - marks[i] for i in range(len(inside)))
    return between, within, counter.count


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024


def peak_memory(run, device: torch.device | str = "cpu") -> int:
    """Bytes by which `run()` raised peak memory above what was in use before it: CUDA's allocator peak on a
    GPU; on Linux CPUs the resident-set high-water mark, reset first through /proc/self/clear_refs."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    run()
    return _status("VmHWM") - before
