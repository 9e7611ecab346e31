"""Generation metrics of GLM-Edge's finetune.py (`compute_metrics`), also ChatGLM's and LLaMA-Factory's: ROUGE-1/2/L
and BLEU-4 of a reply against its reference over jieba words. No torch.

    python evaluate.py --model_dir output/glm-edge --test_file dev.jsonl --output_dir eval/dev   # generates, scores
    python -c "from longsft.evaluate.metrics import reply_scores; print(reply_scores('今天天气很好', '今天天气不错'))"

Per reply (GLM-Edge's definition, with the libraries it uses): both texts stripped and cut into words by
`jieba.cut`; `rouge_chinese.Rouge().get_scores(' '.join(reply_words), ' '.join(reference_words))`, each F-score
x 100 rounded to 4 decimals (`rouge-1`, `rouge-2`, `rouge-l`); `bleu-4` = nltk's `sentence_bleu([reference_words],
reply_words, smoothing_function=SmoothingFunction().method3)` (0-1, as GLM-Edge reports it). The scores of a test
set are the means over its replies. Where GLM-Edge would crash (rouge_chinese raises on an empty reply: "Hypothesis
is empty"), the reply's ROUGE scores are 0 and it is counted in `empty_replies`.
"""

from __future__ import annotations

import logging
import math

METRIC_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _libraries():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as e:
        from longsft.errors import UserError

        raise UserError(f"the generation metrics need jieba, rouge-chinese and nltk ({e}): "
                        f"pip install -r requirements.txt (or bash scripts/install.sh)") from None
    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" lines on every run
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def words(text: str) -> list[str]:
    """jieba's words of the stripped text (spaces included, as GLM-Edge cuts)."""
    jieba = _libraries()[0]
    return list(jieba.cut(text.strip()))


def reply_scores(reply: str, reference: str) -> dict[str, float]:
    """{"rouge-1", "rouge-2", "rouge-l" (F x 100, 4 decimals), "bleu-4" (0-1)} of one reply."""
    _, Rouge, sentence_bleu, SmoothingFunction = _libraries()
    hyp, ref = words(reply), words(reference)
    try:
        rouge = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
        out = {k: round(rouge[k]["f"] * 100, 4) for k in METRIC_KEYS[:3]}
    except ValueError:  # an empty (or all-space) reply or reference: nothing matches
        out = {k: 0.0 for k in METRIC_KEYS[:3]}
    out["bleu-4"] = float(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3))
    return out


def corpus_scores(pairs: list[tuple[str, str]]) -> dict:
    """Means over (reply, reference) pairs of reply_scores, with `count` and `empty_replies`."""
    per = [reply_scores(reply, ref) for reply, ref in pairs]
    out = {k: (math.fsum(p[k] for p in per) / len(per) if per else float("nan")) for k in METRIC_KEYS}
    out["count"] = len(per)
    out["empty_replies"] = sum(1 for reply, _ in pairs if not reply.strip())
    return out
