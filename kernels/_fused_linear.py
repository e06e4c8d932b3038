"""Pieces shared by the fused-linear kernels (kernels/fused_linear_logprobs.py,
kernels/fused_linear_kl_divergence.py): the tile config type, dot precisions, the logits tile (x @ w.T + b) / T
computed in registers, the backward's d(logits) products into dx/dw/db, the reduce backward's loop, and
the static-check specs of its passes.
"""
from collections import namedtuple

import triton
import triton.language as tl

from ._dot import _dot
from ._spec import KernelSpec

TileConfig = namedtuple("TileConfig", "block_n block_v block_k num_warps num_stages")
# fp32 dots run in IEEE precision (torch's default fp32 matmul has TF32 off); "tf32" has no effect on
# half inputs.
DOT_PRECISION = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}

# Under TRITON_INTERPRET=1 (the CPU test lane) the launcher uses this tile instead: the interpreter's
# cost is per tile operation, so wide, short tiles walk a 50k vocab in ~50 steps rather than ~400.
# Same kernels, other constexprs; GPU launches never use it (and it is not in static_configs()).
INTERPRET_CONFIG = TileConfig(16, 1024, 32, 4, 1)
# The tiles of the fastest public Triton fused linear-cross-entropy, Apple's cut-cross-entropy
# (cut_cross_entropy/tl_autotune.py, its tuned defaults; read for its configs, no code taken): forward
# 256 tokens x 128 vocab x 32 hidden, 8 warps, 3 stages; backward 128 x 128 x 32, 4 warps, 4 stages. The
# fused-linear kernels' tuning sets add them to their table picks for fp16/bf16.
CCE_FWD = TileConfig(256, 128, 32, 8, 3)
CCE_BWD = TileConfig(128, 128, 32, 4, 4)
# Triton's CPU interpreter (3.9) multiplies bf16 tl.dot operands wrongly; under TRITON_INTERPRET=1 the
# launcher passes DOT_PRECISION="upcast" for bf16 so the interpreter sees fp32 operands. GPUs never do.
INTERPRET_BF16_PRECISION = "upcast"
# The interpreter runs tl.dot as a numpy matmul, whose BLAS on some CPUs (OpenBLAS on AMD EPYC) sums a
# 1024-long fp32 inner dimension with ~3.5x PyTorch's error. The backward's d @ w sums over the vocab
# tile, 1024 wide under INTERPRET_CONFIG (32-128 on GPUs), so that host error alone reached 1.4x the
# parity bound on d(hidden). Under TRITON_INTERPRET=1 the launcher passes this for fp32: _grad_products
# takes d @ w in fp64, rounded once to fp32; all other dots (inner dimension BLOCK_K or BLOCK_N, as on
# GPUs) stay "ieee". GPUs never see it.
INTERPRET_FP32_PRECISION = "ieee_dx64"



@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, row_lim, col_lim, K, stride_x, stride_w, temp, has_bias,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of (x @ w.T + b) / T for x rows row0.. and w rows col0...

    Divided by T (temp), not multiplied by a rounded 1/T: fl(1/T) scales every logit by the same
    relative error, a systematic error that reached ~1.9x PyTorch's d(weight) error (entropy
    gradient, T = 0.7); z / T as PyTorch computes it shares PyTorch's rounding of T.

    Register economy: the tile origin goes into a 64-bit scalar base pointer and in-tile offsets stay
    32-bit; rows/cols past the end (row_lim, col_lim = valid count) re-read the last valid one instead
    of carrying 2-D masks through the pipelined K loop (callers mask those rows/cols afterwards).
    """
    rn = tl.minimum(tl.arange(0, BLOCK_N), row_lim - 1)
    rv = tl.minimum(tl.arange(0, BLOCK_V), col_lim - 1)
    ks = tl.arange(0, BLOCK_K)
    x_base = x_ptr + row0.to(tl.int64) * stride_x
    w_base = w_ptr + col0.to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in range(0, K, BLOCK_K):
        kmask = (k + ks < K)[None, :]
        a = tl.load(x_base + rn[:, None] * stride_x + (k + ks)[None, :], mask=kmask, other=0.0)
        b = tl.load(w_base + rv[:, None] * stride_w + (k + ks)[None, :], mask=kmask, other=0.0)
        acc = _dot(a, tl.trans(b), acc, DOT_PRECISION)
    if has_bias:
        acc += tl.load(b_ptr + col0 + rv).to(tl.float32)[None, :]
    return tl.math.div_rn(acc, temp)  # z / T rounded once, as PyTorch's logits / T


@triton.jit
def _accumulate(ptrs, val, mask, OWNED: tl.constexpr):
    """*ptrs += val: a plain read-modify-write when this program alone writes those addresses (OWNED),
    else an fp32 atomic."""
    if OWNED:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + val, mask=mask)
    else:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")


@triton.jit
def _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, row_lim, col_lim, v_begin, K,
                   stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X: tl.constexpr,
                   NEED_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, OWNED: tl.constexpr):
    """Given d = d(loss)/d(logits) for one (BLOCK_N, BLOCK_V) tile (fp32, zero outside the masks), add
    d @ w[cols] into dx[rows], d.T @ x[rows] into dw[cols - v_begin] and d.sum(0) into db[cols]
    (with _accumulate: OWNED says no other program adds into the same dx/dw/db entries).

    Rows/cols past the end read clamped addresses (as in _logits_tile) and are masked in the adds."""
    rn = tl.arange(0, BLOCK_N)
    rv = tl.arange(0, BLOCK_V)
    rn_c = tl.minimum(rn, row_lim - 1)
    rv_c = tl.minimum(rv, col_lim - 1)
    row_mask = rn < row_lim
    col_mask = rv < col_lim
    ks = tl.arange(0, BLOCK_K)
    dd = d.to(x_ptr.dtype.element_ty)
    if NEED_X:
        w_base = w_ptr + col0.to(tl.int64) * stride_w
        dx_base = dx_ptr + row0.to(tl.int64) * stride_dx
        for k in range(0, K, BLOCK_K):
            kmask = k + ks < K
            w = tl.load(w_base + rv_c[:, None] * stride_w + (k + ks)[None, :], mask=kmask[None, :], other=0.0)
            if DOT_PRECISION == "ieee_dx64":  # interpreter only (INTERPRET_FP32_PRECISION)
                part = tl.dot(dd.to(tl.float64), w.to(tl.float64)).to(tl.float32)
            else:
                part = _dot(dd, w, tl.zeros((BLOCK_N, BLOCK_K), tl.float32), DOT_PRECISION)
            _accumulate(dx_base + rn[:, None] * stride_dx + (k + ks)[None, :], part,
                        row_mask[:, None] & kmask[None, :], OWNED)
    if NEED_W:
        x_base = x_ptr + row0.to(tl.int64) * stride_x
        dw_base = dw_ptr + (col0 - v_begin).to(tl.int64) * stride_dw
        for k in range(0, K, BLOCK_K):
            kmask = k + ks < K
            x = tl.load(x_base + rn_c[:, None] * stride_x + (k + ks)[None, :], mask=kmask[None, :], other=0.0)
            part = _dot(tl.trans(dd), x, tl.zeros((BLOCK_V, BLOCK_K), tl.float32), DOT_PRECISION)
            _accumulate(dw_base + rv[:, None] * stride_dw + (k + ks)[None, :], part,
                        col_mask[:, None] & kmask[None, :], OWNED)
    if need_b:
        _accumulate(db_ptr + col0 + rv, tl.sum(d, 0), col_mask, OWNED)


@triton.jit
def _reduce_steps(N, v_begin, v_end, OWN_COLS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Trip count of a reduce pass: token blocks (OWN_COLS) or vocab tiles of the slice."""
    if OWN_COLS:
        return tl.cdiv(N, BLOCK_N)
    return tl.cdiv(v_end - v_begin, BLOCK_V)


@triton.jit
def _reduce_tile(i, v_begin, OWN_COLS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(row0, col0) of step i of a reduce pass: this program's vocab tile and token block i (OWN_COLS),
    or its token block and vocab tile i."""
    step = tl.cast(i, tl.int32)  # a tensor also where the interpreter hands the loop index over as an int
    if OWN_COLS:
        return step * BLOCK_N, v_begin + tl.program_id(0) * BLOCK_V
    return tl.program_id(0) * BLOCK_N, v_begin + step * BLOCK_V


# (NEED_X, NEED_W) pairs the launcher can request; (False, False) is a call that trains only the bias.
NEED_PAIRS = ((True, True), (True, False), (False, True), (False, False))
# (OWN_COLS, NEED_X, NEED_W) of the reduce kernel's passes: dx alone; dw (+ db); db alone (bias only).
REDUCE_PASSES = ((False, True, False), (True, False, True), (True, False, False))


def tile_constexprs(cfg, dt: str) -> tuple[dict, str]:
    """(constexprs, name tag) of a TileConfig for input dtype `dt`; the tag names every field, so each
    config of a tuning set has its own spec name (.ci/known_spills.json is keyed by it)."""
    cx = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k, "DOT_PRECISION": DOT_PRECISION[dt]}
    tag = f"{dt},BN={cfg.block_n},BV={cfg.block_v},BK={cfg.block_k},w{cfg.num_warps},s{cfg.num_stages}"
    return cx, tag


def reduce_specs(prefix, kernel, bwd_sig, dt, pass_configs):
    """KernelSpecs of a reduce backward kernel's passes (REDUCE_PASSES), each with its pass's tile."""
    specs = []
    for own_cols, need_x, need_w in REDUCE_PASSES:
        cfg = pass_configs[int(own_cols)]
        cx, tag = tile_constexprs(cfg, dt)
        specs.append(KernelSpec(
            f"{prefix}[{tag},COLS={own_cols},X={need_x},W={need_w}]", kernel, {**bwd_sig, "OWN_COLS": "constexpr"},
            {**cx, "OWN_COLS": own_cols, "NEED_X": need_x, "NEED_W": need_w}, cfg.num_warps, cfg.num_stages))
    return specs
