"""Examples -> token ids and labels, with loss only where the model should learn.

Rules (docs/data-formats.md has the long form):
- BOS: a sequence starts with BOS exactly when the tokenizer adds one to plain text
  (`tokenizer("x")` starts with it) or the chat template writes one; never twice.
- EOS ends every assistant turn and every completion, and is learned. A template that closes
  turns with EOS keeps its own; otherwise one is inserted right after the reply.
- Labels: -100 on system/user turns, prompts and template glue; the assistant replies (all turns)
  and their EOS are learned. `train_on_prompt` learns everything.
- Assistant spans come from the template's `{% generation %}` markers when it has them, else
  from rendering the conversation prefix by prefix: the reply to turn i is the text between
  render(turns[:i], add_generation_prompt=True) and render(turns[:i+1]).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from qlora_pipeline.core.data.records import Example
from qlora_pipeline.errors import DataError

IGNORE_INDEX = -100
# Pad tokens that models ship for exactly this use (Llama 3 reserves <|finetune_right_pad_id|>).
PAD_LIKE = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")
log = logging.getLogger(__name__)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


class TemplateProblem(Exception):
    """The chat template cannot render this record; the row is reported as template_error."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt: str  # rendered prompt incl. the generation prompt ("" for plain text)
    reference: str  # the expected completion ("" for plain text)


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


class Encoder:
    """Turns examples into (input_ids, labels) for one tokenizer and one chat template."""

    def __init__(self, tokenizer, chat_template: str | None, train_on_prompt: bool):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; every completion must end with one. Use a tokenizer that defines eos_token")
        self.tok = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)
        self.train_on_prompt = train_on_prompt
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.has_generation_tags = bool(self.template and _GENERATION_TAG.search(self.template))
        if self.template:
            self._check_template()

    # -- chat template ---------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raise_exception(), undefined variables, type errors
            raise TemplateProblem(f"the chat template failed: {exc}") from None

    def _check_template(self) -> None:
        try:
            text = self._render(_PROBE)
        except TemplateProblem as exc:
            raise DataError(f"{exc}; fix data.chat_template (or the tokenizer's) so it renders a user/assistant exchange") from None
        if "Hello" not in text:
            raise DataError("the chat template does not write the assistant's content; fix data.chat_template")

    def _chat_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], str]:
        """Rendered text, the character span of each assistant reply (prefix by prefix), the last prompt."""
        full = self._render(messages)
        spans, before = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            upto = self._render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateProblem(
                    "the chat template renders earlier turns differently once later turns are added, so replies "
                    "cannot be located; add {% generation %} ... {% endgeneration %} around assistant content"
                )
            spans.append((len(before), len(upto)))
        return full, spans, before

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """Token ids of text, and which tokens overlap a learned character span."""
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, learned, k = list(enc["input_ids"]), [], 0
            for start, end in enc["offset_mapping"]:  # spans and tokens are both in order: one pass
                while k < len(spans) and start >= spans[k][1]:
                    k += 1
                learned.append(k < len(spans) and end > spans[k][0])
            return ids, learned
        # Slow tokenizers have no offsets: tokenize the pieces between span edges separately.
        ids, learned, cursor = [], [], 0
        for s, e in [*spans, (len(text), len(text))]:
            for piece, flag in ((text[cursor:s], False), (text[s:e], True)):
                if piece:
                    piece_ids = self.tok(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    learned += [flag] * len(piece_ids)
            cursor = e
        return ids, learned

    # -- EOS / BOS / labels ----------------------------------------------------------------------
    def _close_with_eos(self, ids: list[int], learned: list[bool]) -> tuple[list[int], list[bool]]:
        """Each learned run ends with a learned EOS: keep the template's, else insert one."""
        out_ids: list[int] = []
        out_learned: list[bool] = []
        i, n = 0, len(ids)
        while i < n:
            if not learned[i]:
                out_ids.append(ids[i])
                out_learned.append(False)
                i += 1
                continue
            j = i
            while j < n and learned[j]:
                j += 1
            run = ids[i:j]
            if self.eos in run:  # learn up to the EOS; template glue after it (e.g. "\n") is not
                k = run.index(self.eos) + 1
                out_ids += run
                out_learned += [True] * k + [False] * (len(run) - k)
                i = j
            elif j < n and ids[j] == self.eos:  # the template closes the reply just outside the span
                out_ids += [*run, self.eos]
                out_learned += [True] * (len(run) + 1)
                i = j + 1
            else:
                out_ids += [*run, self.eos]
                out_learned += [True] * (len(run) + 1)
                i = j
        return out_ids, out_learned

    def _finish(self, ids: list[int], learned: list[bool], prompt: str, reference: str) -> Encoded:
        ids, learned = self._close_with_eos(ids, learned)
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids, learned = [self.bos, *ids], [False, *learned]
        if self.train_on_prompt:
            labels = list(ids)
        else:
            labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, learned)]
        return Encoded(ids, labels, prompt, reference)

    # -- public ----------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """A plain-text document: [BOS] tokens EOS, every token learned."""
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"]) + [self.eos]
        if self.bos is not None and ids[0] != self.bos:
            ids.insert(0, self.bos)
        return ids

    def encode_example(self, ex: Example) -> Encoded:
        """An instruction, prompt/completion or chat example; raises TemplateProblem."""
        if ex.kind == "chat" or (ex.kind in ("alpaca", "pair") and self.template):
            return self._encode_chat(self._as_messages(ex))
        if ex.kind == "alpaca":
            prompt = alpaca_prompt(ex.instruction, ex.input)
        elif ex.kind == "pair":
            prompt = ex.prompt
        else:
            raise ValueError(f"encode_example got a {ex.kind!r} example; use encode_text")
        text = prompt + ex.output
        ids, learned = self._tokenize(text, [(len(prompt), len(text))])
        return self._finish(ids, learned, prompt, ex.output)

    @staticmethod
    def _as_messages(ex: Example) -> list[dict[str, str]]:
        if ex.kind == "chat":
            return [{"role": r, "content": c} for r, c in ex.messages]
        user = ex.prompt if ex.kind == "pair" else (f"{ex.instruction}\n\n{ex.input}" if ex.input.strip() else ex.instruction)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": ex.output}]

    def _encode_chat(self, messages: list[dict[str, str]]) -> Encoded:
        if not self.template:
            raise DataError(
                "chat records need a chat template, and the tokenizer has none; set data.chat_template "
                "(docs/data-formats.md has a ready one) or use a chat model's tokenizer"
            )
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if self.has_generation_tags:
            prompt = self._render(messages[:last], add_generation_prompt=True)
            try:
                enc = self.tok.apply_chat_template(
                    messages, chat_template=self.template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
            except Exception as exc:
                raise TemplateProblem(f"the chat template failed: {exc}") from None
            ids, learned = list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
        else:
            text, spans, prompt = self._chat_spans(messages)
            ids, learned = self._tokenize(text, spans)
        return self._finish(ids, learned, prompt, messages[last]["content"])


def alpaca_prompt(instruction: str, inp: str = "") -> str:
    """The plain prompt used for instruction records when there is no chat template."""
    if inp.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"
