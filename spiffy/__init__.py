"""spiffy: lossless speculative decoding for diffusion LLMs (Spiffy, arXiv 2509.18085).

Public API (docs/algorithm.md §11): `load_model`, `build_decoder`, `Speculation`, `DraftGraph` and the graph helpers; `autotune`
chooses the draft budget and lossless layout this device runs fastest (`graph.budget=auto`).
"""

from spiffy.calibration.autotune import AutoChoice, autotune
from spiffy.decoding.block_decoder import BlockDecoder, DecoderOptions
from spiffy.decoding.build import build_decoder
from spiffy.decoding.config import GenerationConfig
import spiffy.decoding.llada2_generate  # noqa: F401  (installs LLaDA2MoeModelLM.generate)
from spiffy.decoding.speculative import Speculation, SpiffyDecoder
from spiffy.decoding.types import DecodeResult, DecodeStats
from spiffy.graph import DraftGraph, chain, fig2, parse_graph_spec, two_level_topk
from spiffy.models import ModelSpec, load_model, load_tokenizer, model_spec

__all__ = [
    "AutoChoice",
    "BlockDecoder",
    "DecodeResult",
    "DecodeStats",
    "DecoderOptions",
    "DraftGraph",
    "GenerationConfig",
    "ModelSpec",
    "Speculation",
    "SpiffyDecoder",
    "autotune",
    "build_decoder",
    "chain",
    "fig2",
    "load_model",
    "load_tokenizer",
    "model_spec",
    "parse_graph_spec",
    "two_level_topk",
]
