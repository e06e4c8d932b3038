"""Where an attention program's rows live: the @triton.jit helpers of the causal attention kernels
(kernels/causal_attention.py, compiled for packed inputs as kernels/causal_attention_varlen.py).

Every tensor comes as (batch stride, head stride, token stride) with a unit head-dim stride. A padded
batch has every sequence `max_seqlen` long starting at token 0 of its batch row; a packed batch
(IS_VARLEN) passes batch strides 0 and CU_SEQLENS, from which a program reads its sequence's first
token and length.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _seq_bounds(CU_SEQLENS, seq, max_seqlen, IS_VARLEN: tl.constexpr):
    """(first token as int64, length) of sequence `seq`."""
    if IS_VARLEN:
        tok0 = tl.load(CU_SEQLENS + seq)
        seqlen = tl.load(CU_SEQLENS + seq + 1) - tok0
    else:
        tok0 = seq * 0
        seqlen = max_seqlen + seq * 0
    return tok0.to(tl.int64), seqlen


@triton.jit
def _program(CU_SEQLENS, max_seqlen, n_heads, IS_VARLEN: tl.constexpr):
    """(sequence, head, first token, length) of this program: axis 0 of the grid is n_seq * n_heads (CUDA
    caps axes 1 and 2 at 65535; the block index goes on axis 1)."""
    pid = tl.program_id(0)
    seq = pid // n_heads
    tok0, seqlen = _seq_bounds(CU_SEQLENS, seq, max_seqlen, IS_VARLEN)
    return seq, pid % n_heads, tok0, seqlen


@triton.jit
def _base(PTR, seq, head, tok0, stride_b, stride_h, stride_t):
    """Pointer to token 0, dim 0 of (seq, head). Every offset is int64 (token offsets too: a (T, B, H, D)
    layout passes 2^31 elements at T * B * H * D, e.g. T = 32k with B=16, H=32, D=128); the static check
    asserts that no stride argument enters a 32-bit multiply."""
    return PTR + seq.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h + tok0 * stride_t


@triton.jit
def _load_rows(PTR, seq, head, tok0, stride_b, stride_h, stride_t, offs, offs_d, rows):
    """Rows `offs` (len(offs), D) of (seq, head); rows where `rows` is False read as 0."""
    ptrs = _base(PTR, seq, head, tok0, stride_b, stride_h, stride_t) + offs[:, None].to(tl.int64) * stride_t + offs_d[None, :]
    return tl.load(ptrs, mask=rows[:, None], other=0.0)


@triton.jit
def _store_rows(PTR, seq, head, tok0, stride_b, stride_h, stride_t, offs, offs_d, rows, value):
    """Store `value` (len(offs), D) into rows `offs` of (seq, head), in PTR's dtype, where `rows`."""
    ptrs = _base(PTR, seq, head, tok0, stride_b, stride_h, stride_t) + offs[:, None].to(tl.int64) * stride_t + offs_d[None, :]
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=rows[:, None])
