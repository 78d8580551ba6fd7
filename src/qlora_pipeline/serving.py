"""The registered model as a chat endpoint: what is logged with it, and how to ask it.

    # venv active (uvicorn on PATH), MLFLOW_TRACKING_URI pointing at the registry
    mlflow models serve -m models:/qlora-demo@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
      -d '{"messages": [{"role": "user", "content": "What is LoRA?"}], "max_tokens": 64}'

MLflow's transformers flavor with task `llm/v1/chat` renders `messages` through the tokenizer's
chat template, maps `max_tokens` to `max_new_tokens`, passes the other request fields
(`temperature`, `top_p`, `top_k`, `stop`) to the text-generation pipeline and returns only the new
text, OpenAI-shaped. It sets no decoding default of its own, and nothing in it turns a temperature
into `do_sample`; the transformers pipeline then samples (do_sample=True, temperature 0.7) unless
the model's generation_config says otherwise. So the model is logged with do_sample=False in its
generation_config (greedy: identical requests get identical replies, also for plain transformers),
and its signature gets a `do_sample` parameter: `{"do_sample": true, "temperature": 0.8}` samples.
A temperature alone stays greedy (`"temperature": 0`, as OpenAI clients send, works).
"""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

CHAT_TASK = "llm/v1/chat"
# The one place the endpoint's decoding default is decided; a request overrides it.
DO_SAMPLE_DEFAULT = False
# Where mlflow.transformers puts the weights and the tokenizer inside a logged model.
MODEL_SUBDIR, TOKENIZER_SUBDIR = "model", "components/tokenizer"
_PLACEHOLDER = "\x00"
_PROBE = [{"role": "user", "content": "Hi"}]


def fallback_chat_template() -> str:
    """A chat template that renders each user turn as the alpaca prompt training used without one."""
    from qlora_pipeline.core.data.encode import alpaca_prompt

    # Built from alpaca_prompt itself, so the two cannot drift; JSON strings are Jinja literals.
    before, after = (json.dumps(part) for part in alpaca_prompt(_PLACEHOLDER).split(_PLACEHOLDER))
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ " + before + " }}{{ message['content'] }}{{ " + after + " }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    )


def chat_tokenizer(tokenizer, chat_template: str | None):
    """A copy of the tokenizer that carries the chat template training used.

    That is data.chat_template when set, else the tokenizer's own, else the alpaca prompt that
    instruction records were trained with (a model without a template still answers chats).
    """
    from qlora_pipeline.core.data.tokens import resolve_chat_template

    tok = copy.deepcopy(tokenizer)
    if chat_template:
        tok.chat_template = chat_template
    elif resolve_chat_template(tok, None) is None:
        tok.chat_template = fallback_chat_template()
    return tok


def chat_model_config(tokenizer) -> dict[str, Any]:
    """Pipeline arguments logged with the model: BOS exactly once, as in training.

    The flavor renders the template to text and tokenizes it with add_special_tokens=True, so a
    template that writes BOS itself would get a second one from a tokenizer that adds BOS.
    """
    rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token and rendered.startswith(tokenizer.bos_token):
        return {"add_special_tokens": False}
    return {}


@contextmanager
def greedy_by_default(model) -> Iterator[None]:
    """While logging, the model's generation_config says do_sample=DO_SAMPLE_DEFAULT."""
    original = model.generation_config
    config = copy.deepcopy(original)
    config.do_sample = DO_SAMPLE_DEFAULT
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = original


def chat_signature(flavor_signature):
    """The llm/v1/chat signature MLflow sets, plus a `do_sample` request parameter.

    MLflow refuses a signature of our own for llm/v1/chat at log time (it must equal its own), so
    this one is set on the logged model afterwards (mlflow.models.set_signature).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    params = ParamSchema([ParamSpec("do_sample", "boolean", DO_SAMPLE_DEFAULT)])
    return ModelSignature(inputs=flavor_signature.inputs, outputs=flavor_signature.outputs, params=params)


def chat_request(
    messages: str | list[dict[str, str]],
    max_tokens: int | None = None,
    temperature: float | None = None,
    do_sample: bool | None = None,
) -> dict[str, Any]:
    """An OpenAI-shaped chat request body; a string is one user turn."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body: dict[str, Any] = {"messages": list(messages)}
    for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("do_sample", do_sample)):
        if value is not None:
            body[key] = value
    return body


def ask(url: str, body: dict[str, Any], timeout_s: float = 120.0, raw: bool = False) -> Any:
    """POST a chat request to a `mlflow models serve` endpoint; the chat.completion response
    (raw: the body exactly as the server sent it, a one-element list)."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise RuntimeError(f"{url}/invocations answered HTTP {exc.code}: {detail[:2000]}") from None
    # The scoring server returns the flavor's prediction list: one completion per request.
    return answer if raw else (answer[0] if isinstance(answer, list) else answer)


def reply_text(response: dict[str, Any]) -> str:
    """The assistant's new text in a chat.completion response."""
    return response["choices"][0]["message"]["content"]
