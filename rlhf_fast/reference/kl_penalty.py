"""Pure-PyTorch sampled-token KL estimators (Schulman, "Approximating KL divergence", 2020)."""
from __future__ import annotations

import torch

from .. import _validate

KINDS = ("k1", "k2", "k3")


def validate(logp, ref_logp, kind) -> None:
    _validate.check_tensor("logp", logp, dtypes=_validate.FLOAT_DTYPES + (torch.float64,))
    _validate.check_tensor("ref_logp", ref_logp, dtypes=_validate.FLOAT_DTYPES + (torch.float64,))
    if tuple(logp.shape) != tuple(ref_logp.shape):
        raise ValueError(f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    _validate.check_same_device(logp=logp, ref_logp=ref_logp)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def kl_penalty(logp, ref_logp, kind="k1"):
    """Reference twin of rlhf_fast.kl_penalty (see its docstring for the contract)."""
    validate(logp, ref_logp, kind)
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    # k3 = (r - 1) - log r with log r = -log_ratio; expm1 keeps it accurate (and >= 0) when r ~ 1
    return torch.expm1(-log_ratio) + log_ratio


def backward(grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
             kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d logp, d ref_logp) of sum(grad * kl_penalty(logp, ref_logp, kind)), each in its input's dtype.

    With x = logp - ref_logp: dk1/dx = 1, dk2/dx = x, dk3/dx = 1 - e^(-x) = -expm1(-x); d/d ref_logp = -d/dx.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        d = grad
    elif kind == "k2":
        d = grad * log_ratio
    else:
        d = grad * -torch.expm1(-log_ratio)
    return d.to(logp.dtype), (-d).to(ref_logp.dtype)
