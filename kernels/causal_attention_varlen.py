"""Kernels of causal_attention_varlen: packed sequences of uneven lengths, (total, H, D), no padding.

They are kernels/causal_attention.py's FlashAttention-2 kernels compiled with IS_VARLEN=True: program
(s * H + h, block) reads sequence s's first token and length from CU_SEQLENS (cu_seqlens[s],
cu_seqlens[s + 1] - cu_seqlens[s]; kernels/_attention_rows._seq_bounds), tensors pass batch strides of
0, and blocks past a sequence's length return at once, so a packed batch costs what its tokens cost.
The forward's TMA descriptors span (1, H, total, D); rows a tile reads past its sequence's end belong
to the next sequence and are zeroed in the kernel (kernels/causal_attention._kv_tile).

The launcher (rlhf_fast/ops/_attention_launch.py, called by rlhf_fast/ops/causal_attention_varlen.py)
launches the kernels below; `static_configs` lists the packed layout's configs for the CI static check.
"""
from __future__ import annotations

from . import causal_attention as _padded
from ._attention_specs import all_specs
from .causal_attention import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,  # noqa: F401  (the launcher's names)
                               _attn_bwd_preprocess_kernel, _attn_fwd_kernel)


def static_configs():
    """Every (kernel, config) of the packed layout (IS_VARLEN=True): every config of every tuning set."""
    return all_specs(_padded, varlen=True)
