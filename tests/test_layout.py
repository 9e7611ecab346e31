"""The repository layout (README "Layout"): entry scripts at the root, the library in longsft/, imports one way,
patch/ a leaf, no torch in pre-tokenization and sort_and_group, and their outputs on data/sample.jsonl byte for
byte what they were before the package existed (tests/golden/sample_outputs.json).

    python -m pytest -q tests/test_layout.py
    python tests/test_layout.py TREE OUT_JSON     # digests of TREE's outputs (how the golden file was made)
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULES = {"pre_tokenize", "pre_tokenize_glm4", "pre_tokenize_llama3", "sort_and_group", "main", "trainer",
                 "dataset", "evaluate"}
GOLDEN = Path(__file__).parent / "golden" / "sample_outputs.json"
# (case, tokenizer builder, builder kwargs, --template): every hand-written template and `auto` on two families
CASES = [("glm4", "make_glm4_tokenizer", {}, None), ("llama3-longwriter", "make_llama3_tokenizer", {}, "longwriter"),
         ("llama3-llama3", "make_llama3_tokenizer", {}, "llama3"),
         ("chatglm3-chatglm3", "make_chatglm_tokenizer", {"version": 3}, "chatglm3"),
         ("chatglm3-chatglm2", "make_chatglm_tokenizer", {"version": 3}, "chatglm2"),
         ("llama2-llama2", "make_llama2_tokenizer", {}, "llama2"),
         ("qwen2-auto", "make_chat_template_tokenizer", {"kind": "qwen2"}, "auto"),
         ("glm-auto", "make_chat_template_tokenizer", {"kind": "glm"}, "auto")]


def root_modules() -> set[str]:
    return {p.stem for p in ROOT.glob("*.py")}


def repo_imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(module, line) of every import in the file (module-level ones only with top_level_only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def test_the_root_holds_only_entry_scripts():
    assert root_modules() == ENTRY_MODULES


def test_every_package_module_imports():
    for path in sorted((ROOT / "longsft").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        importlib.import_module(name)


def test_the_package_never_imports_a_root_module_and_patch_is_a_leaf():
    roots = root_modules() | {"tools", "bench", "tests"}
    bad = []
    for path in sorted((ROOT / "longsft").rglob("*.py")):
        bad += [f"{path.relative_to(ROOT)}:{line} imports {m}" for m, line in repo_imports(path)
                if m.split(".")[0] in roots]
    for path in sorted((ROOT / "patch").glob("*.py")):
        bad += [f"{path.relative_to(ROOT)}:{line} imports {m}" for m, line in repo_imports(path)
                if m.split(".")[0] in roots | {"longsft"}]
    assert not bad, "\n".join(bad)


def _module_file(name: str):
    for candidate in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_pretokenization_and_sort_and_group_never_import_torch():
    """The module-level imports reachable from the four data entries (within the repository) include no torch."""
    seen, todo, torch_at = set(), ["pre_tokenize", "pre_tokenize_glm4", "pre_tokenize_llama3", "sort_and_group"], []
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parents = [".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)]  # packages run first
        for m, line in repo_imports(path, top_level_only=True):
            if m.split(".")[0] == "torch":
                torch_at.append(f"{path.relative_to(ROOT)}:{line}")
            todo.append(m)
        todo += parents
    assert len(seen) > 10 and not torch_at, torch_at


def test_tools_and_bench_do_not_edit_sys_path():
    edits = [f"{p.relative_to(ROOT)}" for d in ("tools", "bench") for p in sorted((ROOT / d).glob("*.py"))
             if "sys.path.insert" in p.read_text(encoding="utf-8")]
    assert not edits


def test_tools_run_from_the_root_without_an_install(tmp_path):
    """`python tools/make_tiny.py ...` from a checkout: the scripts find this checkout's package (PYTHONPATH as the
    launch scripts set it; conftest sets it for every process a test starts)."""
    proc = subprocess.run([sys.executable, "tools/make_tiny.py", "tokenizer", "--family", "llama3", "--out",
                           str(tmp_path / "tok")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / "tok" / "tokenizer.json").is_file(), proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Outputs byte-identical to before the package layout
# ----------------------------------------------------------------------------------------------

def digests(out: Path) -> dict:
    """sha256 of every output file; meta.json without the tokenizer's path, packs/report.json without its timings
    and path (the only parts that depend on where and when it ran)."""
    res = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        rel = str(p.relative_to(out))
        if rel == "meta.json":
            obj = json.loads(data)
            obj["tokenizer"].pop("name_or_path")
            data = json.dumps(obj, sort_keys=True).encode()
        elif rel == "packs/report.json":
            obj = json.loads(data)
            obj.pop("seconds"), obj.pop("train_file")
            data = json.dumps(obj, sort_keys=True).encode()
        res[rel] = hashlib.sha256(data).hexdigest()
    return res


def run_cases(work: Path, pretokenize_main, sort_and_group_main, builders) -> dict:
    """Tokenizers built by `builders` (name -> function), then pre_tokenize.py --num_proc 1 and sort_and_group.py on
    data/sample.jsonl, run in ROOT (the inputs are recorded as given)."""
    out, cwd = {}, os.getcwd()
    os.chdir(ROOT)
    try:
        for case, builder, kwargs, template in CASES:
            tok = work / "tok" / f"{builder}-{json.dumps(kwargs, sort_keys=True)}"
            if not tok.exists():
                builders[builder](tok, **kwargs)
            data = work / case
            pretokenize_main(["--model_name_or_path", str(tok), "--input", "data/sample.jsonl", "--output_dir",
                              str(data), "--max_length", "2048", "--num_proc", "1"]
                             + (["--template", template] if template else []))
            sort_and_group_main(["--train_file", str(data), "--max_length", "2048", "--group_size", "2"])
            out[case] = digests(data)
    finally:
        os.chdir(cwd)
    return out


def test_outputs_are_byte_identical_to_before_the_package(tmp_path, capsys):
    import pre_tokenize
    import sort_and_group
    from longsft.tiny import tokenizers

    builders = {name: getattr(tokenizers, name) for _, name, _, _ in CASES}
    got = run_cases(tmp_path, pre_tokenize.main, sort_and_group.main, builders)
    want = json.loads(GOLDEN.read_text())
    assert got == want


if __name__ == "__main__":  # digests of another checkout's outputs: python tests/test_layout.py TREE OUT_JSON
    tree = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(tree))
    import tempfile

    import pre_tokenize  # noqa: E402  (TREE's)
    import sort_and_group  # noqa: E402
    if (tree / "longsft").is_dir():
        from longsft.tiny import tokenizers as tk  # noqa: E402
    else:  # before the package: the builders were in tools/make_tiny.py
        from tools import make_tiny as tk  # noqa: E402
    ROOT = tree
    with tempfile.TemporaryDirectory() as work:
        result = run_cases(Path(work), pre_tokenize.main, sort_and_group.main,
                           {name: getattr(tk, name) for _, name, _, _ in CASES})
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
