"""The registry of families and templates (patch/families.py) and the rules around it.

    python -m pytest -q tests/patch/test_registry.py

Consistency of the registry, family detection from folder files (GLM-4 tiktoken vs ChatGLM2/3 SentencePiece,
Llama-3 vs Llama-2 tokenizers), the pad-id rules, patch/ as a leaf, no entry script importing another, and
pre-tokenization + packing without torch.
"""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longsft import models
from longsft.data import upstream_layout
from longsft.templates import registry
from longsft.templates.base import ChatFormat
from longsft.data.inputs import InputError
from patch import families
from patch import install as patch_install

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# The registry itself
# ----------------------------------------------------------------------------------------------

def test_registry_is_consistent():
    assert list(families.FAMILIES) == ["glm4", "chatglm3", "chatglm2", "llama3", "llama2", "glm", "glm4_0414", "qwen2",
                                      "qwen3", "mistral", families.GENERIC]
    assert families.implemented_templates() == ["glm4", "chatglm3", "chatglm2", "longwriter", "llama3", "llama2",
                                                "auto"]
    listed = set()
    for fam in families.FAMILIES.values():
        assert fam.templates and set(fam.templates) <= set(families.TEMPLATES), fam.name
        listed |= set(fam.templates)
        if fam.name == families.GENERIC:  # per model type (tests/patch/test_model_types.py); LoRA: every linear layer
            assert fam.templates == ("auto",) and not fam.lora_targets and fam.generation_stops
            continue
        assert fam.lora_targets and fam.pad and fam.stop_tokens == families.TEMPLATES[fam.default_template].stop_tokens
        assert fam.model_class.startswith("modeling_")
        assert all((ROOT / "patch" / f).is_file() for f in fam.install.files)
        assert fam.install.auto_map["AutoModelForCausalLM"] == fam.model_class
        if fam.tokenizer:  # our own class in patch/, installed as the folder's AutoTokenizer
            assert fam.install.tokenizer_auto_map == {"AutoTokenizer": [fam.tokenizer, None]}
        if fam.front_end:
            assert (ROOT / fam.front_end).is_file()
    assert listed == set(families.TEMPLATES)  # every template belongs to some family
    for name in families.implemented_templates():  # each names a ChatFormat whose `name` is the template's
        cls = registry.format_class(name)
        assert issubclass(cls, ChatFormat) and cls.name == name
    for model_type in families.named_model_types():  # one patched model class per model_type
        assert models.model_class(model_type).__name__ == families.model_class_of(model_type).split(".")[-1]
    assert families.of_model_type("chatglm") == [families.FAMILIES[n] for n in ("glm4", "chatglm3", "chatglm2")]
    with pytest.raises(families.RegistryError, match="unknown model family 'gpt2'"):
        families.family("gpt2")
    with pytest.raises(InputError, match="not supported"):
        models.model_class("mamba")
    # the first template of a family is its default, and a template shared by families keeps its own rules
    assert families.family("chatglm3").templates == ("chatglm3", "chatglm2")
    assert families.pad_rule(families.family("llama3"), "longwriter")[0] == "<|finetune_right_pad_id|>"
    assert families.pad_rule(families.family("llama3"), "llama3")[0] == "pad"


def test_patch_stays_a_leaf():
    """families.py and install.py import nothing from the repository root, and families.py nothing but the
    standard library; install.py runs from a checkout's patch/ folder alone."""
    root_modules = {p.stem for p in ROOT.glob("*.py")}
    for name in ("families.py", "install.py"):
        tree = ast.parse((ROOT / "patch" / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                     and n.level == 0}
        assert not imported & root_modules, (name, imported & root_modules)
        if name == "families.py":
            assert imported <= set(sys.stdlib_module_names), imported
    code = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', {root!r})]; "
            "sys.path.insert(0, {patch!r}); import families, install; "
            "assert install.families is families; "
            "print(sorted(m for m in ('torch', 'transformers', 'dataset', 'storage', 'chat_data') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), patch=str(ROOT / "patch"))],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}


def test_no_entry_script_imports_another():
    """Entry scripts (a `__main__` block) import library modules only. Benchmarks run entries end to end as the
    thing they measure, like the tests do, and are not entries' libraries. One exception, by design: patch/install.py
    is also the installer's library (`install()`), which tools/make_tiny.py uses to make tiny folders hub-like."""
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "patch").glob("*.py"))
    entries = {}
    for p in files:
        if "__name__ == \"__main__\"" in p.read_text():
            rel = p.relative_to(ROOT).with_suffix("")
            entries[".".join(rel.parts)] = p
            if rel.parts[0] == "patch":
                entries[rel.name] = p  # install.py's sibling-style name
    for name, p in entries.items():
        bad = {m for m in _imports(p) if m in entries and entries[m] != p} - {"patch.install"}
        assert not bad, f"{p.relative_to(ROOT)} imports the entry script(s) {sorted(bad)}"


# ----------------------------------------------------------------------------------------------
# Detection from a folder's files
# ----------------------------------------------------------------------------------------------

SP_MODEL = b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x08\n\x03<s>"  # the start of a SentencePiece proto


def chatglm_folder(path: Path, declared: tuple = (), model_type: str = "chatglm", **config) -> Path:
    """A ChatGLM2/3-like folder: config.json, a binary tokenizer.model, a hub-like tokenizer_config.json."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (path / "tokenizer.model").write_bytes(SP_MODEL)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "padding_side": "left",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "added_tokens_decoder": {str(64789 + i): {"content": t, "special": True} for i, t in enumerate(declared)},
        **config}))
    return path


def llama_folder(path: Path, added: list[str], model_type: str | None = "llama") -> Path:
    path.mkdir(parents=True)
    if model_type:
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(added)],
        "model": {"type": "BPE", "vocab": {}}}))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": added[min(1, len(added) - 1)]}))
    return path


def detect(path):
    return getattr(families.detect_folder(path), "name", None)


def test_detection_tells_families_apart(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir, chatglm2_tokenizer_dir,
                                        chatglm3_tokenizer_dir, llama2_tokenizer_dir):
    # the tiny hub-like folders of tools/make_tiny.py (tokenizer only: no config.json)
    assert [detect(d) for d in (glm4_tokenizer_dir, llama3_tokenizer_dir, chatglm2_tokenizer_dir,
                                chatglm3_tokenizer_dir, llama2_tokenizer_dir)] == [
        "glm4", "llama3", "chatglm2", "chatglm3", "llama2"]
    # Llama-2: <s> </s> declared, no <|begin_of_text|>; Llama-3 model folder; neither; other model types
    assert detect(llama_folder(tmp_path / "l2", ["<unk>", "<s>", "</s>"])) == "llama2"
    assert detect(llama_folder(tmp_path / "l3", ["<|begin_of_text|>", "<|end_of_text|>"])) == "llama3"
    # a Llama model with another tokenizer (SmolLM2's ChatML BPE): the family of any decoder, template auto
    assert detect(llama_folder(tmp_path / "odd", ["<|im_start|>"])) == families.GENERIC
    odd = llama_folder(tmp_path / "odd2", ["<|im_start|>"])
    (odd / "tokenizer.json").unlink()  # no tokenizer file transformers could load
    assert detect(odd) is None
    why = families.why_undetected(families.folder_reader(odd))
    assert "model_type 'llama'" in why and "llama3: tokenizers declaring <|begin_of_text|>" in why
    assert f"{families.GENERIC}: tokenizers or sentencepiece or vocab" in why
    assert detect(chatglm_folder(tmp_path / "gpt2", model_type="gpt2")) == families.GENERIC  # SentencePiece
    assert detect(chatglm_folder(tmp_path / "mamba", model_type="mamba")) is None
    assert "packed training does not support this model_type: MambaForCausalLM" in families.why_undetected(
        families.folder_reader(tmp_path / "mamba"))
    assert detect(chatglm_folder(tmp_path / "baichuan", model_type="baichuan")) is None
    assert "no family covers" in families.why_undetected(families.folder_reader(tmp_path / "baichuan"))
    # the model_type narrows the candidates: a tiktoken tokenizer.model in a llama folder is not glm4
    shutil.copy(glm4_tokenizer_dir / "tokenizer.model", tmp_path / "l3" / "tokenizer.model")
    assert detect(tmp_path / "l3") == "llama3"


CHATGLM_VARIANTS = {  # tokenizer_config.json variants -> the family they are
    "roles declared (chatglm3-6b hub)": (dict(declared=("[gMASK]", "sop", "<|user|>", "<|assistant|>")), "chatglm3"),
    "a chat_template with <|role|> tags": (dict(chat_template="[gMASK]sop<|{{ m['role'] }}|>"), "chatglm3"),
    "role tokens as additional_special_tokens": (dict(additional_special_tokens=["<|observation|>"]), "chatglm3"),
    "chatglm_version 3 (saved by ChatGLMTokenizer)": (dict(chatglm_version=3), "chatglm3"),
    "chatglm_version 2 wins over declared roles": (dict(declared=("<|user|>",), chatglm_version=2), "chatglm2"),
    "nothing named (chatglm2-6b hub)": (dict(declared=("[gMASK]", "sop")), "chatglm2"),
}


@pytest.mark.parametrize("variant", sorted(CHATGLM_VARIANTS))
def test_chatglm3_vs_chatglm2_agrees_with_the_tokenizer(tmp_path, chatglm2_tokenizer_dir, variant):
    """The family the registry detects is the version patch/tokenization_chatglm.py's ChatGLMTokenizer builds."""
    from patch.tokenization_chatglm import ChatGLMTokenizer

    kwargs, want = CHATGLM_VARIANTS[variant]
    declared = kwargs.pop("declared", ())
    folder = chatglm_folder(tmp_path / "c", declared=declared, **kwargs)
    shutil.copy(chatglm2_tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")  # a real SentencePiece file
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if declared:  # at the ids the tokenizer gives them
        import sentencepiece as spm

        n = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
        names = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop") + ("<|system|>", "<|user|>", "<|assistant|>",
                                                                   "<|observation|>")
        cfg["added_tokens_decoder"] = {str(n + names.index(t)): {"content": t, "special": True} for t in declared}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert detect(folder) == want
    try:
        version = ChatGLMTokenizer.from_pretrained(str(folder)).chatglm_version
    except ValueError:  # the tokenizer refuses a config that names role tokens ChatGLM2 does not have
        assert want == "chatglm2" and cfg.get("chatglm_version") == 2
    else:
        assert f"chatglm{version}" == want


def test_install_picks_the_tokenizer_of_the_chatglm_family(tmp_path):
    for name, declared in (("c3", ("<|user|>",)), ("c2", ())):
        folder = chatglm_folder(tmp_path / name, declared=declared)
        (folder / "tokenization_chatglm.py").write_text("class ChatGLMTokenizer: pass  # the hub's file\n")
        patch_install.install(folder, verify=False)
        tok_map = json.loads((folder / "tokenizer_config.json").read_text())["auto_map"]
        assert tok_map["AutoTokenizer"] == ["tokenization_chatglm.ChatGLMTokenizer", None]
        assert (folder / "patch_backup" / "tokenization_chatglm.py").read_text().startswith("class ChatGLMTokenizer")
        assert detect(folder) == {"c3": "chatglm3", "c2": "chatglm2"}[name]  # still told apart afterwards
    odd = chatglm_folder(tmp_path / "odd")
    (odd / "tokenizer_config.json").write_text("{}")  # a SentencePiece model no chatglm family claims
    with pytest.raises(ValueError, match="cannot tell which chatglm family"):
        patch_install.install(odd, verify=False)


# ----------------------------------------------------------------------------------------------
# Pad ids: one rule per family (and template), from the tokenizer or from the folder's JSON files
# ----------------------------------------------------------------------------------------------

def test_pad_rules(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir):
    glm = models.load_tokenizer(str(glm4_tokenizer_dir), "glm4")
    llama = models.load_tokenizer(str(llama3_tokenizer_dir), "llama3")
    assert type(llama).__module__.startswith("transformers") and llama.pad_token_id is None
    pad = llama.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert registry.pad_token_id(glm, "glm4") == glm.convert_tokens_to_ids("<|endoftext|>") == glm.pad_token_id
    assert registry.pad_token_id(llama, "llama3", "longwriter") == pad
    assert registry.pad_token_id(llama, "llama3", "llama3") == pad  # no pad token: the family's next source
    llama.pad_token = "<|eot_id|>"
    assert registry.pad_token_id(llama, "llama3", "llama3") == llama.convert_tokens_to_ids("<|eot_id|>")
    assert registry.pad_token_id(llama, "llama3", "longwriter") == pad  # LongWriter's own rule comes first
    lookup = {"pad": None, "eos": 2, "<unk>": 0}.get
    assert families.resolve_pad(("pad", "<unk>", "eos"), lookup) == 0  # an id of 0 counts
    # sort_and_group (upstream layout): a folder that declares no pad token gets its family's rule
    assert upstream_layout.model_pad_token_id(str(llama3_tokenizer_dir)) == pad
    assert upstream_layout.model_pad_token_id(str(glm4_tokenizer_dir)) == glm.pad_token_id  # declared


# ----------------------------------------------------------------------------------------------
# Pre-tokenization and packing never load torch
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["glm4", "llama3"])
def test_pretokenize_and_packing_leave_torch_out(tmp_path, glm4_tokenizer_dir, llama3_tokenizer_dir, family):
    tok_dir = glm4_tokenizer_dir if family == "glm4" else llama3_tokenizer_dir
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import pre_tokenize, sort_and_group
pre_tokenize.main(["--model_name_or_path", {str(tok_dir)!r}, "--input", {str(ROOT / "data" / "sample.jsonl")!r},
                   "--output_dir", {str(tmp_path / "data")!r}, "--max_length", "1024", "--truncate", "right",
                   "--num_proc", "2"])
sort_and_group.main(["--train_file", {str(tmp_path / "data")!r}, "--max_length", "1024", "--group_size", "2"])
print("loaded:", sorted(m for m in ("torch", "longsft.train", "transformers.models.auto") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "loaded: []"
    assert (tmp_path / "data" / "packs" / "meta.json").is_file()


HUB_CHATGLM3_CODE = '''\
# Stand-in for the tokenizer code of an older chatglm3-6b / LongAlign-6B-64k snapshot (written for this test): its
# SentencePiece wrapper builds the four role tokens after [MASK] [gMASK] [sMASK] sop eop. Read as text, never run.
raise SystemExit("the folder's tokenizer code must never run")
role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
'''
HUB_CHATGLM2_CODE = '''\
# Stand-in for chatglm2-6b's tokenizer code: no role tokens. Read as text, never run.
raise SystemExit("the folder's tokenizer code must never run")
special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
'''


def test_chatglm3_told_from_its_tokenizer_code_read_as_text(tmp_path, chatglm2_tokenizer_dir):
    """Issue 19 part 4: a ChatGLM3 folder whose tokenizer_config.json names no role tokens and has no chat template
    (older hub snapshots) was taken for ChatGLM2; its tokenization_chatglm.py tells (read as text, never run), and
    the tokenizer is then built with the role tokens."""
    for name, code, want in (("c3", HUB_CHATGLM3_CODE, "chatglm3"), ("c2", HUB_CHATGLM2_CODE, "chatglm2")):
        folder = chatglm_folder(tmp_path / name)
        shutil.copy(chatglm2_tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
        (folder / "tokenization_chatglm.py").write_text(code)
        assert detect(folder) == want
        tok = models.load_tokenizer(str(folder), want)
        assert tok.chatglm_version == int(want[-1])
    assert "(or naming one in tokenization_chatglm.py)" in families.why_undetected(families.folder_reader(
        chatglm_folder(tmp_path / "sp", model_type="chatglm")))


def test_template_chatglm3_honoured_on_a_folder_taken_for_chatglm2(tmp_path, chatglm2_tokenizer_dir):
    """`--template chatglm3` on a folder that declares nothing (and has no tokenizer code): our ChatGLMTokenizer
    builds the role tokens, so the folder is read as ChatGLM3 (a note says so) instead of the refusal."""
    import pre_tokenize
    from longsft.data.storage import TokenizedData

    folder = chatglm_folder(tmp_path / "c")
    shutil.copy(chatglm2_tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    assert detect(folder) == "chatglm2"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}]}) + "\n")
    rep = pre_tokenize.main(["--model_name_or_path", str(folder), "--template", "chatglm3", "--input", str(src),
                             "--output_dir", str(tmp_path / "out"), "--num_proc", "1"])
    data = TokenizedData(tmp_path / "out")
    assert rep["samples_kept"] == 1 and data.meta["model_family"] == "chatglm3"
    tok = models.load_tokenizer(str(folder), "chatglm3")
    ids = data.sample(0)[0].tolist()
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids and tok.convert_tokens_to_ids("<|system|>") in ids
    with pytest.raises(InputError, match="not a template of the glm4 family"):  # another tokenizer: still refused
        registry.check_template(families.FAMILIES["glm4"], "chatglm3")
