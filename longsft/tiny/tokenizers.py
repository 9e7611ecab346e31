"""Tiny tokenizer folders built offline, laid out like the real hub folders (tests, benchmarks, the CPU quickstart).

    from longsft.tiny.tokenizers import make_llama3_tokenizer, make_chat_template_tokenizer
    make_llama3_tokenizer("/tmp/tiny-llama3"); make_chat_template_tokenizer("/tmp/tiny-qwen2", "qwen2")

Tokenizers (a byte-level BPE trained in well under a second on a small built-in English/Chinese text):
- `make_glm4_tokenizer(out_dir)`: the GLM-4 hub layout. `tokenizer.model` (tiktoken ranks: all 256 bytes +
  a few hundred merges), a hub-like `tokenizer_config.json` (auto_map to tokenization_chatglm.ChatGLM4Tokenizer,
  added_tokens_decoder at the special ids, additional_special_tokens, eos/pad, padding_side left, remove_space,
  do_lower_case, clean_up_tokenization_spaces, model_max_length, a Jinja chat_template) and a copy of
  patch/tokenization_chatglm.py. Loads with `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`.
- `make_llama3_tokenizer(out_dir)`: a Llama-3.1-style fast tokenizer (`tokenizer.json`) with the 256 Llama-3.1
  special tokens right after the regular tokens, in Llama's order. Loads with `AutoTokenizer.from_pretrained`.
SentencePiece tokenizers (sentencepiece's trainer, offline, on the same text; byte fallback, dummy prefix):
- `make_chatglm_tokenizer(out_dir, version=2|3)`: the chatglm2-6b / chatglm3-6b hub layout (binary
  `tokenizer.model`, the hub's tokenizer_config.json fields, patch/tokenization_chatglm.py -> ChatGLMTokenizer).
- `make_llama2_tokenizer(out_dir)`: Llama-2's hub layout (`tokenizer.model`, `tokenizer.json`, tokenizer_config),
  `<unk>` 0, `<s>` 1, `</s>` 2. Loads with `AutoTokenizer.from_pretrained`.
Tokenizers with the chat templates of transformers-native models, for template `auto` (longsft/tiny/chat_templates.py):
- `make_chat_template_tokenizer(out_dir, kind)`, kind in CHAT_TOKENIZERS: glm (GLM-Edge), glm4 (GLM-4-0414),
  qwen2 (Qwen2.5-Instruct; qwen2_marked: its template with {% generation %} marks), qwen3, mistral (v0.3),
  llama3 (Llama-3.1-Instruct with custom tools): a fast tokenizer with the model's special and added tokens.
Special tokens get ids from len(regular vocab) upward, as in the real models (Mistral's: from 0), so nothing may
hard-code ids. The transformers-native families (glm, glm4_0414, qwen2, qwen3, mistral) get these (glm, glm4,
qwen2, qwen3, mistral: CHAT_KIND_OF_FAMILY) when no tokenizer folder is given; their config.json fields are in
NATIVE_TINY.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from longsft.tiny import chat_templates
from patch import families
from patch import tokenization_chatglm as glm_tok

# ----------------------------------------------------------------------------------------------
# A small training text for the BPE merges (English, Chinese, digits, code-ish punctuation)
# ----------------------------------------------------------------------------------------------

CORPUS = """\
The quick brown fox jumps over the lazy dog. A long story begins with a single sentence, and the
writer keeps going until the chapter is done. Write a detailed essay about the history of tea,
its trade routes, and the people who drank it. The model should answer the question clearly.
Please summarize the following document in three paragraphs. Thank you! What is the capital of France?
The capital of France is Paris. Here are the steps: first, read the data; second, tokenize it;
third, train the model; finally, evaluate the results on held-out examples.
def train(model, data):\n    for batch in data:\n        loss = model(batch)\n        loss.backward()\n
Numbers: 1 12 123 2024 3.14159 100% $42 #7 @user <tag> [note] {key: value} (a, b, c) -> x != y
你好，请写一篇关于长江的文章。长江是中国最长的河流，流经十一个省份。今天的天气很好，我们去公园散步吧。
请总结下面的文档。模型需要学习如何生成很长的回答。训练数据包括中文和英文的对话。谢谢你的帮助！
用户：你能帮我写一首诗吗？助手：当然可以。春风拂面，花开满园，鸟儿在枝头歌唱。
"""


def _train_byte_bpe(vocab_size: int, corpus: Iterable[str] | None = None, special_tokens: Iterable[str] = ()):
    """A `tokenizers` byte-level BPE (Llama-3 regex) trained on `corpus` (default CORPUS): 256 bytes + merges
    (after `special_tokens`, which then get the first ids, as Mistral's do)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(glm_tok.PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2, special_tokens=list(special_tokens))
    tok.train_from_iterator([CORPUS] * 4 if corpus is None else corpus, trainer=trainer)
    return tok


def _token_bytes_in_rank_order(tok) -> list[bytes]:
    """Token byte strings for tiktoken ranks: the 256 single bytes (byte order), then merges as learned."""
    char_to_byte = {c: b for b, c in glm_tok._byte_to_char().items()}
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [bytes(char_to_byte[c] for c in s) for s, _ in vocab]
    assert len({t for t in tokens if len(t) == 1}) == 256 and len(set(tokens)) == len(tokens)
    return [bytes([b]) for b in range(256)] + [t for t in tokens if len(t) > 1]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# GLM-4 (tiktoken ranks + remote-code tokenizer class)
# ----------------------------------------------------------------------------------------------

GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message.get('metadata', '') }}\n{{ message['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_glm4_tokenizer(out_dir: str | Path, vocab_size: int = 800, corpus: Iterable[str] | None = None) -> Path:
    """`vocab_size` regular tokens at most (a bigger `corpus` gives a more realistic, larger vocabulary)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = _token_bytes_in_rank_order(_train_byte_bpe(vocab_size, corpus))
    ranks = {t: i for i, t in enumerate(tokens)}
    glm_tok.write_ranks(ranks, out / "tokenizer.model")
    shutil.copyfile(glm_tok.__file__, out / "tokenization_chatglm.py")
    n = len(ranks)
    specials = list(glm_tok.SPECIAL_TOKENS)
    write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                 for i, t in enumerate(specials)},
        "additional_special_tokens": specials,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "chat_template": GLM4_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 128000,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    })
    return out


# ----------------------------------------------------------------------------------------------
# Llama-3.1 (tokenizers fast tokenizer)
# ----------------------------------------------------------------------------------------------

def llama31_special_tokens() -> list[str]:
    """The 256 Llama-3.1 special tokens in id order (offsets 0..255 after the regular vocabulary)."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
             10: "<|python_tag|>"}
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_llama3_tokenizer(out_dir: str | Path, vocab_size: int = 800, corpus: Iterable[str] | None = None) -> Path:
    from tokenizers import AddedToken, decoders, processors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tk = _train_byte_bpe(vocab_size, corpus)
    tk.decoder = decoders.ByteLevel()
    specials = llama31_special_tokens()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tk.token_to_id(bos))])
    tk.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "bos_token": bos,
        "eos_token": "<|end_of_text|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    return out


# ----------------------------------------------------------------------------------------------
# SentencePiece tokenizers: ChatGLM2 / ChatGLM3 (remote-code class) and Llama-2 (hub fast tokenizer)
# ----------------------------------------------------------------------------------------------

def train_sentencepiece(vocab_size: int = 1000, corpus: Iterable[str] | None = None) -> bytes:
    """A SentencePiece BPE model (serialized) trained offline on `corpus` lines (default CORPUS) with the
    settings of the real chatglm / Llama-2 models: `<unk>` 0, `<s>` 1, `</s>` 2, byte fallback (any text
    encodes), a dummy prefix, no whitespace folding, digits split. `vocab_size` is a soft limit."""
    import io

    import sentencepiece as spm

    lines = [line for line in (CORPUS.splitlines() * 4 if corpus is None else corpus) if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return model.getvalue()


def _sentencepiece_file(out: Path, vocab_size: int, corpus, names: Iterable[str]):
    """Train, write out/tokenizer.model, and check that no `names` (special-token strings) is also a piece."""
    import sentencepiece as spm

    (out / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size, corpus))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    clash = [t for t in names if sp.piece_to_id(t) != sp.unk_id()]
    if clash:
        raise ValueError(f"special-token strings {clash} are also pieces of the trained model; change the corpus")
    return sp


CHATGLM3_CHAT_TEMPLATE = (  # chatglm3-6b's tokenizer_config.json template
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HUB_MAX_LENGTH = 1000000000000000019884624838656  # transformers' "no limit" value the hub configs carry


def make_chatglm_tokenizer(out_dir: str | Path, version: int = 3, vocab_size: int = 1000,
                           corpus: Iterable[str] | None = None) -> Path:
    """A chatglm2-6b (`version=2`) / chatglm3-6b (`version=3`) hub-like tokenizer folder: a binary SentencePiece
    `tokenizer.model`, the hub's `tokenizer_config.json` fields (ChatGLM2: only auto_map, tokenizer_class,
    remove_space, do_lower_case, name_or_path; ChatGLM3 also added_tokens_decoder entries for [gMASK], sop,
    <|user|>, <|assistant|> at their ids, eos/pad/unk, padding_side left and its chat_template) and
    patch/tokenization_chatglm.py. Loads with `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`."""
    if version not in (2, 3):
        raise ValueError(f"version={version!r}: expected 2 (ChatGLM2) or 3 (ChatGLM3)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = glm_tok.SP_SPECIAL_TOKENS + (glm_tok.SP_ROLE_TOKENS if version == 3 else ())
    sp = _sentencepiece_file(out, vocab_size, corpus, names)
    shutil.copyfile(glm_tok.__file__, out / "tokenization_chatglm.py")
    config = {"name_or_path": f"THUDM/chatglm{version}-6b", "remove_space": False, "do_lower_case": False,
              "tokenizer_class": "ChatGLMTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    if version == 3:
        ids = {t: sp.get_piece_size() + i for i, t in enumerate(names)}
        config.update({
            "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "normalized": True,
                                                   "rstrip": False, "single_word": False, "special": False}
                                     for t in ("[gMASK]", "sop", "<|user|>", "<|assistant|>")},
            "chat_template": CHATGLM3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": "</s>", "model_max_length": HUB_MAX_LENGTH, "pad_token": "<unk>",
            "padding_side": "left", "unk_token": "<unk>"})
        del config["name_or_path"]
        config = dict(sorted(config.items()))  # the hub file is written by save_pretrained: keys sorted
    write_json(out / "tokenizer_config.json", config)
    return out


def _llama2_tokenizer_json(sp):
    """Llama-2's hub `tokenizer.json` layout for a SentencePiece BPE model: the pieces as a byte-fallback BPE
    (merges ordered by the merged piece's rank), "▁" prepended and spaces replaced by the normalizer, `<s>`
    added in front by the post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        if sp.is_control(rank) or sp.is_byte(rank) or sp.is_unknown(rank):
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", sp.bos_id())])
    return tk


def make_llama2_tokenizer(out_dir: str | Path, vocab_size: int = 1000, corpus: Iterable[str] | None = None) -> Path:
    """A Llama-2 hub-like tokenizer folder: SentencePiece `tokenizer.model` (`<unk>` 0, `<s>` 1, `</s>` 2),
    the matching fast `tokenizer.json` (adds `<s>`), and Llama-2's `tokenizer_config.json` fields.
    Loads with `AutoTokenizer.from_pretrained(dir)`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp = _sentencepiece_file(out, vocab_size, corpus, ())
    _llama2_tokenizer_json(sp).save(str(out / "tokenizer.json"))

    def added(t):
        return {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": added("</s>"), "legacy": False,
        "model_max_length": HUB_MAX_LENGTH, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": added("<unk>")})
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizers with the chat templates of transformers-native models (template `auto`): GLM-Edge, GLM-4-0414,
# Qwen2.5, Qwen3, Mistral, Llama-3.1-Instruct with tools (templates: tools/tiny_chat_templates.py)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTokenizer:
    """A tiny fast tokenizer (`tokenizer.json`, byte-level BPE) with a model's special tokens and chat template.
    `specials`: special tokens (special=True), after the regular vocabulary, or before it with `specials_first`
    (Mistral); `added`: added tokens that are not special (Qwen's <tool_call>, <think>); `bos_prefix`: what the
    tokenizer.json post-processor puts in front of `tokenizer(text)` (apply_chat_template never adds it);
    `template_file`: the template goes to chat_template.jinja (the newer hub layout) instead of tokenizer_config."""
    title: str
    template: str
    specials: tuple[str, ...]
    eos: str
    pad: str | None = None
    bos: str | None = None
    unk: str | None = None
    added: tuple[str, ...] = ()
    specials_first: bool = False
    bos_prefix: tuple[str, ...] = ()
    template_file: bool = False


_GLM_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>")
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                     "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]") + tuple(f"[control_{i}]"
                                                                                       for i in range(8, 16))
CHAT_TOKENIZERS = {
    "glm": ChatTokenizer("GLM-Edge (glm-edge-*-chat)", chat_templates.GLM_EDGE, _GLM_SPECIALS, "<|endoftext|>",
                         pad="<|endoftext|>"),
    "glm4": ChatTokenizer("GLM-4-0414 (GLM-4-9B-0414, GLM-Z1)", chat_templates.GLM4_0414, _GLM_SPECIALS,
                          "<|endoftext|>", pad="<|endoftext|>", bos_prefix=("[gMASK]", "<sop>"), template_file=True),
    "qwen2": ChatTokenizer("Qwen2.5-Instruct", chat_templates.QWEN2, _QWEN_SPECIALS, "<|im_end|>",
                           pad="<|endoftext|>", added=_QWEN_ADDED),
    "qwen2_marked": ChatTokenizer("Qwen2.5-Instruct, template with {% generation %} marks",
                                  chat_templates.QWEN2_MARKED, _QWEN_SPECIALS, "<|im_end|>", pad="<|endoftext|>",
                                  added=_QWEN_ADDED),
    "qwen3": ChatTokenizer("Qwen3", chat_templates.QWEN3, _QWEN_SPECIALS, "<|im_end|>", pad="<|endoftext|>",
                           added=_QWEN_ADDED + ("<tool_response>", "</tool_response>", "<think>", "</think>"),
                           template_file=True),
    "mistral": ChatTokenizer("Mistral-7B-Instruct-v0.3", chat_templates.MISTRAL, _MISTRAL_SPECIALS, "</s>",
                             bos="<s>", unk="<unk>", specials_first=True, bos_prefix=("<s>",)),
    "llama3": ChatTokenizer("Llama-3.1-8B-Instruct (custom tools, ipython role)", chat_templates.LLAMA31,
                            tuple(llama31_special_tokens()), "<|eot_id|>", bos="<|begin_of_text|>",
                            bos_prefix=("<|begin_of_text|>",)),
}


def make_chat_template_tokenizer(out_dir: str | Path, kind: str, vocab_size: int = 800,
                                 corpus: Iterable[str] | None = None) -> Path:
    """A tiny tokenizer folder of `kind` (CHAT_TOKENIZERS: glm, glm4, qwen2, qwen2_marked, qwen3, mistral, llama3):
    `tokenizer.json` and `tokenizer_config.json` (bos/eos/pad/unk as the model's, its chat template, or
    chat_template.jinja). Loads with `PreTrainedTokenizerFast.from_pretrained` (models.load_tokenizer)."""
    from tokenizers import AddedToken, decoders, processors

    if kind not in CHAT_TOKENIZERS:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(CHAT_TOKENIZERS)}")
    spec = CHAT_TOKENIZERS[kind]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tk = _train_byte_bpe(vocab_size, corpus, spec.specials if spec.specials_first else ())
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    if spec.bos_prefix:
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(spec.bos_prefix) + " $A", pair=" ".join(spec.bos_prefix) + " $A $B:1",
            special_tokens=[(t, tk.token_to_id(t)) for t in spec.bos_prefix])
    tk.save(str(out / "tokenizer.json"))
    config = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk,
              "clean_up_tokenization_spaces": False, "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if spec.template_file:
        (out / "chat_template.jinja").write_text(spec.template, encoding="utf-8")
    else:
        config["chat_template"] = spec.template
    write_json(out / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    return out


TOKENIZER_BUILDERS = {"glm4": make_glm4_tokenizer, "llama3": make_llama3_tokenizer,
                      "chatglm2": lambda out: make_chatglm_tokenizer(out, version=2),
                      "chatglm3": lambda out: make_chatglm_tokenizer(out, version=3),
                      "llama2": make_llama2_tokenizer}  # family -> tiny tokenizer
NATIVE_FAMILIES = ("glm", "glm4_0414", "qwen2", "qwen3", "mistral")  # transformers' own classes (modeling_native)
CHAT_KIND_OF_FAMILY = {"glm": "glm", "glm4_0414": "glm4", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}
for _name in NATIVE_FAMILIES:  # each with its model's tokenizer and chat template (template auto)
    TOKENIZER_BUILDERS.setdefault(_name, lambda out, kind=CHAT_KIND_OF_FAMILY[_name]: make_chat_template_tokenizer(
        out, kind))
assert set(TOKENIZER_BUILDERS) <= set(families.FAMILIES), "tiny builders for families patch/families.py lacks"
