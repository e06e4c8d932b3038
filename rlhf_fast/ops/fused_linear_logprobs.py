"""fused_linear_logprobs: lm_head matmul + per-token logprob/entropy without materializing (N, V) logits."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import fused_linear_logprobs as ref
from ..reference import token_logprobs as ref_tl

_OP = "fused_linear_logprobs"


def _empty_bias(hidden):
    return hidden.new_empty(0)


@torch.library.custom_op("rlhf_fast::fused_linear_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            temperature: float, want_entropy: bool, ignore_index: int, chunk_size: int,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref_tl.check_targets_in_range(targets, weight.shape[0], ignore_index)
    chosen = _backend.resolve(_OP, backend, hidden.device, gpu="triton")
    if chosen == "triton":
        from . import _fused_linear_triton as tri
        return tri.forward(hidden.contiguous(), weight.contiguous(), bias, targets.contiguous(),
                           temperature, want_entropy, ignore_index)
    return ref.forward(hidden, weight, bias, targets, temperature, want_entropy, ignore_index,
                       chunk_size or None)


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_size, backend):
    n = hidden.shape[0]
    new = lambda m: hidden.new_empty(m, dtype=torch.float32)  # noqa: E731
    return new(n), new(n if want_entropy else 0), new(n)


@torch.library.custom_op("rlhf_fast::fused_linear_logprobs_bwd", mutates_args=())
def _bwd_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor,
            entropy: torch.Tensor, temperature: float, ignore_index: int, chunk_size: int,
            need: list[bool], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = _backend.resolve(_OP, backend, hidden.device, gpu="triton")
    if chosen == "triton":
        from . import _fused_linear_triton as tri
        d_h, d_w, d_b = tri.backward(grad_logp.contiguous(),
                                     None if grad_entropy is None else grad_entropy.contiguous(),
                                     hidden.contiguous(), weight.contiguous(), bias, targets.contiguous(),
                                     lse, entropy, temperature, ignore_index, need)
    else:
        d_h, d_w, d_b = ref.backward(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                                     temperature, ignore_index, chunk_size or None, need)
    # custom ops cannot return None: unwanted gradients come back as empty tensors
    return (d_h if d_h is not None else _empty_bias(hidden), d_w if d_w is not None else _empty_bias(hidden),
            d_b if d_b is not None else _empty_bias(hidden))


@_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
      chunk_size, need, backend):
    has_b = bias is not None and need[2]
    return (torch.empty_like(hidden) if need[0] else _empty_bias(hidden),
            torch.empty_like(weight) if need[1] else _empty_bias(hidden),
            torch.empty_like(bias) if has_b else _empty_bias(hidden))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_size, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.args = (temperature, want_entropy, ignore_index, chunk_size, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    temperature, want_entropy, ignore_index, chunk_size, backend = ctx.args
    need = [bool(x) for x in ctx.needs_input_grad[:3]]
    need[2] = need[2] and bias is not None
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    d_h, d_w, d_b = _bwd_op(grad_logp, grad_entropy if want_entropy else None, hidden, weight, bias, targets,
                            lse, entropy, temperature, ignore_index, chunk_size, need, backend)
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
    fp32 atomics; "reference" is chunked PyTorch (peak extra memory ~ chunk_size x V x 4 bytes, plus a
    (V, H) fp32 d(weight) accumulator when weight is not fp32). "auto": Triton on CUDA, reference on CPU.
    """
    ref.validate(hidden, weight, targets, bias, temperature, ignore_index, chunk_size)
    _backend.check_backend_arg(backend)
    logp, entropy, _ = _fwd_op(hidden, weight, bias, targets, float(temperature), bool(return_entropy),
                               ignore_index, chunk_size or 0, backend)
    return (logp, entropy) if return_entropy else logp
