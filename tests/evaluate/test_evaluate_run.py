"""evaluate.py end to end on tiny models (longsft/evaluate/run.py, generate.py, loss.py): batched left-padded generation
equals one prompt at a time and stops on the folder's stop ids; LongBench-Write generation resumed after a kill (a
torn last line included) gives what an uninterrupted run gives, a finished run generates nothing, other settings or
inputs are refused; a chat test set: prompts are the template's inference prompts, ROUGE/BLEU over the replies,
every unusable record in skipped.jsonl, and the eval loss equal to stock transformers' cross-entropy.

    python -m pytest -q tests/evaluate/test_evaluate_run.py
"""
import json
import shutil

import pytest
import torch

from longsft.errors import UserError
from longsft.evaluate.generate import Generator, Sampling
from longsft.evaluate.metrics import corpus_scores
from longsft.tiny.models import make_tiny_model
import evaluate as evaluate_entry
from tests.records import write_jsonl

GREEDY = Sampling(max_new_tokens=10, temperature=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is many times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            built[family] = make_tiny_model(tmp_path_factory.mktemp(f"ev_{family}"), family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def qwen2_gen(tiny):
    return Generator.load(str(tiny("qwen2")))


@pytest.mark.parametrize("family", ["qwen2", "llama3", "glm4"])
def test_batched_generation_equals_one_by_one(tiny, family):
    gen = Generator.load(str(tiny(family)))
    prompts = [gen.prompt_ids(p) for p in ("Hi", "Write a much longer prompt about the sea, ships and tea.",
                                             "你好，长江")]
    assert len({len(p) for p in prompts}) == 3  # really left-padded
    batched = gen.generate(prompts, GREEDY)
    for p, b in zip(prompts, batched):
        alone = gen.generate([p], GREEDY)[0]
        assert alone.ids == b.ids and alone.text == b.text and alone.finish_reason == b.finish_reason


def test_prompt_is_the_templates_and_generation_stops_on_the_folders_stop_ids(tmp_path, tiny):
    src = tiny("qwen2")
    model_dir = tmp_path / "qwen2"
    shutil.copytree(src, model_dir)
    gen = Generator.load(str(model_dir))
    assert gen.template == "auto" and gen.family.name == "qwen2"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about tea."}]
    assert gen.prompt_ids("Tell me about tea.", "Be brief.") == list(
        gen.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    prompts = [gen.prompt_ids("Tell me about tea."), gen.prompt_ids("Hello there")]
    free = gen.generate(prompts, GREEDY)
    assert all(o.finish_reason == "length" and len(o.ids) == 10 for o in free), free
    # a token first generated at position k >= 1 of row 0, made a stop id in generation_config.json only
    new = free[0].ids
    k = next(i for i in range(1, len(new)) if new[i] not in new[:i] and new[i] not in free[1].ids[:i + 1])
    config = json.loads((model_dir / "generation_config.json").read_text())
    saved = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    config["eos_token_id"] = [*saved, new[k]]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    gen2 = Generator.load(str(model_dir), model=gen.model, tokenizer=gen.tokenizer)
    assert new[k] in gen2.stops
    cut = gen2.generate(prompts, GREEDY)
    assert cut[0].ids == new[:k + 1] and cut[0].finish_reason == "stop"
    assert cut[0].text == gen.tokenizer.decode(new[:k + 1], skip_special_tokens=True).strip()
    assert cut[1].ids[:len(free[1].ids)] == free[1].ids[:len(cut[1].ids)]  # the other row runs on as before


BENCH = [{"prompt": p, "type": t, "length": n} for p, t, n in [
    ("Write a 300-word story about tea.", "story", 300), ("写一篇500字的文章", "essay", 500),
    ("Write 2000 words on rivers.", "essay", 2000), ("Write a 5000-word history of ships.", "history", 5000),
    ("写一篇10000字的小说", "story", 10000)]]


class Killed(Exception):
    pass


def test_longbench_write_resumes_after_a_kill(tmp_path, qwen2_gen, monkeypatch):
    data = write_jsonl(tmp_path / "lbw.jsonl", BENCH)
    common = ["--model_dir", str(qwen2_gen.model_dir), "--data", str(data), "--max_new_tokens", "8",
              "--batch_size", "2", "--temperature", "0.7", "--seed", "3"]
    full = evaluate_entry.main(common + ["--output_dir", str(tmp_path / "full")], generator=qwen2_gen)
    assert full["count"] == 5 and full["generation"]["new_items"] == 5 and full["generation"]["new_tokens"] > 0
    assert set(full) >= {"S_l", "by_type", "by_length", "generation", "settings"}
    lines = (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2, 3, 4]
    first = json.loads(lines[0])
    assert set(first) >= {"prompt", "type", "length", "response_length", "response"}  # LongWriter's pred.jsonl

    calls = []
    real = Generator.generate

    def dies_on_the_second_batch(self, prompts, sampling, first_index=0, on_tokens=None):
        calls.append(first_index)
        if len(calls) == 2:
            raise Killed()
        return real(self, prompts, sampling, first_index, on_tokens)

    out = tmp_path / "cut"
    monkeypatch.setattr(Generator, "generate", dies_on_the_second_batch)
    with pytest.raises(Killed):
        evaluate_entry.main(common + ["--output_dir", str(out)], generator=qwen2_gen)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    with open(out / "predictions.jsonl", "a") as f:  # a kill in the middle of writing a line
        f.write('{"index": 2, "prompt": "Write 2000 w')
    calls.clear()
    monkeypatch.setattr(Generator, "generate", lambda self, *a, **k: (calls.append(k.get("first_index")),
                                                                       real(self, *a, **k))[1])
    resumed = evaluate_entry.main(common + ["--output_dir", str(out)], generator=qwen2_gen)
    assert calls == [2, 4] and resumed["generation"]["resumed_items"] == 2
    assert (out / "predictions.jsonl").read_text().splitlines() == lines  # what the uninterrupted run wrote
    assert resumed["S_l"] == full["S_l"] and resumed["by_length"] == full["by_length"]

    calls.clear()
    again = evaluate_entry.main(common + ["--output_dir", str(out)], generator=qwen2_gen)
    assert calls == [] and again["generation"]["new_items"] == 0 and again["S_l"] == full["S_l"]
    with pytest.raises(UserError, match=r"generated with other settings \(max_new_tokens: 8 then, 9 now\)"):
        evaluate_entry.main(common[:4] + ["--max_new_tokens", "9", *common[6:], "--output_dir", str(out)],
                            generator=qwen2_gen)
    other = write_jsonl(tmp_path / "other.jsonl", [{**BENCH[0], "prompt": "something else"}] + BENCH[1:])
    with pytest.raises(UserError, match="holds predictions for other inputs"):
        evaluate_entry.main([*common[:2], "--data", str(other), *common[4:], "--output_dir", str(out)],
                            generator=qwen2_gen)


TEST_SET = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is tea?"},
                  {"role": "assistant", "content": "Tea is a drink made from leaves."}]},
    {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                       {"from": "human", "value": "长江有多长？"}, {"from": "gpt", "value": "长江全长约6300公里。"}]},
    {"instruction": "Translate to French", "input": "cat", "output": "chat"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "unanswered"}]},
    "{not json",
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
    {"text": "not a chat record"},
]


def test_test_set_metrics_and_eval_loss(tmp_path, qwen2_gen):
    test_file = write_jsonl(tmp_path / "dev.jsonl", TEST_SET)
    out = tmp_path / "ev"
    scores = evaluate_entry.main(["--model_dir", str(qwen2_gen.model_dir), "--test_file", str(test_file),
                                  "--output_dir", str(out), "--max_new_tokens", "6", "--temperature", "0"],
                                 generator=qwen2_gen)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(p["line"], p["reference"]) for p in preds] == [(1, "Tea is a drink made from leaves."),
                                                            (2, "长江全长约6300公里。"), (3, "chat")]
    expected = corpus_scores([(p["response"], p["reference"]) for p in preds])
    for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert scores[k] == expected[k]
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [(4, "no_reference"), (5, "invalid_json"),
                                                           (6, "no_reference"), (7, "wrong_schema")]
    assert scores["skipped"] == {"invalid_json": 1, "no_reference": 2, "wrong_schema": 1}

    # the multi-turn record's prompt is the chat template's inference prompt of everything before the reply
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
               {"role": "user", "content": "长江有多长？"}]
    want = qwen2_gen.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    from longsft.evaluate.records import read_test_set

    cases, _ = read_test_set(test_file)
    assert qwen2_gen.context_ids(cases[1]["context"]) == list(want)
    greedy = qwen2_gen.generate([qwen2_gen.context_ids(cases[1]["context"])], Sampling(6, temperature=0))[0]
    assert preds[1]["response"] == greedy.text and preds[1]["new_tokens"] == len(greedy.ids)

    # eval loss: stock transformers' Qwen2 on the training format's supervised tokens, summed by hand
    from transformers import Qwen2ForCausalLM

    stock = Qwen2ForCausalLM.from_pretrained(qwen2_gen.model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for case in cases:
        ids, labels = qwen2_gen.fmt.encode(case["messages"])
        ids, labels = torch.tensor(ids, dtype=torch.long)[None], torch.tensor(labels, dtype=torch.long)
        with torch.no_grad():
            logits = stock(ids).logits[0, :-1].double()
        target = labels[1:]
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    assert scores["eval_targets"] == count and scores["eval_samples"] == 3
    assert scores["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert json.loads((out / "scores.json").read_text())["eval_loss"] == scores["eval_loss"]


def test_unusable_test_file_and_missing_vllm(tmp_path, qwen2_gen):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(UserError, match=r"no usable record \(1 skipped"):
        evaluate_entry.main(["--model_dir", str(qwen2_gen.model_dir), "--test_file", str(bad), "--output_dir",
                             str(tmp_path / "o")], generator=qwen2_gen)
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match=r"vLLM is not installed; on a CUDA machine `pip install vllm`"):
        Generator.load(str(qwen2_gen.model_dir), backend="vllm")


def test_records_the_template_cannot_prompt_are_skipped_with_its_reason(tmp_path, tiny):
    """ChatGLM2's format has no system role: a test record with a system prompt is skipped (unknown_role, its line)
    and the others are evaluated, where it stopped evaluate.py with a traceback (the quickstart's FAMILY=chatglm2
    evaluation on data/sample.jsonl)."""
    gen = Generator.load(str(tiny("chatglm2")))
    test_file = write_jsonl(tmp_path / "dev.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Yes, tea."}]}])
    out = tmp_path / "ev"
    scores = evaluate_entry.main(["--model_dir", str(gen.model_dir), "--test_file", str(test_file), "--output_dir",
                                  str(out), "--max_new_tokens", "4", "--temperature", "0"], generator=gen)
    assert scores["count"] == 1 and scores["skipped"] == {"unknown_role": 1} and scores["eval_samples"] == 1
    (skipped,) = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped["line"] == 1 and "system" in skipped["detail"]
    (pred,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert pred["line"] == 2 and pred["index"] == 0


def test_template_auto_prompts_carry_the_records_tools(tmp_path, qwen2_gen):
    """A test record with tool schemas, a call and its result: the prompt is apply_chat_template's of the history
    WITH the tools (template auto reads the record as pre_tokenize.py does; the generic messages have no tools), and
    its eval loss is taken over the same supervised tokens pre_tokenize.py trains."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"t": 17}'},
                {"role": "assistant", "content": "It is 17 C in Paris."}]
    record = {"messages": messages, "tools": tools}
    want = qwen2_gen.tokenizer.apply_chat_template(messages[:-1], tools=tools, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
    assert qwen2_gen.context_ids([], record) == list(want)
    assert "get_weather" in qwen2_gen.tokenizer.decode(want[:len(want) // 2])  # the schema is in the prompt

    test_file = write_jsonl(tmp_path / "tools.jsonl", [record])
    out = tmp_path / "ev"
    scores = evaluate_entry.main(["--model_dir", str(qwen2_gen.model_dir), "--test_file", str(test_file),
                                  "--output_dir", str(out), "--max_new_tokens", "4", "--temperature", "0"],
                                 generator=qwen2_gen)
    import pre_tokenize
    from longsft.data.storage import IGNORE_INDEX, TokenizedData

    pre_tokenize.main(["--model_name_or_path", str(qwen2_gen.model_dir), "--input", str(test_file), "--output_dir",
                       str(tmp_path / "tok"), "--num_proc", "1"])
    trained = TokenizedData(tmp_path / "tok")
    assert len(trained) == 1
    _, labels = trained.sample(0)
    assert scores["count"] == 1 and scores["eval_targets"] == int((labels[1:] != IGNORE_INDEX).sum())
