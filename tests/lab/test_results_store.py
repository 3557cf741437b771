"""spiffy.lab.results / spiffy.lab.claims: atomic row files, the JSONL compatibility path, job keys, claims."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import platform
import stat
import time
from pathlib import Path

import pytest

from spiffy.lab import results as store
from spiffy.lab.claims import Claim, claim_path, try_claim
from spiffy.lab.report import experiment_table, load_frame

ROOT = Path(__file__).resolve().parents[2]


def config(decoder="spiffy", speculate=True, budget=3, rule="degree1", threads=1):
    return {
        "decoder": {"name": decoder, "speculate": speculate},
        "graph": {"budget": budget, "rule": rule},
        "task": {"name": "arith"},
        "eval": {"compare_base": True, "threads": threads, "progress": False},
        "tracking": {"mode": "offline"},
        "force": False,
    }


def row(key, experiment="exp", value=1.0):
    return {"job_key": key, "experiment": experiment, "config": {}, "metrics": {"accuracy": value}}


def test_job_key_ignores_what_cannot_change_a_result():
    base = store.job_key(config())
    assert (
        store.job_key(config(threads=0)) == base
    )  # threads, progress, tracking, force: not the result
    assert store.job_key({**config(), "force": True, "tracking": {"mode": "online"}}) == base
    assert store.job_key(config(budget=5)) != base
    assert store.job_key(config(rule="greedy")) != base


def test_batch_size_is_an_axis_of_the_job_key():
    """A batch-size sweep runs every point; batch-of-one keys are those of rows written before batching."""
    base = config()
    batched = {**base, "eval": {**base["eval"], "batch_size": 16}}
    one = {**base, "eval": {**base["eval"], "batch_size": 1}}
    assert store.job_key(one) == store.job_key(base)
    assert store.job_key(batched) != store.job_key(base)


def test_vanilla_jobs_of_a_budget_sweep_share_one_key():
    keys = {
        store.job_key(config("vanilla", False, b, r))
        for b in (3, 5, 8)
        for r in ("degree1", "greedy")
    }
    assert len(keys) == 1
    # Spiffy at D = 0 drafts nothing either: its graph settings do not matter, its decoder name does
    assert store.job_key(config(budget=0)) == store.job_key(config(budget=0, rule="greedy"))
    assert store.job_key(config(budget=0)) not in keys


def test_row_files_round_trip_replace_and_merge_with_jsonl(tmp_path):
    path = store.write_row(tmp_path, row("k1", value=0.1))
    assert path == tmp_path / "exp" / "k1.json"
    assert store.finished(tmp_path, "exp", "k1") == (row("k1", value=0.1), path)
    store.write_row(tmp_path, row("k1", value=0.2))  # force=true rerun: the row file is replaced
    assert store.finished(tmp_path, "exp", "k1")[0]["metrics"]["accuracy"] == 0.2
    store.append_row(tmp_path / "exp.jsonl", row("k1", value=0.0))  # older format, same key
    store.append_row(tmp_path / "exp.jsonl", row("k2", value=0.5))
    assert store.finished(tmp_path, "exp", "k2") == (row("k2", value=0.5), tmp_path / "exp.jsonl")
    assert store.finished(tmp_path, "exp", "k3") is None
    merged = {r["job_key"]: r["metrics"]["accuracy"] for r in store.read_rows(tmp_path)}
    assert merged == {"k1": 0.2, "k2": 0.5}  # the row file is newer than the JSONL row
    assert [r["job_key"] for r in store.read_rows(tmp_path / "exp")] == ["k1"]
    with pytest.raises(ValueError, match="experiment"):
        store.write_row(tmp_path, {"job_key": "k"})
    with pytest.raises(FileNotFoundError, match="no result store"):
        store.read_rows(tmp_path / "missing")


def test_a_torn_jsonl_line_is_repaired_and_never_swallows_the_next_row(tmp_path):
    path = tmp_path / "exp.jsonl"
    store.append_row(path, row("k1"))
    with open(path, "a") as f:
        f.write('{"job_key": "k2", "experi')  # a writer killed mid-line: no newline
    store.append_row(path, row("k3"))
    assert [r["job_key"] for r in store.read_rows(path)] == ["k1", "k3"]
    assert path.read_text().count("\n") == 2
    assert (tmp_path / "exp.jsonl.torn").read_text() == '{"job_key": "k2", "experi\n'


def test_a_corrupt_row_file_is_reported_with_its_path_and_skipped(tmp_path, capsys):
    """One truncated row must not stop the store: readers skip it, naming it; its job counts as not done."""
    store.write_row(tmp_path, row("good"))
    bad = store.row_path(tmp_path, "exp", "bad")
    bad.write_text('{"job_key": "bad", "experim')  # truncated
    assert [r["job_key"] for r in store.read_rows(tmp_path)] == ["good"]
    assert f"{bad}: not a result row" in capsys.readouterr().err
    assert store.finished(tmp_path, "exp", "bad") is None
    assert f"{bad}: not a result row" in capsys.readouterr().err
    assert store.finished(tmp_path, "exp", "good")[0]["job_key"] == "good"


def test_a_valid_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "exp.jsonl"
    path.write_text('{"job_key": "a"}\n{"job_key": "b"}')
    store.append_row(path, {"job_key": "c"})
    assert [r["job_key"] for r in store.read_rows(path)] == ["a", "b", "c"]
    assert not (tmp_path / "exp.jsonl.torn").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_rows_and_graphs_honour_the_umask(tmp_path, umask):
    from spiffy.graph.draft_graph import DraftGraph

    old = os.umask(umask)
    try:
        path = store.write_row(tmp_path, row("k"))
        graph_path = tmp_path / "g.json"
        DraftGraph.from_formulas([[(1, 1)]]).save(graph_path)
        jsonl = tmp_path / "exp.jsonl"
        store.append_row(jsonl, row("k"))
    finally:
        os.umask(old)
    for written in (path, graph_path, jsonl):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written


def test_disk_errors_name_the_path(tmp_path, monkeypatch):
    import spiffy.graph.files as files

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write .*k\.json.*No space left on device") as caught:
        store.write_row(tmp_path, row("k"))
    assert caught.value.errno == errno.ENOSPC
    assert list((tmp_path / "exp").iterdir()) == []  # no temporary file left behind


def test_an_unwritable_store_is_found_before_the_evaluation(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=f"the result store '{blocker}/exp' is not writable"):
        store.check_writable(blocker / "exp")
    store.check_writable(tmp_path / "ok")
    assert list((tmp_path / "ok").iterdir()) == []  # the probe is gone


def test_committed_jsonl_stores_still_give_the_committed_tables():
    frame = load_frame(ROOT / "results" / "runs")
    experiments = sorted(frame.experiment.dropna().unique())
    assert experiments
    for name in experiments:
        committed = ROOT / "results" / "tables" / f"{name}.csv"
        table = experiment_table(frame, name, levels=True)
        assert table.to_csv(index=False) == committed.read_text(), name


def _write_rows(args):
    folder, writer, n, shared = args
    for i in range(n):
        key = f"shared{i}" if shared else f"w{writer}-{i}"
        store.write_row(folder, {**row(key), "writer": writer, "pad": "x" * 20000})
    return writer


def _concurrent_writers(tmp_path, writers, n):
    """`writers` processes write n rows each (plus n keys every writer writes) while this process reads."""
    jobs = [(tmp_path, w, n, False) for w in range(writers)]
    jobs += [(tmp_path, w, n, True) for w in range(writers)]
    seen_counts = []
    with mp.get_context("spawn").Pool(writers) as pool:
        pending = pool.map_async(_write_rows, jobs)
        while not pending.ready():
            if (tmp_path / "exp").exists():
                rows = store.read_rows(tmp_path / "exp")  # raises on any torn row file
                assert all(r["pad"] == "x" * 20000 for r in rows)
                seen_counts.append(len(rows))
        pending.get()
    rows = store.read_rows(tmp_path)
    keys = sorted(r["job_key"] for r in rows)
    expected = sorted(
        [f"w{w}-{i}" for w in range(writers) for i in range(n)] + [f"shared{i}" for i in range(n)]
    )
    assert keys == expected  # every row exactly once
    assert seen_counts == sorted(seen_counts)  # a reader never loses a row it saw
    assert not [p for p in (tmp_path / "exp").iterdir() if p.name.endswith(".tmp")]


def test_concurrent_writers_land_every_row_once(tmp_path):
    _concurrent_writers(tmp_path, writers=3, n=15)


@pytest.mark.slow
def test_many_concurrent_writers_land_every_row_once_and_readers_never_see_a_torn_row(tmp_path):
    _concurrent_writers(tmp_path, writers=12, n=60)


def _claim(args):
    folder, key, barrier = args
    barrier.wait()  # every process tries at once
    held = try_claim(folder, key)
    barrier.wait()  # and nobody releases before all have tried
    if isinstance(held, Claim):
        held.release()
        return "won"
    return "lost"


def test_identical_concurrent_jobs_are_claimed_once(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(6) as pool:
        barrier = manager.Barrier(6)
        outcomes = pool.map(_claim, [(tmp_path, "k", barrier)] * 6)
    assert sorted(outcomes) == ["lost"] * 5 + ["won"]
    assert not claim_path(tmp_path, "k").exists()  # released


def test_claims_are_released_and_stale_claims_taken_over(tmp_path):
    held = try_claim(tmp_path, "k")
    assert isinstance(held, Claim)
    other = try_claim(tmp_path, "k")
    assert other["pid"] == os.getpid() and other["path"].endswith("k.json")
    held.release()
    assert isinstance(again := try_claim(tmp_path, "k"), Claim)
    again.release()
    path = claim_path(tmp_path, "k")
    # a killed job on this host: its pid is gone
    dead = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    path.write_text(json.dumps({"host": platform.node(), "pid": dead.pid, "token": "t"}))
    assert isinstance(taken := try_claim(tmp_path, "k"), Claim)
    taken.release()
    # another host: live while its heartbeat is recent, stale once it is older than stale_after_s
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t"}))
    assert not isinstance(try_claim(tmp_path, "k", stale_after_s=60), Claim)
    old = time.time() - 120
    os.utime(path, (old, old))
    assert isinstance(taken := try_claim(tmp_path, "k", stale_after_s=60), Claim)
    taken.release()


def test_environment_names_device_threads_and_dtype():
    env = store.environment("cpu", "float32")
    assert env["dtype"] == "float32" and env["torch_threads"] >= 1 and env["device_name"]
