"""Chat templates and token boundaries: what training learns is what generation and serving see.

Tokenizers are built locally in the layouts of real models (byte-level BPE, their special tokens
and chat templates): EOS == end of turn (SmolLM2-Instruct, the tiny model) and EOS != end of turn
(Qwen2.5 base: EOS `<|endoftext|>`, turns end with `<|im_end|>`; Llama-3 base: EOS
`<|end_of_text|>`, turns end with `<|eot_id|>`), and one without a template (OPT: BOS `</s>`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from qlora_pipeline.config import DataConfig
from qlora_pipeline.core.data.encode import IGNORE_INDEX
from qlora_pipeline.core.data.tokens import encode_prompt
from qlora_pipeline.core.data.prepare import prepare_data
from qlora_pipeline.core.data.tokens import end_of_turn_token, stop_token_ids
from qlora_pipeline.core.evaluate import chat_prompt, generate, set_stop_tokens
from qlora_pipeline.core.tiny import build_tiny_model, build_tiny_tokenizer

from ..conftest import DEFAULT_PARAMS, REPO

# Qwen2.5's chat template (tool use included), as its tokenizer_config.json ships it.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n        {{- \'<|im_start|>\' + message.role }}\n'
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# SmolLM2-Instruct's chat template.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3.1/3.2's chat template (custom tools), with its date fixed so renders do not depend on the day.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    '{%- set date_string = "26 Jul 2024" %}\n'
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n'
    "{%- if tools_in_user_message and not tools is none %}\n    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n"
    "{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n'
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n        {%- endif %}\n'
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n"
    '        {{- tool_call.arguments | tojson }}\n        {{- "}" }}\n        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
    '        {%- endif %}\n        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n'
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

# Turns closed by a newline only: nothing in the template says where a reply ends.
PLAIN_CLOSE_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello! How can I help you today?",
    "Opposite of big: small. Opposite of hot: cold. Opposite of up: down. Plural of mouse: mice.",
    "Translate to French: good morning -> bonjour. good night -> bonne nuit. thank you -> merci.",
    "What is the weather in Paris? It is sunny and 22 degrees. Blue, green, red and white are colors.",
    "system user assistant tool ipython Be brief. You are a helpful assistant. 1 2 3 4 5 6 7 8 9 10",
    '{"name": "get_weather", "arguments": {"city": "Paris"}} function parameters tools',
]


def bpe_tokenizer(specials, *, eos, bos=None, pad=None, unk=None, adds_bos=False, template=None, added=()):
    """A byte-level BPE tokenizer (as GPT-2, Qwen2.5 and Llama-3 use) trained offline on a small corpus."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=pad, unk_token=unk)
    if added:
        fast.add_tokens(list(added))  # not special, as Qwen2.5's <tool_call>
    fast.chat_template = template
    return fast


def qwen25_base():
    return bpe_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|endoftext|>", pad="<|endoftext|>",
        template=QWEN25_TEMPLATE, added=["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
    )


def smollm2_instruct():
    return bpe_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", bos="<|im_start|>", pad="<|im_end|>",
        unk="<|endoftext|>", template=SMOLLM2_TEMPLATE,
    )


def llama3_base():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
    return bpe_tokenizer(specials, eos="<|end_of_text|>", bos="<|begin_of_text|>", adds_bos=True, template=LLAMA3_TEMPLATE)


def opt_like():
    """OPT's layout: GPT-2 BPE, no chat template, `</s>` is both BOS (prepended to every text) and EOS."""
    return bpe_tokenizer(["<pad>", "</s>", "<unk>"], eos="</s>", bos="</s>", pad="<pad>", unk="<unk>", adds_bos=True)


# name -> (tokenizer factory, end-of-turn token, whether the template trims replies)
LAYOUTS = {
    "tiny (EOS = end of turn </s>)": (build_tiny_tokenizer, "</s>", False),
    "SmolLM2-Instruct (EOS = <|im_end|>)": (smollm2_instruct, "<|im_end|>", False),
    "Qwen2.5 base (EOS <|endoftext|>, turns end <|im_end|>)": (qwen25_base, "<|im_end|>", False),
    "Llama-3 base (EOS <|end_of_text|>, turns end <|eot_id|>)": (llama3_base, "<|eot_id|>", True),
}


def m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [m("user", "Hi"), m("assistant", "Hello! How can I help you today?")],
    [m("system", "Be brief."), m("user", "2+2?"), m("assistant", "4"), m("user", "And 3+3?"), m("assistant", "6")],
    [m("user", "A color?"), m("assistant", "Blue."), m("user", "Another?"), m("assistant", "Green, and red."),
     m("user", "Last one?"), m("assistant", "White\nand black.")],
    [m("system", "You are a helpful assistant."), m("user", "Translate to French: good morning"), m("assistant", "bonjour"),
     m("user", "good night"), m("assistant", "bonne nuit"), m("user", "thank you"), m("assistant", "merci")],
    [m("user", "Opposite of big?"), m("assistant", "small"), m("user", "Of hot?"), m("assistant", "cold")],
    [m("user", "Count to 3."), m("assistant", "1 2 3"), m("user", "Now to 5."), m("assistant", "1 2 3 4 5")],
]


def write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def prepare(tmp_path: Path, tok, records, **cfg):
    """All prepared rows (train and eval) by source line number, and the stats."""
    write_jsonl(tmp_path / "d.jsonl", records)
    settings = dict(raw_path="d.jsonl", eval_fraction=0.2, min_eval_rows=1, max_seq_len=1024, max_bad_fraction=0.0)
    settings.update(cfg)
    prepared = prepare_data(DataConfig(**settings), tok, root=tmp_path)
    rows = {int(r["source"].rsplit(":", 1)[1]): r for r in [*prepared.train, *prepared.eval]}
    return rows, prepared


def learned_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of learned labels."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def assert_turns_match_generation(tok, messages, row, replies, tools=None):
    """Each assistant turn: its template-rendered prompt is a token prefix of the row, its learned
    tokens start right after that prompt, and decode to exactly the reply and its end-of-turn token."""
    ids, labels = row["input_ids"], row["labels"]
    runs = learned_runs(labels)
    assert [tok.decode(ids[i:j]) for i, j in runs] == replies
    turns = [i for i, msg in enumerate(messages) if msg["role"] == "assistant"]
    assert len(turns) == len(runs)
    for turn, (start, _) in zip(turns, runs):
        prompt = tok.apply_chat_template(messages[:turn], tools=tools, add_generation_prompt=True, tokenize=False)
        prompt_ids = encode_prompt(tok, prompt)
        assert ids[: len(prompt_ids)] == prompt_ids, f"turn {turn}: the serving prompt is not a token prefix"
        assert start == len(prompt_ids), f"turn {turn}: learning does not start right after the prompt"
    assert row["prompt"] == tok.apply_chat_template(messages[: turns[-1]], tools=tools, add_generation_prompt=True, tokenize=False)


# -- 1. end of turn -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_turn_learns_the_templates_end_of_turn_and_each_prompt_is_a_prefix(tmp_path, layout):
    make, end_of_turn, trims = LAYOUTS[layout]
    tok = make()
    assert end_of_turn_token(tok) == end_of_turn
    rows, prepared = prepare(tmp_path, tok, [{"messages": c} for c in CONVERSATIONS])
    assert sorted(rows) == list(range(1, len(CONVERSATIONS) + 1))
    for number, messages in enumerate(CONVERSATIONS, 1):
        replies = [(msg["content"].strip() if trims else msg["content"]) + end_of_turn for msg in messages if msg["role"] == "assistant"]
        assert_turns_match_generation(tok, messages, rows[number], replies)
        if tok.eos_token != end_of_turn:  # EOS appears only where the template writes it: nowhere here
            assert tok.eos_token_id not in rows[number]["input_ids"]
    assert prepared.stats["end_of_turn"] == end_of_turn


def test_end_of_turn_reaches_generation_and_the_saved_generation_config(tmp_path):
    tok = qwen25_base()
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == [eos, eot]
    tok.pad_token = "<|im_start|>"  # any id: the prompt is one row, nothing is padded
    model = build_tiny_model(tok)
    # Rig the model (attention and MLP outputs zeroed, so logits depend on the last token only):
    # prompt end -> "A", "A" -> <|im_end|>, <|im_end|> -> "B", anything else -> "B".
    prompt = chat_prompt(tok, "Hi")
    last, a, b = encode_prompt(tok, prompt)[-1], tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 3] = 1.0
        embed[last] = torch.nn.functional.one_hot(torch.tensor(0), embed.shape[1]).float()
        embed[a] = torch.nn.functional.one_hot(torch.tensor(1), embed.shape[1]).float()
        embed[eot] = torch.nn.functional.one_hot(torch.tensor(2), embed.shape[1]).float()
        head.zero_()
        head[a, 0] = head[eot, 1] = head[b, 2] = head[b, 3] = 10.0
    # Stopped at EOS only, the rigged model would go on after <|im_end|>: "ABBBB".
    assert generate(model, tok, [prompt], max_new_tokens=5, batch_size=1) == ["A"]
    # Serving reads generation_config: set_stop_tokens puts the end-of-turn id there, saved with the model.
    assert set_stop_tokens(model, tok) == [eos, eot]
    model.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [eos, eot]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    out = reloaded.generate(torch.tensor([encode_prompt(tok, prompt)]), max_new_tokens=5, do_sample=False)
    assert tok.decode(out[0, len(encode_prompt(tok, prompt)) :]) == "A<|im_end|>"


def test_template_without_a_recognisable_end_of_turn_gets_eos_after_the_last_reply_only(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = PLAIN_CLOSE_TEMPLATE
    assert end_of_turn_token(tok) is None
    conversations = [c for c in CONVERSATIONS if c[0]["role"] != "system"]
    rows, prepared = prepare(tmp_path, tok, [{"messages": c} for c in conversations])
    for number, messages in enumerate(conversations, 1):
        row = rows[number]
        replies = [msg["content"] + "\n" for msg in messages if msg["role"] == "assistant"]
        replies[-1] += tok.eos_token  # the only place EOS goes: it moves no later turn
        assert_turns_match_generation(tok, messages, row, replies)
    assert prepared.stats["end_of_turn"] == "</s> (appended)"


# -- 2. the prompt is a token prefix of the row ---------------------------------------------------

PAIRS = [
    {"prompt": "Opposite of big: ", "completion": "small"},
    {"prompt": "Opposite of hot: ", "completion": "cold"},
    {"prompt": "Opposite of up:", "completion": " down"},
    {"prompt": "Plural of mouse: ", "completion": "mice"},
    {"prompt": "Translate to French: good morning -> ", "completion": "bonjour"},
    {"prompt": "Translate to French: thank you ->", "completion": " merci"},
    {"prompt": "Q: 2+2?\nA: ", "completion": "4"},
    {"prompt": "Colors:", "completion": "blue, green"},
]
ALPACA = [
    {"instruction": "Opposite of big?", "input": "", "output": " small"},
    {"instruction": "Plural of the noun.", "input": "mouse", "output": "mice"},
]


@pytest.mark.parametrize("make", [opt_like, build_tiny_tokenizer, qwen25_base, llama3_base], ids=["opt", "tiny", "qwen2.5", "llama3"])
def test_the_eval_prompt_is_a_token_prefix_of_every_row(tmp_path, make):
    tok = make()
    if make is opt_like:
        # The fault this guards against: tokenized together, " small" is one token across the boundary.
        prompt_alone = tok("Opposite of big: ", add_special_tokens=False).input_ids
        assert tok("Opposite of big: small", add_special_tokens=False).input_ids[: len(prompt_alone)] != prompt_alone
    records = [*PAIRS, *ALPACA, *([{"messages": c} for c in CONVERSATIONS] if tok.chat_template else [])]
    rows, prepared = prepare(tmp_path, tok, records)
    assert len(rows) == len(records)
    end = end_of_turn_token(tok) or tok.eos_token
    for number, record in enumerate(records, 1):
        row = rows[number]
        prompt_ids = encode_prompt(tok, row["prompt"])
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        # Learning (of the last reply) starts right after the prompt; in a multi-turn chat the prompt
        # holds earlier replies, which are learned too (the test above checks them turn by turn).
        before = row["labels"][: len(prompt_ids)] if "messages" not in record else row["labels"][len(prompt_ids) - 1 : len(prompt_ids)]
        assert all(label == IGNORE_INDEX for label in before)
        assert row["labels"][len(prompt_ids)] != IGNORE_INDEX
        if "messages" not in record:
            reply = record.get("completion", record.get("output"))
            if tok.chat_template and make is llama3_base:
                reply = reply.strip()  # Llama-3's template trims message content
            learned = [tok.decode(row["input_ids"][i:j]) for i, j in learned_runs(row["labels"])]
            assert learned == [reply + end]
        if make is opt_like:  # BOS (`</s>`) starts every row once; the appended EOS is the same id
            assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"].count(tok.bos_token_id) == 2
    if make is opt_like:
        assert prepared.stats["rows_split_at_prompt"] >= 1


def test_tokenizer_without_offsets_keeps_the_prompt_prefix(tmp_path, monkeypatch):
    from qlora_pipeline.core.data import encode

    monkeypatch.setattr(encode, "_has_offsets", lambda tok: False)
    for make in (opt_like, qwen25_base):
        tok = make()
        records = [*PAIRS, *([{"messages": c} for c in CONVERSATIONS] if tok.chat_template else [])]
        rows, _ = prepare(tmp_path, tok, records)
        for number, record in enumerate(records, 1):
            prompt_ids = encode_prompt(tok, rows[number]["prompt"])
            assert rows[number]["input_ids"][: len(prompt_ids)] == prompt_ids
            if "messages" in record:
                replies = [msg["content"] + "<|im_end|>" for msg in record["messages"] if msg["role"] == "assistant"]
                assert_turns_match_generation(tok, record["messages"], rows[number], replies)


# -- 3. data.chat_template travels with the tokenizer ---------------------------------------------

CUSTOM_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_configured_chat_template_is_in_the_adapter_tokenizer_and_free_form_eval_prompts(tmp_path, tiny_cache, monkeypatch):
    from qlora_pipeline.stages import prepare as prepare_stage
    from qlora_pipeline.stages import train as train_stage
    from qlora_pipeline.stages.common import base_tokenizer, context

    monkeypatch.setenv("QLORA_CACHE_DIR", str(tiny_cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(DEFAULT_PARAMS, tmp_path / "params.yaml")
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 2 + [{"text": "a document"}])
    ctx = context(
        tmp_path / "params.yaml",
        [
            "model.name=builtin:tiny-llama", "data.raw_path=chats.jsonl", "data.max_seq_len=128", "data.dedupe=false",
            f"data.chat_template={json.dumps(CUSTOM_TEMPLATE)}", "train.max_steps=1", "train.per_device_batch_size=2",
            "train.gradient_accumulation_steps=1", "train.warmup_steps=0", "train.logging_steps=1",
        ],
    )
    assert ctx.cfg.data.chat_template == CUSTOM_TEMPLATE
    _, tok = base_tokenizer(ctx)
    assert tok.chat_template == CUSTOM_TEMPLATE
    assert chat_prompt(tok, "What is LoRA?") == "[user] What is LoRA?</s>\n[assistant] "

    prepare_stage.run(ctx)
    train_stage.run(ctx)
    saved = AutoTokenizer.from_pretrained(ctx.paths.adapter)
    assert saved.chat_template == CUSTOM_TEMPLATE
    assert chat_prompt(saved, "What is LoRA?") == "[user] What is LoRA?</s>\n[assistant] "


def test_free_form_prompt_without_a_template_is_the_alpaca_prompt():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    assert chat_prompt(tok, "What is LoRA?") == "### Instruction:\nWhat is LoRA?\n\n### Response:\n"


# -- 4. tool calls ---------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CHAT = [
    m("user", "What is the weather in Paris?"),
    # OpenAI's shape: arguments as JSON text (templates get them as an object)
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 22 degrees"},
    m("assistant", "It is sunny and 22 degrees in Paris."),
]
NORMALISED_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
]}


@pytest.mark.parametrize(
    "make, call_text, end",
    [
        (qwen25_base, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "<|im_end|>"),
        (llama3_base, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "<|eot_id|>"),
    ],
    ids=["qwen2.5", "llama3"],
)
@pytest.mark.parametrize("with_tools", [False, True], ids=["calls", "calls+definitions"])
def test_tool_calls_are_learned_and_tool_results_masked(tmp_path, make, call_text, end, with_tools):
    tok = make()
    record = {"messages": TOOL_CHAT, **({"tools": [WEATHER_TOOL]} if with_tools else {})}
    rows, prepared = prepare(tmp_path, tok, [record, {"messages": CONVERSATIONS[0]}])
    assert prepared.report["bad_rows"] == []
    row, tools = rows[1], [WEATHER_TOOL] if with_tools else None
    messages = [TOOL_CHAT[0], NORMALISED_CALL, TOOL_CHAT[2], TOOL_CHAT[3]]
    assert_turns_match_generation(tok, messages, row, [call_text + end, TOOL_CHAT[3]["content"] + end], tools=tools)
    text = tok.decode(row["input_ids"])
    assert "sunny, 22 degrees" in text  # the tool's result is read ...
    learned = "".join(tok.decode(row["input_ids"][i:j]) for i, j in learned_runs(row["labels"]))
    assert "sunny, 22 degrees" not in learned  # ... and not learned
    if with_tools:
        prompt = tok.decode(row["input_ids"][: len(encode_prompt(tok, row["prompt"]))])
        assert "The weather in a city." in prompt


def test_tool_example_in_the_docs_is_accepted(tmp_path):
    doc = (REPO / "docs" / "data-formats.md").read_text(encoding="utf-8")
    block = doc.split("**Tool calls**", 1)[1].split("```jsonl", 1)[1].split("```", 1)[0]
    records = [json.loads(line) for line in block.strip().splitlines()]
    tok = qwen25_base()
    rows, prepared = prepare(tmp_path, tok, [*records, {"messages": CONVERSATIONS[0]}])
    assert prepared.report["bad_rows"] == []
    learned = [tok.decode(rows[1]["input_ids"][i:j]) for i, j in learned_runs(rows[1]["labels"])]
    assert learned == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "Sunny and 22 degrees.<|im_end|>",
    ]


def test_sharegpt_function_call_and_observation_match_chat_tool_turns(tmp_path):
    tok = qwen25_base()
    sharegpt = {"conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "sunny, 22 degrees"},
        {"from": "gpt", "value": "It is sunny and 22 degrees in Paris."},
    ]}
    rows, _ = prepare(tmp_path, tok, [sharegpt, {"messages": TOOL_CHAT}], dedupe=False)
    assert (rows[1]["input_ids"], rows[1]["labels"]) == (rows[2]["input_ids"], rows[2]["labels"])


def test_template_without_tool_support_reports_the_row_with_the_fix(tmp_path):
    tok = build_tiny_tokenizer()  # its template writes role and content only: a tool call would vanish
    rows, prepared = prepare(
        tmp_path, tok, [{"messages": TOOL_CHAT}, *({"messages": c} for c in CONVERSATIONS)], max_bad_fraction=0.5
    )
    assert sorted(rows) == list(range(2, len(CONVERSATIONS) + 2))
    [bad] = prepared.report["bad_rows"]
    assert (bad["source"], bad["reason"]) == ("d.jsonl:1", "tools_unsupported")
    assert "tool_calls" in bad["detail"] and "data.chat_template" in bad["detail"]
    # Tool definitions the template never shows are refused the same way.
    _, prepared = prepare(
        tmp_path, tok, [{"messages": CONVERSATIONS[0], "tools": [WEATHER_TOOL]}, *({"messages": c} for c in CONVERSATIONS[1:])],
        max_bad_fraction=0.5,
    )
    assert [(b["reason"], "tools" in b["detail"]) for b in prepared.report["bad_rows"]] == [("tools_unsupported", True)]


def test_tool_turn_validation(tmp_path):
    tok = qwen25_base()
    call = {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    result = {"role": "tool", "content": "sunny"}
    user = m("user", "Weather?")
    bad = [
        [user, m("assistant", "Let me check."), result, m("assistant", "Sunny.")],  # tool without a call
        [user, call, m("assistant", "Sunny.")],  # a call without its result
        [user, {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": "{not json"}]}, result, m("assistant", "x")],
        [user, {"role": "assistant", "tool_calls": [{"arguments": {}}]}, result, m("assistant", "x")],  # no name
        [{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}, m("assistant", "y")],
        [user, {"role": "assistant", "content": None}],  # no content and no call
    ]
    good = [
        [user, call, result, m("assistant", "Sunny.")],  # flat call shape, no id
        [user, call],  # ends on the call: the model learns to call
        [user, call, result, {"role": "tool", "content": {"temperature": 22}}, m("assistant", "Sunny, 22.")],  # two results
    ]
    rows, prepared = prepare(tmp_path, tok, [{"messages": c} for c in [*bad, *good]], max_bad_fraction=1.0)
    reasons = [(b["source"], b["reason"]) for b in prepared.report["bad_rows"]]
    assert reasons == [
        ("d.jsonl:1", "bad_role_order"),
        ("d.jsonl:2", "bad_role_order"),
        ("d.jsonl:3", "broken_json"),
        ("d.jsonl:4", "bad_value"),
        ("d.jsonl:5", "bad_value"),
        ("d.jsonl:6", "missing_field"),
    ]
    assert sorted(rows) == [7, 8, 9]
    assert '{"temperature": 22}' in tok.decode(rows[9]["input_ids"])
