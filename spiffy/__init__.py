"""spiffy: lossless speculative decoding for diffusion LLMs (Spiffy, arXiv 2509.18085).

Public API (docs/algorithm.md §11): `load_model`, `build_decoder`, `Speculation`, `DraftGraph` and the graph helpers; `autotune`
chooses the draft budget and lossless layout this device runs fastest (`graph.budget=auto`). Loaded models also have
their family's `generate` (LLaDA `generate`, Dream `diffusion_generate`, SDAR `block_diffusion_generate`, with
`speculate=` and `streamer=`); `decode_text` turns a result into text; `DecodingConfig` is the decoder settings
class (`GenerationConfig` is its earlier name). docs/conventions.md. `Engine` runs many requests of a decoder
with stacked forwards and streams their committed blocks (`BlockEvent`).
"""

import spiffy.decoding.llada2_generate  # noqa: F401  (registers the backend of LLaDA2MoeModelLM.generate)
from spiffy.calibration.autotune import AutoChoice, autotune
from spiffy.decoding.block_decoder import BlockDecoder, DecoderOptions
from spiffy.decoding.build import build_decoder
from spiffy.decoding.config import DecodingConfig, GenerationConfig
from spiffy.decoding.engine import Engine, Request
from spiffy.decoding.speculative import Speculation, SpiffyDecoder
from spiffy.decoding.text import decode_text
from spiffy.decoding.types import BlockEvent, DecodeResult, DecodeStats
from spiffy.graph import DraftGraph, chain, fig2, parse_graph_spec, two_level_topk
from spiffy.models import ModelSpec, load_model, load_tokenizer, model_spec

__all__ = [
    "AutoChoice",
    "BlockDecoder",
    "BlockEvent",
    "DecodeResult",
    "DecodeStats",
    "DecoderOptions",
    "DecodingConfig",
    "DraftGraph",
    "Engine",
    "GenerationConfig",
    "ModelSpec",
    "Request",
    "Speculation",
    "SpiffyDecoder",
    "autotune",
    "build_decoder",
    "chain",
    "decode_text",
    "fig2",
    "load_model",
    "load_tokenizer",
    "model_spec",
    "parse_graph_spec",
    "two_level_topk",
]
