"""Evaluate a trained model: LongBench-Write / LongWrite-Ruler (length score S_l, quality score S_q with an LLM judge),
GLM-Edge's generation metrics (ROUGE-1/2/L, BLEU-4) and eval loss on a chat test set, or score a prediction file.

    python evaluate.py --model_dir output/glm4/longwriter --data longbench_write.jsonl --output_dir eval/lbw
    python evaluate.py --model_dir output/glm-edge --test_file dev.jsonl --output_dir eval/dev --max_new_tokens 512
    python evaluate.py --predictions pred.jsonl --output_dir eval/scored \
        --judge_base_url https://api.openai.com/v1 --judge_model gpt-4o-2024-05-13      # key in $OPENAI_API_KEY
    python evaluate.py --model_dir /tmp/tiny-qwen2 --test_file data/sample.jsonl --output_dir /tmp/ev \
        --max_new_tokens 16 --temperature 0                                               # tiny CPU check

Flags and outputs: longsft/evaluate/run.py (its docstring); `python evaluate.py --help` lists every flag.
"""

import sys

from longsft.errors import run_cli
from longsft.evaluate.run import EvaluateArguments, main  # noqa: F401  (what callers use)

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
