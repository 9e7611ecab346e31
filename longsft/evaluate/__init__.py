"""Stage 4, evaluate: what evaluate.py runs (run.py): generation from a trained model (generate.py), LongBench-Write's
length score S_l (length.py) and quality score S_q with an LLM judge (judge.py), GLM-Edge's ROUGE/BLEU (metrics.py),
the eval loss through the training path (loss.py), inputs and the resumable prediction log (records.py), the
length scatter and the summary (report.py)."""
