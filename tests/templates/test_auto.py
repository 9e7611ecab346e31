"""Template `auto` (longsft/templates/auto.py): the tokenizer's own chat template, on the tiny chat tokenizers of
tools/make_tiny.py (GLM-Edge, GLM-4-0414, Qwen2.5, Qwen3, Mistral, Llama-3.1-Instruct with tools)."""
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from longsft.data import pretokenize as driver
import pre_tokenize
from longsft.templates import registry
from longsft.data.inputs import InputError
from longsft.data.inputs import Message
from tests.records import write_jsonl
from longsft.data.storage import IGNORE_INDEX, TokenizedData
from longsft.templates.auto import AutoFormat

KINDS = ["glm", "glm4", "qwen2", "qwen2_marked", "qwen3", "mistral", "llama3"]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = [  # system prompt, a plain turn, a tool call, its result, the answer
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]
GLAIVE = {  # the layout of LLaMA-Factory's glaive_toolcall demo: ShareGPT turns, tools as a JSON string
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "tools": json.dumps([WEATHER]),
}
SPECIAL_TEXT = "see <|im_end|> <|eot_id|> </s> [INST] <|user|> <|endoftext|> [gMASK] end"
HAND_CHECKED = {  # the supervised text of TOOL_CHAT (with its tools), decoded, per template
    "glm": ['Hello!<|user|>', 'get_weather\n{"city": "Paris"}<|observation|>', 'It is 21 degrees.<|endoftext|>'],
    "glm4": ['\nHello!<|user|>', 'get_weather\n{"city": "Paris"}<|observation|>',
             '\nIt is 21 degrees.<|endoftext|>'],
    "qwen2": ['Hello!<|im_end|>',
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
              'It is 21 degrees.<|im_end|>'],
    "qwen2_marked": ['Hello!<|im_end|>',  # the {% generation %} block starts before the call's newline
                     '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                     'It is 21 degrees.<|im_end|>'],
    "llama3": ['Hello!<|eot_id|>', '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
               'It is 21 degrees.<|eot_id|>'],
}


@pytest.fixture(scope="module")
def fmt(chat_tokenizer_dir):
    """kind -> AutoFormat on that tiny tokenizer (loaded as models.load_tokenizer loads a tokenizer.json folder)."""
    made = {}

    def get(kind: str) -> AutoFormat:
        if kind not in made:
            tok = PreTrainedTokenizerFast.from_pretrained(chat_tokenizer_dir(kind))
            made[kind] = registry.chat_format("auto", tok)
            made[kind].kind = kind  # for appends_eos
            assert made[kind].problems == []
        return made[kind]

    return get


def encode(f: AutoFormat, record: dict):
    """(ids, supervised, Skip or None) of one record through the driver's calls (parse_record, encode_batch); the
    samples of a record split by --rewritten_replies split come concatenated (`samples` has them one by one)."""
    _, conv = f.parse_record(record)
    ids, supervised, lengths, outcome, owners = f.encode_batch([conv])
    assert (owners == 0).all() and lengths.sum() == len(ids)
    return ids, supervised, outcome[0]


def samples(f: AutoFormat, record: dict) -> list:
    """[(ids, supervised)] per sample of one record (several with --rewritten_replies split)."""
    _, conv = f.parse_record(record)
    ids, supervised, lengths, outcome, _ = f.encode_batch([conv])
    if outcome[0] is not None:
        raise outcome[0]
    cuts = np.cumsum(lengths)[:-1]
    return list(zip(np.split(ids, cuts), np.split(supervised, cuts)))


def reference(f: AutoFormat, record: dict, **kwargs) -> list[int]:
    """apply_chat_template's ids for what the record becomes."""
    _, conv = f.parse_record(record)
    return list(f.tokenizer.apply_chat_template([t.message for t in conv], tools=conv.tools, tokenize=True,
                                                return_dict=False, **kwargs))


def runs(tok, ids, supervised) -> list[str]:
    """The supervised runs of tokens, decoded."""
    out, cur = [], []
    for i, s in zip(ids.tolist() + [None], supervised.tolist() + [False]):
        if s:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out


def appends_eos(f: AutoFormat) -> bool:
    """GLM's templates end a reply with the next role token: a final reply gets the eos appended."""
    return getattr(f, "kind", None) in ("glm", "glm4")


# ----------------------------------------------------------------------------------------------
# Rendering and tokens: apply_chat_template's ids
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_ids_are_apply_chat_templates(fmt, kind):
    f = fmt(kind)
    alpaca = {"instruction": "Name a colour", "input": "warm", "output": "Red", "system": "Be brief."}
    records = [{"messages": TOOL_CHAT[1:3]}, {"messages": TOOL_CHAT[:3]}, alpaca]
    if kind not in ("qwen3", "mistral"):  # prefix-stable with tools and several turns
        records += [{"messages": TOOL_CHAT, "tools": [WEATHER]}, GLAIVE, {"messages": TOOL_CHAT[1:]},
                    alpaca | {"history": [["Hi", "Hello!"]]}]
    if kind == "mistral":
        records += [{"messages": TOOL_CHAT[1:]}, {"messages": TOOL_CHAT[3:], "tools": [WEATHER]}]
    if kind == "qwen3":
        records += [GLAIVE | {"conversations": GLAIVE["conversations"][:1] + [GLAIVE["conversations"][3]]}]
    for record in records:
        ids, supervised, skip = encode(f, record)
        assert skip is None, (record, skip)
        ref = reference(f, record)
        if appends_eos(f):  # a GLM reply that ends the conversation has no end token: eos appended, supervised
            assert ids[-1] == f.eos_id and supervised[-1] and ids[:-1].tolist() == ref
        else:
            assert ids.tolist() == ref, record
        assert supervised.any()


@pytest.mark.parametrize("kind", ["glm", "glm4", "qwen2", "qwen2_marked", "llama3"])
def test_supervised_spans_hand_checked(fmt, kind):
    f = fmt(kind)
    ids, supervised, skip = encode(f, {"messages": TOOL_CHAT, "tools": [WEATHER]})
    assert skip is None
    assert runs(f.tokenizer, ids, supervised) == HAND_CHECKED[kind]
    # the prompt of each reply is what apply_chat_template gives with add_generation_prompt (tools/generate.py)
    first = int(np.flatnonzero(supervised)[0])
    prompt = reference(f, {"messages": TOOL_CHAT[:2], "tools": [WEATHER]}, add_generation_prompt=True)
    assert ids[:first].tolist() == prompt


def test_mistral_spans_and_alternation(fmt):
    f = fmt("mistral")
    ids, supervised, skip = encode(f, {"messages": TOOL_CHAT[1:]})
    assert skip is None
    assert runs(f.tokenizer, ids, supervised) == [
        " Hello!</s>", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
        " It is 21 degrees.</s>"]
    _, _, skip = encode(f, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                         {"role": "assistant", "content": "c"}]})
    assert skip.reason == "template_error" and "must alternate" in skip.detail


def test_tool_calls_through_each_templates_tool_format(fmt):
    """ShareGPT function_call / observation turns and the record's tools (a JSON string) become the template's own
    tool format: Qwen's <tool_call> / <tool_response>, Llama-3.1's JSON call and ipython role, GLM's observation."""
    texts = {}
    for kind in ("qwen2", "llama3", "glm", "mistral"):
        f = fmt(kind)
        ids, supervised, skip = encode(f, GLAIVE)
        assert skip is None
        texts[kind] = f.tokenizer.decode(ids)
        spans = runs(f.tokenizer, ids, supervised)
        assert len(spans) == 2 and "get_weather" in spans[0] and "21 degrees" in spans[1]
        assert not any('{"temp": 21}' in s for s in spans)  # the tool result is never trained
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in texts["qwen2"] and "<tools>" in texts["qwen2"]
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temp\": 21}<|eot_id|>" in texts["llama3"]
    assert "Environment: ipython" in texts["llama3"] and '"parameters": {"city": "Paris"}' in texts["llama3"]
    assert "<|observation|>\n{\"temp\": 21}" in texts["glm"] and "# 可用工具" in texts["glm"]
    assert '[TOOL_RESULTS] {"content": {"temp": 21}, "call_id": "call00001"}' in texts["mistral"]
    # the same conversation as `messages` with OpenAI-style tool_calls (arguments as a JSON string) is the same
    openai = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"id": "call00001", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                           {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 21}'},
                           {"role": "assistant", "content": "It is 21 degrees."}], "tools": [WEATHER]}
    for kind in ("qwen2", "llama3", "mistral"):
        assert encode(fmt(kind), openai)[0].tolist() == encode(fmt(kind), GLAIVE)[0].tolist()
    # Llama-3.1 takes one call per message: two are the template's error, a skip
    two = {"messages": [openai["messages"][0], {"role": "assistant", "tool_calls": [CALL, CALL]}]}
    assert encode(fmt("llama3"), two)[2].reason == "template_error"
    # GLM-4's finetune layout: the tools on the system message
    glm = fmt("glm")
    on_system = {"messages": [{"role": "system", "content": "", "tools": [WEATHER]}] + openai["messages"]}
    assert "# 可用工具" in glm.tokenizer.decode(encode(glm, on_system)[0])


# ----------------------------------------------------------------------------------------------
# Templates that rewrite earlier turns, generation blocks, opt-outs, special text
# ----------------------------------------------------------------------------------------------

def test_qwen3_rewrites_history_skip_or_leave_unsupervised(fmt):
    f = fmt("qwen3")
    f.rewritten = "skip"
    multi = {"messages": TOOL_CHAT, "tools": [WEATHER]}
    _, _, skip = encode(f, multi)
    assert skip.reason == "template_rewrites_history" and skip.detail.startswith("message 2:")
    assert "<think>" in skip.detail  # what the reply looks like at its own turn
    # single turn: the final turn carries the (empty) reasoning block the model writes
    ids, supervised, skip = encode(f, {"messages": TOOL_CHAT[1:3]})
    assert runs(f.tokenizer, ids, supervised) == ["<think>\n\n</think>\n\nHello!<|im_end|>"]
    # reasoning in the content or in reasoning_content: kept on the final turn
    for reply in ({"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
                  {"role": "assistant", "content": "Hello!", "reasoning_content": "hmm"}):
        ids, supervised, _ = encode(f, {"messages": [TOOL_CHAT[1], reply]})
        assert runs(f.tokenizer, ids, supervised) == ["<think>\nhmm\n</think>\n\nHello!<|im_end|>"]
    # the earlier replies opted out: the record trains its final turn
    opted = {"messages": [dict(m, loss=False) if m["role"] == "assistant" else m for m in TOOL_CHAT[:-1]]
             + [TOOL_CHAT[-1]], "tools": [WEATHER]}
    ids, supervised, skip = encode(f, opted)
    assert skip is None and ids.tolist() == reference(f, opted)
    assert runs(f.tokenizer, ids, supervised) == ["<think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>"]
    # --rewritten_replies unsupervised does that by itself
    f.rewritten = "unsupervised"
    try:
        ids, supervised, skip = encode(f, multi)
        assert skip is None and ids.tolist() == reference(f, multi)
        assert runs(f.tokenizer, ids, supervised) == ["<think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>"]
        _, _, skip = encode(f, {"messages": TOOL_CHAT[1:4]})  # its only reply is rewritten: nothing left
        assert skip.reason == "template_rewrites_history"
    finally:
        f.rewritten = "skip"


def test_mistral_system_prompt_moves_to_the_last_user_message(fmt):
    f = fmt("mistral")
    f.rewritten = "skip"
    _, _, skip = encode(f, {"messages": TOOL_CHAT[:4] + [{"role": "assistant", "content": "Sunny."}]})
    assert skip.reason == "template_rewrites_history" and skip.detail.startswith("message 2:")
    ids, supervised, skip = encode(f, {"messages": TOOL_CHAT[:3]})  # one turn: stable
    assert skip is None and runs(f.tokenizer, ids, supervised) == [" Hello!</s>"]


def test_generation_blocks_decide_when_the_template_has_them(fmt):
    f = fmt("qwen2_marked")
    assert f.marked == {False: True, True: True} and not fmt("qwen2").marked[False]
    record = {"messages": TOOL_CHAT[:2] + [dict(TOOL_CHAT[2], loss=False)] + TOOL_CHAT[3:]}
    ids, supervised, _ = encode(f, record)
    assert ids.tolist() == reference(f, record)
    assert runs(f.tokenizer, ids, supervised) == HAND_CHECKED["qwen2_marked"][1:]  # the opted-out reply is not
    # blocks that do not pair with the assistant messages (here: none for one reply) cannot be told apart
    tok = PreTrainedTokenizerFast.from_pretrained(f.tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and m.content != 'plain' %}{% generation %}"
                         "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    partial = AutoFormat(tok)
    assert partial.marked[False] and encode(partial, {"messages": TOOL_CHAT[1:3]})[2] is None
    _, _, skip = encode(partial, {"messages": TOOL_CHAT[1:3] + [{"role": "user", "content": "more"},
                                                                {"role": "assistant", "content": "plain"}]})
    assert skip.reason == "template_error" and "1 {% generation %} blocks for 2 assistant messages" in skip.detail
    # and that template writes no tool calls: a record with one is skipped for it, never trained without its call
    assert partial.call_shape is None
    assert encode(partial, {"messages": TOOL_CHAT[1:]})[2].reason == "template_cannot_render_tools"


@pytest.mark.parametrize("kind", ["glm", "qwen2", "llama3"])
def test_opted_out_and_empty_replies(fmt, kind):
    f = fmt(kind)
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one", "loss": False},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "two", "loss_weight": 0},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "d"}, {"role": "assistant", "content": "four"}]
    ids, supervised, skip = encode(f, {"messages": chat})
    spans = runs(f.tokenizer, ids, supervised)
    assert len(spans) == 1 and spans[0].startswith("four")
    with pytest.raises(driver.Skip, match="nothing_to_supervise"):
        driver._validate({"messages": chat[:6]}, f)
    with pytest.raises(driver.Skip, match="wrong_schema"):
        f.parse_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                                       "loss": "no"}]})


@pytest.mark.parametrize("kind", KINDS)
def test_special_token_text_in_the_data_stays_text(fmt, kind):
    f = fmt(kind)
    plain = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    typed = {"messages": [{"role": "user", "content": "Q " + SPECIAL_TEXT}, {"role": "assistant",
                                                                             "content": "A " + SPECIAL_TEXT}]}
    specials = set(f.special_ids.values())
    count = [sum(i in specials for i in encode(f, r)[0].tolist()) for r in (plain, typed)]
    assert count[0] == count[1]  # only the template's own special tokens are special tokens
    ids, supervised, skip = encode(f, typed)
    _, conv = f.parse_record(typed)
    text = f.tokenizer.apply_chat_template([t.message for t in conv], tokenize=False)
    assert f.tokenizer.decode(ids[:-1] if appends_eos(f) else ids) == text
    assert SPECIAL_TEXT in runs(f.tokenizer, ids, supervised)[0]
    if kind == "qwen2":  # the text between two template tokens is encoded as plain text, in one piece
        between = f.tokenizer.backend_tokenizer
        im_start, im_end = f.special_ids["<|im_start|>"], f.special_ids["<|im_end|>"]
        starts = [k for k, i in enumerate(ids.tolist()) if i == im_start]
        user = ids[starts[1] + 1:].tolist()
        user = user[:user.index(im_end)]
        assert user == f._backend(True).encode("user\nQ " + SPECIAL_TEXT, add_special_tokens=False).ids
        assert between.encode("<|im_end|>").ids == [im_end]  # (while typed alone it would be the token)
    # tool arguments and tool schemas too
    tooled = {"messages": [{"role": "user", "content": "x"},
                           {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {"q": SPECIAL_TEXT}}]}],
              "tools": [{"name": "f", "description": SPECIAL_TEXT}]}
    ids, _, skip = encode(f, tooled)
    without = json.loads(json.dumps(tooled).replace(SPECIAL_TEXT, "plain"))
    assert skip is None
    assert sum(i in specials for i in ids.tolist()) == sum(i in specials for i in encode(f, without)[0].tolist())


def test_private_use_markers_in_the_data(fmt):
    f = fmt("qwen2")
    ids, supervised, skip = encode(f, {"messages": [{"role": "user", "content": "\U000f0001 alone"},
                                                    {"role": "assistant", "content": "fine"}]})
    assert skip is None  # without special-token text nothing is marked
    _, _, skip = encode(f, {"messages": [{"role": "user", "content": "\U000f0001 <|im_end|>"},
                                         {"role": "assistant", "content": "x"}]})
    assert skip.reason == "template_error" and "private-use" in skip.detail


# ----------------------------------------------------------------------------------------------
# The folder: stop tokens, missing template; the CLI and the driver
# ----------------------------------------------------------------------------------------------

def test_stop_tokens_and_prefix(fmt, chat_tokenizer_dir, tmp_path):
    glm, qwen, llama = fmt("glm"), fmt("qwen2"), fmt("llama3")
    assert glm.stop_token_ids == [glm.special_ids["<|endoftext|>"], glm.special_ids["<|user|>"]]
    assert qwen.stop_token_ids == [qwen.special_ids["<|im_end|>"]]
    assert llama.stop_token_ids == [llama.special_ids["<|eot_id|>"]]
    assert fmt("glm4").prefix_len >= 2 and fmt("mistral").prefix_len >= 1
    folder = Path(chat_tokenizer_dir("qwen2"))
    copy = tmp_path / "qwen"
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [qwen.special_ids["<|endoftext|>"],
                                                                              qwen.special_ids["<|im_end|>"]]}))
    f = AutoFormat(PreTrainedTokenizerFast.from_pretrained(copy))
    assert f.stop_token_ids == [qwen.special_ids["<|endoftext|>"], qwen.special_ids["<|im_end|>"]]


def test_a_folder_without_a_chat_template_is_named(tmp_path, llama2_tokenizer_dir, glm4_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": TOOL_CHAT[1:3]}])
    with pytest.raises(InputError, match=r"--template auto: the tokenizer of .* has no chat template \(no "
                                         r"chat_template in tokenizer_config.json, no chat_template.jinja\); give a "
                                         r"model folder that has one, or pick another --template"):
        pre_tokenize.main(["--model_name_or_path", str(llama2_tokenizer_dir), "--template", "auto", "--input",
                           str(src), "--output_dir", str(tmp_path / "out"), "--num_proc", "1"])
    with pytest.raises(InputError, match="--template auto: not a template of the glm4 family"):
        pre_tokenize.main(["--model_name_or_path", str(glm4_tokenizer_dir), "--template", "auto", "--input",
                           str(src), "--output_dir", str(tmp_path / "out"), "--num_proc", "1"])
    assert not (tmp_path / "out").exists()


def mixed_records() -> list:
    """Plain, tool-calling, special-text, opted-out and bad records in all three layouts."""
    out = []
    for k in range(40):
        out += [{"messages": TOOL_CHAT, "tools": [WEATHER]}, GLAIVE,
                {"conversations": [{"from": "human", "value": f"q{k} {SPECIAL_TEXT}"},
                                   {"from": "gpt", "value": f"a{k} " * (k + 1)}]},
                {"instruction": f"say {k}", "input": "", "output": f"{k}!"},
                {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": False}]},
                {"messages": [{"role": "assistant", "tool_calls": [CALL, CALL]}]}, "not json"]
    return out


def test_pre_tokenize_auto_end_to_end(tmp_path, chat_tokenizer_dir):
    """pre_tokenize.py --template auto on a Llama-3.1-Instruct folder (the llama3 family): every record encoded or
    skipped with a reason, labels = the supervised spans, and the report lists the template's skip reasons."""
    folder = chat_tokenizer_dir("llama3")
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in mixed_records()[:7]]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    rep = pre_tokenize.main(["--model_name_or_path", str(folder), "--template", "auto", "--input",
                             str(tmp_path / "in.jsonl"), "--output_dir", str(tmp_path / "out"), "--num_proc", "1",
                             "--no_shuffle"])
    assert rep["samples_kept"] == 4 and rep["skipped"] == {
        "invalid_json": 1, "wrong_schema": 0, "unknown_role": 0, "too_long": 0, "nothing_to_supervise": 1,
        "template_error": 1, "template_rewrites_history": 0, "template_cannot_render_tools": 0,
        "template_drops_reply": 0}
    data = TokenizedData(tmp_path / "out")
    assert data.meta["template"] == "auto" and data.meta["model_family"] == "llama3"
    f = registry.chat_format("auto", PreTrainedTokenizerFast.from_pretrained(folder))
    assert data.meta["stop_token_ids"] == f.stop_token_ids
    for k, record in enumerate(mixed_records()[:4]):
        ids, supervised, _ = encode(f, record)
        got_ids, got_labels = data.sample(k)
        assert np.array_equal(got_ids, ids) and np.array_equal(got_labels, np.where(supervised, ids, IGNORE_INDEX))
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [(5, "nothing_to_supervise"), (6, "template_error"),
                                                            (7, "invalid_json")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_num_proc_does_not_change_the_output(tmp_path, chat_tokenizer_dir, kind):
    folder = chat_tokenizer_dir(kind)
    records = mixed_records()
    (tmp_path / "in.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    outs = []
    for n in (1, 4):
        args = pre_tokenize.Arguments(model_name_or_path=str(folder), input=[str(tmp_path / "in.jsonl")],
                                      output_dir=str(tmp_path / f"out{n}"), num_proc=n, template="auto")
        f = registry.chat_format("auto", PreTrainedTokenizerFast.from_pretrained(folder))
        driver.run(args, f, "auto", kind, None, problems=f.problems)  # tokenizer-only folders: no family
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / f"out{n}").iterdir())})
    assert outs[0] == outs[1]
    report = json.loads(outs[0]["report.json"])
    assert report["samples_kept"] > 0 and report["lines_read"] == len(records)


def test_generate_prompt_is_the_inference_prompt(fmt):
    """ChatFormat.encode on chat_inputs Messages (what tools/generate.py builds its prompt from): the tokens before
    the first supervised one are apply_chat_template's prompt with add_generation_prompt."""
    for kind in ("qwen2", "llama3", "glm", "mistral"):
        f = fmt(kind)
        ids, labels = f.encode([Message("system", "Be brief."), Message("user", "Hi"),
                                Message("assistant", "x", train=True)])
        first = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
        prompt = f.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        assert ids[:first].tolist() == list(prompt), kind


def test_byte_positions_agree_with_the_offsets(fmt, chat_tokenizer_dir, tmp_path):
    """A byte-level BPE's token positions come from its tokens' byte lengths (no offsets): the same labels as the
    offsets give, on non-ASCII text too; a tokenizer with an NFC normalizer reads the offsets for text it changes."""
    records = [{"messages": [{"role": "user", "content": "长江 ünïcödé 🙂 " * 3},
                             {"role": "assistant", "content": "你好，世界 🙂 é" * 4}]},
               {"messages": TOOL_CHAT, "tools": [WEATHER]}, GLAIVE]
    f = fmt("qwen2")
    assert f._byte_table() is not None
    slow = AutoFormat(f.tokenizer)
    slow._backends["bytes"], slow._backends["nfc"] = None, False  # as for a tokenizer that is not byte-level BPE
    for record in records:
        a, b = encode(f, record), encode(slow, record)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[0].tolist() == reference(f, record)
    folder = tmp_path / "nfc"
    folder.mkdir()
    for p in Path(chat_tokenizer_dir("qwen2")).iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    state = json.loads((folder / "tokenizer.json").read_text())
    state["normalizer"] = {"type": "NFC"}  # Qwen2.5's tokenizer.json normalizes to NFC
    (folder / "tokenizer.json").write_text(json.dumps(state))
    nfc = AutoFormat(PreTrainedTokenizerFast.from_pretrained(folder))
    decomposed = {"messages": [{"role": "user", "content": "cafe\u0301"}, {"role": "assistant",
                                                                          "content": "re\u0301sume\u0301 ok"}]}
    ids, supervised, _ = encode(nfc, decomposed)
    assert ids.tolist() == reference(nfc, decomposed)
    assert runs(nfc.tokenizer, ids, supervised) == ["résumé ok<|im_end|>"]


@pytest.mark.parametrize("kind", ["glm", "qwen2"])
def test_a_work_unit_is_its_records_one_by_one(fmt, kind):
    """encode_batch lays every sample of a work unit on one position axis (one search finds all supervised tokens):
    a batch mixing plain and non-ASCII text, special-token text in the data (the marked path), tools, several
    turns, a skipped record and GLM's appended eos gives each record what it gives alone."""
    f = fmt(kind)
    records = [{"messages": [{"role": "user", "content": "长江 ünïcödé 🙂"}, {"role": "assistant", "content": "你好 é"}]},
               {"messages": TOOL_CHAT, "tools": [WEATHER]}, GLAIVE,
               {"messages": [{"role": "user", "content": "Q " + SPECIAL_TEXT}, {"role": "assistant",
                                                                              "content": "A " + SPECIAL_TEXT}]},
               {"messages": [{"role": "user", "content": "only a question"}, {"role": "assistant", "content": ""}]},
               {"instruction": "Name a colour", "output": "Red"}, {"messages": TOOL_CHAT[1:3]}]
    convs = [f.parse_record(r)[1] for r in records]
    ids, supervised, lengths, outcomes, owners = f.encode_batch(convs)
    cuts = np.cumsum(lengths)[:-1]
    together = {}
    for o, i, s in zip(owners.tolist(), np.split(ids, cuts), np.split(supervised, cuts)):
        together.setdefault(o, []).append((i.tolist(), s.tolist()))
    for k, conv in enumerate(convs):
        ids1, sup1, lengths1, outcome1, _ = f.encode_batch([conv])
        assert (outcomes[k] is None) == (outcome1[0] is None), k
        alone = [(i.tolist(), s.tolist()) for i, s in zip(np.split(ids1, np.cumsum(lengths1)[:-1]),
                                                          np.split(sup1, np.cumsum(lengths1)[:-1]))] if len(ids1) else []
        assert together.get(k, []) == alone, k
    assert sum(o is not None for o in outcomes) == 1 and len(together) == len(records) - 1
    ends = [i[-1] for o in together.values() for i, _ in o]
    assert (f.eos_id in ends) == appends_eos(f)


@pytest.mark.parametrize("family", ["glm", "qwen2"])
def test_native_model_folders_default_to_auto(tmp_path, family):
    """A tiny transformers-native model folder (tools/make_tiny.py: its model's tokenizer and chat template):
    pre_tokenize.py finds the family from config.json and defaults to template auto; stop ids start with the
    folder's generation_config.json eos ids."""
    from longsft.tiny.models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", family)
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": TOOL_CHAT[1:3]}, GLAIVE])
    rep = pre_tokenize.main(["--model_name_or_path", str(model), "--input", str(src), "--output_dir",
                             str(tmp_path / "out"), "--num_proc", "1"])
    meta = TokenizedData(tmp_path / "out").meta
    assert rep["samples_kept"] == 2 and meta["template"] == "auto" and meta["model_family"] == family
    stops = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]
    assert meta["stop_token_ids"][:len(stops)] == stops


def test_split_records_in_the_report(tmp_path, chat_tokenizer_dir):
    """--rewritten_replies split (the default): a Qwen3 multi-turn record becomes one sample per rewritten reply plus
    the whole conversation; the report counts them (lines_read = samples_kept - extra_samples + skipped) and a
    record with a sample over --max_length is skipped once, whole."""
    long_reply = {"role": "assistant", "content": "word " * 900}
    records = [{"messages": TOOL_CHAT, "tools": [WEATHER]}, {"messages": TOOL_CHAT[1:3]},
               {"messages": TOOL_CHAT[1:3] + [TOOL_CHAT[3], long_reply]}, "not json"]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    rep = pre_tokenize.main(["--model_name_or_path", str(chat_tokenizer_dir("qwen3")), "--template", "auto",
                             "--input", str(src), "--output_dir", str(tmp_path / "out"), "--num_proc", "1",
                             "--no_shuffle", "--max_length", "700"])
    split = rep["split"]
    assert split["records"] == 1 and split["samples"] == 3 and split["extra_samples"] == 2  # 2 earlier replies
    assert split["extra_tokens"] > 0
    assert rep["lines_read"] == rep["samples_kept"] - split["extra_samples"] + rep["skipped_total"] == 4
    assert rep["skipped"]["too_long"] == 1 and rep["skipped"]["invalid_json"] == 1
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [(3, "too_long"), (4, "invalid_json")]
    data = TokenizedData(tmp_path / "out")
    assert len(data) == 4
    rep = pre_tokenize.main(["--model_name_or_path", str(chat_tokenizer_dir("qwen3")), "--template", "auto",
                             "--input", str(src), "--output_dir", str(tmp_path / "skip"), "--num_proc", "1",
                             "--rewritten_replies", "skip", "--max_length", "700"])
    assert "split" not in rep and rep["skipped"]["template_rewrites_history"] == 2
