"""Load dLLM checkpoints (published or embedded) through one path, and describe their token ids (docs/algorithm.md §9, §11).

`load_model` reads `config.json`, picks the native class registered for its `model_type`, and loads weights with
transformers' `from_pretrained` (offline for local directories; hub ids need network). `ModelSpec` is everything
a decoder may know about a model: token ids and limits. Decoders never hard-code ids.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PreTrainedModel,
)

from spiffy.models.dream import DreamModel
from spiffy.models.llada import LLaDAModelLM
from spiffy.models.llada2 import LLaDA2MoeModelLM
from spiffy.models.sdar import SDARForCausalLM

# The native families. A new family is its adapter file plus its entry here (docs/extending.md).
FAMILIES: tuple[type[PreTrainedModel], ...] = (
    LLaDAModelLM,
    DreamModel,
    SDARForCausalLM,
    LLaDA2MoeModelLM,
)
# the families whose checkpoints' `architectures` name a causal-LM class
CAUSAL_LM_FAMILIES = (SDARForCausalLM, LLaDA2MoeModelLM)
# model_type -> native class
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {f.config_class.model_type: f for f in FAMILIES}

for _cls in FAMILIES:
    AutoConfig.register(_cls.config_class.model_type, _cls.config_class, exist_ok=True)
    AutoModel.register(_cls.config_class, _cls, exist_ok=True)
    AutoModelForMaskedLM.register(_cls.config_class, _cls, exist_ok=True)
for _cls in CAUSAL_LM_FAMILIES:
    AutoModelForCausalLM.register(_cls.config_class, _cls, exist_ok=True)

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
EMBEDDED_MODEL_DIR = CHECKPOINTS_DIR / "tiny-llada-arith"


@dataclass(frozen=True)
class ModelSpec:
    """Token ids and limits a decoder needs (docs/algorithm.md §2 step 6: ids always come from the adapter)."""

    mask_id: int
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    vocab_size: int
    max_length: int
    # block-causal families (SDAR): attention is causal across blocks of this many positions, so finished
    # blocks' K/V are exact and decoders cache them (docs/algorithm.md §12); None = bidirectional (LLaDA, Dream)
    attention_block_size: int | None = None

    @property
    def block_causal(self) -> bool:
        """Whether the model attends block-causally (decoders then use SDAR's block loop and cache)."""
        return self.attention_block_size is not None


def model_spec(model: PreTrainedModel) -> ModelSpec:
    """Read the `ModelSpec` from a loaded model's config."""
    cfg = model.config
    if getattr(cfg, "mask_token_id", None) is None:
        raise ValueError(
            f"config.mask_token_id is None for model_type={cfg.model_type!r}: this checkpoint names no mask "
            "id; set model.config.mask_token_id (LLaDA2: or pass mask_id= to model.generate)"
        )
    return ModelSpec(
        mask_id=int(cfg.mask_token_id),
        eos_id=cfg.eos_token_id,
        eot_id=getattr(cfg, "eot_token_id", None),
        pad_id=cfg.pad_token_id,
        vocab_size=int(getattr(cfg, "embedding_size", cfg.vocab_size)),
        max_length=int(cfg.max_sequence_length),
        attention_block_size=getattr(cfg, "attention_block_size", None),
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(name: str) -> bool:
    return not _HUB_ID.match(name)


def resolve_model_path(path_or_id: str | os.PathLike) -> str:
    """Return a local directory or a hub id; raise `FileNotFoundError` for a missing local directory."""
    name = str(path_or_id)
    if name == "embedded":
        name = str(EMBEDDED_MODEL_DIR)
    elif name and "/" not in name and (CHECKPOINTS_DIR / name).is_dir():  # a shipped checkpoint
        name = str(CHECKPOINTS_DIR / name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
        return str(path)
    if path.exists() or _looks_like_path(name):
        raise FileNotFoundError(
            f"model directory {name!r} does not exist (a hub id looks like 'org/name')"
        )
    return name  # a hub id such as GSAI-ML/LLaDA-8B-Instruct: needs network or the HF cache


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device` that exists on this machine; otherwise a `ValueError` naming it (a model is
    never loaded onto the CPU in place of a missing accelerator)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device ({err})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device={device!r}: torch sees no CUDA device on this machine (use device=cpu)"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device={device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device={device!r}: MPS is not available on this machine (use device=cpu)"
        )
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"device={device!r}: spiffy runs on cpu, cuda or mps")
    return dev


def load_model(
    path_or_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a LLaDA, Dream or SDAR (or other registered) checkpoint as a native model in eval mode.

    Args:
        path_or_id: a local checkpoint directory, `"embedded"`, or a hub id.
        dtype: parameter dtype (`torch.float64` for exactness tests, `torch.bfloat16` on GPUs).
        device: target device.

    Raises:
        FileNotFoundError: the directory does not exist or has no `config.json`.
        ValueError: the config's `model_type` has no native implementation here, or `device` does not exist here.
    """
    device = check_device(device)
    name = resolve_model_path(path_or_id)
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype")
        dtype = getattr(torch, dtype)
    if Path(name).is_dir():
        model_type = json.loads((Path(name) / "config.json").read_text()).get("model_type")
    else:
        model_type = AutoConfig.from_pretrained(name).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"model_type={model_type!r} in {name!r} is not supported; "
            f"supported: {sorted(MODEL_CLASSES)}"
        )
    model = MODEL_CLASSES[model_type].from_pretrained(name, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(path_or_id: str | os.PathLike):
    """The checkpoint's tokenizer through the same path resolution as `load_model`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(path_or_id))
