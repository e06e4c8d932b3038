"""The parity rule of every kernel test: ours must be as close to a float64 reference as PyTorch is.

FlashAttention's rule, on the largest error over the tensor:

    max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + atol(dtype)

`torch_same_dtype` is the plain-PyTorch computation in the kernel's dtype: it measures the error
this dtype forces on any implementation. The factor 2 leaves room for a different but equally good
order of operations (blocked sums, online softmax); it does not leave room for dropping precision
(an intermediate rounded to a narrower type), which tests/ci/test_parity_layer.py shows is caught.
`atol(dtype)` is one rounding of the output, eps(dtype) * max|ref64|: it covers outputs PyTorch
happens to compute exactly, where twice its error is zero, and Triton's interpreter (3.6 and 3.9),
whose float32 -> bfloat16 cast truncates (up to 1 ulp) where GPUs round to nearest (half an ulp).

Non-finite values (-inf logprobs of masked tokens, NaN where the reference is NaN) must sit in the
same places and agree exactly; only finite reference positions enter the error.

    from parity import assert_close_to_reference
    assert_close_to_reference(out, ref_fn(x.double()), ref_fn(x), name="out")
    assert_close_to_reference(x.grad, x64.grad, x_same.grad, name="dx")
"""
from __future__ import annotations

import json
import os

import torch

# With RLHF_FAST_PARITY_LOG=FILE every comparison appends one JSON line (test, name, dtype, error, bound,
# ratio = error / bound) to FILE; .ci/parity_margins.py prints the tightest ones (CI does after layer 1),
# so a test that passes here with little margin is seen before another CPU's BLAS fails it.
LOG_ENV = "RLHF_FAST_PARITY_LOG"


def default_atol(dtype: torch.dtype, ref64: torch.Tensor) -> float:
    """One rounding of the output to `dtype`: eps(dtype) * max|ref64| over finite values."""
    finite = ref64[torch.isfinite(ref64)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def assert_close_to_reference(ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor,
                              dtype: torch.dtype | None = None, *, atol: float | None = None,
                              name: str = "output") -> tuple[float, float]:
    """Raise AssertionError unless `ours` meets the parity rule; return (our max error, torch's).

    ours: the kernel's output; ref64: the same computation in float64 from float64-cast inputs;
    torch_same_dtype: the same computation in plain PyTorch in the kernel's dtype; all one shape.
    dtype: the dtype the tolerance is for (default: torch_same_dtype.dtype).
    atol: replaces default_atol(dtype, ref64) where a test has a stated reason to.
    """
    dtype = dtype or torch_same_dtype.dtype
    if not (ours.shape == ref64.shape == torch_same_dtype.shape):
        raise AssertionError(f"{name}: shapes differ: ours {tuple(ours.shape)}, ref64 {tuple(ref64.shape)}, "
                             f"torch {tuple(torch_same_dtype.shape)}")
    ours64 = ours.detach().to("cpu", torch.float64)
    ref = ref64.detach().to("cpu", torch.float64)
    same = torch_same_dtype.detach().to("cpu", torch.float64)

    finite = torch.isfinite(ref)
    both_nan = torch.isnan(ours64) & torch.isnan(ref)
    bad = (torch.isfinite(ours64) != finite) | (~finite & ~both_nan & (ours64 != ref))
    if bad.any():
        at = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{name}: non-finite values differ from the reference at {int(bad.sum())} "
                             f"position(s), first {at}: ours {ours64[at].item()}, ref64 {ref[at].item()}")
    if not finite.any():
        return 0.0, 0.0

    err = torch.where(finite, (ours64 - ref).abs(), torch.zeros_like(ref))
    err_torch = torch.where(finite, (same - ref).abs(), torch.zeros_like(ref)).max().item()
    tol = default_atol(dtype, ref) if atol is None else atol
    bound = 2 * err_torch + tol
    worst = err.max().item()
    _log_margin(name, dtype, worst, bound)
    if worst > bound:
        at = tuple(torch.nonzero(err == worst)[0].tolist())
        raise AssertionError(
            f"{name} ({dtype}): max|ours - ref64| = {worst:.3e} at {at} (ours {ours64[at].item():.9g}, "
            f"ref64 {ref[at].item():.9g}) exceeds 2 * max|torch_{str(dtype).split('.')[-1]} - ref64| "
            f"({err_torch:.3e}) + atol ({tol:.3e}) = {bound:.3e}")
    return worst, err_torch


def _log_margin(name: str, dtype: torch.dtype, worst: float, bound: float) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    ratio = worst / bound if bound > 0 else (0.0 if worst == 0 else float("inf"))
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    line = json.dumps({"test": test, "name": name, "dtype": str(dtype), "error": worst, "bound": bound,
                       "ratio": ratio})
    with open(path, "a") as f:  # one short write per line: appends from xdist workers do not interleave
        f.write(line + "\n")
