"""QUANT_BIT in the launch scripts (scripts/_launch.sh): it reaches main.py as --quantization_bit; a bad value stops
the script before anything runs. DRY_RUN=1 only (no GPU, nothing launched).
Run: python -m pytest -q tests/test_quant_bit_scripts.py
"""
import pytest

from tests.test_quickstart import dry_run, flag, launch_fails


@pytest.mark.parametrize("script,env", [("glm4_longwriter_lora", {}), ("llama3_longwriter_lora", {}),
                                        ("sft", {"USE_LORA": "1"}), ("chatglm_pack", {})])
def test_quant_bit_reaches_main(script, env):
    _, cmd = dry_run(script, QUANT_BIT="4", **env)
    assert flag(cmd, "--quantization_bit") == "4" and cmd[-2:] == ["--max_steps", "7"]  # extra flags still last
    _, plain = dry_run(script, **env)
    assert "--quantization_bit" not in plain


def test_bad_quant_bit_is_refused():
    assert "QUANT_BIT=3: 4 (NF4) or 8 (LLM.int8)" in launch_fails("glm4_longwriter_lora", QUANT_BIT="3")
