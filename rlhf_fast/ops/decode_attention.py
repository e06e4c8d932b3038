"""decode_attention: one new query per sequence over a KV cache, split-K (flash-decoding).

Kernels: kernels/decode_attention.py (split, then LSE merge); reference: rlhf_fast/reference/decode_attention.py.
"""
from __future__ import annotations

import torch

from .. import _backend, _validate
from ..reference import decode_attention as _ref
from . import _attention_launch as _launch
from . import _autotune
from ._launch import cuda_grid, on_device

_OP = "decode_attention"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_splits(tmax: int, programs: int, block_n: int, sms: int, max_splits: int) -> tuple[int, int]:
    """(n_splits, split_len): enough splits that `programs` * n_splits fills about two waves of SMs,
    each split a whole number of BLOCK_N-position steps."""
    want = max(1, min(max_splits, _cdiv(2 * sms, programs), _cdiv(tmax, block_n)))
    split_len = _cdiv(_cdiv(tmax, want), block_n) * block_n
    return _cdiv(tmax, split_len), split_len


def split_grid(b: int, hkv: int, n_splits: int, chunks: int) -> tuple[int, int, int]:
    """(B * Hkv, n_splits <= MAX_SPLITS, cdiv(group, BLOCK_G)); axis 0 is the one CUDA lets pass 65535."""
    return cuda_grid(b * hkv, n_splits, chunks, kernel="decode_split")


def combine_grid(b: int, hq: int) -> tuple[int]:
    return cuda_grid(b * hq, kernel="decode_combine")


def decode_fwd(q, k_cache, v_cache, cache_seqlens, scale: float):
    """q (B, Hq, D), caches (B, Hkv, Tmax, D), cache_seqlens int32 (B,) -> (B, Hq, D) contiguous.

    The split kernel's config (its BLOCK_N sets the split length) comes from its tuning set, timed on
    the first call of a (D, dtype, group, Tmax class) regime (rlhf_fast/ops/_autotune.py)."""
    from rlhf_fast.kernels import decode_attention as kern

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q, k_cache, v_cache = _launch.unit_last(q), _launch.unit_last(k_cache), _launch.unit_last(v_cache)
    b, hq, d = q.shape
    hkv, tmax = k_cache.shape[1], k_cache.shape[2]
    if b == 0 or hq == 0:
        return out
    if tmax == 0:
        return out.zero_()
    group = hq // hkv
    arch, dtype = _launch.arch_of(q.device), _launch.table_dtype(q.dtype, q.device)
    chunks = _cdiv(group, kern.BLOCK_G)
    precision = _launch.dot_precision(q.dtype, q.device)

    def run(cfg):  # one whole launch (split, combine): what autotuning times, then the launch with the winner
        n_splits, split_len = decode_splits(tmax, b * hkv * chunks, cfg.block_n, num_sms(q.device), kern.MAX_SPLITS)
        o_part = torch.empty((b, hq, n_splits, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((b, hq, n_splits), dtype=torch.float32, device=q.device)
        with on_device(q):
            kern._decode_split_kernel[split_grid(b, hkv, n_splits, chunks)](
                q, k_cache, v_cache, cache_seqlens, o_part, lse_part,
                q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
                hkv, group, tmax, split_len, n_splits, scale * _launch.LOG2E,
                HEAD_DIM=d, BLOCK_N=cfg.block_n, BLOCK_G=kern.BLOCK_G, DOT_PRECISION=precision,
                **_launch.launch_options(cfg))
            kern._decode_combine_kernel[combine_grid(b, hq)](
                o_part, lse_part, out, out.stride(0), out.stride(1), hq, n_splits,
                HEAD_DIM=d, MAX_SPLITS=kern.MAX_SPLITS,
                num_warps=kern.COMBINE_CONFIG.num_warps, num_stages=kern.COMBINE_CONFIG.num_stages)

    regime = f"sm{arch},D={d},{dtype},group<={chunks * kern.BLOCK_G},Tmax<={_autotune.seqlen_bucket(tmax)}"
    run(_autotune.choose("decode_split", regime, kern.split_tuning_set(arch, d, dtype), run, q.device))
    return out


@torch.library.custom_op("rlhf_fast::decode_attention", mutates_args=())
def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
            scale: float, backend: str) -> torch.Tensor:
    if _backend.resolve(_OP, backend, q.device, gpu="triton") == "reference":
        return _ref.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale).contiguous()
    return decode_fwd(q, k_cache, v_cache, cache_seqlens, scale)


@_decode.register_fake
def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     *, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of one new query per sequence over its KV cache (inference; not differentiable).

    Args:
        q: (B, Hq, D) fp16, bf16 or fp32, the query of the token being decoded.
        k_cache, v_cache: (B, Hkv, Tmax, D), q's dtype and device, Hq % Hkv == 0; any strides with a
            unit last-dim stride (e.g. a (B, Tmax, Hkv, D) cache viewed through ``.transpose(1, 2)``).
        cache_seqlens: int32 (B,) on q's device: the number of valid cache positions of each row, in
            [0, Tmax] (the kernel clamps to that range; values are not checked, to avoid a host sync).
            A row with 0 valid positions returns 0.
        scale: multiplier of q @ k^T; default 1 / sqrt(D).
        backend: "auto" (Triton on CUDA tensors, the reference on CPU tensors), "triton" or "reference".

    Returns:
        (B, Hq, D) in q's dtype, contiguous. Row b equals
        ``F.scaled_dot_product_attention(q[b, :, None], k_cache[b, :, :n], v_cache[b, :, :n],
        enable_gqa=True, scale=scale)[:, 0]`` with n = cache_seqlens[b]. The Triton path splits each
        row's cache across programs (flash-decoding) so a single long sequence still fills the GPU,
        then merges the partial results by their fp32 log-sum-exp.
    """
    _validate.check_tensor("q", q, ndim=3, dtypes=_validate.FLOAT_DTYPES)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _validate.check_tensor(name, t, ndim=4, dtypes=(q.dtype,))
    _validate.check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,))
    _validate.check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"k_cache must have q's batch size {q.shape[0]} at dim 0, got shape {tuple(k_cache.shape)}")
    if cache_seqlens.shape[0] != q.shape[0]:
        raise ValueError(f"cache_seqlens must have q's batch size {q.shape[0]}, got shape {tuple(cache_seqlens.shape)}")
    _launch.check_heads_and_dim(q, k_cache, k_name="k_cache")
    scale = _launch.default_scale(scale, q.shape[-1])
    _backend.check_backend_arg(backend)
    return _decode(q, k_cache, v_cache, cache_seqlens, scale, backend)
