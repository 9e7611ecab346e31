"""GLM-Edge's generation metrics (longsft/evaluate/metrics.py) against the definition computed independently here:
words from jieba, ROUGE-N over the sets of word n-grams and ROUGE-L over the longest common subsequence (F =
2PR / (P + R + 1e-8), x 100, 4 decimals: rouge_chinese's arithmetic), BLEU-4 with nltk's smoothing method3 written
out (modified n-gram precisions, a zero count becomes 1 / (2^k x its denominator), the brevity penalty).

    python -m pytest -q tests/evaluate/test_metrics.py
"""
import math
from collections import Counter

import jieba
import pytest

from longsft.evaluate.metrics import corpus_scores, reply_scores
import evaluate as evaluate_entry
from tests.records import write_jsonl

PAIRS = [  # (reply, reference)
    ("今天天气很好，我们去公园散步吧", "今天天气不错，我们一起去公园散步"),
    ("The cat sat on the mat and looked at the dog", "The cat is sitting on the mat, looking at a dog"),
    ("我喜欢机器学习 and deep learning", "我喜欢深度学习 and machine learning"),
    ("完全无关的回答", "The reference shares nothing"),
    ("一样", "一样"),
    ("", "空的回复"),  # GLM-Edge's rouge_chinese raises here; scored 0
]


def words_of(text):
    """What rouge_chinese sees after GLM-Edge joins jieba's words with spaces: whitespace-separated tokens."""
    return " ".join(jieba.cut(text.strip())).split()


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def f_score(overlap, hyp, ref):
    p = overlap / hyp if hyp else 0.0
    r = overlap / ref if ref else 0.0
    return 2.0 * ((p * r) / (p + r + 1e-8))


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_expected(reply, reference):
    hyp, ref = words_of(reply), words_of(reference)
    if not hyp or not ref:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    out = {}
    for n in (1, 2):
        h, r = set(ngrams(hyp, n)), set(ngrams(ref, n))
        out[f"rouge-{n}"] = round(f_score(len(h & r), len(h), len(r)) * 100, 4)
    out["rouge-l"] = round(f_score(lcs(hyp, ref), len(hyp), len(ref)) * 100, 4)
    return out


def bleu4_method3(hyp, ref):
    """sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3), written out."""
    if not hyp:
        return 0.0
    counts = []
    for n in range(1, 5):
        h, r = Counter(ngrams(hyp, n)), Counter(ngrams(ref, n))
        clipped = sum(min(c, r[g]) for g, c in h.items())
        counts.append((clipped, max(1, sum(h.values()))))
    if counts[0][0] == 0:
        return 0.0
    precisions, k = [], 1
    for num, den in counts:
        if num == 0:
            precisions.append(1 / (2 ** k * den))
            k += 1
        else:
            precisions.append(num / den)
    c, r = len(hyp), len(ref)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(0.25 * math.log(p) for p in precisions))


@pytest.mark.parametrize("reply,reference", PAIRS)
def test_reply_scores_equal_the_definition(reply, reference):
    got = reply_scores(reply, reference)
    want = rouge_expected(reply, reference)
    for k in ("rouge-1", "rouge-2", "rouge-l"):
        assert got[k] == pytest.approx(want[k], abs=1e-9), (k, got, want)
    jieba_words = lambda t: list(jieba.cut(t.strip()))  # noqa: E731 (BLEU sees jieba's words, spaces included)
    assert got["bleu-4"] == pytest.approx(bleu4_method3(jieba_words(reply), jieba_words(reference)), abs=1e-12)


def test_known_values_by_hand():
    """Whole-word English where the counts are easy to check by hand."""
    s = reply_scores("a b c d", "a b c e")
    # unigrams 3 of 4 both ways: F = 0.75; bigrams {ab, bc} of 3; LCS a b c = 3 of 4
    assert s["rouge-1"] == pytest.approx(75.0, abs=1e-4) and s["rouge-l"] == pytest.approx(75.0, abs=1e-4)
    assert s["rouge-2"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    same = reply_scores("the cat sat on the mat", "the cat sat on the mat")  # >= 4 words: BLEU 1
    assert same["rouge-1"] == pytest.approx(100.0, abs=1e-4) and same["bleu-4"] == pytest.approx(1.0)


def test_corpus_means_and_a_scored_prediction_file(tmp_path):
    per = [reply_scores(r, ref) for r, ref in PAIRS]
    corpus = corpus_scores(PAIRS)
    for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert corpus[k] == pytest.approx(sum(p[k] for p in per) / len(per), abs=1e-12)
    assert corpus["count"] == len(PAIRS) and corpus["empty_replies"] == 1
    # evaluate.py --predictions on a test-set prediction file (reference, response) gives the same
    pred = write_jsonl(tmp_path / "p.jsonl", [{"index": i, "reference": ref, "response": r}
                                              for i, (r, ref) in enumerate(PAIRS)])
    scores = evaluate_entry.main(["--predictions", str(pred), "--output_dir", str(tmp_path / "o")])
    for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert scores[k] == corpus[k]
