"""Backend choice for every public op.

Each op accepts ``backend="auto" | "triton" | "cuda" | "reference"``:

- ``"triton"``: the Triton kernel in ``rlhf_fast.kernels``. Needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` (Triton's interpreter, which is how the CPU test suite runs the kernels).
- ``"cuda"``: the compiled csrc extension. It runs its CUDA kernel on CUDA tensors and its C++ port of
  the same algorithm on CPU tensors.
- ``"reference"``: plain PyTorch (``rlhf_fast.reference``); runs anywhere.
- ``"auto"``: the op's fused kernel for CUDA tensors, and the C++ kernel (where the op has one) or the
  reference path for CPU tensors. ``extension_info()["chosen"]`` records what ``auto`` chose.

``RLHF_FAST_BACKEND`` replaces ``"auto"`` (an explicit argument still wins). A backend that was asked
for but cannot run raises ``BackendUnavailable`` saying why: there is no silent fallback.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")

# op name -> backend that "auto" last chose for it (reported by extension_info()).
_chosen: dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


def interpret_mode() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(importable, reason or version) for Triton, imported lazily."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton
    except Exception as exc:  # an import-time failure must be reported, not hidden
        return False, f"import triton failed: {exc!r}"
    return True, triton.__version__


def triton_reason(device: torch.device) -> str | None:
    """None if Triton kernels can run on tensors of `device`, else why not."""
    ok, why = triton_status()
    if not ok:
        return why
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpret_mode():
        return None
    return (f"Triton kernels need CUDA tensors (got {device.type} tensors); set TRITON_INTERPRET=1 "
            "to run them on CPU tensors in Triton's interpreter")


def cuda_ext_reason(device: torch.device) -> str | None:
    """None if the csrc extension can run on tensors of `device`, else why not."""
    from . import _extension
    return _extension.reason_unavailable(device)


def check_backend_arg(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(op: str, backend: str, device: torch.device, *, gpu: str, cpu: str = "reference") -> str:
    """Return the concrete backend ("triton", "cuda" or "reference") for one call of `op`.

    gpu: the op's fused backend for CUDA tensors ("triton" or "cuda").
    cpu: what "auto" uses for CPU tensors ("reference", or "cuda" where the op has a C++ kernel).
    """
    check_backend_arg(backend)
    if backend == "auto":
        env = os.environ.get("RLHF_FAST_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"RLHF_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        want = gpu if device.type == "cuda" else cpu
        reason = _reason(want, device)
        choice = want if reason is None else "reference"
        _chosen[op] = choice if reason is None else f"reference ({want} unavailable: {reason})"
        return choice
    if backend not in (gpu, cpu, "reference"):
        raise BackendUnavailable(f"{op} has no {backend!r} backend; it has {sorted({gpu, cpu, 'reference'})}")
    reason = _reason(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"{op}: backend={backend!r} cannot run: {reason}")
    return backend


def _reason(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "triton":
        return triton_reason(device)
    if backend == "cuda":
        return cuda_ext_reason(device)
    raise AssertionError(backend)


def chosen() -> dict[str, str]:
    return dict(_chosen)
