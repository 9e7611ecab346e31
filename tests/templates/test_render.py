"""Bounded chat-template rendering (longsft/templates/render.py) and its use by template `auto`: a hostile template
fails fast with a message naming it (issue 21 item 6); the rendering stays apply_chat_template's."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

import pre_tokenize
from longsft.data.inputs import InputError
from longsft.templates.render import Renderer, RenderLimitError, RenderLimits
from longsft.tiny.chat_templates import GLM_EDGE, LLAMA31, QWEN2_MARKED, QWEN3
from tests.records import write_jsonl

LOOP = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"  # 10^10 iterations
CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


@pytest.mark.parametrize("template", [GLM_EDGE, LLAMA31, QWEN2_MARKED, QWEN3])
def test_same_text_and_blocks_as_transformers(template):
    r = Renderer(template, "t", RenderLimits(), {"eos_token": "</s>", "bos_token": "<s>"})
    for prompt in (False, True):
        for marks in (False, True):
            want = render_jinja_template([CHAT], chat_template=template, add_generation_prompt=prompt,
                                         return_assistant_tokens_mask=marks, eos_token="</s>", bos_token="<s>")
            text, blocks = r.render(CHAT, None, prompt, marks)
            assert text == want[0][0] and (blocks or []) == [tuple(b) for b in (want[1][0] if marks else [])]


@pytest.mark.parametrize("template, what", [
    (LOOP, "did not finish rendering one record in 1 s (--render_timeout)"),
    ("{{ 'x' * 300000000 }}", "builds a value of 300,000,000 items or characters, over the limit"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "over the limit of 1,048,576 (--render_max_chars)"),
    ("{{ 7 ** 100000000 }}", "over the limit"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "wrote over 1,048,576 characters for one record"),
])
def test_bounds_name_the_template(template, what):
    r = Renderer(template, "the chat template of 'X'", RenderLimits(seconds=1, chars=2 ** 20), {})
    start = time.perf_counter()
    with pytest.raises(RenderLimitError, match="the chat template of 'X'") as e:
        r.render(CHAT)
    assert what in str(e.value) and time.perf_counter() - start < 5


GROW = "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = STEP %}{% endfor %}{{ ns.s|length }}"
HOSTILE = {  # each builds, from small pieces, a value far past any memory: it must stop at the size bound
    "concat ~": GROW.replace("STEP", "ns.s ~ ns.s"),
    "join filter": GROW.replace("STEP", "[ns.s, ns.s]|join"),
    "join method": GROW.replace("STEP", "''.join([ns.s, ns.s])"),
    "printf %": GROW.replace("STEP", "'%s%s' % (ns.s, ns.s)"),
    "format filter": GROW.replace("STEP", "'%s%s'|format(ns.s, ns.s)"),
    "str.format": GROW.replace("STEP", "'{}{}'.format(ns.s, ns.s)"),
    "replace filter": GROW.replace("STEP", "ns.s|replace('a', 'aa')"),
    "replace method": GROW.replace("STEP", "ns.s.replace('a', 'aa')"),
    "block capture": GROW.replace("{% set ns.s = STEP %}", "{% set b %}{{ ns.s }}{{ ns.s }}{% endset %}"
                                                           "{% set ns.s = b %}"),
    "macro output": "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s }}{% endif %}{% endmacro %}"
                    "{{ d('ab', 60)|length }}",
    "int product": "{% set ns = namespace(n=10) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}"
                   "{{ ns.n > 0 }}",
    "center filter": "{{ 'x'|center(10000000000)|length }}",
    "ljust method": "{{ 'x'.ljust(10000000000)|length }}",
    "printf width": "{{ ('%10000000000s' % 'x')|length }}",
    "format width": "{{ '{:>10000000000}'.format('x')|length }}",
    "indent filter": "{{ ('x\\n' * 100000)|indent(100000)|length }}",
    "expandtabs": "{{ ('\\t' * 100000).expandtabs(100000)|length }}",
    "tojson indent": "{{ range(100000)|list|tojson(indent=100000)|length }}",
    "lipsum": "{{ lipsum(100000000)|length }}",
    "lipsum n=": "{{ lipsum(n=100000000)|length }}",
}
_RENDER_ALL = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_DATA, (3 * 2 ** 30, resource.getrlimit(resource.RLIMIT_DATA)[1]))
from longsft.templates.render import Renderer, RenderLimits
out = {}
for name, template in json.loads(sys.argv[1]).items():
    start = time.perf_counter()
    try:
        text = Renderer(template, f"the chat template {name!r}", RenderLimits(seconds=20, chars=2 ** 20),
                        {}).render([])[0]
        out[name] = ["rendered", text[:100], time.perf_counter() - start]
    except BaseException as e:
        out[name] = [type(e).__name__, str(e)[:300], time.perf_counter() - start]
print(json.dumps(out))
"""


def test_no_template_operation_grows_a_value_past_the_bound():
    """Doubling a string with ~, join, %, format, replace, a captured block or a macro, squaring an integer, and a
    single width, indent, tab size or paragraph count far past the limit: each stops with the limit's message,
    before it is built. Run in a process limited to 3 GB of data, so a hole shows as a MemoryError, not as a machine
    out of memory."""
    proc = subprocess.run([sys.executable, "-c", _RENDER_ALL, json.dumps(HOSTILE)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {k: v for k, v in results.items() if v[0] != "RenderLimitError" or f"the chat template {k!r}" not in v[1]
             or "over the limit of 1,048,576 (--render_max_chars)" not in v[1] or v[2] > 5}
    assert not wrong, wrong


def test_bounded_operations_render_as_transformers_does():
    """The operations the bounds watch, at ordinary sizes, give transformers' own text."""
    template = ("{% macro m(x) %}<{{ x }}>{% endmacro %}{% set b %}[{{ messages[0].content }}]{% endset %}"
                "{{ b ~ '|' ~ m('y') }}{{ '%s-%05d' % ('a', 7) }}{{ '{}:{:>4}'.format('k', 3) }}"
                "{{ messages|map(attribute='role')|join(', ') }}{{ 'a\\tb'.expandtabs(4) }}{{ 'ab'.replace('a', 'xy') }}"
                "{{ 'x'|center(5) }}{{ 'l1\\nl2'|indent(2, true) }}{{ messages[0]|tojson(indent=2) }}"
                "{{ '%s!'|format('hi') }}{{ 'a b c d'|wordwrap(3) }}{{ [1, 2, 3]|batch(2)|list }}"
                "{{ 6 * 7 }}{{ 'ab' * 2 }}{{ 2 ** 10 }}{{ 17 % 5 }}{{ 'hi'|replace('h', 'H') }}{{ 'a-b'.split('-') }}")
    want = render_jinja_template([CHAT], chat_template=template)[0][0]
    assert Renderer(template, "t", RenderLimits(), {}).render(CHAT)[0] == want


def _folder(tmp_path, chat_tokenizer_dir, template: str) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    for p in Path(chat_tokenizer_dir("qwen2")).iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_pre_tokenize_fails_fast_on_a_looping_template(tmp_path, chat_tokenizer_dir):
    folder = _folder(tmp_path, chat_tokenizer_dir, LOOP)
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT}])
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"--template auto: the chat template of '.*tok' did not finish rendering "
                                         r"one record in 1 s \(--render_timeout\)"):
        pre_tokenize.main(["--model_name_or_path", str(folder), "--template", "auto", "--input", str(src),
                           "--output_dir", str(tmp_path / "out"), "--num_proc", "1", "--render_timeout", "1"])
    assert time.perf_counter() - start < 10 and not (tmp_path / "out").exists()


def _peak_mb(tmp_path, folder: Path, name: str) -> tuple[subprocess.CompletedProcess, float]:
    """pre_tokenize.py in a fresh process on one record; its peak resident memory in MiB."""
    src = write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": CHAT}])
    argv = ["pre_tokenize.py", "--model_name_or_path", str(folder), "--template", "auto", "--input", str(src),
            "--output_dir", str(tmp_path / f"{name}_out"), "--num_proc", "1"]
    run = (f"import resource, runpy, sys\nsys.argv = {argv!r}\ntry:\n    runpy.run_path('pre_tokenize.py', "
           f"run_name='__main__')\nfinally:\n    print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    return proc, int(proc.stdout.split("peak")[-1]) / 1024


def test_huge_string_stays_small(tmp_path, chat_tokenizer_dir):
    """{{ 'x' * 300000000 }} stops before it is built (17.6 GB before): the process peaks where the same run with a
    plain template peaks, within less than the 300 MB the string alone would take (an absolute bound does not
    hold: this run peaked at 0.26 GB on the dev machine and 1.5 GB on CI, imports and tokenizer included)."""
    proc, peak = _peak_mb(tmp_path, _folder(tmp_path, chat_tokenizer_dir, "{{ 'x' * 300000000 }}"), "huge")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "builds a value of 300,000,000 items or characters" in proc.stderr and "tok" in proc.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    base, base_peak = _peak_mb(plain, _folder(plain, chat_tokenizer_dir, QWEN2_MARKED), "plain")
    assert base.returncode == 0, base.stderr[-2000:]
    assert peak - base_peak < 150, (peak, base_peak)


def test_a_record_that_passes_a_bound_is_skipped_with_the_templates_name(tmp_path, chat_tokenizer_dir):
    template = ("{% for m in messages %}{% if m.content == 'slow' %}" + LOOP + "{% endif %}"
                "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
    folder = _folder(tmp_path, chat_tokenizer_dir, template)
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT}, {"messages": [
        {"role": "user", "content": "slow"}, {"role": "assistant", "content": "x"}]}])
    rep = pre_tokenize.main(["--model_name_or_path", str(folder), "--template", "auto", "--input", str(src),
                             "--output_dir", str(tmp_path / "out"), "--num_proc", "1", "--render_timeout", "1",
                             "--no_shuffle"])
    assert rep["samples_kept"] == 1 and rep["skipped"]["template_error"] == 1
    skipped = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())
    assert skipped["line"] == 2 and "did not finish rendering one record in 1 s" in skipped["detail"]


@pytest.mark.parametrize("value", [12345, True, [1, 2], [{"name": "default"}], {"default": 3}])
def test_a_chat_template_of_a_wrong_type_is_a_clear_error(tmp_path, chat_tokenizer_dir, value):
    """Issue 21 item 11: `"chat_template": 12345` was `TypeError: 'int' object is not iterable` (patch/families.py)."""
    folder = _folder(tmp_path, chat_tokenizer_dir, "x")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT}])
    with pytest.raises(InputError, match=r"tokenizer_config.json: `chat_template` is \w+ .*; it must be a Jinja "
                                         r"template string or a list of .* fix or remove the key"):
        pre_tokenize.main(["--model_name_or_path", str(folder), "--template", "auto", "--input", str(src),
                           "--output_dir", str(tmp_path / "out"), "--num_proc", "1"])


@pytest.mark.slow
def test_every_vendored_hub_template_renders_as_transformers_does():
    """The bounds change no real template's text: every hub template llama-cpp-python's source distribution vendors
    (llama.cpp's models/templates/*.jinja, read at test time), with and without tools, as render_jinja_template
    renders it (or both raise)."""
    from longsft.artifacts import extract
    from longsft.vocabularies import LLAMA_CPP

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    chat = CHAT + [{"role": "user", "content": "More?"}]
    kwargs = {"bos_token": "<s>", "eos_token": "</s>"}
    paths = extract(LLAMA_CPP, "*/vendor/llama.cpp/models/templates/*.jinja", sdist=True)
    assert len(paths) >= 20
    for path in paths:
        template = path.read_text(encoding="utf-8")
        for given in (None, tools):
            try:
                want = render_jinja_template([chat], chat_template=template, tools=given, add_generation_prompt=True,
                                             **kwargs)[0][0]
            except Exception as e:
                want = type(e).__name__
            try:
                got = Renderer(template, path.name, RenderLimits(), kwargs).render(chat, given, True)[0]
            except Exception as e:
                got = type(e).__name__
            assert got == want, (path.name, given is not None)
