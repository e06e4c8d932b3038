"""kl_divergence: exact per-token KL(pi || pi_ref) over the whole vocab from two sets of logits."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import kl_divergence as ref
from . import _autotune
from ._launch import on_first_tensor_device

_OP = "kl_divergence"


@on_first_tensor_device
def _triton_forward(logits, ref_logits, temperature):
    from ..kernels import kl_divergence as k
    n, vocab = logits.shape
    kl = torch.empty(n, dtype=torch.float32, device=logits.device)
    stats = torch.empty(5, n, dtype=torch.float32, device=logits.device)
    if n:
        def run(cfg):  # one whole launch: what autotuning times, then the launch with the winner
            k._kl_fwd_kernel[(n,)](logits, ref_logits, kl, stats, logits.stride(0), ref_logits.stride(0), vocab,
                                   temperature, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages)
        run(_autotune.row_config("kl_fwd", k, logits, run))
    return kl, stats


@on_first_tensor_device
def _triton_backward(grad_kl, logits, ref_logits, stats, kl, temperature, need_ref):
    from ..kernels import kl_divergence as k
    n, vocab = logits.shape
    d_logits = torch.empty_like(logits)
    d_ref = torch.empty_like(ref_logits) if need_ref else None
    if n:
        def run(cfg):
            k._kl_bwd_kernel[(n,)](logits, ref_logits, stats, grad_kl, d_logits,
                                   d_ref if need_ref else d_logits, logits.stride(0), ref_logits.stride(0),
                                   vocab, temperature, NEED_REF=need_ref, BLOCK_V=cfg.block_v,
                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        run(_autotune.row_config("kl_bwd", k, logits, run))
    return d_logits, d_ref


@torch.library.custom_op("rlhf_fast::kl_divergence_fwd", mutates_args=())
def _fwd_op(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.resolve(_OP, backend, logits.device, gpu="triton") == "triton":
        return _triton_forward(logits.contiguous(), ref_logits.contiguous(), temperature)
    return ref.forward(logits, ref_logits, temperature)


@_fwd_op.register_fake
def _(logits, ref_logits, temperature, backend):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty((5, n), dtype=torch.float32)


@torch.library.custom_op("rlhf_fast::kl_divergence_bwd", mutates_args=())
def _bwd_op(grad_kl: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor, stats: torch.Tensor,
            kl: torch.Tensor, temperature: float, need_ref: bool,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.resolve(_OP, backend, logits.device, gpu="triton") == "triton":
        d_logits, d_ref = _triton_backward(grad_kl.contiguous(), logits.contiguous(), ref_logits.contiguous(),
                                           stats, kl, temperature, need_ref)
    else:
        d_logits, d_ref = ref.backward(grad_kl, logits, ref_logits, stats, kl, temperature, need_ref)
    return d_logits, d_ref if d_ref is not None else ref_logits.new_empty(0)


@_bwd_op.register_fake
def _(grad_kl, logits, ref_logits, stats, kl, temperature, need_ref, backend):
    return torch.empty_like(logits), torch.empty_like(ref_logits) if need_ref else ref_logits.new_empty(0)


def _setup_context(ctx, inputs, output):
    logits, ref_logits, temperature, backend = inputs
    kl, stats = output
    ctx.save_for_backward(logits, ref_logits, stats, kl)
    ctx.args = (temperature, backend)


def _backward(ctx, grad_kl, _grad_stats):
    logits, ref_logits, stats, kl = ctx.saved_tensors
    temperature, backend = ctx.args
    need_ref = bool(ctx.needs_input_grad[1])
    d_logits, d_ref = _bwd_op(grad_kl, logits, ref_logits, stats, kl, temperature, need_ref, backend)
    return d_logits, d_ref if need_ref else None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0,
                  backend: str = "auto") -> torch.Tensor:
    """Exact KL(pi || pi_ref) per position, summed over the whole vocabulary, in one pass.

    Args:
        logits: (..., V) float32, bfloat16 or float16: the policy's logits.
        ref_logits: (..., V), same shape (any of those dtypes): the reference model's logits.
        temperature: > 0, applied to both: pi = softmax(logits / T), pi_ref = softmax(ref_logits / T).
        backend: "auto" | "triton" | "reference".

    Returns:
        (...) float32, equal to::

            lp = (logits.float() / T).log_softmax(-1); lq = (ref_logits.float() / T).log_softmax(-1)
            (lp.exp() * (lp - lq)).sum(-1)

        (= torch.distributions.kl_divergence(Categorical(logits=lp), Categorical(logits=lq))).

    Differentiable in logits (d = p (log p - log q - KL) / T) and in ref_logits when it requires grad
    (d = (q - p) / T); gradients are written in each input's dtype without an (N, V) fp32 intermediate.

    Backends: "triton" (one program per row, online max/sum for both distributions over vocab tiles;
    CUDA tensors or TRITON_INTERPRET=1), "reference" (chunked PyTorch). "auto": Triton on CUDA.
    """
    ref.validate(logits, ref_logits, temperature)
    _backend.check_backend_arg(backend)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    kl, _ = _fwd_op(logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab), float(temperature), backend)
    return kl.reshape(lead)
