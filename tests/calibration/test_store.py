"""The graph store: its key covers every setting, cached files are checked against it, writes are atomic, and
malformed files give clear errors naming the path."""

from __future__ import annotations

import copy
import json
import os
import threading
from dataclasses import replace

import pytest

import spiffy
from spiffy.calibration.store import load_or_calibrate
from spiffy.calibration.trajectories import Trajectories, record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.graph.draft_graph import DraftGraph
from spiffy.graph.files import atomic_write_text
from spiffy.lab.schema import GraphConfig
from tests.calibration.test_calibrate import prompts

CFG = GenerationConfig(gen_length=16, block_length=8, steps=16)
KW = dict(
    model_name="fixture", task="random", n_samples=3, budget=4, rule="degree1", progress=False
)


class Calls:
    """A prompt source that counts how often the store asked for prompts (i.e. recorded trajectories)."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return prompts(3)


def calibrate(model, root, cfg=CFG, calls=None, **overrides):
    return load_or_calibrate(model, cfg, calls or Calls(), root=root, **{**KW, **overrides})


@pytest.mark.parametrize(
    ("decoder", "overrides"),
    [
        (dict(temperature=0.7), {}),
        (dict(remasking="random"), {}),
        (dict(logits_eos_inf=True), {}),
        (dict(confidence_eos_eot_inf=True), {}),
        (dict(steps=8), {}),
        (dict(block_length=4), {}),
        (dict(rule="fixed_k", k=2, steps=None), {}),
        (dict(cache="dual"), {}),
        (dict(softmax_dtype="model"), {}),
        ({}, dict(draft_noise="keyed")),
        ({}, dict(horizon=5)),
        ({}, dict(seed=1)),
        ({}, dict(n_samples=4)),
        ({}, dict(task="other")),
        ({}, dict(model_name="other")),
        ({}, dict(dtype="float32")),
    ],
)
def test_every_trajectory_setting_misses_the_cache(fixture_model, tmp_path, decoder, overrides):
    calls = Calls()
    first = calibrate(fixture_model, tmp_path, calls=calls)
    assert calibrate(fixture_model, tmp_path, calls=calls) == first and calls.n == 1  # a hit
    model = fixture_model
    if overrides.pop("dtype", None):
        model = copy.deepcopy(fixture_model).float()
    again = calibrate(model, tmp_path, replace(CFG, **decoder), calls, **overrides)
    assert calls.n == 2, "changing the setting must record new trajectories"
    assert again.provenance["key"] != first.provenance["key"]


@pytest.mark.parametrize("overrides", [dict(budget=3), dict(rule="total"), dict(cross_block=True)])
def test_selection_settings_reuse_trajectories_but_not_the_graph(
    fixture_model, tmp_path, overrides
):
    calls = Calls()
    first = calibrate(fixture_model, tmp_path, calls=calls)
    other = calibrate(fixture_model, tmp_path, calls=calls, **overrides)
    assert calls.n == 1 and other.provenance["key"] != first.provenance["key"]
    for name, value in overrides.items():
        assert other.provenance[{"rule": "selection"}.get(name, name)] == value
    assert len(list(tmp_path.rglob("D*.json"))) == 2


def graph_file(root):
    (path,) = root.rglob("D4-*.json")
    return path


@pytest.mark.parametrize(
    ("corrupt", "why"),
    [
        (lambda g, p: p.write_bytes(os.urandom(300) + b"\xff"), "not UTF-8"),
        (lambda g, p: p.write_text(g.to_json()[:-40]), "not valid JSON"),
        ("copy D3", "budget=3, expected 4"),  # the D3 graph copied over the D4 file
        (lambda g, p: p.write_text(replace(g, selection="greedy").to_json()), "selection='greedy'"),
        (
            lambda g, p: p.write_text(
                DraftGraph((((100, 1),),), ((-1,),), 4, "degree1", g.provenance).to_json()
            ),
            "position rank beyond block_length=8",
        ),
        (
            lambda g, p: p.write_text(DraftGraph((), (), 4, "degree1", g.provenance).to_json()),
            "no nodes although calibration saw",
        ),
        (
            lambda g, p: p.write_text(
                replace(g, provenance={**g.provenance, "draft_noise": "keyed"}).to_json()
            ),
            "provenance draft_noise='keyed', expected 'none'",
        ),
    ],
)
def test_a_cached_graph_that_does_not_match_its_key_is_recalibrated(
    fixture_model, tmp_path, corrupt, why
):
    good = calibrate(fixture_model, tmp_path)
    path = graph_file(tmp_path)
    if corrupt == "copy D3":
        path.write_text(calibrate(fixture_model, tmp_path, budget=3).to_json())
    else:
        corrupt(good, path)
    with pytest.warns(UserWarning, match=why) as record:
        again = calibrate(fixture_model, tmp_path)
    assert str(path) in str(record[0].message)
    assert again == good and DraftGraph.load(path) == good  # recalibrated and rewritten


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "is not UTF-8 text"),
        (b'{"format": "spiffy.trajectories", "version": 2, "horiz', "is not valid JSON"),
        (b'{"format": "spiffy.trajectories", "horizon": 12, "blocks": []}', "version=None"),
        (
            b'{"format": "spiffy.trajectories", "version": 2, "horizon": 4, "blocks": [{}]}',
            "malformed",
        ),
        (b"[1, 2]", "not a spiffy trajectories file"),
    ],
)
def test_malformed_trajectories_name_the_path(tmp_path, payload, match):
    path = tmp_path / "t.json"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=match) as err:
        Trajectories.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="trajectories file"):
        Trajectories.load(tmp_path / "missing.json")


def test_corrupt_cached_trajectories_are_recorded_again(fixture_model, tmp_path):
    calls = Calls()
    calibrate(fixture_model, tmp_path, calls=calls)
    (traj,) = tmp_path.rglob("trajectories/*.json")
    traj.write_bytes(traj.read_bytes()[:100])
    with pytest.warns(UserWarning, match="is not valid JSON"):
        calibrate(fixture_model, tmp_path, calls=calls, budget=3)
    assert calls.n == 2 and Trajectories.load(traj).blocks


def test_random_bytes_graph_file_names_the_path(tmp_path):
    path = tmp_path / "g.json"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="g.json.*not UTF-8"):
        DraftGraph.load(path)
    path.write_text('{"format": "spiffy.draft_graph", "version": 1, "budget": 3, "nodes": [[[1')
    with pytest.raises(ValueError, match="g.json.*not valid JSON"):
        spiffy.Speculation(str(path))


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "g.json"
    old = spiffy.chain(3)
    old.save(path)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        spiffy.chain(8).save(path)
    assert DraftGraph.load(path) == old and [p.name for p in tmp_path.iterdir()] == ["g.json"]


def torn_reads(path, write) -> tuple[int, int]:
    """(reads, torn reads) of a reader polling `path` while `write` rewrites it 100 times."""
    texts = [json.dumps({"n": n, "pad": "x" * (200_000 + 30_000 * (n % 5))}) for n in range(100)]
    write(path, texts[0])
    reads, torn, done = [0], [0], threading.Event()

    def read():
        while not done.is_set():
            reads[0] += 1
            try:
                json.loads(path.read_text())
            except ValueError:
                torn[0] += 1

    reader = threading.Thread(target=read)
    reader.start()
    for text in texts:
        write(path, text)
    done.set()
    reader.join()
    return reads[0], torn[0]


def test_a_concurrent_reader_never_sees_a_torn_file(tmp_path):
    reads, torn = torn_reads(tmp_path / "t.json", atomic_write_text)
    assert reads > 0 and torn == 0 and not list(tmp_path.glob(".*tmp"))


def test_recorder_rejects_a_bad_horizon(fixture_model):
    with pytest.raises(ValueError, match="horizon=0"):
        record_trajectories(fixture_model, CFG, prompts(1), horizon=0, progress=False)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(horizon=0), "graph.horizon=0 must be a positive integer"),
        (dict(source="fig2", budget=3), "graph.budget=3 with graph.source='fig2'.*5 nodes"),
        (dict(source="topk", budget=5), "graph.budget=5 with graph.source='topk'"),
        (dict(budget=20), "graph.horizon=16 < graph.budget=20"),
    ],
)
def test_graph_settings_that_would_mislabel_a_row_are_rejected(settings, match):
    with pytest.raises(ValueError, match=match):
        GraphConfig(**settings)
    GraphConfig(source="fig2", budget=5)
    GraphConfig(source="fig2", budget=0)
    GraphConfig(budget=20, horizon=20)
    GraphConfig(budget=20, rule="greedy")
