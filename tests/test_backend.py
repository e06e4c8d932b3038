"""Backend dispatch: explicit requests that cannot run raise; auto records its choice."""
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
