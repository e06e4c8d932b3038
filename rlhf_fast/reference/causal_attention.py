"""Causal self-attention in plain PyTorch: the CPU path and the test oracle of `causal_attention`."""
from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are upcast to fp32 (the kernels accumulate in fp32); fp32 and fp64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     deterministic: bool = False, backend: str = "reference") -> torch.Tensor:
    """softmax(q @ k^T * scale + causal mask) @ v with k/v heads shared by groups of Hq // Hkv query heads.

    q (B, Hq, T, D), k and v (B, Hkv, T, D); returns (B, Hq, T, D) in q's dtype. Computes in fp32 for
    half-precision inputs (in fp64 for fp64 inputs, which is how tests build the oracle). Materialises the
    (T, T) score matrix, so memory is O(T^2): this is math, not a kernel. `deterministic` and `backend`
    exist only so the signature matches the public op; this path is always deterministic.
    """
    return _attend(q, k, v, scale, want_lse=False)[0]


def _attend(q, k, v, scale, want_lse: bool):
    """(out in q's dtype, lse (B, Hq, T) natural log in the compute dtype, or None) of causal attention."""
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, T, D)
        v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    t = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, T, T)
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(out_dtype), (scores.logsumexp(-1) if want_lse else None)


def _cpu_kernels(q: torch.Tensor):
    """torch's fused CPU attention (aten's flash attention for CPU: forward, and a backward from its
    out and lse) where it serves: CPU tensors of fp32/bf16/fp16. None for fp64, the tests' oracle,
    which stays the plain math below, and on other devices."""
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if q.device.type != "cpu" or q.dtype == torch.float64 or fwd is None or bwd is None:
        return None
    return fwd, bwd


def _repeat_kv(k, v, group: int):
    """k, v with each KV head repeated for its group of query heads (not every torch version's CPU kernel
    takes fewer KV heads)."""
    return (k, v) if group == 1 else (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's reference backend: (out (B, Hq, T, D) in q's dtype, lse (B, Hq, T) float32).

    lse is each row's log-sum-exp of the scaled scores in log2 units, as the Triton kernels store it.
    On CPU (not fp64) torch's fused CPU kernel computes both, 2x faster than the math at T=64.
    """
    kernels = _cpu_kernels(q)
    with torch.no_grad():
        if kernels is not None:
            out, lse = kernels[0](q, *_repeat_kv(k, v, q.shape[1] // k.shape[1]), 0.0, True, scale=scale)
            return out, (lse.float() / math.log(2)).contiguous()
        out, lse = _attend(q, k, v, scale, want_lse=True)
    return out, (lse / math.log(2)).float()


def backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             out: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's reference backward: (dq, dk, dv) in the inputs' dtypes.

    With the forward's `out` and `lse` (log2 units) on CPU (not fp64), torch's fused CPU backward (2x
    faster than the math at T=64). Otherwise the math, recomputing the probabilities (O(T^2) memory while
    it runs, as the forward), in the compute dtype:

        P = softmax(causal(q @ k^T * scale)),  dV = P^T dO,  dP = dO V^T,
        dS = P * (dP - rowsum(P * dP)),  dQ = dS K * scale,  dK = dS^T Q * scale

    with the dK, dV of a shared KV head summed over its group of query heads.
    """
    ct = compute_dtype(q.dtype)
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    kernels = _cpu_kernels(q)
    if kernels is not None and out is not None and lse is not None:
        dq, dk, dv = kernels[1](d_out, q, *_repeat_kv(k, v, group), out, lse * math.log(2), 0.0, True, scale=scale)
        if group > 1:
            dk, dv = (x.view(b, hkv, group, t, d).sum(2) for x in (dk, dv))
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    qc, kc, vc, do = q.to(ct), k.to(ct), v.to(ct), d_out.to(ct)
    if group > 1:
        kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    scores = (qc @ kc.transpose(-1, -2)) * scale  # (B, Hq, T, T)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = scores.softmax(dim=-1)
    dv = p.transpose(-1, -2) @ do  # (B, Hq, T, D)
    dp = do @ vc.transpose(-1, -2)  # (B, Hq, T, T)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = (ds @ kc) * scale
    dk = (ds.transpose(-1, -2) @ qc) * scale
    if group > 1:
        dk, dv = (x.view(b, hkv, group, t, d).sum(2) for x in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
