"""Template `auto`: the tokenizer's own chat template, for any model folder with a fast tokenizer (tokenizer.json) and a
chat template (GLM-Edge, GLM-4-0414, Qwen2.5, Qwen3, Mistral, Llama-3.1-Instruct, ...).

    python pre_tokenize.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --template auto \\
        --input chat.jsonl glaive_toolcall.json --output_dir data/qwen2/auto
    python tools/make_tiny.py chat-tokenizer --kind qwen3 --out /tmp/tiny-qwen3     # tiny folders to try it on

    from longsft.templates.registry import chat_format
    fmt = chat_format("auto", tokenizer)                        # AutoFormat
    ids, labels = fmt.encode([Message("user", "Hi"), Message("assistant", "Hello", train=True)])

Records are read by auto_records.py (messages / ShareGPT / Alpaca, tools, tool calls, tool results).

Rendering and tokens. A conversation is rendered as apply_chat_template renders it (longsft/templates/render.py:
transformers' compiled template and environment, bounded in time and size: --render_timeout, --render_max_chars)
with the tokenizer's template (its `tool_use` one when the record has tools), and the text of a whole work unit is
encoded in one call of the tokenizer's own Rust backend: the ids are `apply_chat_template(..., tokenize=True)`'s.
Special-token text inside the data (any string of a message, a tool call or a tool schema) stays text, as in the
other templates: such a record is rendered with a private-use character in place of each such token, so every
special token left in the text is one the template wrote; the text between those tokens is then encoded without
special tokens (with the original text back) and the template's tokens put between. Token positions (for the
spans below) come from the tokens' byte lengths for a byte-level BPE (checked to add up to the text), else from
the tokenizer's offsets. Non-special added tokens (Qwen's `<tool_call>`, `<think>`) keep the tokenizer's
plain-text behaviour: they are matched wherever they occur, as for tool calls written into content.

What the template can express is found once, by rendering probe conversations (_probe_tools): calls as OpenAI
`tool_calls` or GLM's metadata + observation messages (`call_shape`), schemas as `tools` or on a system message
(`tools_key`), results under `tool_role`; records are fed in that shape (_shaped), and a record holding calls,
results or schemas the template cannot write is skipped as `template_cannot_render_tools`; a trained reply that
renders as nothing (or without its call) is skipped as `template_drops_reply` / `template_cannot_render_tools`.

Supervision. A token is supervised when its first character is in a supervised span:
- with `{% generation %}` blocks in the template (`return_assistant_tokens_mask`), each trained assistant
  message's block (the k-th block belongs to the k-th assistant message; another count is `template_error`);
- otherwise, for each trained assistant message i, the template's rendering of messages[:i+1] must be a prefix
  of the whole rendering, and the span runs from where the inference prompt (messages[:i] rendered with
  add_generation_prompt) and that rendering part (never before the end of messages[:i]'s own rendering), to the
  reply's end of turn: through the last special token of
  the reply when only whitespace follows it (`<|im_end|>`, `<|eot_id|>`, `</s>`), else through the special token
  that follows the reply in the conversation (GLM's next `<|user|>` / `<|observation|>` / `<|assistant|>`). A
  reply that ends the conversation with no such token (GLM) gets the tokenizer's eos appended and supervised, as
  GLM's own finetune scripts append it: the one departure from apply_chat_template's ids.
- A template that always writes a generation prompt after the last message (`trailing`: GLM-Edge's `<|assistant|>`,
  whatever add_generation_prompt says) has it dropped after a final reply, which then gets the eos as above.
- A template that writes an earlier reply differently once later messages follow (Qwen3 drops past reasoning and
  writes `<think>\n\n</think>` only on a final turn; Mistral v0.3 writes the system prompt into the last user
  message only) is not prefix-stable there. `rewritten` (pre_tokenize.py --rewritten_replies): "split" (default)
  trains such a reply as a sample of its own, its prompt (messages[:i] with the generation prompt) + the reply as
  its own turn's rendering writes it (_own_sample); "skip" skips the record (`template_rewrites_history`, the
  detail names the message and the first differing text); "unsupervised" leaves those replies unsupervised.
  encode_batch then returns several samples for the record (its fifth item: the conversation of each sample).
- Linear in the turns (single_pass, decided per template by a self-test in _probe): the conversation is rendered
  once while the template's reads of the messages are logged with the output position, and the renderings of
  messages[:j] are taken from it (_prefix_renderer, with checks per record); otherwise every prefix is rendered.
- A template that raises (Mistral's roles-must-alternate, Llama-3.1's one-tool-call rule) or cannot render a
  record within the bounds skips it with reason `template_error`.
stop_token_ids: the folder's generation_config.json eos_token_id (models.generation_stop_ids), the tokenizer's eos
and the token that ends a reply in the template. `prefix_len` (kept by --truncate left): the tokens every conversation starts with.
"""

from __future__ import annotations

import json
import re

import numpy as np

try:  # the fast JSON dump of _holds_special_text; json is the fallback
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

from longsft.templates.base import ChatFormat, PlainEncoder
from longsft.data.inputs import Message, Skip
from longsft.models import generation_stop_ids
from longsft.templates.auto_records import Conversation, RecordReader, Turn
from longsft.templates.auto_tokens import TemplateTokens, utf8_len
from longsft.templates.auto_tools import ToolShapes, reply_marks
from longsft.templates.render import Renderer, RenderLimitError, RenderLimits
from longsft.data.storage import IGNORE_INDEX

SKIP_REASONS = ("template_error", "template_rewrites_history", "template_cannot_render_tools", "template_drops_reply")
REWRITTEN = ("split", "skip", "unsupervised")  # --rewritten_replies, the default first
MARK_BASE = 0xF0000  # Supplementary Private Use Area-A: a data special token while rendering (one char per token)
_PRIVATE = re.compile("[\U000F0000-\U000FFFFD]")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[-1 - k] == b[-1 - k]:
        k += 1
    return k


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _replace(obj, sub):
    """`obj` (strings, lists, dicts) with `sub` applied to every string value (dict keys stay)."""
    if isinstance(obj, str):
        return sub(obj)
    if isinstance(obj, dict):
        return {k: _replace(v, sub) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_replace(v, sub) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Records -> Conversation
# ----------------------------------------------------------------------------------------------



# ----------------------------------------------------------------------------------------------
# The chat format
# ----------------------------------------------------------------------------------------------

class AutoFormat(ToolShapes, TemplateTokens, RecordReader, ChatFormat):
    name = "auto"
    roles = frozenset({"system", "user", "assistant", "observation"})
    skip_reasons = SKIP_REASONS
    prefix_len = 0
    rewritten = REWRITTEN[0]  # a reply the template rewrites later: its own sample, skip the record, unsupervised
    trailing = ""  # what the template writes after the last message whatever add_generation_prompt says
    single_pass = False  # prefixes from one rendering (linear) when the template passed _probe's self-test
    after_last = ("", "")  # what it writes after its last message: without, with the generation prompt
    _one_rendering = None  # whether the last _prefix_renderer took the prefixes from the one rendering
    _json_visible = False  # no special token holds a character JSON escapes (_holds_special_text)

    takes_args = True  # registry.chat_format passes pre_tokenize.py's arguments (the limits apply to the probes too)

    def __init__(self, tokenizer, args=None):
        self.tokenizer = tokenizer
        self.problems: list[str] = []
        self.stop_token_ids: list[int] = []
        self._backends: dict = {}
        where = f"--template auto: the tokenizer of {tokenizer.name_or_path!r}"
        if not (getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer")):
            self.problems.append(f"{where} is {type(tokenizer).__name__}; template auto needs a tokenizers-based "
                                 f"tokenizer (a folder with tokenizer.json); pick another --template")
            return
        try:  # as apply_chat_template picks them: the `tool_use` template for records with tools, if there is one
            self.templates = {False: tokenizer.get_chat_template(None, None),
                              True: tokenizer.get_chat_template(None, [])}
        except ValueError as e:
            why = "has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja)" \
                if tokenizer.chat_template is None else f"has no usable chat template: {str(e).splitlines()[0]}"
            self.problems.append(f"{where} {why}; give a model folder that has one, or pick another --template "
                                 f"(the family's own)")
            return
        self.marked = {k: bool(_GENERATION_TAG.search(t)) for k, t in self.templates.items()}
        self.template_kwargs = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes
        self.what = f"the chat template of {str(tokenizer.name_or_path)!r}"
        self._set_limits(RenderLimits())
        if args is not None:
            self.configure(args)
        added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
        specials = {t.content: (i, t.lstrip, t.rstrip) for i, t in sorted(added.items()) if t.special}
        self.special_ids = {t: v[0] for t, v in specials.items()}
        self.strips = {t: v[1:] for t, v in specials.items()}
        longest = sorted(specials, key=len, reverse=True)
        alternatives = "|".join(map(re.escape, longest)) or "(?!)"
        self.special_re = re.compile(alternatives)
        # a text that special_re.sub("", text).strip() empties: special_re's matches, taken as its scan takes them
        # (longest first, no going back), and blanks
        self.only_specials_re = re.compile(rf"(?>{alternatives}|\s)*+")
        self._json_visible = not any(c in '"\\' or ord(c) < 0x20 for t in specials for c in t)
        self._special_bytes_re = re.compile(b"|".join(re.escape(t.encode("utf-8", "surrogatepass")) for t in longest)
                                            or b"(?!)")
        self.special_after = re.compile(rf"\s*(?:{alternatives})")
        self.mark = {t: chr(MARK_BASE + k) for k, t in enumerate(longest)}
        self.unmark = {ord(c): t for t, c in self.mark.items()}
        self.eos_id = self.special_ids.get(tokenizer.eos_token) if tokenizer.eos_token else None
        self.plain = PlainEncoder(tokenizer)
        text = "".join(self.special_ids)  # special-token text inside content must stay text
        if text and set(self._backend(True).encode(text, add_special_tokens=False).ids) & set(self.special_ids.values()):
            self.problems.append("the tokenizer turns special-token text inside content into special tokens even with "
                                 "encode_special_tokens; pick another --template")
        self._probe()

    def _set_limits(self, limits: RenderLimits) -> None:
        plain = Renderer(self.templates[False], self.what, limits, self.template_kwargs)
        tools = self.templates[True]  # a template of its own for tools (tool_use), else the same one compiled once
        self.renderers = {False: plain, True: plain if tools == self.templates[False] else
                          Renderer(tools, self.what + " (its tool_use template)", limits, self.template_kwargs)}

    def configure(self, args) -> None:
        """pre_tokenize.py's settings for this template (--rewritten_replies, --render_timeout, --render_max_chars)."""
        self.rewritten = getattr(args, "rewritten_replies", None) or self.rewritten
        if self.rewritten not in REWRITTEN:
            self.problems.append(f"--rewritten_replies {self.rewritten}: expected one of {', '.join(REWRITTEN)}")
        limits = RenderLimits(*(getattr(args, k, None) or d for k, d in (("render_timeout", RenderLimits.seconds),
                                                                            ("render_max_chars", RenderLimits.chars))))
        if limits.seconds <= 0 or limits.chars <= 0:
            self.problems.append(f"--render_timeout {limits.seconds} / --render_max_chars {limits.chars}: must be > 0")
        elif hasattr(self, "renderers") and (limits.seconds, limits.chars) != (self.renderers[False].limits.seconds,
                                                                                self.renderers[False].limits.chars):
            self._set_limits(limits)

    def __getstate__(self):  # the backend and byte table are found again where they are used
        return {**self.__dict__, "_backends": {}}

    def _probe(self) -> None:
        """From the folder and from rendering small probe conversations: stop_token_ids, prefix_len, the trailing
        text the template always writes, and what it can express of tools (call shape, schemas, result role)."""
        stops = generation_stop_ids(str(self.tokenizer.name_or_path)) + [self.eos_id]
        user, reply = {"role": "user", "content": "Alpha"}, {"role": "assistant", "content": "Beta"}
        try:
            text = self._render([user, reply, {"role": "user", "content": "Gamma"}], None)[0]
            m = self.special_re.search(text, text.index("Beta") + 4)
            stops.append(self.special_ids[m.group()] if m else None)
            first = [self._backend(False).encode(self._render([{"role": "user", "content": c}], None)[0],
                                                 add_special_tokens=False).ids for c in ("Alpha", "Zulu")]
            self.prefix_len = next((k for k, (a, b) in enumerate(zip(*first)) if a != b), min(map(len, first)))
            asked, plain = self._render([user], None, prompt=True)[0], self._render([user], None)[0]
            answered = self._render([user, reply], None)[0]
            after = answered[answered.rindex("Beta") + 4:]
            if asked == plain and after.strip() and plain.endswith(after) and self.special_re.search(after) \
                    and plain[plain.rindex("Alpha") + 5:] == after:
                self.trailing = after  # GLM-Edge: `<|assistant|>` after the last message, asked for or not
        except RenderLimitError as e:
            self.problems.append(f"--template auto: {e}")
            return
        except (Skip, ValueError):  # a template that cannot render these: no end-of-turn token, no prefix
            pass
        self.stop_token_ids = list(dict.fromkeys(int(i) for i in stops if i is not None))
        try:
            self._probe_tools()
            self._probe_single_pass()
        except RenderLimitError as e:
            self.problems.append(f"--template auto: {e}")

    def _probe_single_pass(self) -> None:
        """Whether the prefixes of a conversation may come from its one rendering (_prefix_renderer): learn what
        the template writes after its last message, then require the single-rendering layout of probe
        conversations (system prompt, several rounds, tool calls and results in this template's shape) to equal
        the layout from rendering every prefix, and the plain rounds to take their prefixes from the one rendering
        (GLM-4-0414's template reads every message in a first pass for system prompts: its reads place no message,
        so it renders every prefix)."""
        user = [{"role": "user", "content": "Alpha"}]
        after = []
        for prompt in (False, True):
            reads: list = []
            raw = self._render(user, None, prompt=prompt, reads=reads)[0]
            ends = [pos for k, pos in reads if k >= 1 or k < 0]
            if not ends or not ends[0] or any(k < 0 for k, _ in reads):  # read it all before writing: no use
                return
            after.append(raw[ends[0]:])
        self.after_last = tuple(after)
        call = {"name": "get_weather", "arguments": {"city": "Paris"}}
        probes = [
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And you?"},
                          {"role": "assistant", "content": "Fine."}]},
            {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call",
                                                                          "value": json.dumps(call)},
                               {"from": "observation", "value": '{"t": 17}'}, {"from": "gpt", "value": "17 C."},
                               {"from": "human", "value": "Both?"},
                               {"from": "function_call", "value": json.dumps([call, call])},
                               {"from": "observation", "value": '{"t": 18}'},
                               {"from": "observation", "value": '{"t": 19}'}, {"from": "gpt", "value": "18, 19."}],
             "tools": [{"name": "get_weather", "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}]}]
        for n, record in enumerate(probes):
            outcomes = []
            for single in (False, True):
                self.single_pass, self._one_rendering = single, None
                try:
                    outcomes.append(self._layout(self.parse_record(record)[1]))
                except Skip as e:
                    outcomes.append(("skip", e.reason))
            if outcomes[0] != outcomes[1] or n == 0 and not self._one_rendering:
                self.single_pass = False
                return
        self.single_pass = True

    # ---- rendering -------------------------------------------------------------------------------------------

    def _render(self, messages: list[dict], tools, prompt: bool = False, marks: bool = False, reads=None):
        """(text, generation blocks or None) exactly as apply_chat_template renders it, within the render limits
        (longsft/templates/render.py: RenderLimitError past one); Skip on a template error."""
        try:
            return self.renderers[tools is not None].render(messages, tools, prompt, marks, reads, plain=True)
        except RenderLimitError:
            raise
        except Exception as e:  # the template's raise_exception, or a record it cannot render
            raise Skip("template_error", f"the chat template cannot render this record: {type(e).__name__}: "
                                         f"{str(e)[:300]}") from None

    def _holds_special_text(self, data) -> bool:
        """Whether a string in `data` holds special-token text. A special token without characters JSON escapes
        appears in the JSON text of `data` if it appears in one of its strings, so a miss there (one C-speed dump and
        one search) settles it; a hit (it may be a dict key) is checked string by string."""
        if self._json_visible:
            try:  # orjson writes every string character as json.dumps(ensure_ascii=False) does, in UTF-8
                dumped = orjson.dumps(data) if orjson is not None else \
                    json.dumps(data, ensure_ascii=False, check_circular=False).encode("utf-8", "surrogatepass")
                if not self._special_bytes_re.search(dumped):
                    return False
            except (TypeError, ValueError):  # (orjson: lone surrogates, keys that are not strings, huge ints)
                pass
        return any(self.special_re.search(s) for s in _strings(data))

    def _untrail(self, text: str, conv) -> str:
        """The rendering without the template's always-written trailing prompt after a final assistant message
        (GLM-Edge): the reply then ends with a stop token, as GLM-Edge's finetune.py ends it."""
        if self.trailing and conv and conv[-1].role == "assistant" and text.endswith(self.trailing):
            return text[:-len(self.trailing)]
        return text

    def _layout(self, conv: Conversation) -> tuple[list, bool]:
        """([(rendered text, supervised character spans, eos appended)] one per sample, special-token text marked
        in the data). One sample is the whole conversation; with --rewritten_replies split, each reply the whole
        rendering rewrites is one more sample: its own turn's rendering."""
        conv = self._shaped(conv)
        messages, tools = [t.message for t in conv], conv.tools
        marked = self._holds_special_text([messages, tools])
        if marked:
            if any(_PRIVATE.search(s) for s in _strings([messages, tools])):
                raise Skip("template_error", "holds private-use characters U+F0000-U+FFFFD next to special-token "
                                             "text; template auto uses those characters to keep that text plain")
            sub = (lambda s: self.special_re.sub(lambda m: self.mark[m.group()], s))
            messages, tools = _replace(messages, sub), _replace(tools, sub)
        reads = [] if self.single_pass and not self.marked[tools is not None] else None
        raw, blocks = self._render(messages, tools, marks=self.marked[tools is not None], reads=reads)
        text = self._untrail(raw, conv)
        prefix = self._prefix_renderer(conv, messages, tools, raw, reads)
        self._check_rendered(conv, messages, tools, text)
        if blocks is not None:
            assistants = [i for i, t in enumerate(conv) if t.role == "assistant"]
            if len(blocks) != len(assistants):
                raise Skip("template_error", f"the chat template has {len(blocks)} {{% generation %}} blocks for "
                                             f"{len(assistants)} assistant messages")
            spans = [(*b, i) for i, b in zip(assistants, blocks) if conv[i].train]
            self._check_replies(conv, messages, text, spans)
            return [(text, spans, False)], marked
        spans, samples, eos = [], [], False
        for i, turn in enumerate(conv):
            if not turn.train:
                continue
            own = text if i == len(conv) - 1 else self._untrail(prefix(i + 1, False), conv[:i + 1])
            prompt = prefix(i, True)
            start = _common_prefix(prompt, own)
            consistent = start == len(prompt) or self._continues(prefix(i, False) if i else "", own, start)
            if text.startswith(own) and consistent:
                end, e = self._turn_end(own, start, text)
                spans.append((start, end + e, i))  # the appended eos sits at len(text)
                eos = eos or e
                continue
            if self.rewritten == "unsupervised":
                continue
            sample = self._own_sample(prompt, own, start, consistent, i) if self.rewritten == "split" else None
            if sample is None:
                d = _common_prefix(own, text) if not text.startswith(own) else start
                show = (lambda s: s[d:d + 40].translate(self.unmark))
                raise Skip("template_rewrites_history", f"{turn.where}: the chat template writes this reply "
                           f"differently once later messages follow ({show(own)!r} at its own turn, "
                           f"{show(text)!r} in the whole conversation)" + (
                               ", and its own turn's rendering does not continue its prompt" if self.rewritten
                               == "split" else ", so its tokens would not be the ones the model writes at that turn;"
                               " the default --rewritten_replies split trains it as its own sample"))
            self._check_replies(conv, messages, sample[0], sample[1])
            samples.append(sample)
        if spans:
            self._check_replies(conv, messages, text, spans)
            samples.append((text, spans, eos))  # last: the sample that holds the final reply (encode)
        if not samples:
            raise Skip("template_rewrites_history", "the chat template rewrites every trained reply once later "
                                                    "messages follow (--rewritten_replies unsupervised)")
        return samples, marked

    def _own_sample(self, prompt: str, own: str, start: int, consistent: bool, i: int):
        """A reply the whole rendering rewrites, as the model writes it at inference: its prompt (the history with
        the generation prompt), then the reply as its own turn's rendering (messages[:i+1]) writes a final reply.
        When that rendering does not start with the prompt (Mistral v0.3 writes the system prompt only into a last
        user message), the reply's part is what follows the point where both end alike (the prompt's last special
        token and what comes before it). None when no such point exists."""
        if consistent:
            end, e = self._turn_end(own, start, own)
            return own, [(start, end + e, i)], e
        last = None
        for last in self.special_re.finditer(prompt):
            pass
        if last is None or not prompt.endswith(last.group()) and prompt[last.end():].strip():
            return None
        tail = prompt[last.start():]  # e.g. "[/INST]": the reply starts after its match in `own`
        best, cut = 0, None
        for m in re.finditer(re.escape(tail), own):
            n = _common_suffix(prompt, own[:m.end()])
            if n >= best and n > len(tail):
                best, cut = n, m.end()
        if cut is None:
            return None
        sample = prompt + own[cut:]
        end, e = self._turn_end(sample, len(prompt), sample)
        return sample, [(len(prompt), end + e, i)], e

    @staticmethod
    def _continues(before: str, text: str, start: int) -> bool:
        """When the inference prompt is not a prefix of the reply's rendering: the two may part only after the
        conversation before the reply (`before`: its rendering), so the span never takes in earlier turns."""
        return text.startswith(before) and start >= len(before)

    def _prefix_renderer(self, conv: Conversation, messages: list[dict], tools, raw: str, reads):
        """prefix(j, prompt) -> the rendering of messages[:j] (with the generation prompt when `prompt`). From the
        one rendering `raw` when its reads allow it (linear in the conversation): the template read only messages
        before j up to position D(j) (the first read of message j or later), so a rendering of the first j
        messages is raw[:D(j)] followed by what the template writes after its last message (`after_last`,
        learned by _probe and checked on this record: raw must end with it). Checked per reply: its text lies
        between D(i) and D(i+1), and raw continues at D(i) with the generation prompt (else the template looked
        at message i from inside the one before, as Qwen2.5 does after a tool result: that prefix is rendered).
        Without usable reads (and always with `reads` None) every prefix is rendered: quadratic, exact for any
        template."""
        def render(j: int, prompt: bool) -> str:
            return self._render(messages[:j], tools, prompt=prompt)[0]

        n = len(messages)
        self._one_rendering = False  # (what _probe_single_pass checks)
        if not reads or min(reads)[0] < 0:
            return render
        first = [None] * (n + 1)  # D(j): the position of the first read of message j or later
        filled = -1  # first[:filled + 1] are set (a read of message k sets every unset D(j), j <= k)
        for k, pos in reads:
            if k > filled:
                first[filled + 1:k + 1] = [pos] * (k - filled)
                filled = k
        after0, after1 = self.after_last
        if filled < n or raw[first[n]:] != after0:
            return render
        for i, t in enumerate(conv):
            if t.train and not all(raw.find(x, first[i], first[i + 1]) >= 0 for x in reply_marks(t.message)):
                return render

        self._one_rendering = True

        def prefix(j: int, prompt: bool) -> str:
            # after a reply that starts cleanly and holds its text before D(j), or before a reply that does
            if j == n and not prompt or not prompt and j and conv[j - 1].train or \
                    j < n and conv[j].role == "assistant" and raw.startswith(after1, first[j]):
                return raw[:first[j]] + (after1 if prompt else after0)
            return render(j, prompt)

        return prefix

    def _turn_end(self, own: str, start: int, text: str) -> tuple[int, bool]:
        """(end of the supervised span, eos appended) for a reply rendered as own[start:]."""
        end, last = len(own), None
        for last in self.special_re.finditer(own, start):
            pass
        if last is not None and not own[last.end():].strip():  # the reply ends with its special token
            return last.end(), False
        after = self.special_after.match(text, end)  # GLM: the next role token ends the reply
        if after:
            return after.end(), False
        return end, end == len(text) and self.eos_id is not None

    def encode_batch(self, conversations: list[Conversation]):
        """Many conversations -> (ids int32[T], supervised bool[T], length of each sample int64[K], a Skip or None
        per conversation, the conversation of each sample int64[K]). A conversation gives one sample, or more with
        --rewritten_replies split. The texts without special-token text in their data go through one call."""
        outcomes, samples = [], []  # samples: (conversation index, text, spans, eos, marked)
        for k, conv in enumerate(conversations):
            try:
                laid, marked = self._layout(conv)
                samples += [(k, text, spans, eos, marked) for text, spans, eos in laid]
                outcomes.append(None)
            except Skip as s:
                outcomes.append(s)
            except RenderLimitError as e:  # this record only: the template passed a bound (it names it)
                outcomes.append(Skip("template_error", str(e)))
        owners = np.asarray([s[0] for s in samples], np.int64)
        if not samples:
            return np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.int64), outcomes, owners
        ids, starts, counts, in_bytes = self._encode_texts([s[1] for s in samples], [s[4] for s in samples])
        # Positions of all samples on one axis: sample j's from base[j], one spare position after each text (where
        # an appended eos stands), so one search over all tokens finds every span's tokens
        sizes = [utf8_len(text, len(text)) if b and not text.isascii() else len(text)
                 for (_, text, *_), b in zip(samples, in_bytes)]
        base = np.cumsum(np.asarray(sizes, np.int64) + 1) - np.asarray(sizes, np.int64) - 1
        starts = starts + np.repeat(base, counts)
        eos = [j for j, s in enumerate(samples) if s[3]]
        if eos:  # the appended eos stands at the end of its text
            at = np.cumsum(counts)[eos]
            ids = np.insert(ids, at, np.int32(self.eos_id))
            starts = np.insert(starts, at, base[eos] + np.asarray(sizes, np.int64)[eos])
            counts[eos] += 1
        edges = []  # a token is supervised when its first character is in a span: spans as [first, end) positions
        for (_, text, spans, *_), b, origin, size in zip(samples, in_bytes, base.tolist(), sizes):
            if b and not text.isascii():  # in bytes too (a position past the text: the eos)
                spans = [(utf8_len(text, a), utf8_len(text, e), i) for a, e, i in spans]
            edges += [(origin + a, origin + max(a, min(e, size + 1))) for a, e, _ in spans]
        supervised = np.zeros(len(ids), bool)
        if edges:
            first, end = np.searchsorted(starts, np.asarray(edges, np.int64).T, "left")
            inside = np.bincount(first, minlength=len(ids) + 1) - np.bincount(end, minlength=len(ids) + 1)
            supervised = np.cumsum(inside[:-1]) > 0
        return ids, supervised, counts, outcomes, owners

    def encode(self, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of one conversation of chat_inputs Messages (tools/generate.py's prompt)."""
        turns = [Turn(m.role, {"role": self.tool_role if m.role == "observation" else m.role, "content": m.content,
                               **({"metadata": m.metadata} if m.metadata else {})}, m.train) for m in messages]
        ids, supervised, lengths, outcomes, _ = self.encode_batch([Conversation(turns)])
        if outcomes[0] is not None:
            raise outcomes[0]
        ids, supervised = ids[-int(lengths[-1]):], supervised[-int(lengths[-1]):]  # the last reply's own sample
        return ids, np.where(supervised, ids, IGNORE_INDEX).astype(np.int32)
