"""The tokenizer's side of encoding: the pad token, BOS, the chat template, the end-of-turn and stop
tokens (rules: core/data/encode.py and docs/data-formats.md)."""

from __future__ import annotations

import logging

from qlora_pipeline.errors import DataError

# Pad tokens that models ship for exactly this use (Llama 3 reserves <|finetune_right_pad_id|>).
PAD_LIKE = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")
log = logging.getLogger(__name__)
# A one-turn chat whose reply text is searched for in the rendering (what follows it ends a turn).
PROBE_REPLY = "Hello"
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE_REPLY}]


def _pad_candidates(tokenizer) -> list[str]:
    """Tokens already in the vocabulary that may pad, best first; none is EOS, BOS or template text."""
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else " ".join(template.values())
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    specials = [t for t in tokenizer.all_special_tokens if t not in taken and t not in template]
    named = [t for t in PAD_LIKE if t in tokenizer.get_vocab() and t not in taken and t not in template]
    unk = [tokenizer.unk_token] if tokenizer.unk_token in specials else []
    return list(dict.fromkeys([*named, *unk, *specials]))


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token from its own vocabulary, never EOS when anything else exists.

    Never adds a token, so the model's vocabulary, embeddings and config stay the base's (an added
    `<pad>` would make the adapter carry whole embedding matrices). Order: the tokenizer's own pad
    if it is not EOS; a pad-like token already in the vocabulary (PAD_LIKE); the unknown token; any
    other special token that is not EOS or BOS and does not appear in the chat template; else EOS
    itself as filler. Padding is by position (collators set attention 0 and label -100 on pad
    positions, never by id), so even EOS as filler never hides a learned EOS. Returns the pad token.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token
    candidates = _pad_candidates(tokenizer)
    if candidates:
        tokenizer.pad_token = candidates[0]
    else:
        log.info("the tokenizer has no spare special token: padding with EOS, masked by position")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token


def check_pad_token(tokenizer) -> int:
    """The pad id, or a DataError if there is none."""
    if tokenizer.pad_token_id is None:
        raise DataError(
            "the tokenizer has no pad token. Call qlora_pipeline.core.data.ensure_pad_token(tokenizer) "
            "before building the collator (it picks one from the vocabulary; nothing is added)"
        )
    return tokenizer.pad_token_id


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts plain text with BOS (its own convention, which we follow)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a `prompt` column value for generation, with BOS exactly as in training."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer_adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
    return ids


def resolve_chat_template(tokenizer, override: str | None) -> str | None:
    """data.chat_template if set, else the tokenizer's own, else None (alpaca-style prompts)."""
    if override:
        return override
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.get_chat_template()
    except ValueError:  # several named templates and no default
        return None


def _special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, added special tokens included (`<|im_end|>`, `<|eot_id|>`)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for index, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(index)
    return ids


def end_of_turn_token(tokenizer, chat_template: str | None = None) -> str | None:
    """The token the chat template ends an assistant turn with, or None.

    Found by rendering a probe exchange: the first special token the template writes after the
    reply: EOS for templates that close turns with it (SmolLM2-Instruct, Zephyr, the tiny model),
    `<|im_end|>` for ChatML (Qwen2.5 base, whose EOS is `<|endoftext|>`), `<|eot_id|>` for Llama-3.
    None without a template, or when the template closes turns with plain text only.
    `chat_template` is data.chat_template; None means the tokenizer's own.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    if not template:
        return None
    try:
        text = tokenizer.apply_chat_template(PROBE, chat_template=template, tokenize=False)
    except Exception:  # a broken template is reported where it is used
        return None
    if PROBE_REPLY not in text:
        return None
    closer = text.rsplit(PROBE_REPLY, 1)[1]
    special = _special_ids(tokenizer)
    for token_id in tokenizer(closer, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    return None


def stop_token_ids(tokenizer, chat_template: str | None = None) -> list[int]:
    """Ids that end a reply, for generation: EOS, then the template's end-of-turn token if it differs."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_of_turn = end_of_turn_token(tokenizer, chat_template)
    if end_of_turn is not None:
        end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if end_id not in ids:
            ids.append(end_id)
    return ids
