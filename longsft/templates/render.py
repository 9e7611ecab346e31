"""Chat templates rendered exactly as transformers' apply_chat_template renders them, with bounds on time and size.

    from longsft.templates.render import Renderer, RenderLimits
    r = Renderer(tokenizer.chat_template, "the chat template of /models/qwen (tokenizer_config.json)",
                 RenderLimits(seconds=10, chars=64 * 2**20), tokenizer.special_tokens_map)
    text, blocks = r.render([{"role": "user", "content": "Hi"}], tools=None, prompt=True)

    python -m pytest -q tests/templates/test_render.py      # the bounds, on hostile templates (CPU, seconds)
    python -m pytest -q tests/templates/test_render.py -m slow   # every vendored hub template renders the same

A hub chat template is code written by others: transformers runs it in Jinja's immutable sandbox, which stops
escapes but not work. Here the template is compiled in an overlay of transformers' own environment (the same
filters, globals and `{% generation %}` extension, so the text is the same) that also bounds:
- time: each render has `seconds` (SIGALRM, in the main thread of the process that renders: pre_tokenize.py's
  workers render in theirs); a template looping 10^10 times stops there;
- size: no value a template builds passes `chars` characters or items. Repetition and concatenation
  (`'x' * 300000000`, `s + s`), integer powers and products, widths and counts (`center`, `ljust`, `indent`,
  `expandtabs`, printf and format widths, `tojson` indents, `lipsum`) and growing replacements (`replace`, `join`,
  `translate`) are sized before the work; every other filter and call, `%` formatting, `~`, captured block and
  macro output is checked after it (each result is at most `chars`, so no repeated step, doubling included,
  outgrows it; Jinja's sandbox caps `range` at 100,000). The output is counted as the template writes it and
  stops past `chars` characters.
Either raises RenderLimitError naming the template and the limit. The data the template sees is prepared by
transformers' own helpers (`_plain_template_data`, `_alias_reasoning_fields` where this transformers has them),
as render_jinja_template does, so the rendering is apply_chat_template's.
"""

from __future__ import annotations

import functools
import re
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
    env = base.overlay()  # (shares base's dicts: what is changed below is replaced, not mutated)
    tracker = next((e for e in env.extensions.values() if hasattr(e, "activate_tracker")), None)
    if tracker is not None:  # the overlay re-binds extensions; render_jinja_template activates the bound one
        env.activate_tracker = tracker.activate_tracker
    bound = _Bounds(limits.chars, what)
    binops = dict(base.binop_table)
    sized, limit, too_big, checked = bound.sized, limits.chars, bound.too_big, bound.checked

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
            if isinstance(left, int) and isinstance(right, int):  # about the decimal digits of the product
                too_big((abs(left).bit_length() + abs(right).bit_length()) // 4)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            too_big(right * max(1, abs(left).bit_length()) // 4)
        elif operator == "%" and isinstance(left, str):  # printf formatting: its widths, then its result
            bound.format_string(left, _PRINTF_SPEC)
            return checked(binops[operator](left, right))
        return binops[operator](left, right)

    env.intercepted_binops = frozenset({"*", "+", "**", "%"})
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
    sandbox_call, sandbox_str_format = env.call, env.wrap_str_format

    lipsum = env.globals.get("lipsum")

    def call(__context, __obj, *args, **kwargs):  # every call a template makes (functions, methods)
        if type(getattr(__obj, "__self__", None)) is str:  # str methods: widths, and those that grow text
            bound.arguments(args, kwargs)
            bound.str_method(__obj.__name__, __obj.__self__, args, kwargs)
        elif __obj is lipsum and lipsum is not None:  # lipsum(n, html, min, max): n paragraphs of <= max words
            n, words = kwargs.get("n", (args + (5,))[0]), kwargs.get("max", (args + (5, True, 20, 100))[3])
            bound.too_big(n * words * 16 if isinstance(n, int) and isinstance(words, int) else 0)
        return checked(sandbox_call(__context, __obj, *args, **kwargs))

    def wrap_str_format(value):  # `'{:>9999999999}'.format(x)`: the widths of a format string
        wrapped = sandbox_str_format(value)
        if wrapped is not None:
            bound.format_string(value.__self__, _FORMAT_SPEC)
        return wrapped

    env.call, env.wrap_str_format = call, wrap_str_format
    env.filters = {name: bound.filter(name, f) for name, f in base.filters.items()}
    env.concat = bound.concat  # block captures ({% set x %}...), macro and caller() output
    compiled = env.from_string(template)
    names = compiled.root_render_func.__globals__  # `a ~ b`: the compiled code's own join functions
    for name in ("str_join", "markup_join"):
        if callable(names.get(name)):
            names[name] = bound.joined(names[name])
    return compiled


class _Bounds:
    """The size checks of a bounded template: values a template builds stay within `limit` characters or items.
    Checked before the work where the size is known from the arguments (repetition, widths, replacements),
    after it otherwise (each result at most the limit, so no repeated step, doubling included, grows past it)."""
    sized = (str, list, tuple, dict)

    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what

    def too_big(self, n) -> None:
        if n > self.limit:
            raise RenderLimitError(f"{self.what} builds a value of {n:,} items or characters, over the limit of "
                                   f"{self.limit:,} (--render_max_chars)")

    def checked(self, value):
        if isinstance(value, self.sized) and len(value) > self.limit:
            self.too_big(len(value))
        return value

    def arguments(self, args, kwargs) -> None:
        """A width, count or size argument past the limit (`center(10**10)`, `lipsum(10**9)`)."""
        for a in (*args, *kwargs.values()):
            if type(a) is int and a > self.limit:
                self.too_big(a)

    def format_string(self, text: str, spec: re.Pattern) -> None:
        """Widths and precisions in a format string (`'%9999999999s'`, `'{:>9999999999}'`)."""
        if "%" in text or "{" in text:
            for m in spec.finditer(text):
                for number in _NUMBER.findall(" ".join(g for g in m.groups() if g)):
                    self.too_big(int(number) if len(number) <= 12 else 10 ** 12)

    def str_method(self, name: str, text: str, args, kwargs) -> None:
        """The result size of str methods whose output can outgrow their input many times over."""
        if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            self.too_big(len(text) + text.count(args[0]) * max(0, len(args[1]) - len(args[0])) if args[0] else
                         len(text) + (len(text) + 1) * len(args[1]))
        elif name == "expandtabs":
            size = (args or [kwargs.get("tabsize", 8)])[0]
            self.too_big(len(text) + text.count("\t") * size if isinstance(size, int) else 0)
        elif name == "join" and args and hasattr(args[0], "__len__"):
            self.too_big(len(args[0]) * len(text))
        elif name == "translate" and args and isinstance(args[0], dict):
            longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
            self.too_big(len(text) * longest)

    def filter(self, name: str, f):
        """A filter with its result checked; before the work, the sizes it is given (`center(10**10)`) and the
        result size of replace, indent, join, wordwrap, format and tojson (the value is the first argument after
        any context Jinja passes)."""
        value_at = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1
        sizing = name in _SIZING_FILTERS

        @functools.wraps(f)
        def bounded(*args, **kwargs):
            if sizing and len(args) >= value_at:
                if name in _WIDTH_FILTERS:
                    self.arguments(args[value_at:], kwargs)
                self._filter_size(name, args[value_at - 1], args[value_at:], kwargs)
            return self.checked(f(*args, **kwargs))

        return bounded

    def _filter_size(self, name: str, value, rest, kwargs) -> None:
        if name == "join" and hasattr(value, "__len__"):
            sep = (rest or [kwargs.get("d", "")])[0]
            self.too_big(len(value) * len(sep) if isinstance(sep, str) else 0)
        elif name == "tojson":  # an indent per item
            indent = kwargs.get("indent", rest[1] if len(rest) > 1 else None)
            n = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
            if n > 0:
                self.too_big(n * _items(value, self.limit // n + 1))
        elif not isinstance(value, str):
            return
        elif name == "replace":
            self.str_method("replace", value, rest, {})
        elif name == "format":
            self.format_string(value, _PRINTF_SPEC)
        elif name == "indent":
            width = (rest or [kwargs.get("width", 4)])[0]
            n = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            self.too_big(len(value) + (value.count("\n") + 1) * n)
        elif name == "wordwrap":  # a wrapstring after every `width` characters at worst
            wrap = kwargs.get("wrapstring", rest[2] if len(rest) > 2 else None)
            self.too_big(len(value) * (1 + len(wrap)) if isinstance(wrap, str) else 0)

    def concat(self, parts) -> str:
        parts = list(parts)
        self.too_big(sum(map(len, parts)))
        return "".join(parts)

    def joined(self, join):
        def bounded_join(seq):
            return self.checked(join(seq))

        return bounded_join


def _items(value, cap: int) -> int:
    """The items and containers inside `value` (lists, tuples, dicts), counted up to `cap`."""
    n, todo = 0, [value]
    while todo and n < cap:
        v = todo.pop()
        n += 1
        if isinstance(v, dict):
            todo += v.values()
        elif isinstance(v, (list, tuple)):
            todo += v
    return n


_NUMBER = re.compile(r"\d+")
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d+)?(?:\.(\d+))?")  # %-5.3s, %(name)10d: 5, 3; 10
_FORMAT_SPEC = re.compile(r"\{[^{}:]*:([^{}]*)")  # {0:>10.3}: ">10.3"; {name:{w}}: its own {w} holds no number
_WIDTH_FILTERS = frozenset({"center", "indent", "batch", "slice", "wordwrap", "tojson"})
_SIZING_FILTERS = _WIDTH_FILTERS | {"replace", "join", "format"}


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
