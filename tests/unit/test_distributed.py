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


def test_the_ranks_follow_the_launching_process_choice(monkeypatch):
    from qlora_pipeline.config import TrainConfig

    cfg = TrainConfig(num_gpus=2, distributed="auto")
    assert distributed.strategy(cfg, 1) == "single"
    assert distributed.strategy(cfg, 2, fits_one_gpu=lambda: False) == "ddp"  # CPU ranks: data-parallel
    for key, value in {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", distributed.STRATEGY_ENV: "fsdp"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.strategy(cfg, 2) == "fsdp"


def test_fsdp_without_a_gpu_is_refused_with_the_fix():
    from qlora_pipeline.config import TrainConfig
    from qlora_pipeline.errors import ConfigError

    for ranks in (1, 2):  # num_gpus auto on a CPU machine is one rank: still refused, not run unsharded
        with pytest.raises(ConfigError, match="FSDP runs on CUDA GPUs only.*set train.distributed to ddp or auto"):
            distributed.strategy(TrainConfig(num_gpus="auto" if ranks == 1 else 2, distributed="fsdp"), ranks)


@pytest.mark.parametrize(
    "shape, bits, fits_gib",
    [
        # Llama-3.1-8B, NF4 + double quantization, seq 2048: about 7 GiB -> one 16 GiB card is enough
        (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=128256), 4.127, (8, 16)),
        # Llama-3.1-70B: about 40 GiB of 4-bit weights -> not a 24 GiB card, an 80 GiB one
        (dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
              num_key_value_heads=8, vocab_size=128256), 4.127, (24, 80)),
    ],
)
def test_the_leanest_plan_says_which_cards_a_model_needs_sharding_on(shape, bits, fits_gib):
    from types import SimpleNamespace

    from qlora_pipeline.core.fast.memory import ModelDims, leanest_plan_bytes

    dims = ModelDims.from_config(SimpleNamespace(head_dim=128, **shape))
    need_gib = leanest_plan_bytes(dims, 2048, weight_bits=bits, tied=False, lora_r=16) / 2**30
    too_small, enough = fits_gib
    assert too_small < need_gib < enough


def test_fsdp_training_arguments_shard_each_decoder_layer_and_checkpoint_the_whole_adapter(tmp_path):
    from qlora_pipeline.config import TrainConfig
    from qlora_pipeline.core.train import training_arguments

    args = training_arguments(TrainConfig(), tmp_path, False, False, fsdp_layer_class="LlamaDecoderLayer")
    assert args.fsdp_config["version"] == 2
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"  # every checkpoint: the whole adapter, safetensors
    assert not training_arguments(TrainConfig(), tmp_path, False, False).fsdp
