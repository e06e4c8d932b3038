"""What the attention tests share: plain attention math in any dtype, their tolerance, bad-input calls.

Tolerance (FlashAttention's rule, tests/parity.py): max|ours - ref64| <= 2 * max|same_dtype - ref64| +
EPS * max(1, max|ref64|), where same_dtype is `attention_math` in the input dtype (FlashAttention's
attention_ref(upcast=False)): every product rounded to that dtype, as the kernels' bf16 P and dS are.
EPS covers fp32 reassociation over <= 300 keys (~300 * 2^-24 relative) and, for bf16, one rounding of
the largest value: up to 2^-7 relative, since Triton's CPU interpreter truncates fp32 -> bf16 where the
GPU rounds to nearest (2^-8).
"""
import pytest
import torch

from parity import assert_close_to_reference

EPS = {torch.float32: 2e-5, torch.bfloat16: 2.0 ** -7}


def attention_math(q, k, v, scale=None, causal=True):
    """softmax(q k^T * scale + causal mask) v computed in q's dtype (no upcast).

    q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) with Hq a multiple of Hkv; scale defaults to D ** -0.5;
    the causal mask aligns the last query with the last key (query i sees keys <= i + Tk - Tq).
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        tq, tk = scores.shape[-2:]
        future = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(tk - tq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


def assert_attention_close(ours, ref64, same, name):
    """FlashAttention's rule with the slack EPS[same.dtype] * max(1, max|ref64|) (module docstring)."""
    atol = EPS[same.dtype] * max(1.0, ref64.abs().max().item())
    assert_close_to_reference(ours, ref64, same, atol=atol, name=name)


def assert_bad_input_raises(op, args, change, match):
    """op(**args, backend="reference"), each argument named in `change` replaced by change[name](args),
    raises ValueError matching `match`."""
    bad = {**args, **{name: fn(args) for name, fn in change.items()}}
    with pytest.raises(ValueError, match=match):
        op(**bad, backend="reference")
