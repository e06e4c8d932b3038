"""Decode attention kernels: split-K flash-decoding over a KV cache, then a log-sum-exp merge.

_decode_split_kernel: program (b * Hkv + kv_head, split, group chunk) attends the up-to-BLOCK_G query
heads that share one KV head to cache positions [split * split_len, (split + 1) * split_len) of row b,
so K/V are read once per group and a single long sequence still spreads over many programs. It writes
the split's normalised partial output (fp32) and its LSE (fp32, log2 units; -inf for an empty split).
Token offsets are int64: a (Tmax, B, Hkv, D) cache view passes 2^31 elements at B=256, Hkv=8, Tmax=8192.
_decode_combine_kernel: program (b * Hq + head) merges the splits by their LSEs.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from ._attention_specs import aligned_attrs, stride_args
from ._dot import _dot
from ._spec import KernelSpec


@triton.jit
def _decode_split_kernel(Q, K, V, SEQLENS, O_PART, LSE_PART,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                         n_kv_heads, group, tmax, split_len, n_splits, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """O_PART (B, Hq, n_splits, D) and LSE_PART (B, Hq, n_splits), both contiguous fp32."""
    pid = tl.program_id(0)  # b * Hkv + kv_head on axis 0: CUDA caps axes 1 and 2 at 65535
    split = tl.program_id(1)
    b = pid // n_kv_heads
    kv_head = pid % n_kv_heads
    offs_g = tl.program_id(2) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), tmax)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seqlen)
    in_group = offs_g < group
    heads = kv_head * group + offs_g  # (BLOCK_G,) query heads of this KV head
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
                mask=in_group[:, None], other=0.0)
    k_ptrs = K + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]
    v_ptrs = V + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :]

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        valid = cols < hi
        k = tl.load(k_ptrs + tl.cast(start_n, tl.int64) * stride_kt, mask=valid[None, :], other=0.0)
        s = _dot(q, k, None, DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N), log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: each block holds at least one valid key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + tl.cast(start_n, tl.int64) * stride_vt, mask=valid[:, None], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    nonempty = l_i > 0
    acc = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    row = (b64 * n_kv_heads * group + heads) * n_splits + split  # (BLOCK_G,) index into LSE_PART
    tl.store(LSE_PART + row, lse, mask=in_group)
    tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=in_group[:, None])


@triton.jit
def _decode_combine_kernel(O_PART, LSE_PART, O, stride_ob, stride_oh, n_q_heads, n_splits,
                           HEAD_DIM: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """Program b * Hq + head: O[b, head] = sum_s w_s O_PART[b, head, s], w_s = softmax_s(LSE_PART)."""
    pid = tl.program_id(0)
    b = pid // n_q_heads
    head = pid % n_q_heads
    offs_s = tl.arange(0, MAX_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    row0 = pid.to(tl.int64) * n_splits
    lse = tl.load(LSE_PART + row0 + offs_s, mask=offs_s < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty row (cache length 0) gives weights 0, output 0
    denom = tl.sum(tl.math.exp2(lse - m), 0)
    acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    for s in range(0, n_splits):
        w = tl.math.exp2(tl.load(LSE_PART + row0 + s) - m)
        acc += w * tl.load(O_PART + (row0 + s) * HEAD_DIM + offs_d)
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(O + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_d, out.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------------------------- configs
class DecodeConfig(NamedTuple):
    block_n: int      # cache positions per inner step
    num_warps: int
    num_stages: int


HEAD_DIMS = (16, 32, 64, 128, 256)
ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
BLOCK_G = 16          # query heads per program (tl.dot needs >= 16 rows; larger groups use more programs)
MAX_SPLITS = 128      # most splits per row; the combine kernel reads all LSEs of a row at once

# (arch, fp32 inputs) -> {head_dim: (BLOCK_N, num_warps, num_stages)}: K/V tiles of 8-16 KB per stage so
# several loads stay in flight (the kernel is bandwidth-bound).
_SPLIT_CONFIGS = {
    (90, False): {16: (128, 4, 3), 32: (128, 4, 3), 64: (128, 4, 3), 128: (64, 4, 3), 256: (32, 4, 3)},
    (80, False): {16: (128, 4, 3), 32: (128, 4, 3), 64: (128, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)},
    (90, True): {16: (32, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (32, 8, 2), 256: (16, 4, 2)},
    (80, True): {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (32, 8, 2), 256: (16, 4, 2)},
}
COMBINE_CONFIG = DecodeConfig(block_n=0, num_warps=2, num_stages=1)
# The split kernel's tuning set adds, for fp16/bf16, the split-K decode configs of the Triton decode
# attention that SGLang and vLLM serve with (read for its configs, no code taken): the grouped-query
# kernel (up to 16 query heads of one KV head per program, as BLOCK_G here) steps 32 cache positions
# with 4 warps and 2 stages; the one-head kernel steps 64. fp32 keeps the table pick alone. The combine
# kernel reads n_splits partial rows per output row: it is not tuned.
_PUBLIC_SPLIT = ((32, 4, 2), (64, 4, 2))


def split_config(arch: int, head_dim: int, dtype: str) -> DecodeConfig:
    """The split kernel's table pick."""
    return DecodeConfig(*_SPLIT_CONFIGS[(arch, dtype == "fp32")][head_dim])


def split_tuning_set(arch: int, head_dim: int, dtype: str) -> tuple[DecodeConfig, ...]:
    """The split kernel's configs the launcher may time: the table pick first, then the public ones."""
    out = [split_config(arch, head_dim, dtype)]
    for entry in () if dtype == "fp32" else _PUBLIC_SPLIT:
        if DecodeConfig(*entry) not in out:
            out.append(DecodeConfig(*entry))
    return tuple(out)


def static_configs() -> list[KernelSpec]:
    """Every (kernel, config) rlhf_fast/ops/decode_attention.py can pick: the split kernel's whole tuning set."""
    specs = []
    split_scalars = "stride_qb stride_qh stride_kb stride_kh stride_kt stride_vb stride_vh stride_vt " \
                    "n_kv_heads group tmax split_len n_splits"
    for arch in ARCHS:
        for dtype in DTYPES:
            prec = "ieee" if dtype == "fp32" else "tf32"
            for d in HEAD_DIMS:
                sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "SEQLENS": "*i32",
                       "O_PART": "*fp32", "LSE_PART": "*fp32", **{n: "i32" for n in split_scalars.split()},
                       "qk_scale": "fp32"}
                for c in split_tuning_set(arch, d, dtype):
                    specs.append(KernelSpec(
                        f"decode_split[D={d},{dtype},sm{arch},BN={c.block_n},w{c.num_warps},s{c.num_stages}]",
                        _decode_split_kernel, sig,
                        dict(HEAD_DIM=d, BLOCK_N=c.block_n, BLOCK_G=BLOCK_G, DOT_PRECISION=prec),
                        c.num_warps, c.num_stages, (arch,), aligned_attrs(sig), int64_args=stride_args(sig)))
                sig = {"O_PART": "*fp32", "LSE_PART": "*fp32", "O": f"*{dtype}", "stride_ob": "i32",
                       "stride_oh": "i32", "n_q_heads": "i32", "n_splits": "i32"}
                specs.append(KernelSpec(
                    f"decode_combine[D={d},{dtype},sm{arch}]", _decode_combine_kernel, sig,
                    dict(HEAD_DIM=d, MAX_SPLITS=MAX_SPLITS), COMBINE_CONFIG.num_warps, COMBINE_CONFIG.num_stages,
                    (arch,), aligned_attrs(sig), int64_args=stride_args(sig)))
    return specs
