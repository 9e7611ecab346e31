"""main.py --test_file: GLM-Edge's `predict_with_generate` on its test_file, at the end of training: the saved model
(or adapter) generates a reply to every test conversation and gets ROUGE-1/2/L, BLEU-4 and the eval loss
(evaluate.py's test-set mode, longsft/evaluate/run.py), written to OUTPUT_DIR/test_eval/.

    python main.py --model_name_or_path /tmp/tiny-qwen2 --train_file /tmp/tok --output_dir /tmp/run \\
        --max_steps 5 --test_file data/sample.jsonl --test_max_new_tokens 32
    # the same afterwards, or again with other settings:
    python evaluate.py --model_dir /tmp/run --test_file data/sample.jsonl --output_dir /tmp/run/test_eval \\
        --max_new_tokens 32 --temperature 0

How: main.py checks the test file before anything loads (test_file_problems: readable, at least one usable
record, the metric libraries installed). After the final output is saved and marked complete, every rank leaves
the process group and rank 0 runs evaluate.py in a child process (greedy decoding, --test_max_new_tokens, GLM-Edge's
512 by default) on the saved folder: no DeepSpeed or process-group state reaches the generation, and the other
ranks never wait on a collective while rank 0 generates. A failed evaluation is a UserError that says the trained
model is complete and gives the command to run it again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from longsft.errors import UserError

logger = logging.getLogger("longsft.train")
TEST_EVAL_DIR = "test_eval"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding longsft/ (for the child's PYTHONPATH)
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE",
                   "ACCELERATE_USE_DEEPSPEED", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                   "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE")


def test_file_problems(test_file: Optional[str]) -> list[str]:
    """Why --test_file cannot be evaluated (checked before training starts); [] when it can."""
    if not test_file:
        return []
    from longsft.evaluate.metrics import _libraries
    from longsft.evaluate.records import read_test_set

    problems = []
    try:
        _libraries()
        cases, skipped = read_test_set(test_file)
    except UserError as e:
        return [str(e)]
    if not cases:
        reasons = sorted({s["reason"] for s in skipped})
        problems.append(f"--test_file {test_file}: no usable record ({len(skipped)} skipped: {', '.join(reasons)}); "
                        f"each needs a user message and a final assistant reply (the reference)")
    return problems


def evaluation_command(output_dir: str, test_file: str, max_new_tokens: int) -> list[str]:
    return ["evaluate.py", "--model_dir", str(output_dir), "--test_file", str(test_file), "--output_dir",
            str(Path(output_dir) / TEST_EVAL_DIR), "--max_new_tokens", str(max_new_tokens), "--temperature", "0"]


def evaluate_saved_model(output_dir: str, test_file: str, max_new_tokens: int, process_index: int) -> None:
    """Leave the process group on every rank; rank 0 evaluates the saved model on the test file."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if process_index != 0:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    args = evaluation_command(output_dir, test_file, max_new_tokens)
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    logger.info("test set %s: generating with the saved model (greedy, at most %d new tokens) into %s", test_file,
                max_new_tokens, Path(output_dir) / TEST_EVAL_DIR)
    code = subprocess.call([sys.executable, "-m", "longsft.evaluate.run", *args[1:]], env=env)
    if code != 0:
        raise UserError(f"the test-set evaluation failed (exit status {code}); the trained model in {output_dir} is "
                        f"complete. Run it again with: python {' '.join(args)}")
