"""`model.generate` in each family's published shape reproduces the reference fixtures through the published argument
names; batches with attention_mask, `speculate=`, `streamer=`, `transformers.GenerationConfig`, `decode_text`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers.generation.streamers import BaseStreamer

import spiffy
from tests.conftest import DREAM_FIXTURE, SDAR_FIXTURE

SDAR_STRATEGY_KEYS = (
    "gen_length",
    "block_length",
    "denoising_steps",
    "temperature",
    "top_k",
    "top_p",
    "remasking_strategy",
    "confidence_threshold",
    "stopping_criteria_idx",
)


@pytest.fixture(scope="module")
def dream():
    return spiffy.load_model(DREAM_FIXTURE, dtype=torch.float64)


@pytest.fixture(scope="module")
def sdar():
    return spiffy.load_model(SDAR_FIXTURE, dtype=torch.float64)


class Recorder(BaseStreamer):
    """A transformers streamer that keeps what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_llada_generate_reproduces_llada_and_fastdllm(fixture_model, llada_expected):
    """LLaDA's `generate(prompt, steps, gen_length, block_length, temperature, remasking)` returns prompt +
    generation; Fast-dLLM's threshold/factor rules and caches through `threshold=`, `factor=`, `cache=`."""
    for case in llada_expected["llada_generate"]:
        prompt = torch.tensor([case["prompt"]])
        out = fixture_model.generate(
            prompt,
            steps=case["steps"],
            gen_length=case["gen_length"],
            block_length=case["block_length"],
            temperature=case["temperature"],
            remasking=case["remasking"],
            return_dict_in_generate=True,
        )
        assert out.sequences[0].tolist() == case["prompt"] + case["output"]
        assert out.results[0].stats.nfe == case["steps"]
    caches = {"generate": "none", "generate_with_prefix_cache": "prefix"}
    caches["generate_with_dual_cache"] = "dual"
    for case in llada_expected["fastdllm"]:
        out = fixture_model.generate(
            torch.tensor([case["prompt"]]),
            steps=case["steps"],
            gen_length=case["gen_length"],
            block_length=case["block_length"],
            temperature=case["temperature"],
            threshold=case["threshold"],
            factor=case["factor"],
            cache=caches[case["function"]],
            return_dict_in_generate=True,
        )
        assert out.sequences[0, len(case["prompt"]) :].tolist() == case["output"], case
        assert out.results[0].stats.nfe == case["nfe"], case


def test_dream_diffusion_generate_reproduces_dream(dream):
    for case in json.loads((DREAM_FIXTURE / "expected.json").read_text())["diffusion_generate"]:
        threshold = {"threshold": case["threshold"]} if case["threshold"] is not None else {}
        out = dream.diffusion_generate(
            torch.tensor([case["prompt"]]),
            max_new_tokens=case["max_new_tokens"],
            steps=case["steps"],
            temperature=case["temperature"],
            alg=case["alg"],
            **threshold,
        )
        assert out.shape == (1, len(case["prompt"]) + case["max_new_tokens"])
        assert out[0].tolist() == case["prompt"] + case["output"], case
    dict_out = dream.diffusion_generate(
        torch.tensor([case["prompt"]]), max_new_tokens=8, steps=8, return_dict_in_generate=True
    )
    assert dict_out.sequences.shape == (1, len(case["prompt"]) + 8)
    with pytest.raises(ValueError, match="alg='origin'"):
        dream.diffusion_generate(torch.tensor([case["prompt"]]), max_new_tokens=8, alg="origin")


def test_sdar_block_diffusion_generate_reproduces_sdar(sdar):
    expected = json.loads((SDAR_FIXTURE / "expected.json").read_text())
    for case in expected["generate"]:
        out = sdar.block_diffusion_generate(
            {"input_ids": torch.tensor([case["prompt"]])},  # SDAR passes the tokenizer's output
            mask_id=expected["mask_id"],
            **{k: case[k] for k in SDAR_STRATEGY_KEYS},
        )
        assert out[0].tolist() == case["output"], case  # the whole canvas, as SDAR returns it
    with pytest.raises(ValueError, match="mask_id=3: this checkpoint's mask token is 95"):
        sdar.block_diffusion_generate(torch.tensor([case["prompt"]]), mask_id=3)


def test_batch_with_attention_mask_equals_each_prompt_alone(fixture_model):
    kw = dict(steps=16, gen_length=16, block_length=8)
    a, b = [5, 9, 14, 3, 7], [21, 2, 8]
    pad = 0
    inputs = torch.tensor([a, [pad, pad] + b])  # left padding, as transformers pads for generation
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    batch = fixture_model.generate(inputs, attention_mask=mask, **kw)
    alone_a = fixture_model.generate(torch.tensor([a]), **kw)
    alone_b = fixture_model.generate(torch.tensor([b]), **kw)
    assert torch.equal(batch[0], alone_a[0])
    assert torch.equal(batch[1, 2:], alone_b[0]) and batch[1, :2].tolist() == [pad, pad]
    tokenized = {"input_ids": inputs, "attention_mask": mask}
    assert torch.equal(fixture_model.generate(tokenized, **kw), batch)
    with pytest.raises(ValueError, match="attention_mask row 0 has a gap"):
        fixture_model.generate(
            inputs, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1] * 5]), **kw
        )


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculate_is_lossless_with_fewer_forwards(fixture_model, temperature):
    kw = dict(steps=32, gen_length=32, block_length=8, temperature=temperature, seed=3)
    prompt = torch.tensor([[71, 124, 84, 108, 88]])
    base = fixture_model.generate(prompt, return_dict_in_generate=True, **kw)
    fast = fixture_model.generate(prompt, speculate="chain:3", return_dict_in_generate=True, **kw)
    assert torch.equal(base.sequences, fast.sequences)
    assert fast.results[0].stats.nfe < base.results[0].stats.nfe
    other = spiffy.Speculation("fig2")
    assert torch.equal(fixture_model.generate(prompt, speculate=other, **kw), base.sequences)


def test_streamer_gets_the_prompt_then_each_committed_block(fixture_model, llada_expected):
    case = llada_expected["llada_generate"][0]  # its output ends in EOS filler
    eos = llada_expected["eos_id"]
    streamer = Recorder()
    out = fixture_model.generate(
        torch.tensor([case["prompt"]]),
        steps=case["steps"],
        gen_length=case["gen_length"],
        block_length=case["block_length"],
        streamer=streamer,
    )
    assert streamer.ended and streamer.chunks[0][0].tolist() == case["prompt"]
    blocks = [c[0].tolist() for c in streamer.chunks[1:]]
    assert all(len(b) == case["block_length"] for b in blocks)
    streamed = sum(blocks, [])
    first_eos = case["output"].index(eos)
    assert streamed == case["output"][: len(streamed)]  # committed blocks, in order
    assert first_eos < len(streamed) <= first_eos + case["block_length"]  # up to the EOS block
    assert out[0, len(case["prompt"]) :].tolist() == case["output"]
    with pytest.raises(ValueError, match="streams one sequence"):
        fixture_model.generate(torch.tensor([case["prompt"]] * 2), streamer=Recorder())


def test_transformers_generation_config_is_mapped_or_refused(fixture_model):
    prompt = torch.tensor([[71, 124, 84, 108, 88]])
    hf = HFGenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.7, top_k=5)
    out = fixture_model.generate(prompt, generation_config=hf, block_length=8, seed=1)
    ours = spiffy.DecodingConfig(gen_length=16, block_length=8, steps=16, temperature=0.7, top_k=5)
    assert torch.equal(out, fixture_model.generate(prompt, generation_config=ours, seed=1))
    assert spiffy.GenerationConfig is spiffy.DecodingConfig  # the earlier name stays
    with pytest.raises(ValueError, match=r"generation_config fields \['num_beams'\]"):
        fixture_model.generate(prompt, generation_config=HFGenerationConfig(num_beams=4))
    with pytest.raises(ValueError, match="do_sample=True needs temperature > 0"):
        fixture_model.generate(prompt, generation_config=HFGenerationConfig(do_sample=True))
    with pytest.raises(ValueError, match="unknown decoder setting.*'turbo'"):
        fixture_model.generate(prompt, turbo=True)


def test_decode_text_strips_the_filler_and_batches_name_generate_batch():
    from spiffy.tasks.char_tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    ids = tok("7+5=12", add_special_tokens=False)["input_ids"]
    filler = [tok.eos_token_id] * 4 + tok("junk", add_special_tokens=False)["input_ids"]
    result = spiffy.DecodeResult(torch.tensor(ids + filler), spiffy.DecodeStats())
    assert spiffy.decode_text(tok, result) == "7+5=12"
    assert spiffy.decode_text(tok, [result, result]) == ["7+5=12"] * 2
    decoder = spiffy.build_decoder(
        spiffy.load_model("embedded"), gen_length=8, block_length=8, steps=8
    )
    with pytest.raises(ValueError, match="generate_batch"):
        decoder.generate(torch.tensor([ids, ids]))
