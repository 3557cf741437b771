"""Registries of cache modes and verification layouts, with the capabilities the rest of spiffy asks about.

Code never recognises a mode by its name: it asks these entries whether a layout is lossless under a cache, whether
the walk may continue across blocks, and which layout a cache actually runs (the dual cache verifies every draft
as its own query block, whatever layout was asked for). See docs/algorithm.md §4–§5.3. A new cache mode is one
entry here plus its forward strategy in `spiffy.decoding.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerifyLayout:
    """How draft states share one forward. `lossless`: each draft's logits equal a separate forward."""

    name: str
    lossless: bool
    summary: str


@dataclass(frozen=True)
class CacheMode:
    """A cache mode of the base decoder (Fast-dLLM semantics).

    `exact`: its logits equal the no-cache decoder's. `layouts`: the verification layouts it runs, mapped to the
    layout it actually uses. `cross_block`: the acceptance walk may continue across a block boundary (the
    verifying forward computed the next block's first-forward distribution). `stores_blocks`: the cache of a
    block-causal model (SDAR, docs/algorithm.md §12): a prefill, then each finished block's exact K/V stored once; only the
    rules that declare `block_causal` use it, and they imply it. `suffix_queries`: a verification queries the
    block and every position after it (the prefix cache), so its cost depends on where the block is.
    """

    name: str
    exact: bool
    layouts: dict[str, str]
    cross_block: bool
    summary: str
    stores_blocks: bool = False
    suffix_queries: bool = False


VERIFY_LAYOUTS: dict[str, VerifyLayout] = {
    "exact": VerifyLayout("exact", True, "every draft is its own row: equal to a separate forward"),
    "shared": VerifyLayout("shared", False, "the paper's appended drafts sharing the real canvas"),
}

CACHE_MODES: dict[str, CacheMode] = {
    "none": CacheMode(
        "none", True, {"exact": "exact", "shared": "shared"}, True, "full canvas every step"
    ),
    "prefix": CacheMode(
        "prefix",
        False,
        {"exact": "exact", "shared": "shared"},
        False,
        "prefix K/V from the block start",
        suffix_queries=True,
    ),
    "dual": CacheMode(
        "dual", False, {"exact": "exact", "shared": "exact"}, False, "prefix and suffix K/V"
    ),
    "block_causal": CacheMode(
        "block_causal",
        True,
        {"exact": "exact", "shared": "exact"},
        False,
        "SDAR: the exact K/V of the prompt blocks and of every finished block",
        stores_blocks=True,
    ),
}


def _lookup(registry: dict, kind: str, name: str):
    if name not in registry:
        raise ValueError(f"{kind}={name!r} is not known; known: {sorted(registry)}")
    return registry[name]


def get_cache_mode(name: str) -> CacheMode:
    """The registered cache mode `name`; unknown names raise with the known ones."""
    return _lookup(CACHE_MODES, "cache", name)


def get_layout(name: str) -> VerifyLayout:
    """The registered verification layout `name`; unknown names raise with the known ones."""
    return _lookup(VERIFY_LAYOUTS, "verify", name)


def effective_layout(cache: str, verify: str) -> str:
    """The layout the cache mode actually runs when `verify` is asked for."""
    get_layout(verify)
    return get_cache_mode(cache).layouts[verify]


def is_lossless(cache: str, verify: str) -> bool:
    """Whether Spiffy over the base with this cache mode returns exactly the base's tokens."""
    return VERIFY_LAYOUTS[effective_layout(cache, verify)].lossless


def check_cross_block(cache: str, verify: str) -> None:
    """Raise unless the walk may continue across blocks with this cache mode and layout."""
    if not get_cache_mode(cache).cross_block or effective_layout(cache, verify) != "exact":
        allowed = [n for n, m in CACHE_MODES.items() if m.cross_block]
        raise ValueError(
            f"cross_block=True needs cache in {allowed} with verify='exact', "
            f"got cache={cache!r}, verify={verify!r}"
        )
