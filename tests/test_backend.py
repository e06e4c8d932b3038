"""Backend dispatch: explicit requests that cannot run raise; auto records its choice."""
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_fast import _backend, extension_info


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("op", "fast", torch.device("cpu"), gpu="triton")


def test_backend_op_does_not_have_raises():
    with pytest.raises(_backend.BackendUnavailable, match="has no 'cuda' backend"):
        _backend.resolve("op", "cuda", torch.device("cpu"), gpu="triton")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(_backend.BackendUnavailable, match="TRITON_INTERPRET=1"):
        _backend.resolve("op", "triton", torch.device("cpu"), gpu="triton")


def test_auto_on_cpu_picks_cpu_choice_and_records_it(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    assert _backend.resolve("some_op", "auto", torch.device("cpu"), gpu="triton") == "reference"
    assert extension_info()["chosen"]["some_op"] == "reference"


def test_env_override_replaces_auto_only(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("op", "auto", torch.device("cpu"), gpu="triton", cpu="cuda") == "reference"
    assert _backend.resolve("op", "triton", torch.device("cpu"), gpu="triton") == "triton"


def test_bad_env_value_raises(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="RLHF_FAST_BACKEND"):
        _backend.resolve("op", "auto", torch.device("cpu"), gpu="triton")


def test_extension_info_keys():
    info = extension_info()
    assert set(info) >= {"torch", "cuda", "triton", "extension", "interpret", "chosen"}
    for key in ("cuda", "triton", "extension"):
        assert isinstance(info[key]["available"], bool) and info[key]["detail"]


@pytest.fixture
def fresh_extension_state(monkeypatch, tmp_path):
    """No prebuilt module, an empty cache root, and no load() attempted yet (restored after)."""
    from rlhf_fast import _extension
    monkeypatch.setattr(_extension, "_state", {})
    monkeypatch.setattr(_extension, "_prebuilt", lambda: None)
    monkeypatch.setenv("RLHF_FAST_EXT_DIR", str(tmp_path / "cache"))
    return _extension


def test_extension_info_never_starts_a_build(fresh_extension_state, monkeypatch):
    ext = fresh_extension_state

    def no_build():
        raise AssertionError("extension_info() started a build")

    monkeypatch.setattr(ext, "_jit_build", no_build)
    info = extension_info()["extension"]
    assert info["available"] is False
    assert "not built yet" in info["detail"] and str(ext.build_dir()) in info["detail"]
    assert not ext.build_dir().exists()


def test_build_announced_once_with_its_folder(fresh_extension_state, monkeypatch, capsys):
    """The first build says on stderr what it compiles and where; a cached build says nothing."""
    ext = fresh_extension_state
    import torch.utils.cpp_extension as cpp

    def fake_jit_load(name, sources, build_directory, **kw):
        assert all(s.startswith(build_directory) for s in sources)  # compiled from the staged copy
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return "module"

    monkeypatch.setattr(cpp, "load", fake_jit_load)
    monkeypatch.setattr(ext, "importlib_missing", lambda name: False)
    assert ext.load() == "module"
    err = capsys.readouterr().err
    assert err.count("compiling the csrc extension") == 1 and str(ext.build_dir()) in err
    assert (ext.build_dir() / "src" / "include").is_dir()
    monkeypatch.setattr(ext, "_state", {})
    assert extension_info()["extension"]["available"] is True
    assert ext.load() == "module" and capsys.readouterr().err == ""


def test_cache_key_follows_code_and_toolchain_not_location(tmp_path):
    """Two copies of the same sources (a checkout and an install) share one build folder; a changed
    source, torch version or flag gets its own."""
    from rlhf_fast import _extension as ext
    a, b = tmp_path / "checkout", tmp_path / "site-packages" / "_csrc"
    shutil.copytree(ext.source_dir(), a)
    shutil.copytree(ext.source_dir(), b)
    flags = ext.build_flags(False)
    key = ext.cache_key(a, flags)
    assert ext.cache_key(b, flags) == key
    assert ext.cache_key(a, flags, torch_version="0.0.0") != key
    assert ext.cache_key(a, ext.build_flags(True)) != key
    header = next(b.rglob("*.h"))
    header.write_text(header.read_text() + "\n// changed\n")
    assert ext.cache_key(b, flags) != key


@pytest.mark.parametrize("recorded", ["h0000000000000000", ""], ids=["other-sources", "unrecorded"])
def test_stale_prebuilt_extension_is_ignored_and_said_once(recorded, monkeypatch, capsys):
    """A prebuilt module compiled from other sources than csrc/ now holds (pip install -e, then git pull)
    is not loaded: its functions may take other arguments. One line on stderr says so."""
    import sys
    import types
    from rlhf_fast import _extension
    monkeypatch.setattr(_extension, "_state", {})
    stale = types.ModuleType("rlhf_fast._C")
    stale.__file__ = "_C.so"
    if recorded:
        stale.source_digest = recorded
    monkeypatch.setitem(sys.modules, "rlhf_fast._C", stale)
    assert _extension._prebuilt() is None and _extension._prebuilt() is None
    err = capsys.readouterr().err
    assert err.count("ignoring the prebuilt csrc extension") == 1 and "pip install -e ." in err
    stale.source_digest = _extension.source_digest(_extension.source_dir())
    assert _extension._prebuilt() is stale


def test_ahead_of_time_build_records_its_sources():
    """The installed extension (setup.py's build, when there is one) carries the digest of its sources."""
    from rlhf_fast import _extension
    try:
        from rlhf_fast import _C
    except ImportError:
        pytest.skip("no ahead-of-time build installed")
    assert _C.source_digest == _extension.source_digest(_extension.source_dir())
