"""The champion as a chat endpoint: `mlflow models serve` answers OpenAI-shaped chat requests
through the model's chat template, greedy by default, and the logged folder is plain transformers."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from qlora_pipeline.serving import MODEL_SUBDIR, TOKENIZER_SUBDIR, ask, chat_request, reply_text

from ..conftest import restore_mlflow_uris
from .conftest import BIN, TINY_PARAMS, free_port, stop, wait_http

pytestmark = pytest.mark.integration

MODEL = TINY_PARAMS["register.model_name"]
PROMPT = "What is the capital of France?"
# The README's request, word for word but for the port.
README_CURL = (
    "curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' "
    """-d '{{"messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 64}}'"""
)


@pytest.fixture(scope="module")
def endpoint(pipeline, tmp_path_factory):
    """`mlflow models serve` on the champion, as the README starts it, against the test server."""
    project, env, _ = pipeline
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            try:
                wait_http(f"http://127.0.0.1:{port}/health", 180, proc)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from None
            print(f"mlflow models serve answered /health after {time.monotonic() - started:.1f}s")
            yield f"http://127.0.0.1:{port}", port
        finally:
            stop(proc)


@pytest.fixture(scope="module")
def logged(pipeline, mlflow_server, tmp_path_factory):
    """The champion's logged model folder, downloaded as a user would."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    try:
        return Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path_factory.mktemp("champion"))))
    finally:  # set_*_uri export MLFLOW_*_URI: later tests' stage processes must not inherit this server
        restore_mlflow_uris()


def plain_greedy(logged, messages, max_new_tokens: int, dtype=torch.bfloat16) -> str:
    """What plain transformers generates from the logged folder, through the tokenizer's template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(logged / TOKENIZER_SUBDIR)
    model = AutoModelForCausalLM.from_pretrained(logged / MODEL_SUBDIR, dtype=dtype)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)  # the generation_config's default: greedy
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_request_is_answered_greedily_through_the_chat_template(endpoint, logged):
    url, port = endpoint
    body = chat_request(PROMPT, max_tokens=8)
    first, second = ask(url, body), ask(url, body)

    assert first["object"] == "chat.completion"
    message = first["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert reply_text(first) == reply_text(second)  # greedy: identical requests, identical replies
    assert PROMPT not in reply_text(first) and "<|assistant|>" not in reply_text(first)
    usage = first["usage"]
    assert 0 < usage["completion_tokens"] <= 8
    assert first["choices"][0]["finish_reason"] == "length" or usage["completion_tokens"] < 8
    short = ask(url, chat_request(PROMPT, max_tokens=3))
    assert short["usage"]["completion_tokens"] <= 3

    # Exactly what plain transformers generates greedily from the logged folder through the
    # tokenizer's chat template (the server runs the flavor's dtype, bf16 here).
    assert reply_text(first).strip() == plain_greedy(logged, body["messages"], 8).strip()

    # The README's curl command.
    out = subprocess.run(["bash", "-c", README_CURL.format(port=port)], capture_output=True, text=True, timeout=120, check=True)
    (readme,) = json.loads(out.stdout)  # the scoring server wraps the completion in a list
    assert isinstance(reply_text(readme), str) and 0 < readme["usage"]["completion_tokens"] <= 64


def test_decoding_is_greedy_unless_the_request_sets_do_sample(endpoint):
    url, _ = endpoint
    greedy = reply_text(ask(url, chat_request(PROMPT, max_tokens=8)))
    # OpenAI clients send temperature 0 for greedy; it must not fail.
    assert reply_text(ask(url, chat_request(PROMPT, max_tokens=8, temperature=0.0))) == greedy
    # MLflow passes temperature to generate() as is and never turns it into do_sample, so a
    # temperature alone keeps the default (documented in serving.py and the README).
    assert reply_text(ask(url, chat_request(PROMPT, max_tokens=8, temperature=0.9))) == greedy
    sampled = {reply_text(ask(url, chat_request(PROMPT, max_tokens=16, temperature=1.5, do_sample=True))) for _ in range(3)}
    assert len(sampled) > 1  # 16 tokens from a random 512-token model: a repeat is vanishingly rare


def test_logged_folder_is_plain_transformers(logged, mlflow_server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.core.tiny import TINY_CHAT_TEMPLATE
    from qlora_pipeline.stages.register import load_champion

    tokenizer = AutoTokenizer.from_pretrained(logged / TOKENIZER_SUBDIR)
    model = AutoModelForCausalLM.from_pretrained(logged / MODEL_SUBDIR)
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert model.generation_config.do_sample is False
    assert len(plain_greedy(logged, [{"role": "user", "content": PROMPT}], 4, dtype=torch.float32)) > 0

    # The register stage scores the champion from the same artifact (load_champion), on the
    # server this test sets (the autouse fixture resets the URIs between tests).
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    champion = load_champion(MODEL, torch.float32)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(champion(ids).logits, model.to(torch.float32)(ids).logits)
