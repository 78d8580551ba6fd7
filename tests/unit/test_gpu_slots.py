"""The GPU concurrency limit counts GPUs: a training on N ranks holds N slots of its host's limit."""

from __future__ import annotations

import pytest

from flows.slots import slots_for


@pytest.mark.parametrize(
    "stage, num_gpus, host, expected",
    [("train", "auto", 4, 4), ("train", 2, 4, 2), ("train", 1, 1, 1), ("evaluate", 4, 4, 1), ("register", "auto", 8, 1), ("train", 2, 0, 1)],
)
def test_a_stage_holds_one_slot_per_gpu_it_trains_on(stage, num_gpus, host, expected):
    assert slots_for(stage, num_gpus, host) == expected


def test_more_gpus_than_the_worker_has_fails_before_waiting_forever():
    with pytest.raises(ValueError, match="train.num_gpus is 4 but this worker sees 2 GPU"):
        slots_for("train", 4, 2)
