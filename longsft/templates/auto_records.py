"""Chat records as template `auto` hands them to a chat template: the messages `apply_chat_template` takes, with
tools, tool calls and tool results in the Hugging Face conventions (auto.py's AutoFormat mixes in RecordReader).

    from longsft.templates.auto_records import RecordReader
    fmt, conversation = RecordReader().parse_record({"messages": [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": "Hello"}]})

Records (messages / ShareGPT / Alpaca as for every template, longsft/data/pretokenize.py) become what `apply_chat_template` takes:
- messages: roles system, user, assistant, tool (also `observation`, `ipython`); an assistant message may carry
  `tool_calls` ([{"type": "function", "function": {"name", "arguments"}, "id"}] or [{"name", "arguments"}]),
  `reasoning_content`, `metadata` (GLM); a tool message `name`, `tool_call_id`. ShareGPT `function_call` turns
  (the value: {"name", "arguments"} JSON, or a list of them) become assistant messages with `tool_calls`, and
  `observation` / `function_response` / `tool` turns tool messages. Tool results go to the role the template
  renders them under (AutoFormat's probes: "tool", the Hugging Face convention, else "observation" or
  "ipython"); AutoFormat._shaped rewrites calls into GLM's own shape for templates that read that instead.
- tools: the record's `tools` (a list of function schemas or that list as a JSON string, LLaMA-Factory's Glaive
  layout), else a system message's `tools` (GLM-4 finetune layout); bare {"name", ...} schemas are wrapped as
  {"type": "function", "function": ...}. Arguments given as a JSON string are parsed; tool calls without an `id`
  get `call00001`, ... (9 characters, as Mistral requires) and tool results without `tool_call_id` the id of the
  oldest call not yet answered (and its `name`).
Opt-outs are the same: `"loss": false` / `"loss_weight": 0` on a message, only assistant messages are trained
(GLM-Edge's per-role loss masks: system, user and observation never), an empty reply without tool calls is not.
"""

from __future__ import annotations

import json
from collections import deque

from longsft.data.inputs import ZERO_WIDTH, ZERO_WIDTH_CHARS, Skip, _opted_out, _parse_alpaca, _text, load_json

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "function_call": "tool_call", "system": "system",
                  "observation": "tool", "function_response": "tool", "tool": "tool"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                 "observation": "tool", "ipython": "tool"}
_PASS_KEYS = ("metadata", "name", "tool_call_id", "reasoning_content")  # message keys the template sees as given


class Turn:
    """One message: `role` the driver's (system, user, assistant, observation), `message` the template's dict,
    `where` its place in the record (for skip reasons)."""
    __slots__ = ("role", "message", "train", "where")

    def __init__(self, role: str, message: dict, train: bool = False, where: str = ""):
        self.role, self.message, self.train, self.where = role, message, train, where


class Conversation(list):
    """A record's Turns, with its `tools` (a list of function schemas, or None)."""

    def __init__(self, turns, tools=None):
        super().__init__(turns)
        self.tools = tools


def _tools(value, where: str):
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = load_json(value, where)
        except ValueError:
            raise Skip("wrong_schema", f"{where}: not JSON; expected a list of function schemas") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Skip("wrong_schema", f"{where}: expected a list of function schemas (objects)")
    return [t if "function" in t or "name" not in t else {"type": "function", "function": t} for t in value] or None


def _call(c, where: str) -> dict:
    f = c.get("function") if isinstance(c, dict) and isinstance(c.get("function"), dict) else c
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
        raise Skip("wrong_schema", f"{where}: a tool call must be an object with a `name` (and `arguments`)")
    args = f.get("arguments", f.get("parameters"))
    if isinstance(args, str):
        try:
            parsed = load_json(args, f"{where}: arguments")
            args = parsed if isinstance(parsed, dict) else args
        except ValueError:
            pass
    call = {"type": "function", "function": {"name": f["name"], "arguments": {} if args is None else args}}
    if isinstance(c.get("id"), str) and c["id"]:
        call["id"] = c["id"]
    return call


def _calls(value, where: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = load_json(value, where)
        except ValueError:
            raise Skip("wrong_schema", f"{where}: a function_call value must be JSON {{\"name\", \"arguments\"}}") \
                from None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not value:
        raise Skip("wrong_schema", f"{where}: tool calls must be a non-empty list of objects")
    return [_call(c, where) for c in value]


def _link_calls(turns: list[Turn]) -> None:
    """Ids for tool calls that have none; each tool result without a `tool_call_id` answers the oldest open call."""
    pending, n = deque(), 0
    for t in turns:
        msg = t.message
        for c in msg.get("tool_calls", ()):
            if "id" not in c:
                n += 1
                c["id"] = f"call{n:05d}"
            pending.append(c)
        if t.role == "observation":
            given = msg.get("tool_call_id")
            call = next((c for c in pending if c["id"] == given), None) if given else (pending[0] if pending else None)
            if call is not None:
                pending.remove(call)
                msg.setdefault("tool_call_id", call["id"])
                msg.setdefault("name", call["function"]["name"])


class RecordReader:
    """parse_record for template auto (AutoFormat mixes it in); `tool_role` is the role tool results get."""
    tool_role = "tool"

    def parse_record(self, obj) -> tuple[str, Conversation]:
        if not isinstance(obj, dict):
            raise Skip("wrong_schema", f"a record must be a JSON object, got {type(obj).__name__}")
        tools = _tools(obj.get("tools"), "tools")
        if "messages" in obj:
            fmt, turns = "messages", self._messages(obj["messages"])
        elif "conversations" in obj:
            fmt, turns = "sharegpt", self._sharegpt(obj)
        elif "instruction" in obj and "output" in obj:
            fmt, turns = "alpaca", [Turn(m.role, {"role": m.role, "content": m.content}, m.train, f"turn {i}")
                                    for i, m in enumerate(_parse_alpaca(obj))]
        else:
            raise Skip("wrong_schema", "no `messages`, `conversations` or `instruction`+`output` field "
                                       f"(keys: {', '.join(sorted(obj))[:200]})")
        for t in turns:  # GLM-4's finetune layout: the tools on the system message
            listed = t.message.pop("tools", None)
            if tools is None and t.role == "system":
                tools = _tools(listed, "system message tools")
        _link_calls(turns)
        return fmt, Conversation(turns, tools)

    def _turn(self, role: str, content, where: str, source: dict, calls=None) -> Turn:
        """role: system, user, assistant or tool; `source`: the record's message (opt-out, extra keys)."""
        if content is None and calls:
            content = ""
        if role == "tool" and isinstance(content, (dict, list)) and not _is_text_parts(content):
            content = json.dumps(content, ensure_ascii=False)
        content = _text(content, where)
        msg = {"role": self.tool_role if role == "tool" else role, "content": content}
        for key in _PASS_KEYS:
            value = source.get(key)
            if value is not None and value != "":
                if not isinstance(value, str):
                    raise Skip("wrong_schema", f"{where}: `{key}` must be a string")
                msg[key] = value
        if "tools" in source and role == "system":
            msg["tools"] = source["tools"]
        if role != "assistant":
            _opted_out(source, where)  # checked for its type, as everywhere
            return Turn("observation" if role == "tool" else role, msg, False, where)
        if calls:
            msg["tool_calls"] = calls
        if not content.isascii() and any(c in content for c in ZERO_WIDTH_CHARS):
            msg["content"] = content = content.translate(ZERO_WIDTH)
        has_text = bool(content.strip()) or bool(calls) or bool(msg.get("reasoning_content", "").strip())
        return Turn("assistant", msg, has_text and not _opted_out(source, where), where)

    def _messages(self, items) -> list[Turn]:
        if not isinstance(items, list) or not items:
            raise Skip("wrong_schema", "`messages` must be a non-empty list")
        turns = []
        for i, m in enumerate(items):
            where = f"message {i}"
            if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
                raise Skip("wrong_schema", f"{where}: must be an object with `role` and `content`")
            role = MESSAGE_ROLES.get(m["role"]) if isinstance(m["role"], str) else None
            if role is None:
                raise Skip("unknown_role", f"{where}: role {m['role']!r}; expected one of "
                                           f"{', '.join(sorted(MESSAGE_ROLES))}")
            calls = _calls(m["tool_calls"], where) if role == "assistant" and m.get("tool_calls") else None
            turns.append(self._turn(role, m.get("content"), where, m, calls))
        return turns

    def _sharegpt(self, obj: dict) -> list[Turn]:
        items = obj["conversations"]
        if not isinstance(items, list) or not items:
            raise Skip("wrong_schema", "`conversations` must be a non-empty list")
        turns = [self._turn("system", obj["system"], "system", {})] if obj.get("system") else []
        for i, m in enumerate(items):
            where = f"message {i}"
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise Skip("wrong_schema", f"{where}: must be an object with `from` and `value`")
            role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
            if role is None:
                raise Skip("unknown_role", f"{where}: role {m['from']!r}; expected one of "
                                           f"{', '.join(sorted(SHAREGPT_ROLES))}")
            if role == "tool_call":
                turns.append(self._turn("assistant", "", where, m, _calls(m["value"], where)))
            else:
                turns.append(self._turn(role, m["value"], where, m))
        return turns


def _is_text_parts(value) -> bool:
    return isinstance(value, list) and all(isinstance(p, str) or isinstance(p, dict) and "text" in p for p in value)
