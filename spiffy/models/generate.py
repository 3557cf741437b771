"""`model.generate` in each family's published shape: LLaDA's `generate`, Dream's `diffusion_generate`, SDAR's
`block_diffusion_generate`, each returning what the family's reference returns (docs/conventions.md "model.generate").

The layers (pyproject.toml) put `spiffy.models` below `spiffy.decoding`, so these methods cannot import a decoder.
They translate the family's argument names into decoder settings (the `DecodingConfig` fields) and hand them to the
backend that `spiffy.decoding` registers when it is imported (`register_backend`; importing anything under
`spiffy` imports `spiffy/__init__.py`, which imports the decoders, so the backend is always there). The model
stays a model: which decoder runs, and Spiffy over it (`speculate=`), is the decoding layer's business.

Common to every method: a `(B, P)` batch with `attention_mask` (padding, left or right, is dropped from each prompt,
which is then decoded exactly as alone, and the returned rows keep the input row as given); `generation_config=`
a `transformers.GenerationConfig` (its `max_new_tokens`, `do_sample`, `temperature`, `top_p`, `top_k`,
`eos_token_id` are mapped, any other field set on it is refused by name) or spiffy's own `DecodingConfig`;
`speculate=` (a `spiffy.Speculation`, a graph spec such as `"chain:5"`, or a `DraftGraph`): lossless, the same
tokens with fewer forwards; `streamer=` a `transformers` streamer that gets the prompt, then each committed block;
`seed=` and `request_id=` key the randomness at temperature > 0; `return_dict_in_generate=True` returns a
`GenerateOutput` with the per-request `DecodeResult`s (tokens and statistics) beside the sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# transformers.GenerationConfig fields mapped onto decoder settings (the others are refused when set)
HF_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "eos_token_id")
_HF_IGNORED = ("transformers_version", "_from_model_config")

# the keywords every family's method takes beside its published arguments (the module docstring says what each does)
CALL_KEYWORDS = (
    "attention_mask",
    "generation_config",
    "speculate",
    "streamer",
    "seed",
    "request_id",
    "return_dict_in_generate",
    "input_ids",
)

_BACKENDS: dict[str, Callable] = {}


def register_backend(backend: Callable, name: str = "decode") -> None:
    """Called by `spiffy.decoding` at import. `"decode"`: `backend(model, prompts, settings, *, speculate,
    seed, request_ids, streamer)` decodes each prompt (1-D LongTensor) and returns one `DecodeResult` per
    prompt; `"llada2"`: LLaDA2's `generate(model, inputs, **arguments)` (`spiffy.decoding.llada2_generate`)."""
    _BACKENDS[name] = backend


@dataclass
class GenerateOutput:
    """`sequences` (B, L) as the family's reference returns them; `results` the per-request `DecodeResult`s
    (generated tokens, statistics); `history` is always None (Dream's per-step history is not recorded)."""

    sequences: torch.Tensor
    results: list = field(default_factory=list)
    history: Any = None


def hf_generation_settings(config) -> dict:
    """Decoder settings from a `transformers.GenerationConfig` (the fields set on it) or from spiffy's own
    `DecodingConfig` (all of its fields). A `transformers` field with no decoder meaning raises `ValueError`."""
    if hasattr(config, "to_diff_dict") and hasattr(config, "max_new_tokens"):
        given = {k: v for k, v in config.to_diff_dict().items() if k not in _HF_IGNORED}
        unknown = sorted(set(given) - set(HF_FIELDS))
        if unknown:
            raise ValueError(
                f"generation_config fields {unknown} have no meaning for a diffusion decoder here "
                f"(mapped: {list(HF_FIELDS)})"
            )
        return hf_settings(**given)
    if hasattr(config, "to_dict") and hasattr(config, "block_length"):  # spiffy's DecodingConfig
        return {k: v for k, v in config.to_dict().items() if v is not None}
    raise ValueError(
        f"generation_config={type(config).__name__}: expected a transformers.GenerationConfig or a "
        "spiffy.DecodingConfig"
    )


def hf_settings(
    max_new_tokens=None, do_sample=None, temperature=None, top_p=None, top_k=None, eos_token_id=None
) -> dict:
    """`transformers` sampling names as decoder settings: `max_new_tokens` is `gen_length`, `do_sample=False`
    is temperature 0, `top_k=0` / `top_p=1.0` no filter, `eos_token_id` (an id or a list) stops after the block
    that produced it (`stop_ids`)."""
    out: dict = {}
    if max_new_tokens is not None:
        out["gen_length"] = max_new_tokens
    if temperature is not None:
        out["temperature"] = float(temperature)
    if do_sample is False:
        if out.get("temperature", 0.0) != 0.0:
            raise ValueError(
                f"do_sample=False with temperature={temperature}: greedy decoding has temperature 0"
            )
        out["temperature"] = 0.0
    elif do_sample is True and not out.get("temperature"):
        raise ValueError("do_sample=True needs temperature > 0")
    if top_k not in (None, 0):
        out["top_k"] = top_k
    if top_p not in (None, 1.0):
        out["top_p"] = top_p
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        out["stop_ids"] = tuple(ids)
    return out


def _prompts(inputs, attention_mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The (B, P) input and each row's prompt with its padding (attention_mask 0) removed."""
    if isinstance(inputs, Mapping):  # a tokenizer's output: {"input_ids", "attention_mask"}
        attention_mask = inputs.get("attention_mask", attention_mask)
        inputs = inputs["input_ids"]
    ids = torch.as_tensor(inputs)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"inputs of shape {tuple(ids.shape)}: expected (P,) or (B, P) token ids")
    if attention_mask is None:
        return ids, list(ids)
    mask = torch.as_tensor(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} does not match inputs {tuple(ids.shape)}"
        )
    mask = mask.bool()
    for i, row in enumerate(mask):  # padding only at the ends: a hole in the middle is not padding
        kept = row.nonzero().flatten()
        if kept.numel() and kept[-1] - kept[0] + 1 != kept.numel():
            raise ValueError(
                f"attention_mask row {i} has a gap: only left or right padding is supported"
            )
    return ids, [row[m] for row, m in zip(ids, mask, strict=True)]


class DiffusionGenerate:
    """The machinery the family mixins share: the call keywords every method takes (`CALL_KEYWORDS`), settings,
    the backend call, and sequences as the references return them."""

    def _generate(
        self,
        inputs,
        settings: dict,
        *,
        attention_mask=None,
        generation_config=None,
        speculate=None,
        streamer=None,
        seed: int = 0,
        request_id=None,
        return_dict_in_generate: bool = False,
        input_ids=None,
        canvas: bool = False,
        **more,
    ):
        """Decode `inputs` (or `input_ids=`) with the family's `settings`, then the `DecodingConfig` fields
        given by name (`more`, which win), over `generation_config`'s."""
        backend = _BACKENDS.get("decode")
        if backend is None:
            raise RuntimeError("no decoder backend registered: `import spiffy` registers it")
        ids, prompts = _prompts(inputs if inputs is not None else input_ids, attention_mask)
        base = hf_generation_settings(generation_config) if generation_config is not None else {}
        chosen = {**settings, **more}
        given = {**base, **{k: v for k, v in chosen.items() if v is not None}}
        if streamer is not None and len(prompts) != 1:
            raise ValueError(f"streamer= streams one sequence; got a batch of {len(prompts)}")
        if request_id is None:
            request_ids = list(range(len(prompts)))
        elif len(prompts) == 1:
            request_ids = [request_id]
        else:
            request_ids = list(request_id)
        results = backend(
            self,
            prompts,
            given,
            speculate=speculate,
            seed=seed,
            request_ids=request_ids,
            streamer=streamer,
        )
        if canvas:  # SDAR's reference returns its whole canvas (rounded up to whole blocks)
            rows = [r.canvas.to(ids.device) for r in results]
            width = max(r.numel() for r in rows)
            pad = self._pad_id()
            sequences = torch.stack(
                [torch.cat([r, r.new_full((width - r.numel(),), pad)]) for r in rows]
            )
        else:
            sequences = torch.cat(
                [ids, torch.stack([r.tokens.to(ids.device) for r in results])], dim=1
            )
        if return_dict_in_generate:
            return GenerateOutput(sequences, results)
        return sequences

    @staticmethod
    def _config_settings(options: dict) -> dict:
        """The decoder settings of `generation_config=` among a method's keywords (none: {})."""
        config = options.get("generation_config")
        return hf_generation_settings(config) if config is not None else {}

    def _pad_id(self) -> int:
        from spiffy.models.loading import model_spec

        spec = model_spec(self)
        return spec.eos_id if spec.eos_id is not None else 0

    def _check_mask_id(self, mask_id) -> None:
        from spiffy.models.loading import model_spec

        if mask_id is not None and mask_id != model_spec(self).mask_id:
            raise ValueError(
                f"mask_id={mask_id}: this checkpoint's mask token is {model_spec(self).mask_id}"
            )


class LLaDAGenerate(DiffusionGenerate):
    """LLaDA's `generate(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking,
    mask_id)` as a method, with Fast-dLLM's `threshold` / `factor` parallel decoding and its caches (`cache=`
    `prefix` | `dual`); it returns prompt + generation (B, P + gen_length) as LLaDA's does. The other keywords
    are `CALL_KEYWORDS` or `DecodingConfig` fields (unknown ones raise, naming them)."""

    def generate(
        self,
        inputs=None,
        steps: int | None = None,
        gen_length: int | None = None,
        block_length: int | None = None,
        temperature: float | None = None,
        cfg_scale: float = 0.0,
        remasking: str | None = None,
        mask_id: int | None = None,
        *,
        threshold: float | None = None,
        factor: float | None = None,
        **options,
    ):
        self._check_mask_id(mask_id)
        config = self._config_settings(options)
        # LLaDA's defaults (128 tokens, one block, one token per step) where neither argument nor config says
        length = gen_length or config.get("gen_length") or 128
        block = block_length or config.get("block_length") or length
        rule = {}
        if threshold is not None and factor is not None:
            raise ValueError("threshold= and factor= are two rules: give one")
        if threshold is not None:
            rule = dict(rule="threshold", tau=threshold)
        elif factor is not None:
            rule = dict(rule="factor", factor=factor)
        elif options.get("rule", config.get("rule", "schedule")) == "schedule":
            rule = dict(steps=steps or config.get("steps") or length)
        elif steps is not None:
            rule = dict(steps=steps)
        chosen = dict(gen_length=length, block_length=block, temperature=temperature)
        chosen.update(cfg_scale=cfg_scale, remasking=remasking, **rule)
        return self._generate(inputs, chosen, **options)


# Dream's `alg` -> spiffy's remasking (the `dream_steps` rule); `confidence_threshold` is Fast-dLLM's sampler
DREAM_ALGS = {"maskgit_plus": "low_confidence", "topk_margin": "topk_margin", "entropy": "entropy"}


class DreamGenerate(DiffusionGenerate):
    """Dream's `diffusion_generate(inputs, generation_config, max_new_tokens, steps, temperature, top_p, top_k,
    alg, alg_temp, output_history, return_dict_in_generate)`: one block of `max_new_tokens`, `alg` one of
    `maskgit_plus`, `topk_margin`, `entropy` or Fast-dLLM's `confidence_threshold` (with `threshold`). Returns
    the sequences (B, P + max_new_tokens), or with `return_dict_in_generate` an object with `.sequences`.
    The other keywords are `CALL_KEYWORDS` or `DecodingConfig` fields."""

    def diffusion_generate(
        self,
        inputs=None,
        generation_config=None,
        *,
        max_new_tokens: int | None = None,
        steps: int = 512,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        alg: str = "maskgit_plus",
        alg_temp: float | None = None,
        eps: float = 1e-3,
        threshold: float | None = None,
        output_history: bool = False,
        **options,
    ):
        for name, value, default in (
            ("alg_temp", alg_temp, None),
            ("eps", eps, 1e-3),
            ("output_history", output_history, False),
        ):
            if value != default:
                raise ValueError(
                    f"{name}={value!r} is not supported (Dream's default {default!r} only)"
                )
        options["generation_config"] = generation_config
        length = max_new_tokens or self._config_settings(options).get("gen_length")
        if length is None:
            raise ValueError(
                "diffusion_generate needs max_new_tokens (or generation_config.max_new_tokens)"
            )
        if alg == "confidence_threshold":
            if threshold is None:
                raise ValueError("alg='confidence_threshold' needs threshold=")
            rule = dict(rule="dream_threshold", tau=threshold, steps=steps)
        elif alg in DREAM_ALGS:
            if threshold is not None:
                raise ValueError(
                    f"threshold= is read by alg='confidence_threshold', not alg={alg!r}"
                )
            rule = dict(rule="dream_steps", steps=steps, remasking=DREAM_ALGS[alg])
        else:
            raise ValueError(f"alg={alg!r} must be one of {[*DREAM_ALGS, 'confidence_threshold']}")
        sampling = hf_settings(temperature=temperature, top_p=top_p, top_k=top_k)
        chosen = {"gen_length": length, "block_length": length, **rule, **sampling}
        return self._generate(inputs, chosen, **options)


# SDAR's remasking strategies -> spiffy's block-causal rules
SDAR_STRATEGIES = {
    "low_confidence_static": "sdar_static",
    "low_confidence_dynamic": "sdar_dynamic",
    "sequential": "sdar_sequential",
}


class SDARGenerate(DiffusionGenerate):
    """SDAR's `block_diffusion_generate(model, prompt, mask_id, gen_length, block_length, denoising_steps,
    temperature, top_k, top_p, remasking_strategy, confidence_threshold, stopping_criteria_idx)` as a method
    (`prompt`: ids, or a tokenizer output with `input_ids`). It returns the whole canvas as SDAR's does: prompt
    and generation rounded up to whole blocks (B, L), rows shorter than the longest padded with EOS. The other
    keywords are `CALL_KEYWORDS` or `DecodingConfig` fields."""

    def block_diffusion_generate(
        self,
        prompt=None,
        mask_id: int | None = None,
        gen_length: int = 128,
        block_length: int | None = None,
        denoising_steps: int = 8,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        remasking_strategy: str = "low_confidence_dynamic",
        confidence_threshold: float = 0.85,
        stopping_criteria_idx=None,
        **options,
    ):
        self._check_mask_id(mask_id)
        if remasking_strategy not in SDAR_STRATEGIES:
            raise ValueError(
                f"remasking_strategy={remasking_strategy!r} must be one of {list(SDAR_STRATEGIES)}"
            )
        rule = SDAR_STRATEGIES[remasking_strategy]
        own_block = getattr(self.config, "block_size", None)
        chosen = {
            "gen_length": gen_length,
            "block_length": block_length or own_block,
            "rule": rule,
            "steps_per_block": denoising_steps,
            "tau": confidence_threshold if rule == "sdar_dynamic" else None,
            **hf_settings(temperature=temperature, top_p=top_p, top_k=top_k),
        }
        if stopping_criteria_idx is not None:
            ids = stopping_criteria_idx
            chosen["stop_ids"] = tuple([ids] if isinstance(ids, int) else ids)
        return self._generate(prompt, chosen, canvas=True, **options)


class LLaDA2Generate:
    """LLaDA2's own `generate(inputs, temperature, block_length, steps, gen_length, top_p, top_k, eos_early_stop,
    minimal_topk, threshold, eos_id, mask_id)` (2.1 adds `editing_threshold`, `max_post_steps`,
    `num_to_transfer`) and `version="2.1"` (default) or `"2.0"`; `seed=` keys sampling, `return_result=True` also
    returns the `DecodeResult`. It returns what the reference returns, a (1, n) tensor (docs/llada2.md): the
    backend `spiffy.decoding.llada2_generate` registers as `"llada2"`."""

    def generate(self, inputs=None, **arguments):
        backend = _BACKENDS.get("llada2")
        if backend is None:
            raise RuntimeError("LLaDA2MoeModelLM.generate needs spiffy.decoding (import spiffy)")
        return backend(self, inputs, **arguments)
