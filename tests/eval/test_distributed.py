"""`spiffy.eval.distributed` and SpiffyLM's multi-process contract: ranks from the launcher's environment, one device
per rank, record order, lm-eval's padding requests, and failures/timeouts across two gloo processes (forked)."""

from __future__ import annotations

import multiprocessing
import socket
import time
import traceback
from dataclasses import dataclass

import pytest
from lm_eval.api.instance import Instance

from spiffy.eval import distributed
from spiffy.eval.distributed import RankFailed, Ranks
from tests.eval.test_harness import instance, lm  # noqa: F401 - the fixture


def test_a_plain_process_is_rank_0_of_1(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.launched_ranks() == (0, 1, 0)
    assert distributed.join("cpu") == Ranks(0, 1, 0, "cpu")


def test_ranks_come_from_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched_ranks() == (5, 8, 1)
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match="RANK=8, WORLD_SIZE=8"):
        distributed.launched_ranks()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.launched_ranks()


def test_each_rank_takes_the_gpu_of_its_local_rank():
    assert distributed.rank_device("cpu", 3, 4) == "cpu"
    assert distributed.rank_device("cuda:1", 0, 1) == "cuda:1"  # one process: as configured
    with pytest.raises(ValueError, match="model.device='cuda:1' with 2 processes"):
        distributed.rank_device("cuda:1", 0, 2)
    with pytest.raises(ValueError, match="LOCAL_RANK=0 but this node shows 0 CUDA"):
        distributed.rank_device("cuda", 0, 2)  # this machine has no GPU


def test_bad_timeout_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="eval.dist_timeout_s=0"):
        distributed.join("cpu", timeout_s=0)


@dataclass
class Rec:
    request_id: str


def test_records_of_the_shards_merge_in_single_process_order():
    # lm-eval gives rank r documents r, r + W, ...; two tasks, rank 1 has one document less (padding dropped)
    rank0 = [Rec("a:0:0"), Rec("a:2:0"), Rec("a:4:0"), Rec("b:0:0"), Rec("b:0:1"), Rec("b:2:0")]
    rank1 = [Rec("a:1:0"), Rec("a:3:0"), Rec("b:1:0")]
    merged = [r.request_id for r in distributed.merge_in_request_order([rank0, rank1])]
    assert merged == [
        "a:0:0",
        "a:1:0",
        "a:2:0",
        "a:3:0",
        "a:4:0",
        "b:0:0",
        "b:0:1",
        "b:1:0",
        "b:2:0",
    ]


def test_padding_requests_are_answered_without_decoding_or_recording(lm):  # noqa: F811
    first, last = instance("ab", {"until": []}, doc_id=0), instance("ba", {"until": []}, doc_id=1)
    plain = lm.generate_until([first, last])
    nfe = sum(r.stats.nfe + r.base_stats.nfe for r in lm.records)
    lm.records.clear()
    # lm-eval pads a rank's share by repeating its last request (evaluator: `cloned_reqs.extend([req] * repeats)`)
    padded = lm.generate_until([first, last, last, last])
    assert padded == plain + [plain[1], plain[1]]
    assert [r.request_id for r in lm.records] == ["t:0:0", "t:1:0"]
    assert sum(r.stats.nfe + r.base_stats.nfe for r in lm.records) == nfe


def test_repeats_are_requests_not_padding(lm):  # noqa: F811
    repeated = Instance(
        request_type="generate_until",
        doc={},
        arguments=("ab", {"until": []}),
        idx=0,
        metadata=("t", 0, 2),
    )
    assert repeated.repeats == 2
    out = lm.generate_until([repeated, repeated])
    assert out[0] == out[1] and len(lm.records) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, scenario: str, queue) -> None:
    import os

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch.distributed as dist

    try:
        ranks = distributed.join("cpu", timeout_s=2 if scenario == "rank0_never_arrives" else 30)
        if scenario == "rank1_fails":

            def work():
                if ranks.rank == 1:
                    raise ValueError("bad request 7")
                return ranks.rank

            distributed.checked(ranks, "generate_until", work)
        elif scenario == "rank0_fails_calibration":

            def calibrate():
                raise KeyError("graph.rule")

            distributed.share_from_rank0(ranks, "calibration", calibrate)
        elif scenario == "rank0_never_arrives":
            if ranks.rank == 0:
                time.sleep(8)  # past the 2 s timeout of rank 1's wait
            start = time.monotonic()
            try:
                distributed.share_from_rank0(ranks, "calibration", lambda: "graph")
            except Exception as error:  # noqa: BLE001 - reported with how long the wait took
                queue.put((rank, str(error), time.monotonic() - start))
                return
        elif scenario == "ok":
            value = distributed.share_from_rank0(ranks, "calibration", lambda: {"graph": 3})
            got = distributed.gather(ranks, (ranks.rank, value))
            every = distributed.all_gather(ranks, ranks.rank * 10)
            queue.put((rank, "ok", (got, every)))
            return
        queue.put((rank, "no error", None))
    except BaseException as error:  # noqa: BLE001 - reported to the test
        queue.put((rank, type(error).__name__, str(error) or traceback.format_exc(limit=1)))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a timed-out group may not tear down cleanly
                pass


def run_two(scenario: str, wait_s: float = 60) -> dict[int, tuple[str, object]]:
    context = multiprocessing.get_context("fork")
    queue, port = context.Queue(), _free_port()
    procs = [context.Process(target=_worker, args=(r, port, scenario, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, kind, detail = queue.get(timeout=wait_s)
        out[rank] = (kind, detail)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return out


def test_collectives_across_two_processes():
    out = run_two("ok")
    got, every = out[0][1]
    assert got == [(0, {"graph": 3}), (1, {"graph": 3})] and every == [0, 10]
    assert out[1][1] == (None, [0, 10])  # gather: only rank 0 receives


def test_a_failure_on_one_rank_fails_every_rank_with_its_error():
    out = run_two("rank1_fails")
    assert out[1][:2] == ("ValueError", "bad request 7")
    assert out[0][0] == RankFailed.__name__
    assert "rank 1 of 2 failed during generate_until: ValueError: bad request 7" in out[0][1]


def test_a_calibration_failure_on_rank_0_reaches_the_others():
    out = run_two("rank0_fails_calibration")
    assert out[0][0] == "KeyError"
    assert out[1][0] == RankFailed.__name__
    assert "rank 0 of 2 failed during calibration: KeyError: 'graph.rule'" in out[1][1]


def test_a_rank_that_never_arrives_times_out_instead_of_hanging():
    message, waited = run_two("rank0_never_arrives")[1]
    assert waited < 7, waited  # the 2 s timeout, not rank 0's 8 s
    assert message.startswith(
        "rank 1 of 2: calibration did not complete on every rank within 2 s (eval.dist_timeout_s)"
    ), message
