"""Model adapters: the shared transformer parts, native LLaDA, Dream and SDAR, loading, and the `ModelSpec` decoders rely on."""

from spiffy.models.base import DiffusionLM, DiffusionLMOutput
from spiffy.models.kv import KVCache
from spiffy.models.llada import LLaDAConfig, LLaDAModelLM
from spiffy.models.loading import (
    EMBEDDED_MODEL_DIR,
    ModelSpec,
    load_model,
    load_tokenizer,
    model_spec,
)
from spiffy.models.sdar import SDARConfig, SDARForCausalLM

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "DiffusionLM",
    "DiffusionLMOutput",
    "KVCache",
    "LLaDAConfig",
    "LLaDAModelLM",
    "ModelSpec",
    "SDARConfig",
    "SDARForCausalLM",
    "load_model",
    "load_tokenizer",
    "model_spec",
]
