"""Input checks and Triton launchers shared by the attention ops (causal_attention, causal_attention_varlen;
decode_attention's launcher, in its own op file, takes the checks and layout helpers from here).

Each launch times its stage's tuning set on the first call of a regime (rlhf_fast/ops/_autotune.py,
the sets in kernels/_attention_configs.py) and launches the winner; CPU tensors and
RLHF_FAST_AUTOTUNE=0 launch the table pick.

Padded (B, H, T, D) and packed (total, H, D) tensors reach the same kernels: every tensor is described
by (batch stride, head stride, token stride) with a unit head-dim stride, and a packed batch passes
`cu_seqlens` so each program finds its sequence's first token and length (batch stride 0). The
log-sum-exp is kept in fp32 and in log2 units (the kernels work with exp2), laid out (B, Hq, T)
padded or (Hq, total) packed.
"""
from __future__ import annotations

import math
import os

import torch

from rlhf_fast.kernels import _attention_configs as configs

from .. import _validate
from . import _autotune
from ._launch import cuda_grid, host_sync_forbidden, on_device

HEAD_DIMS = (16, 32, 64, 128, 256)
LOG2E = 1.4426950408889634
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------------- checks
def check_qkv(q, k, v, *, token_dim: int, ndim: int) -> None:
    """Shape/dtype/device checks common to the padded (ndim 4) and packed (ndim 3) layouts.

    token_dim is the axis of the sequence; the head axis is 1 in both layouts.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.check_tensor(name, t, ndim=ndim, dtypes=_validate.FLOAT_DTYPES)
    _validate.check_same_device(q=q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k and v must have q's dtype {q.dtype}, got k {k.dtype} and v {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must have q's batch size {q.shape[0]} at dim 0, got shape {tuple(k.shape)}")
    if k.shape[token_dim] != q.shape[token_dim]:
        raise ValueError(f"k and v must have q's sequence length {q.shape[token_dim]} at dim {token_dim}, "
                         f"got shape {tuple(k.shape)}")
    check_heads_and_dim(q, k)


def check_heads_and_dim(q, k, *, k_name: str = "k") -> None:
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"q head dim (last dim) must be one of {HEAD_DIMS}, got {d}")
    if k.shape[-1] != d:
        raise ValueError(f"{k_name} must have q's head dim {d} as last dim, got shape {tuple(k.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of {k_name} heads ({hkv}) at dim 1 (MHA, GQA, MQA)")


def default_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def check_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> int | None:
    """Value checks on cu_seqlens; returns cu_seqlens[-1]. Reads it on the host (one sync), so it runs
    inside the custom op, where torch.compile does not trace it.

    A tensor that passed is marked with its version counter: the same unmodified tensor checked again
    with the same max_seqlen and total (every layer of a model gets the batch's cu_seqlens) costs no
    sync. An in-place change bumps the version and is checked anew. While a host sync is forbidden
    (CUDA-graph capture, where static-input copies bump the version; torch.compile tracing) nothing is
    read and None is returned: the values are then trusted as documented.
    """
    key = (cu_seqlens._version, max_seqlen, total)
    passed = getattr(cu_seqlens, "_rlhf_fast_checked", None)
    if passed is not None and passed[0] == key:
        return passed[1]
    if host_sync_forbidden():
        return None
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if bounds[-1] > total:
        raise ValueError(f"cu_seqlens[-1] ({bounds[-1]}) must be <= q.shape[0] ({total})")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) must be >= the longest sequence ({max(lengths)})")
    cu_seqlens._rlhf_fast_checked = (key, bounds[-1])
    return bounds[-1]


# ----------------------------------------------------------------------------------------------- layout
def unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/token strides but need a unit head-dim stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def empty_like_unit_last(t: torch.Tensor) -> torch.Tensor:
    """An output laid out like `t` (a (B, T, H, D) view stays one) with a unit head-dim stride.

    The fake (meta) functions allocate their outputs with this too, so fake and real strides agree.
    """
    out = torch.empty_like(t)
    return out if out.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def bht_strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of a (B, H, T, D) or packed (total, H, D) tensor."""
    if packed:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def arch_of(device: torch.device) -> int:
    """Config table to use: 90 on Hopper and datacenter Blackwell (sm_90/sm_100, 227 KB of shared memory
    per block), 80 elsewhere (Ampere, Ada, consumer Blackwell: <= 163 KB) and in the CPU interpreter."""
    if device.type != "cuda":
        return 80
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major in (9, 10) else 80


def table_dtype(dtype: torch.dtype, device: torch.device) -> str:
    """Dtype row of the config tables. The interpreter runs fp32 on the half-precision tiles: the small
    fp32 tiles exist for GPU registers (IEEE dots), and larger tiles keep the CPU test lane fast."""
    if device.type != "cuda" and dtype == torch.float32:
        return "bf16"
    return DTYPE_NAMES[dtype]


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 inputs get true fp32 products (no TF32), matching torch's fp32 matmul; half inputs ignore it.

    "upcast" (bf16 on CPU tensors) works around Triton's interpreter, which cannot multiply bf16.
    """
    if dtype == torch.bfloat16 and device.type != "cuda":
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_wanted(arch: int, dtype: str, device: torch.device) -> bool:
    """Read K and V through TMA descriptors in the forward? On the config tables that use them (see
    kernels.causal_attention.uses_tma), with Triton's host-side TensorDescriptor. RLHF_FAST_ATTN_TMA=0
    turns them off on the GPU; =1 turns them on for CPU tensors too (Triton's interpreter runs them:
    that is how the CPU tests cover this path)."""
    from rlhf_fast.kernels import causal_attention as kern

    env = os.environ.get("RLHF_FAST_ATTN_TMA", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"RLHF_FAST_ATTN_TMA must be 0 or 1 when set, got {env!r}")
    if env == "0" or (device.type != "cuda" and env != "1"):
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (Triton >= 3.4)
    except ImportError:
        return False
    return device.type != "cuda" or kern.uses_tma(arch, dtype)


def kv_descriptor(t: torch.Tensor, packed: bool, block: list[int]):
    """A 4-D TMA descriptor over (B, H, T, D), or (1, H, total, D) for a packed (total, H, D) tensor; None
    where TMA cannot address it: base or a stride not 16-byte aligned, or a stride <= 0 (an expanded
    view such as GQA's K/V broadcast over heads: a TMA descriptor needs positive strides, and 0 passes
    the alignment test)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    view = t.unsqueeze(0).transpose(1, 2) if packed else t
    item = view.element_size()
    strides = view.stride()[:-1]
    if view.data_ptr() % 16 or any(st <= 0 or st * item % 16 for st in strides) or view.stride(-1) != 1:
        return None
    return TensorDescriptor(view, list(view.shape), list(view.stride()), block)


def launch_options(cfg) -> dict:
    """num_warps, num_stages and, where the config table sets one, the ptxas register budget (maxnreg):
    the same options the CI static check compiles each config with."""
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if getattr(cfg, "maxnreg", None) is not None:
        options["maxnreg"] = cfg.maxnreg
    return options


def seq_arg(cu_seqlens, device: torch.device) -> torch.Tensor:
    """CU_SEQLENS kernel argument: the offsets when packed, an unused int32 placeholder when padded."""
    return cu_seqlens if cu_seqlens is not None else torch.empty(1, dtype=torch.int32, device=device)


def lse_shape(q: torch.Tensor, packed: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[1], q.shape[2])


def lse_strides(lse: torch.Tensor, packed: bool) -> tuple[int, int]:
    """(batch, head) strides of the LSE; its token stride is 1."""
    return (0, lse.stride(0)) if packed else (lse.stride(0), lse.stride(1))


# ----------------------------------------------------------------------------------------------- grids
# The (sequence, head) product goes on grid axis 0, the only one CUDA lets pass 65535 blocks (2048
# prompts x 32 heads is 65536); the block index along the sequence goes on axis 1. A CPU test checks
# every grid below at extreme sizes.
def rows_grid(max_seqlen: int, block: int, n_seq: int, heads: int, kernel: str) -> tuple[int, int]:
    """Forward, preprocess, dQ (heads = Hq, block = BLOCK_M) and dK/dV (heads = Hkv, block = BLOCK_N):
    (n_seq * heads, cdiv(max_seqlen, block))."""
    return cuda_grid(n_seq * heads, -(-max_seqlen // block), kernel=kernel)


# ----------------------------------------------------------------------------------------------- launchers
def attention_fwd(q, k, v, cu_seqlens, max_seqlen: int, scale: float, packed_end: int | None = 0):
    """Forward. Padded: q (B, Hq, T, D), cu_seqlens None. Packed: q (total, Hq, D), cu_seqlens (n+1,),
    packed_end = cu_seqlens[-1] (rows from there on belong to no sequence and get 0), or None when it
    was not read (the whole output is zeroed first then).

    Returns (out like q, lse fp32 (B, Hq, T) or (Hq, total), log2 units).
    """
    packed = cu_seqlens is not None
    out = empty_like_unit_last(q)
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    lse = torch.empty(lse_shape(q, packed), device=q.device, dtype=torch.float32)
    n_seq = cu_seqlens.numel() - 1 if packed else q.shape[0]
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if n_seq == 0 or max_seqlen == 0 or q.numel() == 0:
        return out.zero_(), lse.fill_(0.0)
    if packed:
        (out if packed_end is None else out[packed_end:]).zero_()
    arch, dtype = arch_of(q.device), table_dtype(q.dtype, q.device)
    kern = kernels_for(packed)
    tma = tma_wanted(arch, dtype, q.device)

    def run(cfg):  # one whole launch: what autotuning times, then the launch with the winner
        k_src, v_src = k, v
        if tma:
            block = configs.tma_block(cfg, d)
            k_src, v_src = kv_descriptor(k, packed, block), kv_descriptor(v, packed, block)
            if k_src is None or v_src is None:
                k_src, v_src = k, v
        with on_device(q):
            kern._attn_fwd_kernel[rows_grid(max_seqlen, cfg.block_m, n_seq, hq, "attn_fwd")](
                q, k_src, v_src, out, lse, seq_arg(cu_seqlens, q.device),
                *bht_strides(q, packed), *bht_strides(k, packed), *bht_strides(v, packed),
                *bht_strides(out, packed), *lse_strides(lse, packed),
                max_seqlen, hq, hq // hkv, scale * LOG2E,
                HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_VARLEN=packed,
                DOT_PRECISION=dot_precision(q.dtype, q.device), USE_TMA=k_src is not k,
                **launch_options(cfg))

    run(tuned("fwd", arch, d, dtype, packed, max_seqlen, run, q.device))
    return out, lse


def attention_bwd(do, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float, deterministic: bool):
    """Backward (FlashAttention-2): dK/dV per KV block summed over the query heads of each group, then dQ.

    deterministic=True computes dQ in a separate pass over the KV blocks (no atomics); False accumulates
    dQ with fp32 atomics inside the dK/dV pass, saving the recomputation of the scores, wherever the
    config table has an atomic variant (kernels._attention_configs.has_config).
    """
    packed = cu_seqlens is not None
    dq, dk, dv = empty_like_unit_last(q), empty_like_unit_last(k), empty_like_unit_last(v)
    do, q, k, v, out = (unit_last(t) for t in (do, q, k, v, out))
    n_seq = cu_seqlens.numel() - 1 if packed else q.shape[0]
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if n_seq == 0 or max_seqlen == 0 or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if packed:  # rows past cu_seqlens[-1] belong to no sequence; their gradient is 0
        dq.zero_(), dk.zero_(), dv.zero_()
    arch = arch_of(q.device)
    kern = kernels_for(packed)
    cu = seq_arg(cu_seqlens, q.device)
    dtype = table_dtype(q.dtype, q.device)
    common = dict(HEAD_DIM=d, IS_VARLEN=packed, DOT_PRECISION=dot_precision(q.dtype, q.device))

    delta = torch.empty_like(lse)
    atomic = not deterministic and configs.has_config("bwd_dkdv_atomic", arch, d, dtype)
    dq_acc = torch.empty(q.shape, device=q.device, dtype=torch.float32) if atomic else dq

    # each run_* is one whole launch: what autotuning times, then the launch with the winner
    def run_pre(cfg):
        with on_device(q):
            kern._attn_bwd_preprocess_kernel[rows_grid(max_seqlen, cfg.block_m, n_seq, hq, "attn_bwd_pre")](
                out, do, delta, cu, *bht_strides(out, packed), *bht_strides(do, packed),
                *lse_strides(delta, packed), max_seqlen, hq, HEAD_DIM=d, BLOCK_M=cfg.block_m, IS_VARLEN=packed,
                **launch_options(cfg))

    def run_dkdv(cfg):
        with on_device(q):
            if atomic:  # the kernel adds into dQ: every launch (tuning ones too) starts from 0
                dq_acc.zero_()
            kern._attn_bwd_dkdv_kernel[rows_grid(max_seqlen, cfg.block_n, n_seq, hkv, "attn_bwd_dkdv")](
                q, k, v, do, lse, delta, dk, dv, dq_acc, cu,
                *bht_strides(q, packed), *bht_strides(k, packed), *bht_strides(v, packed),
                *bht_strides(do, packed), *bht_strides(dk, packed), *bht_strides(dv, packed),
                *bht_strides(dq_acc, packed), *lse_strides(lse, packed),
                max_seqlen, hkv, hq // hkv, scale, scale * LOG2E,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ATOMIC_DQ=atomic, **common,
                **launch_options(cfg))

    def run_dq(cfg):
        with on_device(q):
            kern._attn_bwd_dq_kernel[rows_grid(max_seqlen, cfg.block_m, n_seq, hq, "attn_bwd_dq")](
                q, k, v, do, lse, delta, dq, cu,
                *bht_strides(q, packed), *bht_strides(k, packed), *bht_strides(v, packed),
                *bht_strides(do, packed), *bht_strides(dq, packed), *lse_strides(lse, packed),
                max_seqlen, hq, hq // hkv, scale, scale * LOG2E,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
                **launch_options(cfg))

    run_pre(tuned("bwd_pre", arch, d, dtype, packed, max_seqlen, run_pre, q.device))
    run_dkdv(tuned("bwd_dkdv_atomic" if atomic else "bwd_dkdv", arch, d, dtype, packed, max_seqlen, run_dkdv,
                   q.device))
    if atomic:
        with on_device(q):
            return dq.copy_(dq_acc), dk, dv
    run_dq(tuned("bwd_dq", arch, d, dtype, packed, max_seqlen, run_dq, q.device))
    return dq, dk, dv


def kernels_for(packed: bool):
    """The op's kernel module: kernels/causal_attention_varlen.py for packed inputs, else
    kernels/causal_attention.py (the same kernels; the varlen module compiles them with IS_VARLEN)."""
    if packed:
        from rlhf_fast.kernels import causal_attention_varlen as kern
    else:
        from rlhf_fast.kernels import causal_attention as kern
    return kern


def tuned(stage: str, arch: int, head_dim: int, dtype: str, packed: bool, max_seqlen: int, run, device):
    """The config of `stage` to launch: the tuning set's winner for this regime (see _autotune.choose)."""
    regime = (f"sm{arch},D={head_dim},{dtype},{'packed' if packed else 'padded'},"
              f"T<={_autotune.seqlen_bucket(max_seqlen)}")
    return _autotune.choose(f"attn_{stage}", regime, configs.tuning_set(stage, arch, head_dim, dtype), run, device)
