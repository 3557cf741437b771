"""The native LLaDA model against the reference logits, and its cache / mask / position features."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

import spiffy
from spiffy.models.kv import KVCache
from tests.conftest import tiny_random_model


def test_logits_match_reference_within_1e9(fixture_model, llada_expected):
    for case in llada_expected["logits"]:
        ids = torch.tensor([case["input_ids"]])
        ref = torch.tensor(case["logits"], dtype=torch.float64)
        out = fixture_model(ids).logits[0, :, : ref.shape[1]]
        assert (out - ref).abs().max().item() < 1e-9


def test_auto_model_loads_without_remote_code(llada_fixture_dir):
    model = AutoModel.from_pretrained(llada_fixture_dir, dtype=torch.float64)
    assert type(model).__name__ == "LLaDAModelLM"


def test_spec_reads_ids_from_config(fixture_model, llada_expected):
    spec = spiffy.model_spec(fixture_model)
    assert (spec.mask_id, spec.eos_id, spec.pad_id) == (
        llada_expected["mask_id"],
        llada_expected["eos_id"],
        llada_expected["pad_id"],
    )


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        spiffy.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        spiffy.load_model(tmp_path)


def test_wrong_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        spiffy.load_model(tmp_path)


def test_positions_beyond_max_length_are_rejected():
    model = tiny_random_model()
    with pytest.raises(ValueError, match="max_sequence_length"):
        model(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.arange(126, 130))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prefix_and_dual_cache_reproduce_the_full_forward(kv_heads):
    model = tiny_random_model(kv_heads=kv_heads)
    ids = torch.randint(0, 20, (1, 24))
    full = model(ids, return_kv=True)
    s, e = 8, 16
    prefix = KVCache(full.present, insert_at=0).slice_positions(s)
    out = model(ids[:, s:], position_ids=torch.arange(s, 24), kv_cache=prefix).logits
    torch.testing.assert_close(out, full.logits[:, s:], rtol=0, atol=1e-12)
    dual = KVCache(full.present, insert_at=s, replace=e - s)
    out = model(ids[:, s:e], position_ids=torch.arange(s, e), kv_cache=dual).logits
    torch.testing.assert_close(out, full.logits[:, s:e], rtol=0, atol=1e-12)


def test_mask_and_positions_equal_removing_the_hidden_keys():
    model = tiny_random_model()
    ids = torch.randint(0, 20, (1, 20))
    keep = torch.ones(20, dtype=torch.bool)
    keep[5:9] = False
    mask = keep[None, None, :].expand(1, 20, 20)
    masked = model(ids, attention_mask=mask).logits[0, keep]
    pos = torch.arange(20)[keep]
    removed = model(ids[:, keep], position_ids=pos).logits[0]
    torch.testing.assert_close(masked, removed, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_in_lower_precision(llada_fixture_dir, dtype):
    model = spiffy.load_model(llada_fixture_dir, dtype=dtype)
    out = model(torch.tensor([[1, 2, 3, 127]])).logits
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_logits_at_projects_only_the_requested_rows():
    model = tiny_random_model()
    ids = torch.randint(0, 20, (3, 24))
    full = model(ids).logits
    # The LM head over 8 (or 3) rows and over 24 is a different GEMM shape: BLAS picks its kernel by shape and
    # CPU, so the last bits may differ (4e-16 seen on an AVX2 EPYC). Equal up to float64 rounding, not bitwise.
    torch.testing.assert_close(
        model(ids, logits_at=slice(8, 16)).logits, full[:, 8:16], rtol=0, atol=1e-12
    )
    rows = torch.tensor([0, 5, 23])
    torch.testing.assert_close(model(ids, logits_at=rows).logits, full[:, rows], rtol=0, atol=1e-12)
    calls = []
    head = model.model.transformer["ff_out"]
    handle = head.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    model(ids, logits_at=slice(8, 16))
    handle.remove()
    assert calls == [8]  # the LM head saw 8 rows, not 24


def test_gqa_without_sdpa_support_gives_the_same_logits(monkeypatch):
    from spiffy.models import kv

    model = tiny_random_model(kv_heads=2)
    ids = torch.randint(0, 20, (2, 16))
    with_gqa = model(ids).logits
    monkeypatch.setattr(kv, "sdpa_has_gqa", lambda: False)
    torch.testing.assert_close(model(ids).logits, with_gqa, rtol=0, atol=1e-12)
