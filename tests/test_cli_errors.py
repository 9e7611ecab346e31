"""Every CLI answers a user mistake the same way: one `error: ...` message, no traceback, exit status 2
(errors.EXIT_USER_ERROR; patch/install.py, a leaf, keeps the same value)."""
import subprocess
import sys
from pathlib import Path

import pytest

from longsft.errors import EXIT_USER_ERROR

ROOT = Path(__file__).resolve().parents[1]


def _cases(tmp: Path) -> dict[str, list[str]]:
    missing = str(tmp / "missing")
    return {
        "main.py": ["main.py", "--model_name_or_path", missing, "--train_file", missing, "--output_dir", str(tmp / "o")],
        "pre_tokenize.py": ["pre_tokenize.py", "--model_name_or_path", missing, "--input", missing,
                            "--output_dir", str(tmp / "d")],
        "sort_and_group.py": ["sort_and_group.py", "--train_file", missing],
        "patch/install.py": ["patch/install.py", "--model_dir", missing],
        "tools/plot_loss.py": ["tools/plot_loss.py", "--run_dir", missing],
    }


@pytest.mark.parametrize("script", ["main.py", "pre_tokenize.py", "sort_and_group.py", "patch/install.py",
                                    "tools/plot_loss.py"])
def test_user_mistake_is_one_message_and_exit_2(tmp_path, script):
    cmd = [sys.executable, *_cases(tmp_path)[script]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == EXIT_USER_ERROR, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "error: " in out.stderr, out.stderr[-2000:]


def test_install_uses_the_same_exit_status():
    sys.path.insert(0, str(ROOT / "patch"))
    try:
        import install
    finally:
        sys.path.pop(0)
    assert install.EXIT_USER_ERROR == EXIT_USER_ERROR
