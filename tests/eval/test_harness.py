"""`SpiffyLM` on hand-built lm-eval Instances and through lm-eval: stop strings, every `--gen_kwargs` key honoured or
refused by name, `--device`, Spiffy's numbers in lm-eval's results and samples, graph=calibrated|auto."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

import spiffy
from spiffy.eval.harness import SpiffyLM, cut_at_stop, spiffy_metrics
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
    assert len(lm.records) == 2
    assert all(r.agrees and r.base_stats.nfe == 16 and r.stats.nfe < 16 for r in lm.records)
    assert [r.request_id for r in lm.records] == ["t:0:0"] * 2


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


def test_gen_kwargs_are_honoured_as_the_decoder_they_name(lm):
    """max_gen_toks is the generated length, temperature/do_sample/top_k/top_p the sampling: each request
    decodes exactly as a decoder built with those settings (same keyed request id and seed)."""
    model, graph = lm.decoder.model, lm.decoder.speculation
    tok = lm.tokenizer

    def direct(**settings):
        kw = {**dict(gen_length=16, block_length=8, steps=16), **settings}
        result = spiffy.build_decoder(model, speculate=graph, **kw).generate(
            torch.tensor(tok("ab", add_special_tokens=False)["input_ids"]), request_id="t:0:0"
        )
        return tok.decode(result.tokens.tolist(), skip_special_tokens=True)

    short = lm.generate_until([instance("ab", {"until": [], "max_gen_toks": 8})])[0]
    assert short == direct(gen_length=8, steps=8) and len(short) == 8
    sampled = {"until": [], "do_sample": True, "temperature": 0.9, "top_k": 5}
    assert lm.generate_until([instance("ab", sampled)])[0] == direct(temperature=0.9, top_k=5)
    greedy = {"until": [], "do_sample": False, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    assert lm.generate_until([instance("ab", greedy)])[0] == direct()
    assert all(r.agrees for r in lm.records)  # the base decoder got the same settings


@pytest.mark.parametrize(
    ("gen_kwargs", "match"),
    [
        ({"num_beams": 4}, r"gen_kwargs \['num_beams'\] are not supported"),
        ({"do_sample": True}, "do_sample=True needs temperature > 0"),
        ({"do_sample": False, "temperature": 0.5}, "do_sample=False with temperature=0.5"),
        (
            {"max_gen_toks": 12},
            "block_length=8",
        ),  # not a whole number of blocks: refused, not rounded
        ({"max_gen_toks": 0}, "max_gen_toks=0 must be a positive integer"),
        ({"top_k": 3}, "top_k=3: filters sampling"),
    ],
)
def test_gen_kwargs_that_cannot_be_honoured_are_refused_by_name(lm, gen_kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm.generate_until([instance("ab", {"until": [], **gen_kwargs})])


def test_device_flag_is_honoured_and_a_missing_device_is_an_error(monkeypatch):
    import spiffy.models.loading as loading

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = f"cuda:{count}"  # one past the last CUDA device: absent on every machine
    with pytest.raises(ValueError, match=f"device='{missing}'"):
        SpiffyLM.create_from_arg_string("pretrained=embedded", {"device": missing})
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        loading.check_device("gpu0")
    seen = []
    real = loading.load_model
    monkeypatch.setattr(
        loading, "load_model", lambda path, **kw: seen.append(kw["device"]) or real(path, **kw)
    )
    SpiffyLM.create_from_arg_string("pretrained=embedded", {"device": "cpu"})
    SpiffyLM.create_from_arg_string("pretrained=embedded,device=cpu", {"device": missing})
    assert seen == ["cpu", "cpu"]  # --device, and model_args' device over it


def test_spiffy_numbers_in_lm_eval_results_and_samples():
    """Through lm-eval's own simple_evaluate: per-task nfe/base_nfe/speedup/agreement/tokens/s in `results`,
    each --log_samples record with its request's NFE."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from spiffy.lab.pipeline import TASKS_DIR

    lm = SpiffyLM.create_from_arg_string(
        "pretrained=embedded,gen_length=32,block_length=8,steps=32,graph=chain:3,compare_base=true"
    )
    lm.progress = False
    results = simple_evaluate(
        model=lm,
        tasks=["spiffy_arith"],
        limit=3,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    spiffy_metrics(results, lm)
    numbers = results["results"]["spiffy_arith"]
    nfe = [r.stats.nfe for r in lm.records]
    assert numbers["nfe,none"] == sum(nfe) / 3
    assert numbers["base_nfe,none"] == 32 and numbers["agreement,none"] == 1.0
    assert numbers["speedup_nfe,none"] == 32 * 3 / sum(nfe)
    assert numbers["tokens_per_s,none"] > 0
    samples = results["samples"]["spiffy_arith"]
    assert {s["doc_id"]: s["spiffy"][0]["nfe"] for s in samples} == {
        r.doc_id: r.stats.nfe for r in lm.records
    }
    assert results["config"]["spiffy"]["spiffy_arith"]["nfe"] == numbers["nfe,none"]


def test_calibrated_graph_from_model_args(tmp_path):
    args = "pretrained=embedded,gen_length=32,block_length=8,steps=32,graph=calibrated"
    with pytest.raises(ValueError, match="graph=calibrated needs calibration_task="):
        SpiffyLM.create_from_arg_string(args)
    with pytest.raises(ValueError, match="need graph=calibrated or graph=auto"):
        SpiffyLM.create_from_arg_string("pretrained=embedded,budget=3")
    with pytest.raises(ValueError, match="max_budget= is not read by graph=calibrated"):
        SpiffyLM.create_from_arg_string(args + ",calibration_task=arith,max_budget=4")
    lm = SpiffyLM.create_from_arg_string(
        args + f",calibration_task=arith,budget=3,n_samples=2,graph_root={tmp_path}"
    )
    assert lm.decoder.graph.budget == 3
    assert list(tmp_path.rglob("D3-best-*.json"))  # cached where the runner caches graphs


@pytest.mark.slow
def test_auto_graph_from_model_args(tmp_path):
    lm = SpiffyLM.create_from_arg_string(
        "pretrained=embedded,gen_length=32,block_length=8,steps=32,graph=auto,"
        f"calibration_task=arith,max_budget=2,n_samples=2,graph_root={tmp_path}"
    )
    assert getattr(lm.decoder, "graph", None) is None or lm.decoder.graph.budget <= 2
    assert list(tmp_path.rglob("*.json"))
