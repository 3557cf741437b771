"""The forward strategy of every cache mode, registered explicitly in one table (docs/algorithm.md §4, §12).

A new cache mode is an entry in `spiffy.decoding.modes.CACHE_MODES` (its capabilities) and one here (its
`ForwardStrategy`); nothing registers itself on import.
"""

from __future__ import annotations

from spiffy.decoding.block_causal import BlockCausalCache
from spiffy.decoding.forward import DualCache, ForwardStrategy, NoCache, PrefixCache

STRATEGIES: dict[str, type[ForwardStrategy]] = {
    "none": NoCache,
    "prefix": PrefixCache,
    "dual": DualCache,
    "block_causal": BlockCausalCache,
}
