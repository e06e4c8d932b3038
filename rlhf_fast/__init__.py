"""rlhf_fast: fused GPU kernels for RLHF, and a minimal GPT + PPO pipeline that runs on them.

Public ops (each takes ``backend="auto" | "triton" | "cuda" | "reference"``, see ``rlhf_fast._backend``):

- attention: ``causal_attention``, ``causal_attention_varlen``, ``decode_attention``
- logprobs:  ``token_logprobs``, ``fused_linear_logprobs``, ``kl_divergence``,
  ``fused_linear_kl_divergence``, ``kl_penalty``
- sampling:  ``sample``, ``sample_from_probs``

Ops are imported lazily on first attribute access, so ``import rlhf_fast`` is cheap and never
imports Triton or builds the extension.
"""
from __future__ import annotations

import importlib

from ._backend import BACKENDS, BackendUnavailable
from .info import extension_info

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "causal_attention": "rlhf_fast.ops.causal_attention",
    "causal_attention_varlen": "rlhf_fast.ops.causal_attention_varlen",
    "decode_attention": "rlhf_fast.ops.decode_attention",
    "token_logprobs": "rlhf_fast.ops.token_logprobs",
    "fused_linear_logprobs": "rlhf_fast.ops.fused_linear_logprobs",
    "kl_divergence": "rlhf_fast.ops.kl_divergence",
    "fused_linear_kl_divergence": "rlhf_fast.ops.fused_linear_kl_divergence",
    "kl_penalty": "rlhf_fast.ops.kl_penalty",
    "sample": "rlhf_fast.ops.sample",
    "sample_from_probs": "rlhf_fast.ops.sample",
}

__all__ = ["BACKENDS", "BackendUnavailable", "extension_info", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
