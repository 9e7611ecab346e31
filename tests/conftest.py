"""Shared test setup: offline hub, the repository root first on the PYTHONPATH of every process a test starts (this
checkout's package, whatever `pip install -e` points at), and the `gpu` marker's skip. pytest itself puts the root
on sys.path (pyproject.toml: pythonpath)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# Tiny tokenizers (longsft/tiny/tokenizers.py), built once per test session in a temp folder
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def glm4_tokenizer_dir(tmp_path_factory) -> Path:
    """A GLM-4 hub-like tokenizer folder: tokenizer.model, tokenizer_config.json (auto_map), our code."""
    from longsft.tiny.tokenizers import make_glm4_tokenizer

    return make_glm4_tokenizer(tmp_path_factory.mktemp("glm4_tokenizer"))


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    """A Llama-3.1-style fast tokenizer folder (tokenizer.json + tokenizer_config.json)."""
    from longsft.tiny.tokenizers import make_llama3_tokenizer

    return make_llama3_tokenizer(tmp_path_factory.mktemp("llama3_tokenizer"))


@pytest.fixture(scope="session")
def chatglm2_tokenizer_dir(tmp_path_factory) -> Path:
    """A chatglm2-6b hub-like tokenizer folder: SentencePiece tokenizer.model, tokenizer_config.json, our code."""
    from longsft.tiny.tokenizers import make_chatglm_tokenizer

    return make_chatglm_tokenizer(tmp_path_factory.mktemp("chatglm2_tokenizer"), version=2)


@pytest.fixture(scope="session")
def chatglm3_tokenizer_dir(tmp_path_factory) -> Path:
    """A chatglm3-6b hub-like tokenizer folder (role tokens named in added_tokens_decoder and chat_template)."""
    from longsft.tiny.tokenizers import make_chatglm_tokenizer

    return make_chatglm_tokenizer(tmp_path_factory.mktemp("chatglm3_tokenizer"), version=3)


@pytest.fixture(scope="session")
def llama2_tokenizer_dir(tmp_path_factory) -> Path:
    """A Llama-2 hub-like tokenizer folder: tokenizer.model + tokenizer.json + tokenizer_config.json."""
    from longsft.tiny.tokenizers import make_llama2_tokenizer

    return make_llama2_tokenizer(tmp_path_factory.mktemp("llama2_tokenizer"))


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory):
    """kind -> a tiny tokenizer folder with that model's chat template (longsft/tiny/tokenizers.py CHAT_TOKENIZERS: glm,
    glm4, qwen2, qwen2_marked, qwen3, mistral, llama3), each built once per session."""
    from longsft.tiny.tokenizers import make_chat_template_tokenizer

    built = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = make_chat_template_tokenizer(tmp_path_factory.mktemp(f"chat_{kind}"), kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def glm(glm4_tokenizer_dir):
    """The tiny GLM-4 tokenizer loaded as the hub folder's own code would load it (AutoTokenizer, remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(glm4_tokenizer_dir, trust_remote_code=True)


@pytest.fixture(scope="session")
def llama(llama3_tokenizer_dir):
    """The tiny Llama-3.1 tokenizer (AutoTokenizer on tokenizer.json)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
