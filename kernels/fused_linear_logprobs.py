"""Triton kernels for fused_linear_logprobs: lm_head matmul tiles (tl.dot) fused with the softmax statistics.

A program owns BLOCK_N tokens and a run of BLOCK_V-wide vocab tiles. For each tile it computes the
(BLOCK_N, BLOCK_V) logits in registers (K loop over the hidden size), folds them into per-row online
(max, sum-exp, sum-exp*(z - max), target logit), and drops them: the logits never reach global memory.
Vocab splits (grid axis 1) write partial statistics that the launcher combines, so small N still fills
the GPU. The backward recomputes each logit tile, forms d(logits) on chip and adds its products into
fp32 d(hidden) and d(weight) buffers with atomics.
"""
from collections import namedtuple

import triton
import triton.language as tl

from ._online_softmax import _online_lse_step, _rebased_sum
from ._spec import KernelSpec

TileConfig = namedtuple("TileConfig", "block_n block_v block_k num_warps num_stages")
# One config per input dtype; the launcher uses exactly this table. fp32 dots run in IEEE precision
# (torch's default fp32 matmul has TF32 off), i.e. on FMA units with the tile in registers, so fp32
# takes a smaller tile than the tensor-core dtypes to stay free of spills.
CONFIGS = {
    "fp32": TileConfig(32, 64, 32, 4, 2),
    "bf16": TileConfig(64, 128, 64, 8, 3),
    "fp16": TileConfig(64, 128, 64, 8, 3),
}
DOT_PRECISION = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}
# Under TRITON_INTERPRET=1 (the CPU test lane) the launcher uses this tile instead: the interpreter's
# cost is per tile operation, so wide, short tiles walk a 50k vocab in ~50 steps rather than ~400.
# Same kernels, other constexprs; GPU launches never use it (and it is not in static_configs()).
INTERPRET_CONFIG = TileConfig(16, 1024, 32, 4, 1)
# Triton's CPU interpreter (3.9) multiplies bf16 tl.dot operands wrongly; under TRITON_INTERPRET=1 the
# launcher passes DOT_PRECISION="upcast" for bf16 so the interpreter sees fp32 operands. GPUs never do.
INTERPRET_BF16_PRECISION = "upcast"


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, row_lim, col_lim, K, stride_x, stride_w, inv_t, has_bias,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of (x @ w.T + b) / T for x rows row0.. and w rows col0...

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
    return acc * inv_t


@triton.jit
def _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, row_lim, col_lim, v_begin, K,
                   stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X: tl.constexpr,
                   NEED_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Given d = d(loss)/d(logits) for one (BLOCK_N, BLOCK_V) tile (fp32, zero outside the masks), add
    d @ w[cols] into dx[rows], d.T @ x[rows] into dw[cols - v_begin] and d.sum(0) into db[cols].

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
            part = _dot(dd, w, tl.zeros((BLOCK_N, BLOCK_K), tl.float32), DOT_PRECISION)
            tl.atomic_add(dx_base + rn[:, None] * stride_dx + (k + ks)[None, :], part,
                          mask=row_mask[:, None] & kmask[None, :], sem="relaxed")
    if NEED_W:
        x_base = x_ptr + row0.to(tl.int64) * stride_x
        dw_base = dw_ptr + (col0 - v_begin).to(tl.int64) * stride_dw
        for k in range(0, K, BLOCK_K):
            kmask = k + ks < K
            x = tl.load(x_base + rn_c[:, None] * stride_x + (k + ks)[None, :], mask=kmask[None, :], other=0.0)
            part = _dot(tl.trans(dd), x, tl.zeros((BLOCK_V, BLOCK_K), tl.float32), DOT_PRECISION)
            tl.atomic_add(dw_base + rv[:, None] * stride_dw + (k + ks)[None, :], part,
                          mask=col_mask[:, None] & kmask[None, :], sem="relaxed")
    if need_b:
        tl.atomic_add(db_ptr + col0 + rv, tl.sum(d, 0), mask=col_mask, sem="relaxed")


@triton.jit
def _fused_linear_logprobs_fwd_kernel(x_ptr, w_ptr, b_ptr, t_ptr, part_ptr, N, V, H, stride_x, stride_w, inv_t,
                                      ignore_index, tiles_per_split, has_bias, want_entropy,
                                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                                      DOT_PRECISION: tl.constexpr):
    """part (4, splits, N) fp32 <- per split: m = max z, sum exp(z - m), sum exp(z - m) (z - m), z[target]."""
    split = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    t = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    sy = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    # A fixed trip count (not a bound derived from program_id): the launcher makes every split start
    # inside the vocab, so the first tile has a finite max and later all-masked tiles change nothing.
    for i in range(0, tiles_per_split):
        col0 = v_begin + i * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, N - row0, V - col0, H, stride_x, stride_w, inv_t,
                         has_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        z = tl.where((cols < V)[None, :], z, float("-inf"))  # no softmax mass past the vocab
        m_new, s_new, alpha, y, e = _online_lse_step(z, m, s, 1)
        if want_entropy:
            # sy = sum exp(z - m) (z - m) (entropy = log s - sy / s)
            sy = _rebased_sum(sy, s, alpha, m - m_new, e * y, 1)
        zt += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), 1)
        m, s = m_new, s_new
    n_splits = tl.num_programs(1)
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_mask)
    tl.store(out + n_splits * N, s, mask=row_mask)
    tl.store(out + 2 * n_splits * N, sy, mask=row_mask)
    tl.store(out + 3 * n_splits * N, zt, mask=row_mask)


@triton.jit
def _fused_linear_logprobs_bwd_kernel(x_ptr, w_ptr, b_ptr, t_ptr, stats_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                                      dx_ptr, dw_ptr, db_ptr, N, V, H, v_begin, v_end, stride_x, stride_w,
                                      stride_dx, stride_dw, inv_t, ignore_index, has_bias, have_entropy, need_b,
                                      NEED_X: tl.constexpr, NEED_W: tl.constexpr, BLOCK_N: tl.constexpr,
                                      BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                                      DOT_PRECISION: tl.constexpr):
    """Vocab slice [v_begin, v_end): d(logits) = (g_logp (onehot - p) - g_H p (log p + H)) / T per tile."""
    row0 = tl.program_id(0) * BLOCK_N
    col0 = v_begin + tl.program_id(1) * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_N)
    cols = col0 + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < v_end
    z = _logits_tile(x_ptr, w_ptr, b_ptr, row0, col0, N - row0, v_end - col0, H, stride_x, stride_w, inv_t,
                     has_bias, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    t = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (t != ignore_index)
    g_logp = tl.where(valid, tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0), 0.0)
    m = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(stats_ptr + N + rows, mask=row_mask, other=0.0)
    logp = (z - m[:, None]) - log_s[:, None]
    p = tl.exp(logp)
    coef = g_logp[:, None] + tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if have_entropy:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0), 0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        coef += g_ent[:, None] * (logp + ent[:, None])
    # -inf logit (p = 0): zero gradient, not 0 * inf; NaN rows (NaN stats) stay NaN as in the reference
    d = tl.where(logp == float("-inf"), 0.0, -p * coef)
    d = tl.where(cols[None, :] == t[:, None], d + g_logp[:, None], d) * inv_t
    d = tl.where(row_mask[:, None] & col_mask[None, :], d, 0.0)
    _grad_products(d, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, row0, col0, N - row0, v_end - col0, v_begin, H,
                   stride_x, stride_w, stride_dx, stride_dw, need_b, NEED_X, NEED_W, BLOCK_N, BLOCK_V, BLOCK_K,
                   DOT_PRECISION)


# (NEED_X, NEED_W) pairs the launcher can request; (False, False) is a call that trains only the bias.
NEED_PAIRS = ((True, True), (True, False), (False, True), (False, False))


def static_configs():
    specs = []
    for dt, cfg in CONFIGS.items():
        cx = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k,
              "DOT_PRECISION": DOT_PRECISION[dt]}
        tag = f"{dt},BN={cfg.block_n},BV={cfg.block_v},BK={cfg.block_k}"
        specs.append(KernelSpec(
            f"fused_linear_logprobs_fwd[{tag}]", _fused_linear_logprobs_fwd_kernel,
            {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "t_ptr": "*i64", "part_ptr": "*fp32",
             "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32", "inv_t": "fp32",
             "ignore_index": "i32", "tiles_per_split": "i32", "has_bias": "i32", "want_entropy": "i32",
             **{k: "constexpr" for k in cx}}, cx, cfg.num_warps, cfg.num_stages))
        for need_x, need_w in NEED_PAIRS:
            specs.append(KernelSpec(
                f"fused_linear_logprobs_bwd[{tag},X={need_x},W={need_w}]", _fused_linear_logprobs_bwd_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "t_ptr": "*i64", "stats_ptr": "*fp32",
                 "ent_ptr": "*fp32", "g_logp_ptr": "*fp32", "g_ent_ptr": "*fp32", "dx_ptr": "*fp32",
                 "dw_ptr": "*fp32", "db_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", "v_begin": "i32",
                 "v_end": "i32", "stride_x": "i32", "stride_w": "i32", "stride_dx": "i32", "stride_dw": "i32",
                 "inv_t": "fp32", "ignore_index": "i32", "has_bias": "i32", "have_entropy": "i32",
                 "need_b": "i32", "NEED_X": "constexpr", "NEED_W": "constexpr", **{k: "constexpr" for k in cx}},
                {**cx, "NEED_X": need_x, "NEED_W": need_w}, cfg.num_warps, cfg.num_stages))
    return specs
