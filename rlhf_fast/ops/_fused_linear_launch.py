"""Host-side pieces every fused-linear op's Triton launcher shares (fused_linear_logprobs,
fused_linear_kl_divergence): tile choice, the vocab split plan, the backward's passes (atomic or
reduce) over bounded d(weight) slices, and the custom ops' gradient plumbing.
"""
from __future__ import annotations

import os
from collections import namedtuple

import torch

from .. import _backend
from . import _autotune

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Rows of the fp32 d(weight) slice the Triton backward accumulates into when weight is not fp32:
# the slice holds about this many elements (256 MiB), so extra memory does not grow with V.
DW_SLICE_ELEMENTS = 1 << 26


def contig(t):
    """t.contiguous(), None passing through (optional bias)."""
    return None if t is None else t.contiguous()


def _empty(like):
    """Stands in for a gradient that was not asked for (custom ops cannot return None)."""
    return like.new_empty(0)


def needed_grads(ctx, bias) -> list[bool]:
    """Which of (hidden, weight, bias), the op's first three inputs, autograd wants a gradient for."""
    need = [bool(x) for x in ctx.needs_input_grad[:3]]
    need[2] = need[2] and bias is not None
    return need


def grads_out(grads, like) -> tuple:
    """(d hidden, d weight, d bias) as a backward custom op returns them: empty tensors for None."""
    return tuple(g if g is not None else _empty(like) for g in grads)


def fake_grads(hidden, weight, bias, need) -> tuple:
    """register_fake of a backward custom op: grads_out's shapes for these inputs and `need`."""
    has_b = bias is not None and need[2]
    return (torch.empty_like(hidden) if need[0] else _empty(hidden),
            torch.empty_like(weight) if need[1] else _empty(hidden),
            torch.empty_like(bias) if has_b else _empty(hidden))


def tile_config(dtype: torch.dtype, table: dict):
    """(TileConfig, dot precision) for a Triton fused-linear kernel.

    table: the kernel module's per-dtype config table (e.g. kernels.fused_linear_logprobs.CONFIGS); under
    TRITON_INTERPRET=1 the interpreter's tile and precisions instead.
    """
    from ..kernels import _fused_linear as k
    name = _TRITON_DTYPES[dtype]
    if _backend.interpret_mode():
        interpret = {"bf16": k.INTERPRET_BF16_PRECISION, "fp32": k.INTERPRET_FP32_PRECISION}
        prec = interpret.get(name, k.DOT_PRECISION[name])
        return k.INTERPRET_CONFIG, prec
    return table[name], k.DOT_PRECISION[name]


def tuned_tile(kernel: str, sets: dict, hidden: torch.Tensor, vocab: int, run):
    """The TileConfig of a kernel with per-dtype tuning sets (e.g. kernels.fused_linear_logprobs.
    FWD_TUNING_SETS): the winner of the set for this (dtype, N class, V, H) where timing happens
    (rlhf_fast/ops/_autotune.py; `run(cfg)` is one whole launch), else tile_config's pick."""
    cfg, _ = tile_config(hidden.dtype, {name: configs[0] for name, configs in sets.items()})
    if _backend.interpret_mode():
        return cfg
    n, h = hidden.shape
    regime = f"{_TRITON_DTYPES[hidden.dtype]},N<={_autotune.seqlen_bucket(n)},V={vocab},H={h}"
    return _autotune.choose(kernel, regime, sets[_TRITON_DTYPES[hidden.dtype]], run, hidden.device)


def reduce_tile_configs(dtype: torch.dtype, table: dict) -> tuple:
    """(dx pass, dw pass) TileConfigs of a reduce backward kernel, from its per-dtype table
    (fused_linear_logprobs.REDUCE_CONFIGS, fused_linear_kl_divergence.FUSED_REDUCE_CONFIGS)."""
    from ..kernels import _fused_linear as k
    if _backend.interpret_mode():
        return k.INTERPRET_CONFIG, k.INTERPRET_CONFIG
    return table[_TRITON_DTYPES[dtype]]


def tile_kwargs(cfg, prec: str) -> dict:
    """A TileConfig and dot precision as Triton launch keywords (constexprs, warps, stages)."""
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, DOT_PRECISION=prec,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def split_plan(n: int, vocab: int, cfg, device) -> tuple[int, int]:
    """(tiles_per_split, splits): split the vocab so that about 4 programs per SM are in flight."""
    n_tiles = cdiv(vocab, cfg.block_v)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want_splits = max(1, min(n_tiles, cdiv(4 * sms, cdiv(n, cfg.block_n))))
    tiles_per_split = cdiv(n_tiles, want_splits)
    return tiles_per_split, cdiv(n_tiles, tiles_per_split)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# How the Triton backward sums d(hidden) and d(weight) (kernels/fused_linear_logprobs.py): "atomic" (fp32
# atomics, most parallel, sum order not fixed) or "reduce" (no atomics, bitwise reproducible; one more
# logits matmul and as many fp32 read-modify-writes as the atomic kernel's atomics, so not expected
# to be faster: not the default). "auto": reduce when torch.are_deterministic_algorithms_enabled().
BWD_ENV = "RLHF_FAST_FUSED_LINEAR_BWD"
BWD_MODES = ("auto", "atomic", "reduce")
BackwardPass = namedtuple("BackwardPass", "grid own_cols need_x need_w need_b cfg")


def backward_mode() -> str:
    """"atomic" or "reduce" for this call, from $RLHF_FAST_FUSED_LINEAR_BWD (default "auto") and torch's
    deterministic mode, which always gets "reduce" (atomics have no fixed order)."""
    mode = os.environ.get(BWD_ENV, "auto")
    if mode not in BWD_MODES:
        raise ValueError(f"{BWD_ENV} must be one of {', '.join(BWD_MODES)}, got {mode!r}")
    if torch.are_deterministic_algorithms_enabled():
        return "reduce"
    return "atomic" if mode == "auto" else mode


def backward_passes(n: int, v_begin: int, v_end: int, cfg, reduce_cfgs, need, mode: str) -> list[BackwardPass]:
    """The launches of one vocab slice's backward: one atomic launch over (token blocks, vocab tiles)
    with tile cfg, or the reduce kernel's dx pass over token blocks and dw/db pass over vocab tiles
    (own_cols), with the tiles reduce_cfgs = (dx pass, dw pass)."""
    need_x, need_w, need_b = (bool(x) for x in need)
    if mode == "atomic":
        grid = (cdiv(n, cfg.block_n), cdiv(v_end - v_begin, cfg.block_v))
        return [BackwardPass(grid, None, need_x, need_w, need_b, cfg)]
    dx_cfg, dw_cfg = reduce_cfgs
    passes = []
    if need_x:
        passes.append(BackwardPass((cdiv(n, dx_cfg.block_n),), False, True, False, False, dx_cfg))
    if need_w or need_b:
        passes.append(BackwardPass((cdiv(v_end - v_begin, dw_cfg.block_v),), True, False, need_w, need_b, dw_cfg))
    return passes


def pass_kernel(bp: BackwardPass, atomic_kernel, reduce_kernel):
    """(kernel, extra constexprs) that run backward pass bp."""
    if bp.own_cols is None:
        return atomic_kernel, {}
    return reduce_kernel, {"OWN_COLS": bp.own_cols}


def grad_buffers(hidden, weight, bias, need):
    """fp32 accumulators the backward kernels add into; fp32 inputs accumulate straight into the result."""
    f32 = torch.float32
    d_x = torch.zeros(hidden.shape, dtype=f32, device=hidden.device) if need[0] else None
    d_b = torch.zeros(weight.shape[0], dtype=f32, device=weight.device) if need[2] else None
    d_w = None
    if need[1]:
        d_w = torch.zeros(weight.shape, dtype=f32, device=weight.device) if weight.dtype == f32 else \
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return d_x, d_w, d_b


def run_backward_slices(launch, hidden, weight, bias, need, cfg, reduce_cfgs, tuning=None):
    """Call launch(d_x32, d_w_slice32, d_b32, v_begin, v_end, backward_pass) for each pass of each
    vocab slice (backward_passes, in backward_mode()); return the grads.

    fp32 weights take one slice that is the result itself; other dtypes accumulate each slice of
    d(weight) in a bounded fp32 buffer and cast it into the result.

    tuning: (kernel name, per-dtype tuning sets of the atomic tile, of the reduce (dx, dw) tile pairs),
    e.g. ("fused_linear_logprobs_bwd", k.BWD_TUNING_SETS, k.REDUCE_TUNING_SETS): the mode's set is timed
    (rlhf_fast/ops/_autotune.py) and its winner replaces cfg or reduce_cfgs. Each timed run allocates
    its own accumulators, so the atomics of one run never add into another's.
    """
    mode = backward_mode()
    if tuning is None or _backend.interpret_mode() or hidden.shape[0] == 0:
        return _backward_slices(launch, hidden, weight, bias, need, cfg, reduce_cfgs, mode)
    kernel, atomic_sets, reduce_sets = tuning
    name = _TRITON_DTYPES[hidden.dtype]
    regime = f"{name},N<={_autotune.seqlen_bucket(hidden.shape[0])},V={weight.shape[0]},H={hidden.shape[1]}," \
             f"need={''.join(str(int(x)) for x in need)}"
    if mode == "atomic":
        def run(c):
            return _backward_slices(launch, hidden, weight, bias, need, c, reduce_cfgs, mode)
        return run(_autotune.choose(kernel, regime, atomic_sets[name], run, hidden.device))

    def run_reduce(pair):
        return _backward_slices(launch, hidden, weight, bias, need, cfg, pair, mode)
    return run_reduce(_autotune.choose(kernel + "_reduce", regime, reduce_sets[name], run_reduce, hidden.device))


def _backward_slices(launch, hidden, weight, bias, need, cfg, reduce_cfgs, mode):
    n, vocab = hidden.shape[0], weight.shape[0]
    if n == 0:  # no tokens: zero gradients, and no empty grid to launch
        return (torch.zeros_like(hidden) if need[0] else None, torch.zeros_like(weight) if need[1] else None,
                torch.zeros_like(bias) if need[2] else None)
    d_x, d_w, d_b = grad_buffers(hidden, weight, bias, need)
    if weight.dtype == torch.float32 or not need[1]:
        slice_rows = vocab
    else:
        slice_rows = max(cfg.block_v, DW_SLICE_ELEMENTS // max(weight.shape[1], 1) // cfg.block_v * cfg.block_v)
    dummy = hidden.new_empty(1, dtype=torch.float32)
    w_buf = None
    for v_begin in range(0, vocab, slice_rows):
        v_end = min(vocab, v_begin + slice_rows)
        if need[1] and weight.dtype != torch.float32:
            w_buf = torch.zeros(v_end - v_begin, weight.shape[1], dtype=torch.float32, device=weight.device) \
                if w_buf is None or w_buf.shape[0] != v_end - v_begin else w_buf.zero_()
        w_slice = d_w if weight.dtype == torch.float32 else w_buf
        for bp in backward_passes(n, v_begin, v_end, cfg, reduce_cfgs, need, mode):
            launch(d_x if d_x is not None else dummy, w_slice if w_slice is not None else dummy,
                   d_b if d_b is not None else dummy, v_begin, v_end, bp)
        if need[1] and weight.dtype != torch.float32:
            d_w[v_begin:v_end] = w_buf
    return (None if d_x is None else d_x.to(hidden.dtype), d_w,
            None if d_b is None else d_b.to(bias.dtype))
