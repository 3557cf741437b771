"""Model adapters: native LLaDA, Dream and SDAR implementations, loading, and the `ModelSpec` decoders rely on."""

from spiffy.models.kv import KVCache
from spiffy.models.llada import DiffusionLMOutput, LLaDAConfig, LLaDAModelLM
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
