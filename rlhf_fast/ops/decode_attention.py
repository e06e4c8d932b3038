"""decode_attention: one new query per sequence over a KV cache, split-K (flash-decoding)."""
from __future__ import annotations

import torch

from .. import _backend, _validate
from ..reference import decode_attention as _ref
from . import _attention_launch as _launch

_OP = "decode_attention"


@torch.library.custom_op("rlhf_fast::decode_attention", mutates_args=())
def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
            scale: float, backend: str) -> torch.Tensor:
    if _backend.resolve(_OP, backend, q.device, gpu="triton") == "reference":
        return _ref.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale).contiguous()
    return _launch.decode_fwd(q, k_cache, v_cache, cache_seqlens, scale)


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
