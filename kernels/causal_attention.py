"""Causal attention kernels: FlashAttention-2 forward, backward (dK/dV pass + dQ pass or dQ atomics).

One set of kernels serves padded (B, H, T, D) and packed (total, H, D) inputs (IS_VARLEN; the packed op's
kernel module is kernels/causal_attention_varlen.py): kernels/_attention_rows.py says how a program finds
its rows in either layout. Configs: kernels/_attention_configs.py (table picks and tuning sets).

Scores are kept in log2 units (qk_scale = scale * log2(e)) so that the softmax uses exp2; the LSE the
forward writes for the backward is in the same units, fp32. Blocks strictly above the diagonal are never
loaded: each loop runs an unmasked part (blocks fully below the diagonal) and a masked part (the blocks
that straddle it, and the ragged tail of the sequence).
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from ._attention_configs import (ARCHS, DTYPES, HEAD_DIMS, AttnConfig, config, has_config,  # noqa: F401
                                 tma_block, tuning_set, uses_tma)
from ._attention_rows import _base, _load_rows, _program, _store_rows
from ._attention_specs import all_specs
from ._dot import _dot


# ----------------------------------------------------------------------------------------------- forward
@triton.jit
def _kv_tile(src, stride_t, start_n, cols, seqlen, desc_b, desc_h, desc_t0, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TRANSPOSE: tl.constexpr, USE_TMA: tl.constexpr):
    """Keys or values [start_n, start_n + BLOCK_N) of one head as (BLOCK_N, D), or (D, BLOCK_N) with
    TRANSPOSE; with MASKED, rows past the sequence read as 0.

    src: pointers at key 0 laid out like the result, or (USE_TMA) a 4-D descriptor over (batch, head, token,
    dim) whose block (desc_b, desc_h, desc_t0 + start_n, 0) is read by TMA. A descriptor bounds the whole
    tensor, not one packed sequence, so its rows past the sequence are zeroed here (they may hold anything).
    """
    if USE_TMA:
        t = src.load([desc_b, desc_h, desc_t0 + start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if MASKED:
            t = tl.where(cols[:, None] < seqlen, t, 0.0)
        if TRANSPOSE:
            t = tl.trans(t)
    elif MASKED:
        if TRANSPOSE:
            t = tl.load(src + tl.cast(start_n, tl.int64) * stride_t, mask=cols[None, :] < seqlen, other=0.0)
        else:
            t = tl.load(src + tl.cast(start_n, tl.int64) * stride_t, mask=cols[:, None] < seqlen, other=0.0)
    else:
        t = tl.load(src + tl.cast(start_n, tl.int64) * stride_t)
    return t


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, desc_b, desc_h, desc_t0, lo, hi,
                    offs_m, offs_n, seqlen, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over key blocks [lo, hi). k_src (D, BLOCK_N) and v_src (BLOCK_N, D) pointers at key 0,
    or TMA descriptors (see _kv_tile)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _kv_tile(k_src, stride_kt, start_n, cols, seqlen, desc_b, desc_h, desc_t0, BLOCK_N, HEAD_DIM,
                     MASKED, True, USE_TMA)
        s = _dot(q, k, None, DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            keep = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < seqlen)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _kv_tile(v_src, stride_vt, start_n, cols, seqlen, desc_b, desc_h, desc_t0, BLOCK_N, HEAD_DIM,
                     MASKED, False, USE_TMA)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU_SEQLENS,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     stride_lb, stride_lh,
                     max_seqlen, n_q_heads, group, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Grid (n_seq * Hq, cdiv(max_seqlen, BLOCK_M)): one query block of one head of one sequence.

    With USE_TMA (Hopper), K and V are 4-D TMA descriptors with (1, 1, BLOCK_N, D) blocks over
    (B, Hkv, T, D), or over (1, Hkv, total, D) when packed; otherwise pointers like Q.
    """
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = tl.program_id(1)
    seq, head, tok0, seqlen = _program(CU_SEQLENS, max_seqlen, n_q_heads, IS_VARLEN)
    if start_m * BLOCK_M >= seqlen:
        return
    kv_head = head // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < seqlen
    q = _load_rows(Q, seq, head, tok0, stride_qb, stride_qh, stride_qt, offs_m, offs_d, rows)
    if USE_TMA:
        k_src = K
        v_src = V
        desc_t0 = tok0.to(tl.int32)
        if IS_VARLEN:
            desc_b = 0
        else:
            desc_b = seq
    else:
        k_src = _base(K, seq, kv_head, tok0, stride_kb, stride_kh, stride_kt) + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]
        v_src = _base(V, seq, kv_head, tok0, stride_vb, stride_vh, stride_vt) + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :]
        desc_b = 0
        desc_t0 = 0

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    diag = start_m * BLOCK_M
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, desc_b, kv_head, desc_t0,
                                    0, diag, offs_m, offs_n, seqlen, qk_scale, BLOCK_N, HEAD_DIM, False,
                                    DOT_PRECISION, USE_TMA)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, desc_b, kv_head, desc_t0,
                                    diag, tl.minimum(diag + BLOCK_M, seqlen), offs_m, offs_n, seqlen, qk_scale,
                                    BLOCK_N, HEAD_DIM, True, DOT_PRECISION, USE_TMA)
    # every row sees key 0, so l_i >= 1 and m_i is finite
    acc = acc / l_i[:, None]
    lse_ptrs = LSE + seq.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + tok0 + offs_m
    tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=rows)
    _store_rows(O, seq, head, tok0, stride_ob, stride_oh, stride_ot, offs_m, offs_d, rows, acc)


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, CU_SEQLENS,
                                stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                                stride_lb, stride_lh, max_seqlen, n_q_heads,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr):
    """delta = rowsum(O * dO) in fp32, laid out like the LSE."""
    start_m = tl.program_id(1)
    seq, head, tok0, seqlen = _program(CU_SEQLENS, max_seqlen, n_q_heads, IS_VARLEN)
    if start_m * BLOCK_M >= seqlen:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < seqlen
    o = _load_rows(O, seq, head, tok0, stride_ob, stride_oh, stride_ot, offs_m, offs_d, rows)
    do = _load_rows(DO, seq, head, tok0, stride_db, stride_dh, stride_dt, offs_m, offs_d, rows)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + seq.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + tok0 + offs_m, delta, mask=rows)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr,
                         stride_qt, stride_dot, stride_dqt, lo, hi, offs_n, seqlen, scale, qk_scale,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N, D) of one KV block over query blocks [lo, hi) of one query head.

    q_ptrs (D, BLOCK_M), do_ptrs and dq_ptrs (BLOCK_M, D) at query 0. Rows past the sequence load an
    LSE of +inf, so their probabilities are exactly 0 and add nothing.
    """
    offs_mb = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        rows = offs_m < seqlen
        q_t = tl.load(q_ptrs + tl.cast(start_m, tl.int64) * stride_qt, mask=rows[None, :], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=rows, other=float("inf"))
        s_t = _dot(k, q_t, None, DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_ptrs + tl.cast(start_m, tl.int64) * stride_dot, mask=rows[:, None], other=0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION)
        delta = tl.load(delta_ptr + offs_m, mask=rows, other=0.0)
        dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk = _dot(ds_t, tl.trans(q_t), dk, DOT_PRECISION)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(ds_t), k, None, DOT_PRECISION) * scale
            tl.atomic_add(dq_ptrs + tl.cast(start_m, tl.int64) * stride_dqt, dq, mask=rows[:, None])
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_SEQLENS,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                          stride_dqb, stride_dqh, stride_dqt, stride_lb, stride_lh,
                          max_seqlen, n_kv_heads, group, scale, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          IS_VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (n_seq * Hkv, cdiv(max_seqlen, BLOCK_N)): dK, dV of one KV block, summed over its query heads.

    With ATOMIC_DQ, also adds each query block's dQ into the fp32 buffer DQ with atomics.
    """
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(1) * BLOCK_N
    seq, kv_head, tok0, seqlen = _program(CU_SEQLENS, max_seqlen, n_kv_heads, IS_VARLEN)
    if start_n >= seqlen:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_rows = offs_n < seqlen
    k = _load_rows(K, seq, kv_head, tok0, stride_kb, stride_kh, stride_kt, offs_n, offs_d, kv_rows)
    v = _load_rows(V, seq, kv_head, tok0, stride_vb, stride_vh, stride_vt, offs_n, offs_d, kv_rows)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    diag_hi = tl.minimum(start_n + BLOCK_N, seqlen)
    for g in range(group):
        head = kv_head * group + g
        q_ptrs = _base(Q, seq, head, tok0, stride_qb, stride_qh, stride_qt) + offs_mb[None, :].to(tl.int64) * stride_qt + offs_d[:, None]
        do_ptrs = _base(DO, seq, head, tok0, stride_dob, stride_doh, stride_dot) + offs_mb[:, None].to(tl.int64) * stride_dot + offs_d[None, :]
        dq_ptrs = _base(DQ, seq, head, tok0, stride_dqb, stride_dqh, stride_dqt) + offs_mb[:, None].to(tl.int64) * stride_dqt + offs_d[None, :]
        row0 = seq.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + tok0
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE + row0, DELTA + row0,
                                      stride_qt, stride_dot, stride_dqt, start_n, diag_hi, offs_n, seqlen,
                                      scale, qk_scale, BLOCK_M, True, ATOMIC_DQ, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE + row0, DELTA + row0,
                                      stride_qt, stride_dot, stride_dqt, start_n + BLOCK_N, seqlen, offs_n, seqlen,
                                      scale, qk_scale, BLOCK_M, False, ATOMIC_DQ, DOT_PRECISION)
    _store_rows(DK, seq, kv_head, tok0, stride_dkb, stride_dkh, stride_dkt, offs_n, offs_d, kv_rows, dk * scale)
    _store_rows(DV, seq, kv_head, tok0, stride_dvb, stride_dvh, stride_dvt, offs_n, offs_d, kv_rows, dv)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, offs_m, offs_n,
                       seqlen, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (BLOCK_M, D) over key blocks [lo, hi); k_ptrs and v_ptrs (D, BLOCK_N) at key 0."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = _kv_tile(k_ptrs, stride_kt, start_n, cols, seqlen, 0, 0, 0, BLOCK_N, HEAD_DIM, MASKED, True, False)
        v_t = _kv_tile(v_ptrs, stride_vt, start_n, cols, seqlen, 0, 0, 0, BLOCK_N, HEAD_DIM, MASKED, True, False)
        s = _dot(q, k_t, None, DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(cols[None, :] <= offs_m[:, None], p, 0.0)
        dp = _dot(do, v_t, None, DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k_t.dtype)
        dq = _dot(ds, tl.trans(k_t), dq, DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt, stride_lb, stride_lh,
                        max_seqlen, n_q_heads, group, scale, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (n_seq * Hq, cdiv(max_seqlen, BLOCK_M)): dQ of one query block (the deterministic path)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = tl.program_id(1)
    seq, head, tok0, seqlen = _program(CU_SEQLENS, max_seqlen, n_q_heads, IS_VARLEN)
    if start_m * BLOCK_M >= seqlen:
        return
    kv_head = head // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < seqlen
    q = _load_rows(Q, seq, head, tok0, stride_qb, stride_qh, stride_qt, offs_m, offs_d, rows)
    do = _load_rows(DO, seq, head, tok0, stride_dob, stride_doh, stride_dot, offs_m, offs_d, rows)
    row0 = seq.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + tok0
    lse = tl.load(LSE + row0 + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(DELTA + row0 + offs_m, mask=rows, other=0.0)
    k_ptrs = _base(K, seq, kv_head, tok0, stride_kb, stride_kh, stride_kt) + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]
    v_ptrs = _base(V, seq, kv_head, tok0, stride_vb, stride_vh, stride_vt) + offs_n[None, :].to(tl.int64) * stride_vt + offs_d[:, None]
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    diag = start_m * BLOCK_M
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, diag, offs_m, offs_n,
                            seqlen, qk_scale, BLOCK_N, HEAD_DIM, False, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, diag,
                            tl.minimum(diag + BLOCK_M, seqlen), offs_m, offs_n, seqlen, qk_scale, BLOCK_N, HEAD_DIM,
                            True, DOT_PRECISION)
    _store_rows(DQ, seq, head, tok0, stride_dqb, stride_dqh, stride_dqt, offs_m, offs_d, rows, dq * scale)


def static_configs():
    """Every (kernel, config) of the padded layout the launchers in rlhf_fast/ops/_attention_launch.py can
    pick: every config of every tuning set (the packed layout's are in causal_attention_varlen)."""
    return all_specs(sys.modules[__name__], varlen=False)
