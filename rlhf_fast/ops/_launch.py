"""What every Triton launch in rlhf_fast needs from the host: the tensors' device, a grid CUDA accepts,
and knowing when a host sync is not allowed."""
from __future__ import annotations

import contextlib
import functools

import torch

# Most blocks per grid axis (x, y, z) that CUDA launches (CUDA programming guide, compute capability
# table: x up to 2^31 - 1, y and z up to 65535). Put the large product (sequences x heads) on axis 0.
MAX_GRID = (2**31 - 1, 65535, 65535)


def on_device(t: torch.Tensor):
    """Context to launch a Triton kernel on `t`'s GPU.

    Triton launches on the *current* CUDA device and its current stream, not on the device of the
    tensors passed: a model on cuda:1 while cuda:0 is current would run on GPU 0 with GPU 1 pointers.
    A no-op for CPU tensors (Triton's interpreter).
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_first_tensor_device(launcher):
    """Decorator of a host launcher function: runs it under `on_device` of its first tensor argument."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            raise TypeError(f"{launcher.__name__}: no tensor argument to take the device from")
        with on_device(first):
            return launcher(*args, **kwargs)
    return guarded


def cuda_grid(*axes: int, kernel: str) -> tuple[int, ...]:
    """`axes` as a launch grid, or ValueError naming the kernel and the axis over CUDA's limit."""
    if not 1 <= len(axes) <= 3:
        raise ValueError(f"{kernel}: a grid has 1 to 3 axes, got {axes}")
    for axis, (n, limit) in enumerate(zip(axes, MAX_GRID)):
        if n > limit:
            raise ValueError(f"{kernel}: grid axis {axis} would have {n} blocks; CUDA allows at most {limit} "
                             f"(grid {tuple(axes)})")
    return tuple(int(n) for n in axes)


def host_sync_forbidden() -> bool:
    """True while a host read of device data would break the caller: CUDA-graph capture on the current
    stream (a sync raises there), or torch.compile tracing (a sync is a graph break). Value checks that
    need such a read are skipped then; the shape checks still run."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
