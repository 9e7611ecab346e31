"""Template `auto`'s tools: what a chat template can express of tool calls, results and schemas (found by rendering
probe conversations), records fed in that shape, and the checks that no call, result, schema or reply is lost
(AutoFormat mixes in ToolShapes).

    from longsft.templates.registry import chat_format
    fmt = chat_format("auto", tokenizer)                      # an AutoFormat: a ToolShapes
    fmt.call_shape, fmt.tools_key, fmt.tool_role              # e.g. "glm", "system", "observation" (GLM-4-9b-chat)

    python -m pytest -q tests/templates/test_real_templates.py -k probed_tool_shapes   # on the real templates (slow)

Uses the AutoFormat attributes and methods `what`, `special_re`, `_render`.
"""

from __future__ import annotations

import json
from typing import Optional

from longsft.data.inputs import Skip
from longsft.templates.auto_records import Conversation, Turn

PROBE = {"fn": "zq_probe_fn", "arg": "zq_probe_arg", "value": "zq_probe_value", "result": "zq_probe_result"}


def reply_marks(message: dict) -> list[str]:
    """Text a reply's rendering must hold: its content (stripped), or its calls' names."""
    marks = [c["function"]["name"] for c in message.get("tool_calls") or ()]
    content = message.get("content")
    content = content.strip() if isinstance(content, str) else ""
    return marks + [content] if content else marks



class ToolShapes:
    call_shape = "openai"  # how tool calls reach the template: "openai" tool_calls, "glm" metadata messages, None
    tools_key = "kwarg"  # where tool schemas go: apply_chat_template's `tools`, a "system" message's key, None

    def _shows(self, messages: list[dict], tools, *texts: str) -> Optional[str]:
        """The rendering when it holds every one of `texts`, else None."""
        try:
            text = self._render(messages, tools)[0]
        except Skip:
            return None
        return text if all(t in text for t in texts) else None

    def _probe_tools(self) -> None:
        """How this template writes tools, found by rendering probe conversations (names below are PROBE's):
        schemas through apply_chat_template's `tools` or on a system message (GLM-4-9b-chat's `item['tools']`);
        calls as OpenAI `tool_calls` or as GLM's assistant message with `metadata` = the function's name and the
        arguments JSON as content; results under the role that renders them with the most special tokens
        (GLM's `<|observation|>` over a plain-text `<|tool|>`)."""
        p = PROBE
        schema = {"type": "function", "function": {"name": p["fn"], "description": "probe", "parameters": {
            "type": "object", "properties": {p["arg"]: {"type": "string"}}}}}
        user = {"role": "user", "content": "Alpha"}
        if self._shows([user], [schema], p["fn"]):
            self.tools_key = "kwarg"
        elif self._shows([{"role": "system", "content": "", "tools": [schema]}, user], None, p["fn"]) or \
                self._shows([{"role": "system", "content": "Omega", "tools": [schema]}, user], None, p["fn"]):
            self.tools_key = "system"
        else:
            self.tools_key = None
        tools = [schema] if self.tools_key == "kwarg" else None
        call = {"type": "function", "id": "call00001", "function": {"name": p["fn"], "arguments": {p["arg"]: p["value"]}}}
        openai = {"role": "assistant", "content": "", "tool_calls": [call]}
        glm = {"role": "assistant", "metadata": p["fn"], "content": json.dumps({p["arg"]: p["value"]})}
        best = None  # (special tokens, -preference, shape, role)
        for shape, message in (("openai", openai), ("glm", glm)):
            if not self._shows([user, message], tools, p["fn"], p["value"]):
                continue
            for k, role in enumerate(("tool", "observation", "ipython")):
                result = {"role": role, "content": p["result"], "tool_call_id": "call00001", "name": p["fn"]}
                text = self._shows([user, message, result], tools, p["fn"], p["value"], p["result"])
                if text is not None:
                    score = (len(self.special_re.findall(text)), -k - (3 if shape == "glm" else 0))
                    best = max(best, (score, shape, role)) if best else (score, shape, role)
            if best is None:  # calls but no results: calls alone are still shown
                best = ((0, -9), shape, "tool")
        self.call_shape, self.tool_role = (best[1], best[2]) if best else (None, "tool")

    def _shaped(self, conv: Conversation) -> Conversation:
        """The record in the shape this template reads (`call_shape`, `tools_key`, `tool_role` from _probe_tools);
        Skip template_cannot_render_tools when it holds calls, results or schemas the template cannot write."""
        calls = any(t.message.get("tool_calls") for t in conv)
        results = any(t.role == "observation" for t in conv)
        where = self.what
        if (calls or results) and self.call_shape is None:
            raise Skip("template_cannot_render_tools", f"{where} writes no tool calls (neither OpenAI tool_calls nor "
                                                       f"GLM's metadata + observation messages): its calls would be lost")
        if conv.tools and self.tools_key is None:
            raise Skip("template_cannot_render_tools", f"{where} writes no tool schemas (neither `tools` nor a system "
                                                       f"message's `tools`): the record's tools would be lost")
        turns, tools = list(conv), conv.tools
        if self.call_shape == "glm" and (calls or results):
            turns = []
            for t in conv:
                msg = t.message
                if t.role == "observation":
                    turns.append(Turn(t.role, {"role": self.tool_role, "content": msg["content"]}, False, t.where))
                    continue
                if not msg.get("tool_calls"):
                    turns.append(t)
                    continue
                if msg["content"].strip():
                    turns.append(Turn(t.role, {k: v for k, v in msg.items() if k != "tool_calls"}, t.train, t.where))
                for c in msg["tool_calls"]:  # GLM: one assistant message per call, the name as its metadata
                    args = c["function"]["arguments"]
                    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                    turns.append(Turn("assistant", {"role": "assistant", "metadata": c["function"]["name"],
                                                    "content": args}, t.train, t.where))
        if tools and self.tools_key == "system":
            if turns and turns[0].role == "system":
                turns[0] = Turn("system", {**turns[0].message, "tools": tools}, False, turns[0].where)
            else:
                turns.insert(0, Turn("system", {"role": "system", "content": "", "tools": tools}, False, "tools"))
            tools = None
        return Conversation(turns, tools)

    def _check_rendered(self, conv: Conversation, messages: list[dict], tools, text: str) -> None:
        """Tool results and schemas the template was given must be in its rendering (never trained without)."""
        for t, m in zip(conv, messages):
            shown = m["content"].strip()
            if t.role == "observation" and shown and shown not in text \
                    and json.dumps(shown, ensure_ascii=False)[1:-1] not in text:  # Llama-3.1: a JSON string
                raise Skip("template_cannot_render_tools", f"{t.where}: the tool result is not in the rendering of "
                                                           f"{self.what}")
        schemas = tools or next((m.get("tools") for m in messages if m.get("tools")), None) or []
        for s in schemas:
            name = (s.get("function") or s).get("name") if isinstance(s, dict) else None
            if isinstance(name, str) and name not in text:
                raise Skip("template_cannot_render_tools", f"tools: the schema of {name!r} is not in the rendering of "
                                                           f"{self.what}")

    def _check_replies(self, conv: Conversation, messages: list[dict], text: str, spans: list) -> None:
        """Every supervised span holds its reply: some text (not only special tokens and blanks) and its calls."""
        for a, b, i in spans:
            msg = messages[i]
            if self.only_specials_re.fullmatch(text, a, b):  # nothing but special tokens and blanks
                raise Skip("template_drops_reply", f"{conv[i].where}: {self.what} renders this reply as nothing; it "
                                                   f"would be trained as an empty answer")
            part = self.special_re.sub("", text[a:b]) if msg.get("tool_calls") else ""
            for c in msg.get("tool_calls") or ():
                if c["function"]["name"] not in part:
                    raise Skip("template_cannot_render_tools", f"{conv[i].where}: the call of "
                                                               f"{c['function']['name']!r} is not in the reply as "
                                                               f"{self.what} renders it")

