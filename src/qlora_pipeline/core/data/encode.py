"""Examples -> token ids and labels, with loss only where the model should learn.

Rules (docs/data-formats.md has the long form):
- BOS: a sequence starts with BOS exactly when the tokenizer adds one to plain text
  (`tokenizer("x")` starts with it) or the chat template writes one; never twice.
- End of turn: every reply ends with the token that ends a turn, and it is learned. With a chat
  template that is the template's own end-of-turn token (`end_of_turn_token`: the first special
  token it writes after a reply, EOS itself for Zephyr/SmolLM2-style templates, `<|im_end|>` or
  `<|eot_id|>` where EOS is another token) on every assistant turn; EOS is added only where the
  template writes it. A template that closes turns with plain text gets EOS after the last reply
  only (so every turn's prompt is still a prefix of the row). Without a template (alpaca,
  prompt/completion, text) EOS is appended.
- Prompt prefix: the prompt of the last reply (the row's `prompt`) is tokenized on its own, as
  `encode_prompt` tokenizes it for generation, so it is always a token prefix of the row and the
  learned tokens start right after it. Earlier turns' prompts are prefixes too wherever the
  tokenizer allows it (no token straddles a turn boundary).
- Labels: -100 on system/user/tool turns, prompts and template glue; the assistant replies (all
  turns, tool calls included) and their end-of-turn token are learned. `train_on_prompt` learns
  everything.
- Assistant spans come from the template's `{% generation %}` markers when it has them, else
  from rendering the conversation prefix by prefix: the reply to turn i is the text between
  render(turns[:i], add_generation_prompt=True) and render(turns[:i+1]).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

from qlora_pipeline.core.data.records import Example
from qlora_pipeline.core.data.tokens import PROBE, PROBE_REPLY, end_of_turn_token, resolve_chat_template, tokenizer_adds_bos
from qlora_pipeline.errors import DataError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Probes for tool use: a call with its result, and a tool definition; each string must show up rendered.
# The call id is 9 letters and digits, as Mistral's templates demand.
_TOOL_NAME, _TOOL_ARGUMENT, _TOOL_RESULT, _TOOL_SPEC_NAME = "get_weather", "Reykjavik", "4 degrees, windy", "get_time_zone"
_TOOL_PROBE = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": _TOOL_NAME, "arguments": {"city": _TOOL_ARGUMENT}}}
    ]},
    {"role": "tool", "tool_call_id": "call00001", "name": _TOOL_NAME, "content": _TOOL_RESULT},
    {"role": "assistant", "content": "Cold."},
]
_TOOL_SPEC = [{
    "type": "function",
    "function": {
        "name": _TOOL_SPEC_NAME,
        "description": "The time zone of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
_TOOLS_FIX = (
    "set data.chat_template to a template that renders tools (the chat templates of Qwen2.5 and "
    "Llama-3.1 do: tool_calls on assistant turns and role 'tool'), or remove these rows"
)


class TemplateProblem(Exception):
    """The chat template cannot render this record; the row is reported as bad with `reason`."""

    def __init__(self, detail: str, reason: str = "template_error"):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt: str  # rendered prompt incl. the generation prompt ("" for plain text)
    reference: str  # the expected completion ("" for plain text)


def _has_offsets(tokenizer) -> bool:
    """Whether the tokenizer returns character offsets (fast tokenizers do)."""
    return bool(getattr(tokenizer, "is_fast", False))


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (character offsets), whether it overlaps one of the (sorted) spans."""
    flags, k = [], 0
    for start, end in offsets:  # spans and tokens are both in order: one pass
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        flags.append(k < len(spans) and end > spans[k][0])
    return flags


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    runs, i, n = [], 0, len(flags)
    while i < n:
        if not flags[i]:
            i += 1
            continue
        j = i
        while j < n and flags[j]:
            j += 1
        runs.append((i, j))
        i = j
    return runs


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
        self.end_of_turn: str | None = None
        if self.template:
            self._check_template()
            self.end_of_turn = end_of_turn_token(tokenizer, self.template)
        # A reply is closed by the template's end-of-turn token, or by EOS wherever the template writes it.
        self.closers = {self.eos}
        if self.end_of_turn is not None:
            self.closers.add(tokenizer.convert_tokens_to_ids(self.end_of_turn))
        self.rows_split_at_prompt = 0  # rows whose tokenization had to be cut where the reply starts
        self._tool_problems: dict[str, str | None] = {}

    # -- chat template ---------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tools=None) -> str:
        try:
            return self.tok.apply_chat_template(
                messages, tools=tools or None, chat_template=self.template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja raise_exception(), undefined variables, type errors
            raise TemplateProblem(f"the chat template failed: {exc}") from None

    def _check_template(self) -> None:
        try:
            text = self._render(PROBE)
        except TemplateProblem as exc:
            raise DataError(f"{exc}; fix data.chat_template (or the tokenizer's) so it renders a user/assistant exchange") from None
        if PROBE_REPLY not in text:
            raise DataError("the chat template does not write the assistant's content; fix data.chat_template")

    def _check_tools(self, calls: bool, definitions: bool) -> None:
        """Raise TemplateProblem(tools_unsupported) if the row uses tools the template does not render."""
        for what, used in (("calls", calls), ("definitions", definitions)):
            if not used:
                continue
            if what not in self._tool_problems:
                self._tool_problems[what] = self._probe_tools(what)
            if self._tool_problems[what]:
                raise TemplateProblem(self._tool_problems[what], reason="tools_unsupported")

    def _probe_tools(self, what: str) -> str | None:
        """Why the template cannot render tool calls / tool definitions, or None if it can."""
        try:
            if what == "calls":
                text = self._render(_TOOL_PROBE)
                shown = all(part in text for part in (_TOOL_NAME, _TOOL_ARGUMENT, _TOOL_RESULT))
                missing = "the assistant's tool_calls and the 'tool' turns"
            else:
                text = self._render(PROBE, tools=_TOOL_SPEC)
                shown = _TOOL_SPEC_NAME in text
                missing = "the row's `tools` definitions"
        except TemplateProblem as exc:
            return f"the chat template cannot render tool use ({exc}); {_TOOLS_FIX}"
        return None if shown else f"the chat template does not render {missing}, so the model would never see them; {_TOOLS_FIX}"

    def _prefix_spans(self, messages: list[dict[str, Any]], tools) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text and the character span of each assistant turn, found prefix by prefix."""
        full = self._render(messages, tools=tools)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True, tools=tools)
            upto = self._render(messages[: i + 1], tools=tools)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateProblem(
                    "the chat template renders earlier turns differently once later turns are added, so replies "
                    "cannot be located; add {% generation %} ... {% endgeneration %} around assistant content"
                )
            spans.append((len(before), len(upto)))
        return full, spans

    def _marked_spans(self, messages: list[dict[str, Any]], tools) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text and the character spans the template marks with {% generation %}."""
        try:
            enc = self.tok.apply_chat_template(
                messages, tools=tools or None, chat_template=self.template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True,
            )
        except Exception as exc:
            raise TemplateProblem(f"the chat template failed: {exc}") from None
        text = self._render(messages, tools=tools)
        offsets = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans: list[tuple[int, int]] = []
        previous = False
        for (start, end), marked in zip(offsets, enc["assistant_masks"]):
            if marked and previous:
                spans[-1] = (spans[-1][0], end)
            elif marked:
                spans.append((start, end))
            previous = bool(marked)
        return text, spans

    # -- tokens ----------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def _tokenize(self, text: str, spans: list[tuple[int, int]], cut: int) -> tuple[list[int], list[bool]]:
        """Token ids of text, and which tokens overlap a learned character span.

        text[:cut] is the prompt of the last reply. It is tokenized on its own, exactly as
        `encode_prompt` tokenizes it for generation, so it is always a token prefix of the row. The
        rest keeps the whole text's tokenization when that starts with the prompt's tokens; when a
        token would straddle the cut (a prompt ending in a space before a completion starting with
        a word: `": "` + `"small"` merge into `" small"`), the rest is tokenized from the cut on.
        """
        if not _has_offsets(self.tok):
            return self._tokenize_without_offsets(text, spans, cut)
        head = self.tok(text[:cut], add_special_tokens=False, return_offsets_mapping=True)
        whole = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        head_ids = list(head["input_ids"])
        if list(whole["input_ids"][: len(head_ids)]) == head_ids:
            ids, offsets = list(whole["input_ids"]), list(whole["offset_mapping"])
        else:
            self.rows_split_at_prompt += 1
            tail = self.tok(text[cut:], add_special_tokens=False, return_offsets_mapping=True)
            ids = head_ids + list(tail["input_ids"])
            offsets = list(head["offset_mapping"]) + [(s + cut, e + cut) for s, e in tail["offset_mapping"]]
        return ids, _overlapping(offsets, spans)

    def _tokenize_without_offsets(self, text: str, spans: list[tuple[int, int]], cut: int) -> tuple[list[int], list[bool]]:
        """_tokenize for tokenizers without offsets: token boundaries found by tokenizing prefixes."""
        ids = self._ids(text[:cut])
        learned = [False] * len(ids)

        def boundary(x: int) -> int:  # tokens of the prompt that lie wholly before character x
            prefix = self._ids(text[:x])
            k = 0
            while k < min(len(prefix), len(ids)) and prefix[k] == ids[k]:
                k += 1
            return k

        for start, end in spans:
            if start < cut:
                a, b = boundary(start), boundary(min(end, cut))
                learned[a:b] = [True] * max(0, b - a)
        cursor = cut
        for start, end in [*((max(s, cut), e) for s, e in spans if e > cut), (len(text), len(text))]:
            for piece, flag in ((text[cursor:start], False), (text[start:end], True)):
                piece_ids = self._ids(piece)
                ids += piece_ids
                learned += [flag] * len(piece_ids)
            cursor = end
        return ids, learned

    # -- end of turn / BOS / labels --------------------------------------------------------------
    def _close_turns(self, ids: list[int], learned: list[bool]) -> tuple[list[int], list[bool]]:
        """Each reply is learned up to and including the token that closes it.

        That is the last end-of-turn token (or EOS) the template writes in the reply's span, and
        template glue after it (`"\\n"`) is not learned; or the one right after the span (generation
        markers that end before it). A reply with neither is left as it is, except the last one,
        which gets EOS: a stop the model learns, placed where it shifts no later turn.
        """
        ids, learned = list(ids), list(learned)
        runs = _runs(learned)
        for number, (i, j) in reversed(list(enumerate(runs))):  # right to left: an insert moves nothing still to do
            closing = [p for p in range(i, j) if ids[p] in self.closers]
            if closing:
                learned[closing[-1] + 1 : j] = [False] * (j - closing[-1] - 1)
            elif j < len(ids) and ids[j] in self.closers:
                learned[j] = True
            elif number == len(runs) - 1:
                ids.insert(j, self.eos)
                learned.insert(j, True)
        return ids, learned

    def _finish(self, ids: list[int], learned: list[bool], prompt: str, reference: str) -> Encoded:
        ids, learned = self._close_turns(ids, learned)
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
            return self._encode_chat(self._as_messages(ex), list(ex.tools))
        if ex.kind == "alpaca":
            prompt = alpaca_prompt(ex.instruction, ex.input)
        elif ex.kind == "pair":
            prompt = ex.prompt
        else:
            raise ValueError(f"encode_example got a {ex.kind!r} example; use encode_text")
        text = prompt + ex.output
        ids, learned = self._tokenize(text, [(len(prompt), len(text))], len(prompt))
        return self._finish(ids, learned, prompt, ex.output)

    @staticmethod
    def _as_messages(ex: Example) -> list[dict[str, Any]]:
        if ex.kind == "chat":
            return [copy.deepcopy(m) for m in ex.messages]  # a template may not change the example
        user = ex.prompt if ex.kind == "pair" else (f"{ex.instruction}\n\n{ex.input}" if ex.input.strip() else ex.instruction)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": ex.output}]

    def _encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Encoded:
        if not self.template:
            raise DataError(
                "chat records need a chat template, and the tokenizer has none; set data.chat_template "
                "(docs/data-formats.md has a ready one) or use a chat model's tokenizer"
            )
        self._check_tools(
            calls=any(m["role"] == "tool" or m.get("tool_calls") for m in messages), definitions=bool(tools)
        )
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = self._render(messages[:last], add_generation_prompt=True, tools=tools)
        text, spans = (self._marked_spans if self.has_generation_tags else self._prefix_spans)(messages, tools)
        if not text.startswith(prompt):
            raise TemplateProblem(
                "the chat template's prompt for the last reply (rendered with add_generation_prompt=True) is "
                "not how the whole conversation starts, so generation would see other tokens than training; "
                "fix the template so add_generation_prompt writes what precedes an assistant turn"
            )
        ids, learned = self._tokenize(text, spans, len(prompt))
        return self._finish(ids, learned, prompt, messages[last]["content"])


def alpaca_prompt(instruction: str, inp: str = "") -> str:
    """The plain prompt used for instruction records when there is no chat template."""
    if inp.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"
