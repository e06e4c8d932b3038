"""token_logprobs: per-token log pi(target) and entropy from materialized logits, one pass over the vocab.

Layers (FlashAttention style): Triton launchers -> torch.library custom ops (forward, backward) with
fake shape functions and a registered autograd formula -> the public function with the spec.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import token_logprobs as ref
from . import _autotune
from ._launch import on_first_tensor_device

_OP = "token_logprobs"


@on_first_tensor_device
def _triton_forward(logits, targets, temperature, want_entropy, ignore_index, cutoffs):
    from ..kernels import token_logprobs as k
    n, vocab = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n if want_entropy else 0, dtype=torch.float32, device=logits.device)
    stats = torch.empty(2, n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logp, entropy, stats
    cut_t, cut_i = _cut_args(cutoffs, vocab, stats)

    def run(cfg):  # one whole launch: what autotuning times, then the launch with the winner
        k._token_logprobs_fwd_kernel[(n,)](
            logits, targets, cut_t, cut_i, logp, entropy, stats, logits.stride(0), vocab, temperature, ignore_index,
            WANT_ENTROPY=want_entropy, HAS_CUTOFFS=cutoffs is not None, BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # with cutoffs the table pick (what the static check compiles with HAS_CUTOFFS); without, the tuned one
    run(_autotune.row_config("token_logprobs_fwd", k, logits, run) if cutoffs is None else k.tuning_set(vocab)[0])
    return logp, entropy, stats


@on_first_tensor_device
def _triton_backward(grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index, cutoffs):
    from ..kernels import token_logprobs as k
    n, vocab = logits.shape
    grad = torch.empty_like(logits)
    if n == 0:
        return grad
    have_ent = grad_entropy is not None
    cut_t, cut_i = _cut_args(cutoffs, vocab, stats)

    def run(cfg):
        k._token_logprobs_bwd_kernel[(n,)](
            logits, targets, cut_t, cut_i, stats, entropy if have_ent else stats, grad_logp,
            grad_entropy if have_ent else grad_logp, grad, logits.stride(0), grad.stride(0), vocab,
            temperature, ignore_index, HAVE_ENTROPY=have_ent, HAS_CUTOFFS=cutoffs is not None, BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    run(_autotune.row_config("token_logprobs_bwd", k, logits, run) if cutoffs is None else k.tuning_set(vocab)[0])
    return grad


def _cut_args(cutoffs, vocab, dummy):
    """The kernels' (threshold fp32 (N,), index int32 (N,)) pointers; `dummy` twice without cutoffs."""
    return (dummy, dummy) if cutoffs is None else ref.cut_points(cutoffs, vocab)


@torch.library.custom_op("rlhf_fast::token_logprobs_fwd", mutates_args=())
def _fwd_op(logits: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool,
            ignore_index: int, cutoffs: torch.Tensor | None, backend: str,
            check_kept: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref.check_targets_in_range(targets, logits.shape[-1], ignore_index)
    chosen = _backend.resolve(_OP, backend, logits.device, gpu="triton")
    if chosen == "triton":
        out = _triton_forward(logits.contiguous(), targets.long().contiguous(), temperature, want_entropy,
                              ignore_index, cutoffs)
    else:
        out = ref.forward(logits, targets, temperature, want_entropy, ignore_index, cutoffs=cutoffs)
    if cutoffs is not None and check_kept:
        ref.check_targets_kept(out[0], targets, ignore_index)
    return out


@_fwd_op.register_fake
def _(logits, targets, temperature, want_entropy, ignore_index, cutoffs, backend, check_kept=True):
    n = logits.shape[0]
    new = lambda *m: logits.new_empty(m, dtype=torch.float32)  # noqa: E731
    return new(n), new(n if want_entropy else 0), new(2, n)


@torch.library.custom_op("rlhf_fast::token_logprobs_bwd", mutates_args=())
def _bwd_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, logits: torch.Tensor,
            targets: torch.Tensor, stats: torch.Tensor, entropy: torch.Tensor, temperature: float,
            ignore_index: int, cutoffs: torch.Tensor | None, backend: str) -> torch.Tensor:
    chosen = _backend.resolve(_OP, backend, logits.device, gpu="triton")
    if chosen == "triton":
        return _triton_backward(grad_logp.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
                                logits.contiguous(), targets.long().contiguous(), stats, entropy, temperature,
                                ignore_index, cutoffs)
    return ref.backward(grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index,
                        cutoffs=cutoffs)


@_bwd_op.register_fake
def _(grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index, cutoffs, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, want_entropy, ignore_index, cutoffs, backend, _ = inputs
    logp, entropy, stats = output
    ctx.save_for_backward(logits, targets, stats, entropy, cutoffs, logp if cutoffs is not None else None)
    ctx.args = (temperature, want_entropy, ignore_index, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, targets, stats, entropy, cutoffs, logp = ctx.saved_tensors
    temperature, want_entropy, ignore_index, backend = ctx.args
    if grad_logp is None:
        grad_logp = torch.zeros_like(stats[0])
    elif cutoffs is not None:  # a target off its kept set (check_kept=False): logp is the constant -inf
        grad_logp = grad_logp.masked_fill(logp.isneginf(), 0.0)
    if not want_entropy:
        grad_entropy = None
    grad = _bwd_op(grad_logp, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index, cutoffs,
                   backend)
    return grad, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, cutoffs: torch.Tensor | None = None,
                   check_kept: bool = True, backend: str = "auto"):
    """Log-probability of each target token (and the entropy) without an (N, V) fp32 copy of the logits.

    Args:
        logits: (..., V) float32, bfloat16 or float16.
        targets: (...) int64 (or int32), each in [0, V) or equal to ``ignore_index``.
        temperature: > 0; the distribution is softmax(logits / temperature).
        return_entropy: also return the entropy of that distribution.
        ignore_index: targets equal to it give logp = 0 and entropy = 0, and no gradient.
        cutoffs: None (the full distribution), or (..., 2) float64 on the logits' device, the kept set of
            each position as ``rlhf_fast.sample(..., return_cutoffs=True)`` returns it (CUTOFFS.md): with
            ``x = logits.float() / temperature`` (one float32 division, as the sampler's), token v is kept
            iff ``x_v > t or (x_v == t and v >= i)`` for ``t, i = cutoffs[..., 0], cutoffs[..., 1]``.
            Rows with no filter are (-inf, 0); invalid sampler rows (nan, 0) keep nothing.
        check_kept: with cutoffs, whether a target off its kept set raises ValueError; False gives it
            logp = -inf (a constant: no gradient through it; entropy and the row's other gradients as
            usual), for a caller that handles it (an RL update whose policy moved since the rollout).
        backend: "auto" | "triton" | "reference" (see ``rlhf_fast._backend``).

    Returns:
        logp (...) float32, or (logp, entropy) when ``return_entropy``. For non-ignored positions::

            z = logits.float() / temperature
            logp = z.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
            entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)

        i.e. trl's ``selective_log_softmax(logits / T, targets)`` and ``entropy_from_logits(logits / T)``,
        computed in float32 whatever the input dtype. With ``cutoffs``, the same on ``z`` masked to -inf
        off the kept set: the kept, renormalized distribution the sampler drew from, so for the drawn
        tokens logp equals the sampler's logprobs (to float32 rounding); d(logits) = 0 off the kept set.
        Greedy rows (temperature 0 in the sampler) have no distribution to train: temperature must be > 0.

    Differentiable in ``logits``; the backward writes d(logits) in the logits' dtype directly (no (N, V)
    fp32 intermediate). Targets outside [0, V) raise ValueError (the check reads the targets, so on
    CUDA it costs one host sync; while a CUDA graph is captured it is a device-side assert instead).
    With cutoffs, a target off its row's kept set (probability 0 under the filtered distribution) raises
    ValueError naming targets and cutoffs, checked on logp after the forward (one more host sync on CUDA;
    a device-side assert under graph capture), or with ``check_kept=False`` gets logp = -inf. Membership is decided on the recomputed x: it can differ from the sampler's only for a
    logit within float32 rounding of the cut (bitwise the same logits give the same set).
    A NaN logit gives NaN logp, entropy and d(logits) for its row on every backend.

    Backends: "triton" (one program per row, online max/sum over vocab tiles; CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1), "reference" (chunked PyTorch, any device). "auto" picks Triton
    for CUDA tensors and the reference for CPU tensors.
    """
    ref.validate(logits, targets, temperature, ignore_index, cutoffs=cutoffs)
    _backend.check_backend_arg(backend)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    logp, entropy, _ = _fwd_op(logits.reshape(-1, vocab), targets.reshape(-1), float(temperature),
                               bool(return_entropy), ignore_index,
                               None if cutoffs is None else cutoffs.reshape(-1, 2), backend, bool(check_kept))
    if return_entropy:
        return logp.reshape(lead), entropy.reshape(lead)
    return logp.reshape(lead)
