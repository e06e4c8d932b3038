"""fused_linear_logprobs: lm_head matmul + per-token logprob/entropy without materializing (N, V) logits."""
from __future__ import annotations

import os
from collections import namedtuple

import torch

from .. import _backend
from ..reference import fused_linear_logprobs as ref
from ..reference import token_logprobs as ref_tl
from ._launch import on_first_tensor_device

_OP = "fused_linear_logprobs"
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Rows of the fp32 d(weight) slice the Triton backward accumulates into when weight is not fp32:
# the slice holds about this many elements (256 MiB), so extra memory does not grow with V.
DW_SLICE_ELEMENTS = 1 << 26


def _contig(t):
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


def tile_config(dtype: torch.dtype, table: dict | None = None):
    """(kernel module, TileConfig, dot precision) for a Triton fused-linear kernel.

    table: the kernel module's per-dtype config table (default: fused_linear_logprobs.CONFIGS).
    """
    from ..kernels import fused_linear_logprobs as k
    name = _TRITON_DTYPES[dtype]
    if _backend.interpret_mode():
        interpret = {"bf16": k.INTERPRET_BF16_PRECISION, "fp32": k.INTERPRET_FP32_PRECISION}
        prec = interpret.get(name, k.DOT_PRECISION[name])
        return k, k.INTERPRET_CONFIG, prec
    return k, (table or k.CONFIGS)[name], k.DOT_PRECISION[name]


def reduce_tile_configs(dtype: torch.dtype, table: dict) -> tuple:
    """(dx pass, dw pass) TileConfigs of a reduce backward kernel, from its per-dtype table
    (fused_linear_logprobs.REDUCE_CONFIGS, kl_divergence.FUSED_REDUCE_CONFIGS)."""
    from ..kernels import fused_linear_logprobs as k
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


def run_backward_slices(launch, hidden, weight, bias, need, cfg, reduce_cfgs):
    """Call launch(d_x32, d_w_slice32, d_b32, v_begin, v_end, backward_pass) for each pass of each
    vocab slice (backward_passes, in backward_mode()); return the grads.

    fp32 weights take one slice that is the result itself; other dtypes accumulate each slice of
    d(weight) in a bounded fp32 buffer and cast it into the result.
    """
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
    mode = backward_mode()
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


@on_first_tensor_device
def _triton_forward(hidden, weight, bias, targets, temperature, want_entropy, ignore_index):
    k, cfg, prec = tile_config(hidden.dtype)
    n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    if n == 0:
        e = torch.empty(0, dtype=torch.float32, device=dev)
        return e, e.clone(), torch.empty(2, 0, dtype=torch.float32, device=dev)
    tiles_per_split, splits = split_plan(n, vocab, cfg, dev)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=dev)
    k._fused_linear_logprobs_fwd_kernel[(cdiv(n, cfg.block_n), splits)](
        hidden, weight, bias if bias is not None else hidden, targets, part, n, vocab, hidden.shape[1],
        hidden.stride(0), weight.stride(0), temperature, ignore_index, tiles_per_split,
        int(bias is not None), int(want_entropy), **tile_kwargs(cfg, prec))
    m, s, sy, zt = part.unbind(0)
    big_m = m.max(0).values
    scale = torch.exp(m - big_m)
    total = (s * scale).sum(0)
    log_total = torch.log(total)
    valid = targets != ignore_index
    logp = torch.where(valid, (zt.sum(0) - big_m) - log_total, 0.0)
    entropy = log_total.new_empty(0)
    if want_entropy:
        total_y = (scale * (sy + (m - big_m) * s)).sum(0)  # sum exp(z - M) (z - M) over all splits
        entropy = torch.where(valid, log_total - total_y / total, 0.0)
    return logp, entropy, torch.stack([big_m, log_total])


@on_first_tensor_device
def _triton_backward(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature,
                     ignore_index, need):
    k, cfg, prec = tile_config(hidden.dtype)
    have_ent = grad_entropy is not None

    def launch(d_x, d_w, d_b, v_begin, v_end, bp):
        kernel, extra = pass_kernel(bp, k._fused_linear_logprobs_bwd_kernel,
                                    k._fused_linear_logprobs_bwd_reduce_kernel)
        kernel[bp.grid](
            hidden, weight, bias if bias is not None else hidden, targets, stats, entropy if have_ent else stats,
            grad_logp, grad_entropy if have_ent else grad_logp, d_x, d_w, d_b, hidden.shape[0], weight.shape[0],
            hidden.shape[1], v_begin, v_end, hidden.stride(0), weight.stride(0), hidden.shape[1],
            weight.shape[1], temperature, ignore_index, int(bias is not None), int(have_ent),
            int(bp.need_b), NEED_X=bp.need_x, NEED_W=bp.need_w, **extra, **tile_kwargs(bp.cfg, prec))

    return run_backward_slices(launch, hidden, weight, bias, need, cfg,
                               reduce_tile_configs(hidden.dtype, k.REDUCE_CONFIGS))


@torch.library.custom_op("rlhf_fast::fused_linear_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            temperature: float, want_entropy: bool, ignore_index: int, chunk_size: int,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref_tl.check_targets_in_range(targets, weight.shape[0], ignore_index)
    chosen = _backend.resolve(_OP, backend, hidden.device, gpu="triton")
    if chosen == "triton":
        return _triton_forward(hidden.contiguous(), weight.contiguous(), _contig(bias), targets.long().contiguous(),
                               temperature, want_entropy, ignore_index)
    return ref.forward(hidden, weight, bias, targets, temperature, want_entropy, ignore_index,
                       chunk_size or None)


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_size, backend):
    n = hidden.shape[0]
    new = lambda *m: hidden.new_empty(m, dtype=torch.float32)  # noqa: E731
    return new(n), new(n if want_entropy else 0), new(2, n)


@torch.library.custom_op("rlhf_fast::fused_linear_logprobs_bwd", mutates_args=())
def _bwd_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, stats: torch.Tensor,
            entropy: torch.Tensor, temperature: float, ignore_index: int, chunk_size: int,
            need: list[bool], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = _backend.resolve(_OP, backend, hidden.device, gpu="triton")
    if chosen == "triton":
        grads = _triton_backward(grad_logp.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
                                 hidden.contiguous(), weight.contiguous(), _contig(bias), targets.long().contiguous(),
                                 stats, entropy, temperature, ignore_index, need)
    else:
        grads = ref.backward(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature,
                             ignore_index, chunk_size or None, need)
    return grads_out(grads, hidden)


@_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, stats, entropy, temperature, ignore_index,
      chunk_size, need, backend):
    return fake_grads(hidden, weight, bias, need)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_size, backend = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy)
    ctx.args = (temperature, want_entropy, ignore_index, chunk_size, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, bias, targets, stats, entropy = ctx.saved_tensors
    temperature, want_entropy, ignore_index, chunk_size, backend = ctx.args
    need = needed_grads(ctx, bias)
    if grad_logp is None:
        grad_logp = torch.zeros_like(stats[0])
    d_h, d_w, d_b = _bwd_op(grad_logp, grad_entropy if want_entropy else None, hidden, weight, bias, targets,
                            stats, entropy, temperature, ignore_index, chunk_size, need, backend)
    return (d_h if need[0] else None, d_w if need[1] else None, d_b if need[2] else None,
            None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100,
                          chunk_size: int | None = None, backend: str = "auto"):
    """Per-token log pi(target) (and entropy) of ``hidden @ weight.T + bias``, never holding (N, V) logits.

    Args:
        hidden: (N, H) float32, bfloat16 or float16 (the final hidden states, flattened over batch/time).
        weight: (V, H), same dtype (the lm_head weight). bias: optional (V,), same dtype.
        targets: (N,) int64 (or int32) in [0, V), or ``ignore_index``.
        temperature: > 0; the distribution is softmax(logits / temperature).
        return_entropy: also return the entropy of that distribution.
        ignore_index: targets equal to it give logp = entropy = 0 and no gradient.
        chunk_size: tokens per chunk for the reference backend (default: so that one (chunk, V) fp32
            block is 16 MiB). The Triton backend tiles on its own and ignores it.
        backend: "auto" | "triton" | "reference".

    Returns:
        logp (N,) float32, or (logp, entropy). Equal to
        ``token_logprobs(hidden @ weight.T + bias, targets, temperature=...)``, i.e.::

            z = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
            logp = z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    Differentiable in hidden, weight and bias. The backward recomputes logits block by block (one more
    matmul than the naive path) and accumulates d(weight) in fp32.

    Backends: "triton" tiles the matmul with tl.dot, keeps each (BLOCK_N, BLOCK_V) logit tile on chip
    with an online log-sum-exp, and in the backward adds d(hidden) and d(weight) tile products with
    fp32 atomics, or without atomics (bitwise reproducible, one more matmul) under
    ``torch.use_deterministic_algorithms(True)`` or ``RLHF_FAST_FUSED_LINEAR_BWD=reduce``;
    "reference" is chunked PyTorch (peak extra memory ~ chunk_size x V x 4 bytes, plus a (V, H) fp32
    d(weight) accumulator when weight is not fp32). "auto": Triton on CUDA, reference on CPU.
    """
    ref.validate(hidden, weight, targets, bias, temperature, ignore_index, chunk_size)
    _backend.check_backend_arg(backend)
    logp, entropy, _ = _fwd_op(hidden, weight, bias, targets, float(temperature), bool(return_entropy),
                               ignore_index, chunk_size or 0, backend)
    return (logp, entropy) if return_entropy else logp
