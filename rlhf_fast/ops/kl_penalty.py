"""kl_penalty: per-token KL estimators from the sampled token's log-probabilities (elementwise)."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import kl_penalty as ref

_OP = "kl_penalty"


@torch.library.custom_op("rlhf_fast::kl_penalty", mutates_args=())
def _kl_penalty_op(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, backend: str) -> torch.Tensor:
    _backend.resolve(_OP, backend, logp.device, gpu="reference")  # the reference is the only backend
    return ref.kl_penalty(logp, ref_logp, kind)


@_kl_penalty_op.register_fake
def _(logp, ref_logp, kind, backend):
    return logp.new_empty(logp.shape, dtype=torch.promote_types(logp.dtype, ref_logp.dtype))


def _setup_context(ctx, inputs, output):
    logp, ref_logp, kind, _ = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind


def _backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    return (*ref.backward(grad, logp, ref_logp, ctx.kind), None, None)


_kl_penalty_op.register_autograd(_backward, setup_context=_setup_context)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", *,
               backend: str = "auto") -> torch.Tensor:
    """Estimate KL(pi || pi_ref) at tokens sampled from pi, from their log-probabilities.

    Args:
        logp: (...) float tensor, log pi(token) under the policy that sampled the tokens.
        ref_logp: (...) same shape, log pi_ref(token) under the reference model.
        kind: with log r = ref_logp - logp (r = pi_ref / pi):

            - "k1": ``logp - ref_logp`` (= -log r). Unbiased for KL(pi || pi_ref) when tokens come from
              pi, but high variance and negative for some samples.
            - "k2": ``(logp - ref_logp) ** 2 / 2``. Biased (its mean is KL only to second order in
              log r), low variance, always >= 0; its gradient in expectation is the gradient of
              KL(pi || pi_ref), which is why GRPO-style losses use it.
            - "k3": ``(r - 1) - log r``. Unbiased for KL(pi || pi_ref) under pi (E_pi[r - 1] = 0),
              always >= 0 and lower variance than k1 (Schulman's recommended estimator).

        backend: "auto" | "reference". This op is a few elementwise PyTorch ops with a closed-form
            backward (rlhf_fast/reference/kl_penalty.py); it has no Triton or CUDA kernel, and asking
            for one raises BackendUnavailable.

    Returns:
        (...) tensor of the inputs' (promoted) dtype, differentiable in both inputs.
    """
    ref.validate(logp, ref_logp, kind)
    _backend.check_backend_arg(backend)
    return _kl_penalty_op(logp, ref_logp, kind, backend)
