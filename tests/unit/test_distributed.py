"""Which rank failed, as the launching process tells it from what the ranks left behind."""

from __future__ import annotations

import json

import pytest

from qlora_pipeline import distributed


def leave(folder, monkeypatch, rank: int, exc: BaseException) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(distributed.RANK_ERRORS_ENV, str(folder))
    distributed.record_failure(exc)


GLOO_RESET = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234: Connection reset by peer")


def test_a_killed_rank_is_named_not_the_rank_that_saw_its_connection_drop(tmp_path, monkeypatch):
    leave(tmp_path, monkeypatch, 0, GLOO_RESET)  # rank 1 was SIGKILLed: it left nothing
    message = distributed.failure_message(tmp_path, 2, 1)
    assert message.startswith("rank 1 of 2 ended without an error of its own")
    assert json.loads((tmp_path / "rank0.json").read_text())["stopped"] is True


def test_a_rank_that_failed_on_its_own_is_named_with_its_message(tmp_path, monkeypatch):
    leave(tmp_path, monkeypatch, 1, ValueError("bad batch"))
    leave(tmp_path, monkeypatch, 0, KeyboardInterrupt("signal 15"))  # stopped by torchrun afterwards
    assert distributed.failure_message(tmp_path, 2, 1) == "rank 1 of 2 failed: ValueError: bad batch"


@pytest.mark.parametrize("exc, lost", [(GLOO_RESET, True), (RuntimeError("CUDA out of memory"), False)])
def test_only_a_broken_collective_counts_as_a_lost_peer(exc, lost):
    assert distributed.lost_peer(exc) is lost
