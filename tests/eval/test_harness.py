"""`SpiffyLM.generate_until` on hand-built lm-eval Instances: stop strings, max tokens, one record each."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

import spiffy
from spiffy.eval.harness import SpiffyLM, cut_at_stop
from spiffy.tasks.char_tokenizer import build_char_tokenizer
from tests.helpers.scripted_model import ScriptedModel


def instance(text, kwargs, doc_id=0):
    return Instance(
        request_type="generate_until",
        doc={},
        arguments=(text, kwargs),
        idx=0,
        metadata=("t", doc_id, 1),
    )


@pytest.fixture()
def lm():
    tok = build_char_tokenizer()
    model = ScriptedModel(vocab=len(tok))
    # the scripted model's vocab ids are the tokenizer's: outputs decode to characters
    model.config.mask_token_id = tok.mask_token_id
    model.config.eos_token_id = tok.eos_token_id
    kwargs = dict(gen_length=16, block_length=8, steps=16)
    base = spiffy.build_decoder(model, **kwargs)
    spec = spiffy.build_decoder(model, speculate=spiffy.Speculation("chain:3"), **kwargs)
    return SpiffyLM(spec, tok, base=base, progress=False)


def test_stop_strings_and_max_tokens(lm):
    full = lm.generate_until([instance("ab", {"until": []})])[0]
    assert len(full) == 16
    stop = full[5:7]
    cut = lm.generate_until([instance("ab", {"until": [stop]})])[0]
    assert cut == full[: full.index(stop)]
    short = lm.generate_until([instance("ab", {"until": [], "max_gen_toks": 4})])[0]
    assert short == full[:4]
    assert len(lm.records) == 3
    assert all(r.agrees and r.base_stats.nfe == 16 and r.stats.nfe < 16 for r in lm.records)
    assert [r.request_id for r in lm.records] == ["t:0:0"] * 3


def test_cut_at_earliest_stop():
    assert cut_at_stop("x = 1\ndef f():\n#", ["\n#", "\ndef"]) == "x = 1"
    assert cut_at_stop("abc", []) == "abc"


def test_loglikelihood_is_out_of_scope(lm):
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])


def test_prompt_too_long_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="exceeds the model's max_length"):
        lm.generate_until([instance("x" * 600, {"until": []})])
    assert lm.records == []  # nothing was decoded or recorded for the refused request


def test_model_args_string_builds_spiffy_with_its_options():
    """lm-eval's `--model_args` reach `Speculation` (graph, verify, prune, cross_block) and the base."""
    lm = SpiffyLM.create_from_arg_string(
        "pretrained=embedded,gen_length=32,block_length=8,steps=32,graph=chain:3,"
        "cross_block=true,draft_noise=keyed,prune=2,compare_base=true"
    )
    spec = lm.decoder.speculation
    assert spec.cross_block and spec.verify == "exact" and spec.draft_noise == "keyed"
    assert spec.prune == 2
    assert lm.base is not None and lm.base.cfg == lm.decoder.cfg
    plain = SpiffyLM.create_from_arg_string("pretrained=embedded,gen_length=32,block_length=8")
    assert not hasattr(plain.decoder, "speculation") and plain.base is None
    with pytest.raises(ValueError, match="unknown decoder setting.*'turbo'"):
        SpiffyLM.create_from_arg_string("pretrained=embedded,gen_length=32,block_length=8,turbo=1")
    with pytest.raises(ValueError, match="need graph"):
        SpiffyLM.create_from_arg_string("pretrained=embedded,gen_length=32,block_length=8,prune=2")


@pytest.mark.parametrize("batch_size", [2, "auto"])
def test_batched_generate_until_equals_one_at_a_time(fixture_model, batch_size):
    """lm-eval's batch_size: the same completions, NFE and agreement as one request at a time."""
    tok = build_char_tokenizer()
    kwargs = dict(gen_length=16, block_length=8, cache="dual", rule="threshold", tau=0.6)
    base = spiffy.build_decoder(fixture_model, **kwargs)
    spec = spiffy.build_decoder(fixture_model, speculate=spiffy.Speculation("fig2"), **kwargs)
    # the fixture's vocabulary is larger than the character tokenizer's: any char id is a valid token id
    requests = [
        instance(text, {"until": []}, doc_id=i)
        for i, text in enumerate(["ab", "xyz1", "q", "a+b="] * 2)
    ]
    alone = SpiffyLM(spec, tok, base=base, progress=False)
    batched = SpiffyLM(spec, tok, base=base, progress=False, batch_size=batch_size)
    assert batched.generate_until(requests) == alone.generate_until(requests)
    for a, b in zip(alone.records, batched.records, strict=True):
        assert (a.request_id, a.stats.nfe, a.base_stats.nfe, a.agrees) == (
            b.request_id,
            b.stats.nfe,
            b.base_stats.nfe,
            b.agrees,
        )


def test_batch_size_from_lm_eval_arguments():
    lm = SpiffyLM.create_from_arg_string(
        "pretrained=embedded,gen_length=8,block_length=8,steps=8", {"batch_size": "16"}
    )
    assert lm.batch_size == 16
    auto = SpiffyLM.create_from_arg_string("pretrained=embedded", {"batch_size": "auto:4"})
    assert auto.batch_size == "auto"
    with pytest.raises(ValueError, match="batch_size='many' must be a positive integer or 'auto'"):
        SpiffyLM.create_from_arg_string("pretrained=embedded", {"batch_size": "many"})
