"""Chat templates rendered exactly as transformers' apply_chat_template renders them, with bounds on time and size.

    from longsft.templates.render import Renderer, RenderLimits
    r = Renderer(tokenizer.chat_template, "the chat template of /models/qwen (tokenizer_config.json)",
                 RenderLimits(seconds=10, chars=64 * 2**20), tokenizer.special_tokens_map)
    text, blocks = r.render([{"role": "user", "content": "Hi"}], tools=None, prompt=True)

    python -m pytest -q tests/templates/test_render.py      # the bounds, on hostile templates (CPU, seconds)

A hub chat template is code written by others: transformers runs it in Jinja's immutable sandbox, which stops
escapes but not work. Here the template is compiled in an overlay of transformers' own environment (the same
filters, globals and `{% generation %}` extension, so the text is the same) that also bounds:
- time: each render has `seconds` (SIGALRM, in the main thread of the process that renders: pre_tokenize.py's
  workers render in theirs); a template looping 10^10 times stops there;
- size: string and list repetition / concatenation (`'x' * 300000000`, `s + s`), and integer powers, whose result
  would pass `chars`, raise before anything is allocated; the output is counted as the template writes it and
  stops past `chars` characters.
Either raises RenderLimitError naming the template and the limit. The data the template sees is prepared by
transformers' own helpers (`_plain_template_data`, `_alias_reasoning_fields` where this transformers has them),
as render_jinja_template does, so the rendering is apply_chat_template's.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass


try:  # signal.getsignal without its conversion to an enum, which costs a ValueError per call for a Python handler
    from _signal import getsignal as _getsignal
except ImportError:  # pragma: no cover (not CPython)
    _getsignal = signal.getsignal


class RenderLimitError(Exception):
    """A template passed a bound: the message names the template, the bound and the flag that sets it."""


@dataclass(frozen=True)
class RenderLimits:
    seconds: float = 10.0  # per render; real templates take milliseconds even on 1M-token records
    chars: int = 64 * 2 ** 20  # output and any intermediate string or list; a 1M-token record renders ~4M


def _compiled(template: str, limits: RenderLimits, what: str):
    """The template compiled in a bounded overlay of transformers' (cached) environment."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    base = _compile_jinja_template("").environment  # never compile the template itself unbounded: Jinja folds
    # constant expressions such as 'x' * 300000000 while compiling
    env = base.overlay()
    tracker = next((e for e in env.extensions.values() if hasattr(e, "activate_tracker")), None)
    if tracker is not None:  # the overlay re-binds extensions; render_jinja_template activates the bound one
        env.activate_tracker = tracker.activate_tracker
    binops = dict(base.binop_table)

    def too_big(n) -> None:
        if n > limits.chars:
            raise RenderLimitError(f"{what} builds a value of {n:,} items or characters, over the limit of "
                                   f"{limits.chars:,} (--render_max_chars)")

    sized, limit = (str, list, tuple), limits.chars

    def call_binop(context, operator, left, right):
        if operator == "+":  # the common case first (templates join strings with +)
            if type(left) is str and type(right) is str:
                if len(left) + len(right) > limit:
                    too_big(len(left) + len(right))
                return left + right
            if isinstance(left, sized) and isinstance(right, sized):
                too_big(len(left) + len(right))
        elif operator == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, sized) and isinstance(b, int):
                    too_big(len(a) * b)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            too_big(right * max(1, abs(left).bit_length()) // 4)  # about the decimal digits of the result
        return binops[operator](left, right)

    env.intercepted_binops = frozenset({"*", "+", "**"})
    env.call_binop = call_binop
    sandbox_getattr, undefined = env.getattr, env.undefined

    def getattr_(obj, attribute):
        # `message.content` on a plain dict: the sandbox tries getattr first, which raises AttributeError for
        # every key that is not a dict attribute (dicts have no instance attributes), then reads the item, and for
        # a missing key (`message.tool_calls` on most messages) catches a KeyError too and returns an Undefined.
        # The same answers without the exceptions; anything else (dict methods, other types) as before.
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            value = obj.get(attribute, _MISSING)
            return undefined(obj=obj, name=attribute) if value is _MISSING else value
        return sandbox_getattr(obj, attribute)

    env.getattr = getattr_
    return env.from_string(template)


_DICT_ATTRIBUTES = frozenset(dir(dict))
_MISSING = object()


def _plain(value):
    from transformers.utils import chat_template_utils as ctu

    return ctu._plain_template_data(value) if hasattr(ctu, "_plain_template_data") else value


def _aliased(chat):
    from transformers.utils import chat_template_utils as ctu

    return ctu._alias_reasoning_fields(chat) if hasattr(ctu, "_alias_reasoning_fields") else chat


class Renderer:
    """One chat template, rendered with bounds. `what` names it in errors; `kwargs`: what apply_chat_template
    passes besides messages and tools (the tokenizer's special tokens map)."""

    def __init__(self, template: str, what: str, limits: RenderLimits, kwargs: dict):
        self.template, self.what, self.limits = template, what, limits
        self.kwargs = _plain(dict(kwargs))
        self._compiled = None

    def __getstate__(self):  # compiled templates do not pickle; each process compiles its own
        return {**self.__dict__, "_compiled": None, "_globals": None, "_new_context": None}

    @property
    def compiled(self):
        if self._compiled is None:
            self._compiled = _compiled(self.template, self.limits, self.what)
            self._globals = dict(self._compiled.globals)
            self._new_context = self._compiled.environment.context_class
        return self._compiled

    def render(self, messages: list[dict], tools=None, prompt: bool = False, marks: bool = False,
               reads: list | None = None, plain: bool = False):
        """(text, generation blocks [(start, end)] when `marks`, else None). The template's own exceptions pass
        through; RenderLimitError past a bound. `reads`: a list that receives (message index, output position)
        for each time the template reads a message (index len(messages): it looked past the last one; -1: the
        whole list, e.g. its length), in order: where a rendering of the first j messages would part from this
        one (auto.py's single-rendering path). `plain`: messages and tools are JSON data already (dicts, lists,
        strings, numbers, None: what auto_records.py builds from JSON records), so transformers' conversion into
        plain data (a deep copy) is left out; the template sees the same values either way."""
        compiled = self.compiled
        chat = _aliased(messages if plain else _plain(messages))
        tools = tools if plain else _plain(tools)
        blocks: list[str] = []
        indices: list = []
        limit, size = self.limits.chars, 0
        at = [0]
        if reads is not None:
            chat = ReadMessages(chat, reads, at)
        # compiled.generate(...) without its copy of the template's globals (a ChainMap, read key by key in Python:
        # a third of a short record's rendering): the same Context over a plain dict of them, made once
        context = self._new_context(compiled.environment, {
            **self._globals, "messages": chat, "tools": tools, "documents": None, "add_generation_prompt": prompt,
            **self.kwargs}, compiled.name, compiled.blocks, globals=self._globals)
        with self._timer():
            tracker = compiled.environment.activate_tracker(blocks, indices) if marks else _NoTracker()
            with tracker:
                try:
                    for block in compiled.root_render_func(context):
                        size += len(block)
                        if size > limit:
                            raise RenderLimitError(f"{self.what} wrote over {limit:,} characters for one record "
                                                   f"(--render_max_chars)")
                        blocks.append(block)
                        at[0] = size
                except Exception:  # as Template.generate: the template's error with its traceback in template lines
                    compiled.environment.handle_exception()
        return "".join(blocks), ([tuple(i) for i in indices] if marks else None)

    def _timer(self):
        return _Alarm(self.limits.seconds, self.what)


class ReadMessages:
    """The messages as a template reads them, logging each read as (index, output position so far): an item or a
    forward slice `messages[k:]` (a view), iteration item by item (index len: the end seen); anything that sees
    the whole list at once (length, reversed, other slices, comparison, printing) logs index -1. Not a list
    subclass, so C code that would read a list's items directly (json.dumps) fails instead of reading unlogged."""
    __slots__ = ("_items", "_reads", "_at", "_offset")

    def __init__(self, items: list, reads: list, at: list, offset: int = 0):
        self._items, self._reads, self._at, self._offset = items, reads, at, offset

    def _read(self, k: int) -> None:
        self._reads.append((k, self._at[0]))

    def _whole(self):
        self._reads.append((-1, self._at[0]))
        return self._items[self._offset:]

    def __getitem__(self, key):
        if isinstance(key, slice):
            if key.step in (None, 1) and key.stop is None and (key.start or 0) >= 0:
                return ReadMessages(self._items, self._reads, self._at, self._offset + (key.start or 0))
            return self._whole()[key]
        if isinstance(key, int) and key >= 0:
            self._read(min(self._offset + key, len(self._items)))
            return self._items[self._offset + key]
        return self._whole()[key]

    def __iter__(self):
        for k in range(self._offset, len(self._items)):
            self._read(k)
            yield self._items[k]
        self._read(len(self._items))

    def __bool__(self):
        self._read(min(self._offset, len(self._items)))
        return len(self._items) > self._offset

    def __len__(self):
        return len(self._whole())

    def __reversed__(self):
        return reversed(self._whole())

    def __contains__(self, item):
        return item in self._whole()

    def __eq__(self, other):
        return self._whole() == other

    def __repr__(self):
        return repr(self._whole())

    __hash__ = None


class _NoTracker:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Alarm:
    """SIGALRM after `seconds` raises RenderLimitError in the rendering (main) thread. The handler is installed once
    per process (when SIGALRM has no other handler) and the timer armed per render; elsewhere (another thread, a
    process that uses SIGALRM itself) no time bound: the size bounds still hold."""
    current = None  # the _Alarm armed now (the handler raises for it)
    installed = False

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what, self.armed = seconds, what, False

    @classmethod
    def _expired(cls, signum, frame):
        alarm = cls.current
        if alarm is not None:
            cls.current = None
            raise RenderLimitError(f"{alarm.what} did not finish rendering one record in {alarm.seconds:g} s "
                                   f"(--render_timeout); a real template takes milliseconds")

    @classmethod
    def _install(cls) -> bool:
        if not cls.installed:
            if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer") \
                    or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None):
                return False
            signal.signal(signal.SIGALRM, cls._expired)
            cls.installed = True
        return _getsignal(signal.SIGALRM) == cls._expired and threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.seconds and _Alarm.current is None and self._install():
            _Alarm.current = self
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self.armed = True
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _Alarm.current = None
        return False
