"""Tokenization and labels for every format: exact -100 positions, EOS learned, one BOS at most."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from qlora_pipeline.config import DataConfig
from qlora_pipeline.core.data.encode import IGNORE_INDEX
from qlora_pipeline.core.data.tokens import check_pad_token, encode_prompt, ensure_pad_token
from qlora_pipeline.core.data.prepare import prepare_data
from qlora_pipeline.core.tiny import BOS, EOS, TINY_CHAT_TEMPLATE, build_tiny_tokenizer
from qlora_pipeline.errors import DataError

M = IGNORE_INDEX
# The tiny template with {% generation %} markers; renders exactly the same text as TINY_CHAT_TEMPLATE.
GEN_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{% else %}{{ message['content'] }}</s>{% endif %}{{ '\\n' }}"  # trim_blocks would eat a literal newline
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BOS_TEMPLATE = "{{ bos_token }}" + TINY_CHAT_TEMPLATE
# Turns closed by a newline only: EOS is inserted after the last reply (test_templates.py has multi-turn).
NO_EOS_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture
def plain_tok():
    """The tiny tokenizer without a chat template (alpaca-style prompts)."""
    t = build_tiny_tokenizer()
    t.chat_template = None
    return t


@pytest.fixture
def bos_tok():
    """The tiny tokenizer set to start plain text with BOS, like Llama/Mistral tokenizers."""
    t = build_tiny_tokenizer()
    t._tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, t.bos_token_id)])
    assert t("a").input_ids[0] == t.bos_token_id
    return t


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def prepare_one(tmp_path: Path, tok, records, name: str = "d.jsonl", **cfg):
    """Prepare records plus a filler document (so both splits have a row); return the records' rows."""
    filler = {"text": "filler document for the eval split"}
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in [*records, filler]) + "\n", encoding="utf-8")
    settings = dict(raw_path=name, eval_fraction=0.01, min_eval_rows=1, max_seq_len=512, max_bad_fraction=0.0)
    settings.update(cfg)
    prepared = prepare_data(DataConfig(**settings), tok, root=tmp_path)
    rows = [r for r in [*prepared.train, *prepared.eval] if r["source"] != f"{name}:{len(records) + 1}"]
    return rows, prepared


def encode(tmp_path, tok, record, **cfg) -> dict:
    """The prepared row of one record (whichever split it landed in)."""
    rows, _ = prepare_one(tmp_path, tok, [record], **cfg)
    assert len(rows) == 1
    return rows[0]


def test_alpaca_with_chat_template_learns_output_and_eos_only(tmp_path, tok):
    row = encode(tmp_path, tok, {"instruction": "Add 2 and 3.", "input": "be brief", "output": "5"})
    prompt = "<|user|>\nAdd 2 and 3.\n\nbe brief" + EOS + "\n<|assistant|>\n"
    assert row["prompt"] == prompt and row["reference"] == "5"
    p, c, nl = ids(tok, prompt), ids(tok, "5"), ids(tok, "\n")
    assert row["input_ids"] == p + c + [tok.eos_token_id] + nl
    assert row["labels"] == [M] * len(p) + c + [tok.eos_token_id] + [M] * len(nl)
    assert row["source"] == "d.jsonl:1"


def test_alpaca_without_template_uses_plain_prompt_and_appends_eos(tmp_path, plain_tok):
    row = encode(tmp_path, plain_tok, {"instruction": "Name a color.", "input": "", "output": "red"})
    prompt = "### Instruction:\nName a color.\n\n### Response:\n"
    assert row["prompt"] == prompt
    p, c = ids(plain_tok, prompt), ids(plain_tok, "red")
    assert row["input_ids"] == p + c + [plain_tok.eos_token_id]
    assert row["labels"] == [M] * len(p) + c + [plain_tok.eos_token_id]

    row = encode(tmp_path, plain_tok, {"instruction": "Plural?", "input": "cat", "output": "cats"})
    assert row["prompt"] == "### Instruction:\nPlural?\n\n### Input:\ncat\n\n### Response:\n"


def test_prompt_completion_pair(tmp_path, tok, plain_tok):
    record = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    row = encode(tmp_path, plain_tok, record)
    p, c = ids(plain_tok, "Q: 2+2?\nA:"), ids(plain_tok, " 4")
    assert row["input_ids"] == p + c + [plain_tok.eos_token_id]
    assert row["labels"] == [M] * len(p) + c + [plain_tok.eos_token_id]
    # With a chat template the pair is one user/assistant exchange.
    row = encode(tmp_path, tok, record)
    assert row["prompt"] == "<|user|>\nQ: 2+2?\nA:" + EOS + "\n<|assistant|>\n"


def multi_turn():
    return [
        {"role": "system", "content": "Be short."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Color?"},
        {"role": "assistant", "content": "blue"},
    ]


def expected_multi_turn(tok):
    """input_ids and labels for multi_turn() under the tiny template, built piece by piece."""
    eos, nl = tok.eos_token_id, ids(tok, "\n")
    pieces = [
        (ids(tok, "<|system|>\nBe short." + EOS + "\n<|user|>\nHi" + EOS + "\n<|assistant|>\n"), False),
        (ids(tok, "Hello") + [eos], True),
        (nl + ids(tok, "<|user|>\nColor?" + EOS + "\n<|assistant|>\n"), False),
        (ids(tok, "blue") + [eos], True),
        (nl, False),
    ]
    input_ids = [t for piece, _ in pieces for t in piece]
    labels = [t if learned else M for piece, learned in pieces for t in piece]
    return input_ids, labels


def test_chat_multi_turn_learns_every_assistant_turn(tmp_path, tok):
    row = encode(tmp_path, tok, {"messages": multi_turn()})
    input_ids, labels = expected_multi_turn(tok)
    assert row["input_ids"] == input_ids
    assert row["labels"] == labels
    assert labels.count(tok.eos_token_id) == 2  # both replies end with a learned EOS
    assert row["reference"] == "blue"
    assert row["prompt"].endswith("<|user|>\nColor?" + EOS + "\n<|assistant|>\n")


def test_sharegpt_matches_chat(tmp_path, tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    convo = [{"from": names[m["role"]], "value": m["content"]} for m in multi_turn()]
    row = encode(tmp_path, tok, {"conversations": convo})
    assert (row["input_ids"], row["labels"]) == expected_multi_turn(tok)


def test_generation_markers_give_the_same_labels(tmp_path, tok):
    row = encode(tmp_path, tok, {"messages": multi_turn()}, chat_template=GEN_TEMPLATE)
    assert (row["input_ids"], row["labels"]) == expected_multi_turn(tok)


def test_template_without_end_of_turn_token_gets_eos_after_the_last_reply(tmp_path, tok):
    row = encode(tmp_path, tok, {"messages": multi_turn()[1:3]}, chat_template=NO_EOS_TEMPLATE)
    p, c = ids(tok, "<|user|>\nHi\n<|assistant|>\n"), ids(tok, "Hello")
    nl = ids(tok, "\n")
    assert row["input_ids"] == p + c + nl + [tok.eos_token_id]
    # The reply span is "Hello\n"; EOS goes after it and is learned.
    assert row["labels"] == [M] * len(p) + c + nl + [tok.eos_token_id]


def test_train_on_prompt_learns_everything(tmp_path, tok):
    row = encode(tmp_path, tok, {"messages": multi_turn()}, train_on_prompt=True)
    input_ids, _ = expected_multi_turn(tok)
    assert row["input_ids"] == input_ids and row["labels"] == input_ids


def test_plain_text_document_all_learned_with_eos(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    prepared = prepare_data(DataConfig(raw_path="a.txt", max_seq_len=512), tok, root=tmp_path)
    rows = [*prepared.train, *prepared.eval]
    docs = {r["source"]: r for r in rows}
    assert set(docs) == {"a.txt:1", "a.txt:3"}
    first = docs["a.txt:1"]
    assert first["input_ids"] == ids(tok, "first doc") + [tok.eos_token_id]
    assert first["labels"] == first["input_ids"]
    assert first["prompt"] == "" and first["reference"] == ""


def test_plain_text_chunked_into_blocks_no_token_lost(tmp_path, tok):
    docs = [f"document number {i} says hello" for i in range(12)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    cfg = DataConfig(raw_path="a.txt", max_seq_len=16, eval_fraction=0.25)
    prepared = prepare_data(cfg, tok, root=tmp_path)
    assert all(len(r) <= 16 for r in [*prepared.train["input_ids"], *prepared.eval["input_ids"]])
    expected = sum(len(ids(tok, d)) + 1 for d in docs)
    assert prepared.stats["tokens_train"] + prepared.stats["tokens_eval"] == expected
    assert prepared.stats["records_eval"] == 3 and prepared.stats["rows_eval"] >= 1
    assert list(prepared.train["labels"]) == list(prepared.train["input_ids"])


def test_no_double_bos(tmp_path, tok, bos_tok):
    bos = tok.bos_token_id
    # Template writes BOS, tokenizer does not add one: exactly the template's BOS.
    row = encode(tmp_path, tok, {"messages": multi_turn()[1:3]}, chat_template=BOS_TEMPLATE)
    assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1 and row["labels"][0] == M
    # Template writes BOS and the tokenizer adds one too: still one.
    row = encode(tmp_path, bos_tok, {"messages": multi_turn()[1:3]}, chat_template=BOS_TEMPLATE)
    assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1
    # Tokenizer adds BOS, template does not: BOS is prepended once, as the tokenizer would.
    row = encode(tmp_path, bos_tok, {"messages": multi_turn()[1:3]})
    assert row["input_ids"][:2] == [bos, *ids(tok, "<|user|>")] and row["input_ids"].count(bos) == 1
    # The eval prompt encodes to the same prefix as training, BOS included.
    assert encode_prompt(bos_tok, row["prompt"]) == row["input_ids"][: len(encode_prompt(bos_tok, row["prompt"]))]
    assert encode_prompt(bos_tok, "<s>hi").count(bos) == 1
    # Plain text with a BOS-adding tokenizer: [BOS] tokens EOS.
    (tmp_path / "t.txt").write_text("one doc\n\nanother one\n", encoding="utf-8")
    prepared = prepare_data(DataConfig(raw_path="t.txt"), bos_tok, root=tmp_path)
    for r in [*prepared.train, *prepared.eval]:
        assert r["input_ids"][0] == bos and r["input_ids"].count(bos) == 1 and r["input_ids"][-1] == tok.eos_token_id


def test_tokenizer_without_bos(tmp_path):
    t = build_tiny_tokenizer()
    t.bos_token = None
    row = encode(tmp_path, t, {"messages": multi_turn()})
    assert row["input_ids"] == expected_multi_turn(t)[0]


def test_eval_prompt_encodes_to_the_training_prefix(tmp_path, tok, plain_tok):
    for t in (tok, plain_tok):
        row = encode(tmp_path, t, {"instruction": "Capital of Peru?", "output": "Lima"})
        prompt_ids = encode_prompt(t, row["prompt"])
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        assert all(label == M for label in row["labels"][: len(prompt_ids)])
        assert row["labels"][len(prompt_ids)] != M


def test_chat_records_without_any_template_fail_clearly(tmp_path, plain_tok):
    with pytest.raises(DataError, match="data.chat_template"):
        encode(tmp_path, plain_tok, {"messages": multi_turn()})


def test_broken_chat_template_fails_before_any_row(tmp_path, tok):
    with pytest.raises(DataError, match="chat template"):
        encode(tmp_path, tok, {"messages": multi_turn()}, chat_template="{% for m in messages %}{{ m.content }")


def test_prefix_unstable_template_is_a_template_error(tmp_path, tok):
    # Writes the number of turns first, so earlier renders are not prefixes of later ones.
    unstable = "{{ messages|length }}" + TINY_CHAT_TEMPLATE
    with pytest.raises(DataError, match="template_error"):
        encode(tmp_path, tok, {"messages": multi_turn()}, chat_template=unstable)


def test_column_mapping(tmp_path, tok):
    record = {"question": "Add 2 and 3.", "answer": "5"}
    mapped = encode(tmp_path, tok, record, columns={"instruction": "question", "output": "answer"})
    plain = encode(tmp_path, tok, {"instruction": "Add 2 and 3.", "output": "5"})
    assert mapped["input_ids"] == plain["input_ids"] and mapped["labels"] == plain["labels"]
    convo = {"messages": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Hello"}]}
    mapped = encode(tmp_path, tok, convo, columns={"role": "speaker", "content": "text"})
    assert mapped["reference"] == "Hello"


def test_ensure_pad_token_reuses_the_vocabulary_and_never_grows_it():
    t = build_tiny_tokenizer()
    t.pad_token = t.eos_token
    size = len(t)
    assert ensure_pad_token(t) == "<pad>"  # `<pad>` is already in the vocabulary
    assert t.pad_token_id != t.eos_token_id and len(t) == size
    assert ensure_pad_token(t) == "<pad>"  # already fine: nothing changes

    from transformers import PreTrainedTokenizerFast

    # The layout of SmolLM2 / ChatML models: pad = EOS = end of turn, an unknown token to spare.
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3, "b": 4}
    word = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    chatml = PreTrainedTokenizerFast(
        tokenizer_object=word, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    chatml.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    assert ensure_pad_token(chatml) == "<|endoftext|>" and chatml.pad_token_id == 0 and len(chatml) == 5

    # Nothing to spare: EOS pads, by position only, and the vocabulary still does not grow.
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")), eos_token="</s>")
    bare._tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert bare.pad_token is None
    assert ensure_pad_token(bare) == "</s>" and len(bare) == 2 and check_pad_token(bare) == 1


def test_template_offered_in_docs_renders_like_the_tiny_one(tok):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "data-formats.md").read_text(encoding="utf-8")
    block = doc.split("A template that works", 1)[1].split("```", 2)[1]
    template = textwrap.dedent(block).strip("\n") + "\n"
    for gen in (False, True):
        ours = tok.apply_chat_template(multi_turn(), chat_template=template, tokenize=False, add_generation_prompt=gen)
        assert ours == tok.apply_chat_template(multi_turn(), tokenize=False, add_generation_prompt=gen)
