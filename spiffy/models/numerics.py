"""Invariant numerics (docs/numerics.md): a row's result does not depend on how many rows share its forward.

BLAS libraries choose GEMM kernels, blockings and split-K by the shape of the product, and ATen's elementwise
loops take a scalar path for the elements left over after the vector loop: so in float32 and bfloat16 the same
row can come out a few ulps apart when it is computed among 1 or among 100 rows, and a near-tie argmax can flip.
Inside `invariant_numerics()` (what `DecoderOptions(invariant=True)` wraps every model call in) every operation
whose per-row arithmetic could depend on the row count is replaced, for any family, by one whose arithmetic is
fixed per row (the functions of `torch.nn.functional` are swapped for dispatchers while any thread is inside,
and only those threads get the replacements, `_install`):

* every `torch.nn.functional.linear` (every `nn.Linear`: projections, MLPs, experts, the LM head) runs on fixed
  tiles of `ROW_TILE` rows, each tile one product of the same shape (`tiled_linear`): the same call with the same
  shape every time, so the same kernel and the same summation order for every row, wherever it sits;
* `silu` and `sigmoid` are computed as `x / (1 + exp(-x))` and `1 / (1 + exp(-x))`, from operations whose vector and
  scalar paths agree (ATen's fused `silu` kernel does not: its scalar tail rounds differently);
* attention (`spiffy.models.kv.bidirectional_attention`) pads every key part to whole `KEY_TILE` chunks, takes
  the softmax row by row over `[own keys, cached keys]` and sums the value chunks left to right, so keys that
  padding or stacking adds contribute exact zeros at the end (`active()` selects that path).

Norms (`x.pow(2).mean(-1)`, `rsqrt`) and the softmax are row-wise kernels already: one row's arithmetic is the
same whatever the number of rows. What is promised: on one machine (the same CPU instruction set or GPU, the same
BLAS library and thread count), a row's logits are bitwise the same alone or among any number of rows, states or
requests. Not promised: equality with the default mode (the mode changes float32/bfloat16 roundings), or across
machines. The tests (`tests/models/test_numerics.py`, `tests/decoding/test_invariant.py`) check the claim.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

ROW_TILE = 32  # rows per product of a linear layer (every product has this many rows)
KEY_TILE = (
    32  # keys per attention chunk (a multiple of every vector width: no scalar tail in a row)
)
QUERY_TILE = 8  # query rows per attention product

_state = threading.local()
_lock = threading.Lock()
_installed = 0  # threads inside invariant_numerics(): the dispatchers stay installed while > 0
_ORIGINAL = {name: getattr(F, name) for name in ("linear", "silu", "sigmoid")}
_ORIGINAL_TORCH_SIGMOID = torch.sigmoid


def active() -> bool:
    """Whether this thread is inside `invariant_numerics()`."""
    return getattr(_state, "depth", 0) > 0


def tiled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed on tiles of `ROW_TILE` rows (the rows of `x` zero-padded to whole
    tiles), one product of shape (ROW_TILE, in) x (in, out) per tile, then `bias` added: every row's result is
    that of the same product whatever the number of rows."""
    linear = _ORIGINAL["linear"]
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    n = rows.shape[0]
    tiles = max(-(-n // ROW_TILE), 1)
    if tiles * ROW_TILE != n:
        rows = F.pad(rows, (0, 0, 0, tiles * ROW_TILE - n))
    if tiles == 1:
        out = linear(rows, weight)
    else:
        out = torch.cat(
            [linear(rows[i * ROW_TILE : (i + 1) * ROW_TILE], weight) for i in range(tiles)]
        )
    out = out[:n]
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], weight.shape[0])


def _exp_neg(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """exp(-x) in float32 at least (bfloat16 and float16 inputs), with the dtype to return."""
    work = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    return torch.exp(-x.to(work)), x.dtype


def silu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x / (1 + exp(-x)), the same for every element whatever its position (see the module docstring)."""
    e, dtype = _exp_neg(x)
    return (x.to(e.dtype) / (1 + e)).to(dtype)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + exp(-x)), position-independent like `silu`."""
    e, dtype = _exp_neg(x)
    return (1 / (1 + e)).to(dtype)


def _dispatcher(original, replacement):
    """`replacement` on threads inside `invariant_numerics()`, `original` on every other thread."""

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        if getattr(_state, "depth", 0) > 0:
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    return dispatch


_DISPATCH = {
    "linear": _dispatcher(_ORIGINAL["linear"], tiled_linear),
    "silu": _dispatcher(_ORIGINAL["silu"], silu),
    "sigmoid": _dispatcher(_ORIGINAL["sigmoid"], sigmoid),
}
_DISPATCH_TORCH_SIGMOID = _dispatcher(_ORIGINAL_TORCH_SIGMOID, sigmoid)


def _install(delta: int) -> None:
    """While some thread is inside `invariant_numerics()`, `torch.nn.functional.{linear, silu, sigmoid}` and
    `torch.sigmoid` are dispatchers that run the fixed-arithmetic versions on those threads only (every module
    calls them through the `torch.nn.functional` namespace: `nn.Linear`, the families' MLPs), the originals on
    every other thread; afterwards the originals are restored."""
    global _installed
    with _lock:
        _installed += delta
        on = _installed > 0
        for name, fn in _DISPATCH.items():
            setattr(F, name, fn if on else _ORIGINAL[name])
        torch.sigmoid = _DISPATCH_TORCH_SIGMOID if on else _ORIGINAL_TORCH_SIGMOID


@contextmanager
def invariant_numerics(enabled: bool = True):
    """Run the enclosed model calls in invariant numerics (module docstring); `enabled=False` does nothing."""
    if not enabled:
        yield
        return
    depth = getattr(_state, "depth", 0)
    if depth == 0:
        _install(+1)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth
        if depth == 0:
            _install(-1)


class InvariantModel:
    """A model whose every call runs in `invariant_numerics()`; everything else is the wrapped model's."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, *args, **kwargs):
        with invariant_numerics():
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def wrap(model: Any, invariant: bool) -> Any:
    """`model` itself, or with `invariant=True` the model whose calls run in invariant numerics."""
    return InvariantModel(model) if invariant else model


def machine() -> dict:
    """What a row's float32/bfloat16 roundings depend on (result rows record it): the CPU instruction set
    ATen dispatches to, the BLAS library torch was built with, and any instruction-set caps in the environment."""
    import os
    import re

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    version = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    caps = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
    return {
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "blas": (blas.group(1) if blas else "unknown")
        + (f" {version.group(1)}" if version else ""),
        "isa_caps": {k: os.environ[k] for k in caps if k in os.environ},
    }
