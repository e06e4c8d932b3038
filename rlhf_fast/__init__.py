"""rlhf_fast: fused GPU kernels for RLHF, and a minimal GPT + PPO pipeline that runs on them.

Public ops (each takes ``backend="auto" | "triton" | "cuda" | "reference"``, see ``rlhf_fast._backend``):

- attention: ``causal_attention``, ``causal_attention_varlen``, ``decode_attention``
- logprobs:  ``token_logprobs``, ``fused_linear_logprobs``, ``kl_divergence``,
  ``fused_linear_kl_divergence``, ``kl_penalty``
- sampling:  ``sample``, ``sample_from_probs``

and one composite over the logprob op: ``fused_linear_token_loss`` (a per-token training loss of the
lm_head's logprobs, its gradient taken in the forward; ``rlhf_fast/fused_loss.py``).

Ops are imported lazily on first attribute access, so ``import rlhf_fast`` is cheap and never
imports Triton or builds the extension.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ._backend import BACKENDS, BackendUnavailable
from ._lazy import lazy_exports
from .info import extension_info

__version__ = "0.1.0"


def _map_source_checkout_kernels() -> None:
    """In a plain source checkout (PYTHONPATH=repo, no install), make `rlhf_fast.kernels` load ./kernels.

    Installs map kernels/ to rlhf_fast.kernels through setup.py's package_dir; a bare copy of the tree
    (as benchmarks/gpu_check.sh uses) has no such mapping, so the same module is registered here.
    """
    if (Path(__file__).parent / "kernels").is_dir() or "rlhf_fast.kernels" in sys.modules:
        return
    if importlib.util.find_spec("rlhf_fast.kernels") is not None:  # editable install's finder
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location("rlhf_fast.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rlhf_fast.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_source_checkout_kernels()

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
    "fused_linear_token_loss": "rlhf_fast.fused_loss",
}

__all__ = ["BACKENDS", "BackendUnavailable", "extension_info", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
