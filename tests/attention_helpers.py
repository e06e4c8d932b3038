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
from rlhf_fast import causal_attention, causal_attention_varlen
from rlhf_fast.reference.causal_attention import causal_attention as reference

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


def fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return (out, *grads)


def check_against_float64(q, k, v, backend="triton", **kw):
    """Compare out, dq, dk, dv of the op's `backend` with the float64 math, FlashAttention's rule."""
    do = torch.randn_like(q)
    ours = fwd_bwd(causal_attention, q, k, v, do, backend=backend, **kw)
    ref64 = fwd_bwd(reference, q.double(), k.double(), v.double(), do.double())
    same = fwd_bwd(attention_math, q, k, v, do)
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), ours, ref64, same):
        assert a.dtype == q.dtype and a.shape == r.shape, name
        assert_attention_close(a, r, s, name)


def pack(lengths, hq, hkv, d, dtype, device, extra_rows=0):
    total = sum(lengths) + extra_rows
    q = torch.randn(total, hq, d, dtype=dtype, device=device)
    k = torch.randn(total, hkv, d, dtype=dtype, device=device)
    v = torch.randn(total, hkv, d, dtype=dtype, device=device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def seq_grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of one sequence given as (L, H, D) slices, via the (1, H, L, D) layout."""
    q, k, v = (x.detach().clone().transpose(0, 1).unsqueeze(0).requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do.transpose(0, 1).unsqueeze(0).to(out.dtype))
    return [t.squeeze(0).transpose(0, 1) for t in (out, *grads)]


def check_packed(lengths, hq, hkv, d, dtype, device, extra_rows=0, **kw):
    q, k, v, cu = pack(lengths, hq, hkv, d, dtype, device, extra_rows)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = causal_attention_varlen(*leaves, cu, max(lengths), backend="triton", **kw)
    do = torch.randn_like(out)
    ours = [out, *torch.autograd.grad(out, leaves, do)]
    end = int(cu[-1])
    for t in ours:  # rows past cu_seqlens[-1] belong to no sequence
        assert torch.all(t[end:] == 0)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if s == e:
            continue
        ref64 = seq_grads(reference, q[s:e].double(), k[s:e].double(), v[s:e].double(), do[s:e].double())
        same = seq_grads(attention_math, q[s:e], k[s:e], v[s:e], do[s:e])
        for name, a, r, m in zip(("out", "dq", "dk", "dv"), ours, ref64, same):
            assert_attention_close(a[s:e], r, m, f"sequence {i} (length {e - s}) {name}")
