"""Raw rows -> validated examples of one of four kinds: text, alpaca, prompt/completion, chat.

`format: auto` decides per record from its keys (after `data.columns` renames them; the mapping
is either one for every file or one per path glob, see `ColumnMaps`):
messages -> chat, conversations -> sharegpt (normalised to chat), instruction/input/output ->
alpaca, prompt/completion -> prompt/completion, text -> text. A row that fails a check becomes a
`BadRow` with a reason code (docs/data-formats.md lists them) and a message saying what is wrong.

Chat turns are kept as the dicts the chat template is given: `role` and `content`, plus
`tool_calls` on an assistant turn that calls tools (normalised to the OpenAI shape with `arguments`
as a JSON object, which is what templates render) and `name` / `tool_call_id` on a `tool` turn.
Whether the template can render tool use is the encoder's check (`tools_unsupported`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from qlora_pipeline.columns import MESSAGE_FIELDS, columns_per_file
from qlora_pipeline.core.data.sources import BadRow, Row, glob_to_regex

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's tool turns as LLaMA-Factory writes them: `function_call` (the value is the call as JSON)
# and `observation` (the tool's result).
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}


@dataclass
class Example:
    """A validated record. `kind` picks the rendering; `format` is what the user's data was."""

    source: str
    format: str  # text | instruction | chat | sharegpt
    kind: str  # text | alpaca | pair | chat
    text: str = ""
    messages: tuple[dict[str, Any], ...] = ()  # chat turns as the template gets them (see the module doc)
    tools: tuple[dict[str, Any], ...] = ()  # tool definitions (JSON schema) the template renders, if any
    instruction: str = ""
    input: str = ""
    output: str = ""  # alpaca output, or the completion of a prompt/completion pair
    prompt: str = ""

    def key(self) -> str:
        """Content identity for dedupe and for the seeded split (the source is not part of it)."""
        body = {
            "text": [self.text],
            "alpaca": [self.instruction, self.input, self.output],
            "pair": [self.prompt, self.output],
            "chat": [_turn_key(m) for m in self.messages] + ([{"tools": list(self.tools)}] if self.tools else []),
        }[self.kind]
        return json.dumps([self.kind, body], ensure_ascii=False, sort_keys=True)

    def strings(self) -> list[str]:
        """Every text the model will read, for the special-token check (tool calls and schemas as JSON)."""
        extras = [json.dumps(m["tool_calls"], ensure_ascii=False) for m in self.messages if m.get("tool_calls")]
        extras += [json.dumps(t, ensure_ascii=False) for t in self.tools]
        return [self.text, self.instruction, self.input, self.output, self.prompt, *(m["content"] for m in self.messages), *extras]


def _turn_key(message: dict[str, Any]) -> list[Any]:
    """[role, content] for a plain turn (the identity earlier versions used, so splits stay put), plus the rest."""
    rest = {k: v for k, v in message.items() if k not in ("role", "content")}
    return [message["role"], message["content"], rest] if rest else [message["role"], message["content"]]


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def rename_columns(fields: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply data.columns (ours -> yours) to a record's top-level keys (message keys apply inside turns)."""
    top = {ours: theirs for ours, theirs in columns.items() if ours not in MESSAGE_FIELDS}
    if not top:
        return fields
    theirs_to_ours = {theirs: ours for ours, theirs in top.items()}
    # A column that has our name but is not the one mapped to it is left out, so it cannot shadow.
    return {theirs_to_ours.get(k, k): v for k, v in fields.items() if k in theirs_to_ours or k not in top}


class ColumnMaps:
    """Which data.columns mapping applies to each file: the flat form to all of them; in the
    per-file form the first glob matching the end of the file's path (none: the names as they are)."""

    def __init__(self, columns: dict[str, Any]):
        self.per_file = columns_per_file(columns)
        self.columns = columns
        self._patterns = [(p, glob_to_regex(p), m) for p, m in columns.items()] if self.per_file else []
        self._cache: dict[str, tuple[str | None, dict[str, str]]] = {}

    def for_file(self, file: str) -> tuple[str | None, dict[str, str]]:
        """(the matching glob or None, the mapping) for a file as reports show it."""
        if not self.per_file:
            return None, self.columns
        if file not in self._cache:
            self._cache[file] = next(((p, m) for p, rx, m in self._patterns if rx.search(file)), (None, {}))
        return self._cache[file]

    @property
    def globs(self) -> list[str]:
        return [p for p, _, _ in self._patterns]

    def unused_globs(self) -> list[str]:
        """Globs that matched none of the files looked up so far."""
        used = {p for p, _ in self._cache.values()}
        return [p for p in self.globs if p not in used]


def _mapping_note(fields: dict[str, Any], mapping: dict[str, str], pattern: str | None, maps: ColumnMaps) -> str:
    """Why a row's columns did not fit after data.columns: what the mapping expected, what is there."""
    where = f"data.columns[{pattern!r}]" if pattern else "data.columns"
    top = {ours: theirs for ours, theirs in mapping.items() if ours not in MESSAGE_FIELDS and ours != theirs}
    absent = {ours: theirs for ours, theirs in top.items() if theirs not in fields}
    if absent:
        pairs = ", ".join(f"{theirs!r} as {ours}" for ours, theirs in absent.items())
        note = f". {where} reads {pairs}, but the row has no {', '.join(repr(t) for t in absent.values())} column"
        hidden = [ours for ours in absent if ours in fields]
        if hidden:
            note += (
                f"; its own {', '.join(repr(h) for h in hidden)} column is not read, because the mapping takes "
                "that field from another column. Files that use the default names need no mapping: map only "
                'the files that differ, per glob, e.g. data.columns: {"extra/*.jsonl": {instruction: question}}'
            )
        return note
    if maps.per_file and pattern is None:
        globs = ", ".join(repr(p) for p in maps.globs)
        return f". No data.columns glob matches this file ({globs}), so its columns are read by their own names"
    return ""


def _message_keys(columns: dict[str, str], role: str, content: str) -> tuple[str, str]:
    return columns.get(role, role), columns.get(content, content)


def detect_format(fields: dict[str, Any], wanted: str, found: dict[str, Any] | None = None) -> str:
    """Which format a record is, from its keys; raises _Bad when its keys fit none.

    `found` is the record as read, before data.columns renamed it, for the message."""
    keys = set(fields)
    if wanted != "auto":
        return wanted
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"instruction", "input", "output", "prompt", "completion"}:
        return "instruction"
    if "text" in keys:
        return "text"
    shown = sorted(found if found is not None else fields)
    renamed = f" ({sorted(keys)} after data.columns)" if found is not None and sorted(keys) != shown else ""
    raise _Bad(
        "wrong_columns",
        f"the row's fields match no format: expected text | instruction+output (+input) | prompt+completion | "
        f"messages | conversations, found {shown}{renamed}. Map yours with data.columns, "
        'e.g. {instruction: question, output: answer}, or per file: {"extra/*.jsonl": {instruction: question}}',
    )


def _string(fields: dict[str, Any], name: str, *, required: bool = True) -> str:
    if name not in fields or fields[name] is None:
        if required:
            raise _Bad("missing_field", f"no {name!r} field (fields: {sorted(fields)}); add it or map yours with data.columns")
        return ""
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Bad("bad_value", f"{name!r} must be a string, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad("bad_value", f"{name!r} must be a string, got {value}")
    return value if isinstance(value, str) else str(value)


def _turns(fields: dict[str, Any], name: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, Any]]:
    if name not in fields:
        raise _Bad("missing_field", f"no {name!r} field (fields: {sorted(fields)}); add it or map yours with data.columns")
    turns = fields[name]
    if isinstance(turns, str):  # CSV cells hold the list as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as exc:
            raise _Bad("broken_json", f"{name!r} is not a JSON list of turns: {exc.msg}") from None
    if not isinstance(turns, list) or not turns:
        raise _Bad("bad_value", f"{name!r} must be a non-empty list of turns")
    return [_turn(number, turn, role_key, content_key, roles) for number, turn in enumerate(turns, 1)]


def _turn(number: int, turn: Any, role_key: str, content_key: str, roles: dict[str, str]) -> dict[str, Any]:
    """One turn as the chat template gets it: role, content, and tool_calls / name / tool_call_id where given."""
    if not isinstance(turn, dict):
        raise _Bad("bad_value", f"turn {number} must be an object with {role_key!r} and {content_key!r}")
    raw_role = turn.get(role_key)
    if raw_role is None:
        raise _Bad("missing_field", f"turn {number} needs {role_key!r} and {content_key!r} (has {sorted(turn)})")
    if not isinstance(raw_role, str) or raw_role not in roles:
        raise _Bad("bad_role_order", f"turn {number} has unknown role {raw_role!r}; allowed: {', '.join(roles)}")
    role = roles[raw_role]
    calls = None
    if raw_role == "function_call":  # ShareGPT: the value is the call itself
        calls, content = _tool_calls(turn.get(content_key), number), ""
    else:
        if turn.get("tool_calls") is not None:
            if role != "assistant":
                raise _Bad("bad_value", f"turn {number} ({role}) has tool_calls; only assistant turns call tools")
            calls = _tool_calls(turn["tool_calls"], number)
        content = turn.get(content_key)
        if content is None:
            if calls is None:  # a turn that calls tools may have no text
                raise _Bad("missing_field", f"turn {number} needs {role_key!r} and {content_key!r} (has {sorted(turn)})")
            content = ""
        elif role == "tool" and isinstance(content, (dict, list)):  # structured tool results, as JSON text
            content = json.dumps(content, ensure_ascii=False)
        elif not isinstance(content, str):
            raise _Bad("bad_value", f"turn {number}: {content_key!r} must be a string, got {type(content).__name__}")
    message: dict[str, Any] = {"role": role, "content": content}
    if calls:
        message["tool_calls"] = calls
    if role == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(turn.get(key), str) and turn[key]:
                message[key] = turn[key]
    return message


def _tool_calls(value: Any, number: int) -> list[dict[str, Any]]:
    """A turn's tool calls in the OpenAI shape, `arguments` a JSON object (templates render it with tojson).

    Accepted: a list of calls or one call, each `{"type": "function", "function": {"name", "arguments"}}`
    or flat `{"name", "arguments"}` (`parameters` too); `arguments` a JSON object or JSON text of one.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Bad("broken_json", f"turn {number}: the tool call is not JSON: {exc.msg}") from None
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not calls:
        raise _Bad("bad_value", f"turn {number}: tool_calls must be a non-empty list of calls")
    out = []
    for k, call in enumerate(calls, 1):
        what = f"turn {number}, tool call {k}"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise _Bad("bad_value", f'{what} must be an object like {{"type": "function", "function": {{"name": ..., "arguments": {{...}}}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _Bad("bad_value", f"{what} needs a function name")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise _Bad("broken_json", f"{what}: arguments are not JSON: {exc.msg}") from None
        if not isinstance(arguments, dict):
            raise _Bad("bad_value", f"{what}: arguments must be a JSON object, got {type(arguments).__name__}")
        entry: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str) and call["id"]:
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(fields: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The row's `tools` definitions (a list of JSON schemas, or JSON text of one), if it has them."""
    tools = fields.get("tools")
    if tools is None or tools == "":
        return ()
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise _Bad("broken_json", f"'tools' is not a JSON list of tool definitions: {exc.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _Bad("bad_value", "'tools' must be a list of tool definitions (JSON schema objects)")
    return tuple(tools)


def check_role_order(turns: list[dict[str, Any]]) -> None:
    """Optional system first, then user/assistant alternating, ending on an assistant turn.

    An assistant turn with tool_calls is followed by one or more `tool` turns (its results), then by
    the assistant again; a conversation may also end on a tool call.
    """
    start = 1 if turns[0]["role"] == "system" else 0
    expected: tuple[str, ...] = ("user",)
    for number, turn in enumerate(turns[start:], start + 1):
        role, content = turn["role"], turn["content"]
        if role not in expected:
            where = "only first" if role == "system" else f"{' or '.join(expected)} expected"
            raise _Bad(
                "bad_role_order",
                f"turn {number} is {role!r} ({where}); turns must go [system], user, assistant, user, ... "
                "(an assistant turn with tool_calls is followed by its 'tool' results, then the assistant again)",
            )
        if role == "user" and not content.strip():
            raise _Bad("bad_value", f"turn {number} (user) is empty")
        if role == "assistant" and not content.strip() and not turn.get("tool_calls"):
            raise _Bad("empty_completion", f"turn {number} (assistant) is empty")
        if role == "user":
            expected = ("assistant",)
        elif role == "assistant":
            expected = ("tool",) if turn.get("tool_calls") else ("user",)
        else:
            expected = ("tool", "assistant")
    if len(turns) == start:
        raise _Bad("bad_role_order", "no user or assistant turns")
    if turns[-1]["role"] != "assistant":
        raise _Bad("bad_role_order", "the last turn is not the assistant's; end each conversation with the reply to learn")


def to_example(row: Row, wanted: str, columns: dict[str, str]) -> Example:
    """Normalise and validate one row; raises _Bad."""
    fields = rename_columns(row.fields, columns)
    fmt = "text" if row.from_txt else detect_format(fields, wanted, row.fields)
    if row.from_txt and wanted not in ("auto", "text"):
        raise _Bad("wrong_columns", f"a .txt file is plain text, but data.format is {wanted!r}; use format auto or text")
    if fmt == "text":
        text = _string(fields, "text")
        if not text.strip():
            raise _Bad("missing_field", "'text' is empty")
        return Example(row.source, "text", "text", text=text)
    if fmt == "chat":
        role_key, content_key = _message_keys(columns, "role", "content")
        turns = _turns(fields, "messages", role_key, content_key, {r: r for r in CHAT_ROLES})
        check_role_order(turns)
        return Example(row.source, "chat", "chat", messages=tuple(turns), tools=_tools(fields))
    if fmt == "sharegpt":
        role_key, content_key = _message_keys(columns, "from", "value")
        turns = _turns(fields, "conversations", role_key, content_key, SHAREGPT_ROLES)
        check_role_order(turns)
        return Example(row.source, "sharegpt", "chat", messages=tuple(turns), tools=_tools(fields))
    # instruction: alpaca (instruction/input/output) or prompt/completion
    if "prompt" in fields or "completion" in fields:
        prompt, completion = _string(fields, "prompt"), _string(fields, "completion")
        if not prompt.strip():
            raise _Bad("bad_value", "'prompt' is empty")
        if not completion.strip():
            raise _Bad("empty_completion", "'completion' is empty")
        return Example(row.source, "instruction", "pair", prompt=prompt, output=completion)
    instruction, output = _string(fields, "instruction"), _string(fields, "output")
    inp = _string(fields, "input", required=False)
    if not instruction.strip():
        raise _Bad("bad_value", "'instruction' is empty")
    if not output.strip():
        raise _Bad("empty_completion", "'output' is empty")
    return Example(row.source, "instruction", "alpaca", instruction=instruction, input=inp, output=output)


def validate_rows(
    rows: list[Row], wanted: str, columns: dict[str, Any], special: re.Pattern[str] | None
) -> tuple[list[Example], list[BadRow]]:
    """Every row -> an Example or a BadRow naming its file:line and what is wrong.

    `columns` is data.columns in either form: {ours: yours} for every file, or {glob: {ours: yours}};
    `special` matches the tokenizer's special tokens (prepare.py's special_token_pattern)."""
    maps = ColumnMaps(columns)
    examples, bad = [], []
    for row in rows:
        pattern, mapping = maps.for_file(row.file or row.source.rpartition(":")[0])
        try:
            example = to_example(row, wanted, mapping)
            if special is not None:
                for value in example.strings():
                    hit = special.search(value)
                    if hit:
                        raise _Bad(
                            "special_token_in_text",
                            f"holds the special token {hit.group()!r}, which would be read as a control token; "
                            "remove it from the data",
                        )
        except _Bad as exc:
            detail = exc.detail
            if exc.reason in ("wrong_columns", "missing_field") and not row.from_txt:
                detail += _mapping_note(row.fields, mapping, pattern, maps)
            bad.append(BadRow(row.source, exc.reason, detail))
            continue
        examples.append(example)
    for pattern in maps.unused_globs():
        log.warning("data.columns glob %r matches none of the files with rows; check its spelling", pattern)
    return examples, bad
