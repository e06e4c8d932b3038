"""Shared test setup.

`--device=cpu` (default) runs every test on CPU tensors; Triton kernels then run in Triton's
interpreter, which needs TRITON_INTERPRET=1 in the environment before Triton is imported (the
README's test command sets it). `--device=cuda` runs the same tests on CUDA tensors
(benchmarks/gpu_check.sh).

A test that needs a backend calls `need_backend(backend, device)`: it skips where the backend cannot
run, unless RLHF_FAST_REQUIRE_BACKENDS=1 (set by .ci/run and gpu_check.sh), where it fails instead,
so CI can never pass by skipping the kernels it is meant to check.
"""
import os

import pytest
import torch


def pytest_configure(config):
    """Inductor's compiled kernels go to a fresh folder per test process (unless TORCHINDUCTOR_CACHE_DIR is
    set): the shared default, /tmp/torchinductor_<user>, may hold kernels that another process compiled
    under other settings (ATEN_CPU_CAPABILITY=avx2 here once: its wrappers then ran this CPU's kernels
    and crashed the test with a double free), and a test must not depend on what ran before it."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's folder
        import tempfile
        config._rlhf_fast_inductor_dir = tempfile.mkdtemp(prefix="rlhf_fast_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = config._rlhf_fast_inductor_dir


def pytest_unconfigure(config):
    made = getattr(config, "_rlhf_fast_inductor_dir", None)
    if made is not None:
        import shutil
        shutil.rmtree(made, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="device the tensors of every test live on")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device=cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def need_backend(backend: str, device: torch.device) -> None:
    from rlhf_fast import _backend
    if backend == "reference":
        return
    reason = _backend.triton_reason(device) if backend == "triton" else _backend.cuda_ext_reason(device)
    if reason is None:
        return
    if os.environ.get("RLHF_FAST_REQUIRE_BACKENDS") == "1":
        pytest.fail(f"backend {backend!r} required but unavailable: {reason}")
    pytest.skip(f"backend {backend!r} unavailable: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
