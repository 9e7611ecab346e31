"""The one registry of model families and chat templates: everything the toolkit knows about each model it trains.

Pure data and small helpers: the standard library only (no torch, no transformers, nothing from the repository
root or the longsft package), so `patch/install.py` reads it as its sibling from inside any checkout, and the
package imports it as `patch.families`. Class names are "module.Class" strings; this module never imports them.

    from patch import families
    fam = families.detect_folder("/models/glm-4-9b")   # -> FAMILIES["glm4"] (config.json + tokenizer files)
    fam.default_template, fam.templates                # "glm4", ("glm4",)
    families.template("longwriter").impl               # "longsft.templates.llama.LongWriterFormat"
    families.pad_rule(fam, "glm4")                     # ("pad", "<|endoftext|>")

A family (`Family`) is one kind of model folder: the config.json `model_type`s it covers, the patched model
class in patch/ (for transformers-native types, transformers' own class with the packed forward mixed in:
modeling_llama.py, modeling_native.py), how its tokenizer loads, its templates (default first), LoRA targets,
pad-id rule, where generation's stop tokens come from, and how a folder is recognised (`Detect`: the tokenizer
files tell families of one model_type apart: GLM-4's `tokenizer.model` is tiktoken text, ChatGLM2/3's a binary
SentencePiece model; Llama-3 tokenizers declare `<|begin_of_text|>`, Llama-2's `<s>`). A template (`Template`)
is one chat format; its `impl` names the longsft.templates.base.ChatFormat subclass that implements it (a module of
longsft/templates/), or None while it is only registered.

Registering a template: write the ChatFormat subclass (class attribute `name` = the template name) in a module
of longsft/templates/, set `impl="longsft.templates.module.Class"` in its TEMPLATES entry (or add the entry), and list the name in the `templates`
of every family whose tokenizer can express it (the default first). `python pre_tokenize.py --template NAME`,
tools/generate.py and the tests then find it; nothing else lists templates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

PATCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Template:
    """One chat format. `stop_tokens`: generation stops on these (token texts; ones the tokenizer lacks are left
    out); `pad`: a pad-id rule that replaces the family's for data in this template (see `resolve_pad`)."""
    name: str
    impl: Optional[str]  # "package.module.Class" implementing longsft.templates.base.ChatFormat; None: not yet
    help: str
    stop_tokens: tuple[str, ...]
    pad: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Detect:
    """How a folder is recognised as the family, among the families of its config.json model_type (all of them
    when there is no config.json, e.g. a tokenizer-only folder). Every condition that is set must hold.

    kinds: the tokenizer files, one of: "tiktoken" (tokenizer.model is a tiktoken ranks text file),
        "sentencepiece" (tokenizer.model is anything else: a SentencePiece model), "tokenizers" (tokenizer.json).
    markers: token texts the tokenizer must all declare (tokenizer_config.json / special_tokens_map.json
        added_tokens_decoder, additional_special_tokens, extra_special_tokens, bos/eos/pad/unk tokens;
        tokenizer.json added_tokens).
    markers_any: at least one of these must be declared, or `template_text` be in a chat_template.
    setting: (key, value): when tokenizer_config.json has `key`, it decides alone (value equal: this family).
    tokenizer_class: the tokenizer_config.json tokenizer_class or its AutoTokenizer auto_map class name.
    code_text: `markers_any` may also be found in the text of the folder's tokenizer code (`code_text`, e.g.
        tokenization_chatglm.py, and the modules its AutoTokenizer auto_map names), read as text, never run.
    ChatGLM3 vs ChatGLM2 follows patch/tokenization_chatglm.py's own rule (detect_chatglm_version: chatglm_version,
    else role tokens named, else a chat_template with `<|` tags), extended by the tokenizer code's text (older
    chatglm3-6b / LongAlign-6B-64k snapshots declare nothing but their tokenization_chatglm.py builds the role
    tokens); models.load_tokenizer passes the family's `chatglm_version`, so the family and the tokenizer agree."""
    kinds: tuple[str, ...]
    markers: tuple[str, ...] = ()
    markers_any: tuple[str, ...] = ()
    template_text: Optional[str] = None
    code_text: tuple[str, ...] = ()
    setting: Optional[tuple] = None
    tokenizer_class: Optional[str] = None


@dataclass(frozen=True)
class Install:
    """What patch/install.py does for the family: files copied from patch/, config.json auto_map entries, and the
    tokenizer_config.json auto_map (None: the tokenizer stays transformers' own)."""
    files: tuple[str, ...]
    auto_map: dict
    tokenizer_auto_map: Optional[dict] = None


@dataclass(frozen=True)
class Family:
    """One model family. `tokenizer`: our tokenizer class in patch/ ("module.Class"), loaded without running the
    folder's code; None: transformers' fast tokenizer from tokenizer.json. The folder's own tokenizer code runs
    only with --trust_remote_code. `pad`: the pad-id rule (`resolve_pad`). `remote_code`: the hub folders ship
    modeling/tokenizer code (auto_map), so tiny stand-ins get it too (patch/install.py)."""
    name: str
    title: str
    model_types: tuple[str, ...]
    model_class: str  # "module.Class" in patch/
    config_class: Optional[str]  # "module.Class" in patch/; None: transformers' own config class
    tokenizer: Optional[str]
    tokenizer_files: tuple[str, ...]  # what `tokenizer` reads from the folder
    templates: tuple[str, ...]  # default first
    lora_targets: tuple[str, ...]
    pad: tuple[str, ...]
    detect: Detect
    install: Install
    remote_code: bool = False
    front_end: Optional[str] = None  # the family's own pre-tokenization script, if it has one
    generation_stops: bool = False  # generation also stops on the folder's generation_config.json eos_token_id(s)

    @property
    def default_template(self) -> str:
        return self.templates[0]

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """What generation stops on for the family's models (its default template's stop tokens)."""
        return TEMPLATES[self.default_template].stop_tokens


# ---------------------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------------------

GLM_STOPS = ("<|endoftext|>", "<|user|>", "<|observation|>")
TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("glm4", "longsft.templates.glm.GLM4Format",
             "GLM-4: [gMASK]<sop>, then <|role|> + metadata line + content per message, <|endoftext|> last",
             GLM_STOPS),
    Template("chatglm3", "longsft.templates.glm.ChatGLM3Format",
             "ChatGLM3: [gMASK] sop, then <|role|> + metadata line + content per message, </s> last",
             ("</s>", "<|user|>", "<|observation|>")),
    Template("chatglm2", "longsft.templates.longalign.ChatGLM2Format",
             "ChatGLM2 / LongAlign: '[Round N]\\n\\n问：{q}\\n\\n答：{a}' rounds after [gMASK] sop, </s> last",
             ("</s>",)),
    Template("longwriter", "longsft.templates.llama.LongWriterFormat",
             "LongWriter-llama3.1: <|begin_of_text|>, [INST]{q}[/INST]{a} turns, one <|end_of_text|> last",
             ("<|end_of_text|>",), pad=("<|finetune_right_pad_id|>", "pad", "eos")),
    Template("llama3", "longsft.templates.llama.Llama3Format",
             "Llama-3.1 instruct: <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> per message",
             ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    Template("llama2", "longsft.templates.longalign.Llama2Format",
             "LongAlign Llama-2: <s>, '[INST]{q}[/INST]{a}' rounds joined by blank lines, </s> last",
             ("</s>",)),
    Template("auto", "longsft.templates.auto.AutoFormat",
             "the tokenizer's own chat template (tokenizer_config.json chat_template / chat_template.jinja), as "
             "apply_chat_template renders it (tools, tool calls, system prompts); a tokenizer.json tokenizer; stop "
             "tokens: the folder's generation_config.json eos_token_id", ()),
)}

# ---------------------------------------------------------------------------------------------------------------
# Families (detection tries them in this order: the more specific first within a model_type)
# ---------------------------------------------------------------------------------------------------------------

_CHATGLM_FILES = ("packed_attention.py", "configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")
_CHATGLM_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
_CHATGLM_LORA = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA_INSTALL = Install(("packed_attention.py", "modeling_llama.py"),
                         {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"})
_CHATGLM_SP = "tokenization_chatglm.ChatGLMTokenizer"
_CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def _chatglm(name: str, title: str, tokenizer: str, templates: tuple[str, ...], pad: tuple[str, ...],
             detect: Detect, front_end: Optional[str] = None) -> Family:
    return Family(name, title, ("chatglm",), "modeling_chatglm.ChatGLMForConditionalGeneration",
                  "configuration_chatglm.ChatGLMConfig", tokenizer, ("tokenizer.model",), templates, _CHATGLM_LORA,
                  pad, detect, Install(_CHATGLM_FILES, _CHATGLM_AUTO_MAP, {"AutoTokenizer": [tokenizer, None]}),
                  remote_code=True, front_end=front_end)


def _llama(name: str, title: str, templates: tuple[str, ...], pad: tuple[str, ...], detect: Detect,
           front_end: Optional[str] = None) -> Family:
    return Family(name, title, ("llama",), "modeling_llama.LlamaForCausalLM", None, None, ("tokenizer.json",),
                  templates, _LLAMA_LORA, pad, detect, _LLAMA_INSTALL, front_end=front_end)


_GLM_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")  # every linear layer but lm_head


def _native(name: str, title: str, model_type: str, cls: str, lora_targets: tuple[str, ...]) -> Family:
    """A transformers-native model type: transformers' own class with the packed forward (patch/modeling_native.py),
    transformers' fast tokenizer, the tokenizer's own chat template, stop ids from generation_config.json."""
    model_class = f"modeling_native.{cls}"
    return Family(name, title, (model_type,), model_class, None, None, ("tokenizer.json",), ("auto",), lora_targets,
                  ("pad", "eos"), Detect(kinds=("tokenizers",)),
                  Install(("packed_attention.py", "modeling_native.py"), {"AutoModelForCausalLM": model_class}),
                  generation_stops=True)


# ---------------------------------------------------------------------------------------------------------------
# The family of every other decoder transformers implements: patch/model_types.json, made by a check of each model
# type (longsft/model_types.py: a tiny config, packed == one sample at a time, logits and gradients)
# ---------------------------------------------------------------------------------------------------------------

GENERIC = "transformers"
MODEL_TYPES_FILE = PATCH_DIR / "model_types.json"
_NATIVE_FILES = ("packed_attention.py", "modeling_native.py")


def _read_model_types() -> dict:
    try:
        data = json.loads(MODEL_TYPES_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    return {"transformers": data.get("transformers"), "accepted": dict(data.get("accepted") or {}),
            "refused": dict(data.get("refused") or {})}


MODEL_TYPES = _read_model_types()  # {"transformers": version, "accepted": {type: {class, layer_types}}, "refused"}


def _generic(model_types: tuple[str, ...], model_class: str, install: Install) -> Family:
    """Any model type of patch/model_types.json's accepted list, with any tokenizer transformers loads
    (tokenizer.json, a SentencePiece tokenizer.model, vocab.json + merges.txt) and its own chat template
    (template auto); LoRA targets: every linear layer of the decoder blocks (read from the model)."""
    return Family(GENERIC, "any decoder transformers implements that passes the packed check (patch/model_types.json),"
                  " with its own tokenizer and chat template", model_types, model_class, None, None,
                  ("tokenizer.json",), ("auto",), (), ("pad", "eos"),
                  Detect(kinds=("tokenizers", "sentencepiece", "vocab")), install, generation_stops=True)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _chatglm("glm4", "GLM-4-9B (glm-4-9b, glm-4-9b-chat, LongWriter-glm4-9b; chatglm format)",
             "tokenization_chatglm.ChatGLM4Tokenizer", ("glm4",), ("pad", "<|endoftext|>"),
             Detect(kinds=("tiktoken",)), front_end="pre_tokenize_glm4.py"),
    _chatglm("chatglm3", "ChatGLM3-6B (chatglm3-6b, LongAlign-6B-64k)", _CHATGLM_SP, ("chatglm3", "chatglm2"),
             ("pad", "<unk>", "eos"),
             Detect(kinds=("sentencepiece",), markers_any=_CHATGLM3_ROLES, template_text="<|",
                    setting=("chatglm_version", 3), tokenizer_class="ChatGLMTokenizer",
                    code_text=("tokenization_chatglm.py",))),
    _chatglm("chatglm2", "ChatGLM2-6B (chatglm2-6b; LongAlign, LL-BaiYang)", _CHATGLM_SP, ("chatglm2",),
             ("pad", "<unk>", "eos"),
             Detect(kinds=("sentencepiece",), setting=("chatglm_version", 2), tokenizer_class="ChatGLMTokenizer")),
    _llama("llama3", "Llama-3.1 (Llama-3.1-8B base or instruct, LongWriter-llama3.1-8b)",
           ("longwriter", "llama3", "auto"),
           ("pad", "<|finetune_right_pad_id|>", "eos"),
           Detect(kinds=("tokenizers",), markers=("<|begin_of_text|>",)), front_end="pre_tokenize_llama3.py"),
    _llama("llama2", "Llama-2 (Llama-2-7b/13b, LongAlign-7B/13B-64k)", ("llama2", "auto"), ("pad", "<unk>", "eos"),
           Detect(kinds=("tokenizers", "sentencepiece"), markers=("<s>", "</s>"))),
    _native("glm", "GLM-Edge (glm-edge-1.5b-chat, glm-edge-4b-chat; transformers' GlmForCausalLM)", "glm",
            "GlmForCausalLM", _GLM_LORA),
    # model_type "glm4" is GLM-4-0414's; the family "glm4" is GLM-4-9B's chatglm format (model_type "chatglm")
    _native("glm4_0414", "GLM-4-0414 (GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1; transformers' Glm4ForCausalLM)", "glm4",
            "Glm4ForCausalLM", _GLM_LORA),
    _native("qwen2", "Qwen2 / Qwen2.5 (Qwen2.5-7B, Qwen2.5-7B-Instruct, ...; transformers' Qwen2ForCausalLM)",
            "qwen2", "Qwen2ForCausalLM", _LLAMA_LORA),
    _native("qwen3", "Qwen3 dense (Qwen3-0.6B ... Qwen3-32B; transformers' Qwen3ForCausalLM)", "qwen3",
            "Qwen3ForCausalLM", _LLAMA_LORA),
    _native("mistral", "Mistral (Mistral-7B v0.1-v0.3 and Instruct; transformers' MistralForCausalLM)", "mistral",
            "MistralForCausalLM", _LLAMA_LORA),
    # last: tried after every family above; its model class and install depend on the type (generic_family)
    _generic(tuple(sorted(MODEL_TYPES["accepted"])), "modeling_native", Install(_NATIVE_FILES, {})),
)}


def generic_family(model_type: Optional[str]) -> Optional[Family]:
    """The `transformers` family for one model type (its patch/ class and install), None for a type the check did
    not accept. A type a family above names keeps that family's class (llama: modeling_llama.LlamaForCausalLM)."""
    entry = MODEL_TYPES["accepted"].get(model_type) if model_type else None
    if entry is None:
        return FAMILIES[GENERIC] if model_type is None else None
    named = [f for f in FAMILIES.values() if f.name != GENERIC and model_type in f.model_types]
    if named:
        return _generic((model_type,), named[0].model_class, named[0].install)
    cls = f"modeling_native.{entry['class']}"
    return _generic((model_type,), cls, Install(_NATIVE_FILES, {"AutoModelForCausalLM": cls}))


def refused_reason(model_type: str) -> Optional[str]:
    """Why patch/model_types.json refuses a model type (None: not refused there)."""
    reason = MODEL_TYPES["refused"].get(model_type)
    return f"{reason} (patch/model_types.json, transformers {MODEL_TYPES['transformers']})" if reason else None


# ---------------------------------------------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------------------------------------------

class RegistryError(ValueError):
    """An unknown family or template name, or a folder whose family cannot be told."""


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise RegistryError(f"unknown model family {name!r}; the families are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def template(name: str) -> Template:
    if name not in TEMPLATES:
        raise RegistryError(f"unknown template {name!r}; available: {', '.join(implemented_templates())}")
    return TEMPLATES[name]


def implemented_templates() -> list[str]:
    """Template names that have an implementation, in registry order."""
    return [t.name for t in TEMPLATES.values() if t.impl]


def of_model_type(model_type: Optional[str]) -> list[Family]:
    """The families a config.json model_type covers, in detection order (all of them for None); the `transformers`
    family last, specialised to the type (generic_family)."""
    named = [f for f in FAMILIES.values() if f.name != GENERIC and (model_type is None or model_type in f.model_types)]
    generic = generic_family(model_type)
    return named + ([generic] if generic else [])


def model_types() -> list[str]:
    return sorted({t for f in FAMILIES.values() for t in f.model_types})


def named_model_types() -> list[str]:
    """The model types of the families with a name of their own (not only the `transformers` family)."""
    return sorted({t for f in FAMILIES.values() if f.name != GENERIC for t in f.model_types})


def model_class_of(model_type: str) -> Optional[str]:
    """The patch/ model class ("module.Class") for a model_type: one class serves all of its families."""
    classes = {f.model_class for f in of_model_type(model_type)}
    if len(classes) > 1:  # a registry mistake, caught by the tests
        raise RegistryError(f"model_type {model_type!r}: families disagree on the model class: {sorted(classes)}")
    return classes.pop() if classes and model_type is not None else None


def config_class_of(model_type: str) -> Optional[str]:
    return next((f.config_class for f in of_model_type(model_type) if model_type is not None), None)


def pad_rule(fam: Family, template_name: Optional[str] = None) -> tuple[str, ...]:
    """The pad-id rule for data of `fam` in template `template_name`: the template's own rule, else the family's."""
    t = TEMPLATES.get(template_name or fam.default_template)
    return t.pad if t is not None and t.pad else fam.pad


def resolve_pad(rule: tuple[str, ...], lookup: Callable[[str], Optional[int]]) -> Optional[int]:
    """The first source of `rule` that gives an id. Sources: "pad" (the tokenizer's pad token), "eos" (its eos
    token), or a token text (that token's id). `lookup(source)` returns the id or None."""
    for source in rule:
        i = lookup(source)
        if i is not None:
            return int(i)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Detection: which family a folder is, from config.json and the tokenizer files (no code runs, nothing loads)
# ---------------------------------------------------------------------------------------------------------------

_OWN_CODE_MARK = "def detect_chatglm_version("  # in patch/tokenization_chatglm.py, not in the hub's files
Reader = Callable[[str], Optional[bytes]]  # file name in the folder -> its bytes, or None when absent
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")


def folder_reader(path: str | Path) -> Reader:
    root = Path(path)

    def read(name: str) -> Optional[bytes]:
        p = root / name
        return p.read_bytes() if p.is_file() else None

    return read


def _json(read: Reader, name: str) -> dict:
    raw = read(name)
    if raw is None:
        return {}
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


_ADDED_TOKENS_KEY = re.compile(rb'"added_tokens"\s*:\s*(?=\[)')


def added_token_entries(raw: Optional[bytes]) -> Optional[list]:
    """tokenizer.json's top-level `added_tokens` list as written, read without decoding or parsing the (large)
    vocabulary after it: the key is found in the bytes, where the text before it (strings left out) opens exactly one
    object, and only the bytes from there to the list's end are decoded (a prefix, grown until the list is whole).
    None when there is no such key or its value is not a readable list."""
    if not raw:
        return None
    for m in _ADDED_TOKENS_KEY.finditer(raw):
        head = raw[:m.start()].replace(b"\\\\", b"").replace(b'\\"', b"")
        outside = b"".join(head.split(b'"')[0::2])
        if head.count(b'"') % 2 == 0 and outside.count(b"{") + outside.count(b"[") - outside.count(b"}") \
                - outside.count(b"]") == 1:
            break
    else:
        return None
    size = 1 << 16
    while True:  # a cut list never parses: grow the prefix until it does (or the file ends)
        end = m.end() + size
        try:
            items, _ = json.JSONDecoder().raw_decode(raw[m.end():end].decode("utf-8", "ignore"))
            return items if isinstance(items, list) else None
        except ValueError:
            if end >= len(raw):
                return None
            size *= 4


def _added_tokens(raw: Optional[bytes], items: Optional[list]) -> list[str]:
    """Contents of tokenizer.json's added_tokens (`items`: added_token_entries(raw); a file where they cannot be
    found that way is parsed whole)."""
    if raw is None:
        return []
    if items is None:
        try:
            items = json.loads(raw.decode("utf-8", errors="replace")).get("added_tokens", [])
        except (ValueError, AttributeError):
            return []
    if not isinstance(items, list):
        return []
    return [t.get("content") for t in items if isinstance(t, dict) and isinstance(t.get("content"), str)]


@dataclass
class TokenizerFacts:
    """What a folder's files say: config.json model_type, tokenizer file kinds, declared tokens, class names,
    chat templates and the other tokenizer_config.json settings."""
    model_type: Optional[str]
    kinds: set = field(default_factory=set)
    tokens: set = field(default_factory=set)
    classes: set = field(default_factory=set)
    chat_templates: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    layer_kinds: set = field(default_factory=set)  # config.json's *layer_types values
    code: dict = field(default_factory=dict)  # tokenizer code file name -> its text (read, never run)
    added_entries: Optional[list] = None  # tokenizer.json's added_tokens as written (added_token_entries)
    problems: list = field(default_factory=list)  # malformed settings (e.g. a chat_template that is no template)

    def describe(self) -> str:
        kinds = ", ".join(sorted(self.kinds)) or "none found"
        return (f"config.json model_type {self.model_type!r}; tokenizer files: {kinds}; tokenizer class "
                f"{', '.join(sorted(self.classes)) or 'not named'}")


def tokenizer_facts(read: Reader) -> TokenizerFacts:
    config = _json(read, "config.json")
    facts = TokenizerFacts(config.get("model_type") if config else None)
    model = read("tokenizer.model")
    if model is not None:
        facts.kinds.add("tiktoken" if _TIKTOKEN_LINE.match(model[:512]) else "sentencepiece")
    tok_json = read("tokenizer.json")
    if tok_json is not None:
        facts.kinds.add("tokenizers")
        facts.added_entries = added_token_entries(tok_json)
        facts.tokens.update(_added_tokens(tok_json, facts.added_entries))
    if read("vocab.json") is not None and read("merges.txt") is not None:
        facts.kinds.add("vocab")  # a GPT-2-style BPE transformers converts
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    facts.layer_kinds = {str(k) for c in (config, text_config) for key, v in c.items()
                         if key.endswith("layer_types") and isinstance(v, list) for k in v}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = _json(read, name)
        for entry in (cfg.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                facts.tokens.add(entry["content"])
        values = list(cfg.get("additional_special_tokens") or [])
        extra = cfg.get("extra_special_tokens") or []
        values += list(extra.values() if isinstance(extra, dict) else extra)
        values += [cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
        for v in values:
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                facts.tokens.add(v)
        if isinstance(cfg.get("tokenizer_class"), str):
            facts.classes.add(cfg["tokenizer_class"])
        templates, problem = chat_templates(cfg.get("chat_template"))
        facts.chat_templates += templates
        if problem:
            facts.problems.append(f"{name}: {problem}")
        if name == "tokenizer_config.json":
            facts.settings = cfg
        auto = (cfg.get("auto_map") or {}).get("AutoTokenizer") if isinstance(cfg.get("auto_map"), dict) else None
        for ref in auto if isinstance(auto, list) else [auto]:
            if isinstance(ref, str):
                facts.classes.add(ref.rsplit(".", 1)[-1])
    for file in {f for fam in FAMILIES.values() for f in fam.detect.code_text}:
        raw = read(file)  # read as text only: the folder's code never runs here
        text = raw.decode("utf-8", errors="replace") if raw is not None else None
        # our own patch/ copy (patch/install.py) names every version's tokens: its version is in tokenizer_config
        facts.code[file] = None if text is None or _OWN_CODE_MARK in text else text
    return facts


def unchecked_layer_kinds(facts: TokenizerFacts) -> list[str]:
    """Layer kinds of the folder's config (layer_types) the packed check of its model type did not cover."""
    entry = MODEL_TYPES["accepted"].get(facts.model_type) or {}
    return sorted(facts.layer_kinds - set(entry.get("layer_types") or ()) - {"full_attention"})  # (plain causal)


def chat_templates(value) -> tuple[list[str], Optional[str]]:
    """The template texts of a tokenizer_config.json `chat_template` value (a string, a list of {"name",
    "template"} objects, or a name -> string object) and a sentence naming what is wrong with it, if anything."""
    if value is None:
        return [], None
    if isinstance(value, str):
        return [value], None
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return list(value.values()), None
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return [t["template"] for t in value], None
    shown = json.dumps(value, ensure_ascii=False)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return [], (f"`chat_template` is {type(value).__name__} {shown}; it must be a Jinja template string or a list of "
                f"{{\"name\": ..., \"template\": \"...\"}} objects: fix or remove the key")


def matches(fam: Family, facts: TokenizerFacts) -> bool:
    d = fam.detect
    if not facts.kinds & set(d.kinds):
        return False
    if fam.name == GENERIC and facts.model_type is not None and unchecked_layer_kinds(facts):
        return False
    if d.tokenizer_class and d.tokenizer_class not in facts.classes:
        return False
    if d.setting and d.setting[0] in facts.settings:
        return str(facts.settings[d.setting[0]]) == str(d.setting[1])
    if not all(m in facts.tokens for m in d.markers):
        return False
    if d.markers_any and not (facts.tokens & set(d.markers_any)
                              or (d.template_text and any(d.template_text in t for t in facts.chat_templates))
                              or any(m in (facts.code.get(f) or "") for f in d.code_text for m in d.markers_any)):
        return False
    return True


def detect(read: Reader) -> Optional[Family]:
    """The family of the folder `read` reads, or None when no family matches (see `describe_folder`)."""
    facts = tokenizer_facts(read)
    return next((f for f in of_model_type(facts.model_type) if matches(f, facts)), None)


def detect_folder(path: str | Path) -> Optional[Family]:
    return detect(folder_reader(path))


def why_undetected(read: Reader) -> str:
    """A sentence saying why `detect` found no family, naming what each candidate needs."""
    facts = tokenizer_facts(read)
    candidates = of_model_type(facts.model_type)
    if not candidates:
        refused = refused_reason(facts.model_type) if facts.model_type else None
        if refused:
            return f"{facts.describe()}: packed training does not support this model_type: {refused}"
        return (f"{facts.describe()}: no family covers this model_type (supported: {', '.join(model_types())}; "
                f"a model type new in transformers {MODEL_TYPES['transformers']} or later: check it with "
                f"`python -m longsft.model_types --types {facts.model_type}`)")
    needs = []
    for f in candidates:
        d = f.detect
        if f.name == GENERIC and unchecked_layer_kinds(facts):
            note = (MODEL_TYPES["accepted"].get(facts.model_type) or {}).get("note")
            needs.append(f"{f.name}: layer kinds {', '.join(unchecked_layer_kinds(facts))} (config.json layer_types)"
                         f" did not pass the packed check of {facts.model_type}" + (f" ({note})" if note else ""))
            continue
        need = " or ".join(d.kinds) + (f" declaring {', '.join(d.markers)}" if d.markers else "") \
            + (f" declaring one of {', '.join(d.markers_any)}" if d.markers_any else "") \
            + (f" (or naming one in {', '.join(d.code_text)})" if d.code_text else "") \
            + (f" with tokenizer class {d.tokenizer_class}" if d.tokenizer_class else "")
        needs.append(f"{f.name}: {need}")
    return f"{facts.describe()}: matches no family ({'; '.join(needs)})"
