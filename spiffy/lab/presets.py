"""The decoder presets (`spiffy/conf/decoder/*.yaml`) outside a Hydra run: one vocabulary for `spiffy run` and `spiffy bench`.

`compose_preset` composes a preset as Hydra composes the `decoder` group (its `defaults` list in order, `_self_`
last) and resolves `${model.block_size}` against the block size given (None: the decoder's block length, filled
in by `preset_generation`). A bench decoder names a preset and optionally overrides its keys:
`<preset>[:key=value,...]`, e.g. `multi_token:tau=0.8`, `vanilla:rule=fixed_k,k=2`, `sdar:fuse_next=true`
(values are YAML: numbers, `true`, `null`, names). The keys are the `decoder.<key>` keys of the Hydra schema
(`spiffy.lab.schema.DecoderConfig`); an unknown preset or key raises naming it (docs/conventions.md, "The package and the `spiffy` command").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.rules import get_rule
from spiffy.lab.schema import DecoderConfig
from spiffy.tasks.registry import TASKS, task_generation

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "decoder"
# keys of a preset that are not `GenerationConfig` fields: Spiffy's options and the run's
SPECULATION_KEYS = ("speculate", "verify", "draft_noise", "cross_block", "fuse_store")


def preset_names() -> list[str]:
    """The decoder presets, by file name."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _load(name: str) -> tuple[list[str], dict]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"decoder preset {name!r} is not one of {preset_names()}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return list(raw.pop("defaults", ["_self_"])), raw


def compose_preset(name: str, block_size: int | None = None) -> dict:
    """The preset's keys as Hydra composes them (its defaults first, then itself), `${model.block_size}`
    resolved to `block_size`."""

    def merged(preset: str) -> dict:
        defaults, own = _load(preset)
        out: dict = {}
        for entry in defaults:
            out.update(own if entry == "_self_" else merged(entry))
        if "_self_" not in defaults:
            out.update(own)
        return out

    root = OmegaConf.create({"model": {"block_size": block_size}, "decoder": merged(name)})
    return OmegaConf.to_container(root, resolve=True)["decoder"]


def parse_decoder(text: str) -> tuple[str, dict]:
    """`<preset>[:key=value,...]` as the preset's name and the overridden keys (YAML values)."""
    name, _, rest = text.partition(":")
    if name not in preset_names():
        raise ValueError(f"decoder {text!r}: preset {name!r} is not one of {preset_names()}")
    known = {f.name for f in dataclasses.fields(DecoderConfig)} - {"name"}
    given = {}
    for item in _items(rest):
        key, eq, value = item.partition("=")
        if not eq or key not in known:
            raise ValueError(
                f"decoder {text!r}: {item!r} must be key=value with a decoder key, one of {sorted(known)}"
            )
        try:
            given[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"decoder {text!r}: {item!r} has no YAML value") from None
    return name, given


def _items(text: str) -> list[str]:
    """`text` split at the commas outside brackets (`stop_ids=[1,2],tau=0.8` is two items)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [item for item in [*items, text[start:]] if item]


def preset_settings(text: str) -> tuple[dict, dict]:
    """A bench decoder `<preset>[:key=value,...]` as (`GenerationConfig` fields it sets, Spiffy's keys:
    `speculate`, `verify`, ...). `steps_per_token` stays among the first (`preset_generation` reads it)."""
    name, given = parse_decoder(text)
    keys = {**compose_preset(name), **given}
    keys.pop("name", None)
    speculation = {k: keys.pop(k) for k in SPECULATION_KEYS if k in keys}
    for key in ("compile", "invariant"):  # DecoderOptions: the bench sets its own
        if keys.pop(key, False):
            raise ValueError(f"decoder {text!r}: {key}=true is a run option, not a bench decoder's")
    return keys, speculation


def preset_generation(task: str, text: str, temperature: float, **overrides) -> dict:
    """Every `GenerationConfig` field of the decoder `<preset>[:key=value,...]` on `task`'s preset, with
    `overrides` (`GenerationConfig` fields) last; `temperature` unless the decoder sets its own. As in `spiffy run`: `steps = gen_length / steps_per_token`
    for the rules that read `steps`; a rule with `steps_per_block` left unset gets the block length (one token
    per step; the SDAR presets read the model's block size, which is the block length here)."""
    gen, _ = preset_settings(text)
    per_token = gen.pop("steps_per_token", 1)
    gen = {**gen, **overrides}
    params = get_rule(gen.get("rule", "schedule")).params
    length = gen.get("gen_length", TASKS[task].generation["gen_length"])
    if "steps" in params and "steps" not in overrides:
        if length % per_token:
            raise ValueError(
                f"decoder {text!r}: steps_per_token={per_token} must divide gen_length={length}"
            )
        gen["steps"] = length // per_token
    elif per_token != 1:
        raise ValueError(f"decoder {text!r}: steps_per_token={per_token} is read by no rule here")
    if "steps_per_block" in params and gen.get("steps_per_block") is None:
        gen["steps_per_block"] = gen.get("block_length", TASKS[task].generation["block_length"])
    unknown = sorted(set(gen) - set(GenerationConfig.field_names()))
    if unknown:
        raise ValueError(f"decoder {text!r}: {unknown} are not GenerationConfig fields")
    return task_generation(task, **{"temperature": temperature, **gen})
