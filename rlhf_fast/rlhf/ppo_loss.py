"""PPO's clipped policy loss (Schulman et al. 2017, eq. 7) on (B, T) tensors, and the same per-token loss as a
`token_loss` for the GPT's fused lm_head pass (rlhf_fast.fused_linear_token_loss), which takes the gradient
of a loss known in the forward with one lm_head matmul fewer than logprobs + policy_loss + backward."""
from __future__ import annotations

import torch

from .ppo_math import _check_clip_range, _clipped_loss_inputs, _is_real, masked_mean


def check_clip_options(clip_range, clip_range_high, dual_clip) -> float:
    """Validate the clip options; returns clip_range_high (clip_range when None)."""
    _check_clip_range(clip_range)
    if clip_range_high is not None and (not _is_real(clip_range_high) or not clip_range_high > 0):
        raise ValueError(f"clip_range_high must be a number > 0 (or None for clip_range), got {clip_range_high!r}")
    if dual_clip is not None and (not _is_real(dual_clip) or not dual_clip > 1):
        raise ValueError(f"dual_clip must be a number > 1 (or None for off), got {dual_clip!r}")
    return clip_range if clip_range_high is None else clip_range_high


def clipped_token_losses(logprobs, old_logprobs, adv, clip_range: float, clip_range_high: float, dual_clip):
    """Per-token clipped losses of same-shape tensors (policy_loss's formula, before aggregation) ->
    (clipped_losses, pg_losses, pg_losses_clipped, ratio, log_ratio, dual_active or None)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range_high)
    clipped_losses = torch.maximum(pg_losses, pg_losses_clipped)
    dual_active = None
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual_active = (adv < 0) & (clipped_losses > dual_bound)
        clipped_losses = torch.where(dual_active, dual_bound, clipped_losses)
    return clipped_losses, pg_losses, pg_losses_clipped, ratio, log_ratio, dual_active


def ppo_token_loss(old_logprobs, advantages, weights, clip_range: float, clip_range_high: float | None = None,
                   dual_clip: float | None = None):
    """A GPT `token_loss`: sum over the given flat positions of weights * policy_loss's per-token loss.

    old_logprobs, advantages, weights: flat (N,) constants over the model's positions (weights 0 off the
    response; for policy_loss's masked mean, mask / mask.sum(), times any outer scale). Then the fused
    pass's loss equals the weighted policy_loss and its gradient that of policy_loss's backward.
    """
    clip_range_high = check_clip_options(clip_range, clip_range_high, dual_clip)
    old, adv, w = (x.detach().float() for x in (old_logprobs, advantages, weights))

    def loss_fn(positions, stats):
        losses = clipped_token_losses(stats.logp, old[positions], adv[positions], clip_range, clip_range_high,
                                      dual_clip)[0]
        return (losses * w[positions]).sum()
    return loss_fn


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float, *, clip_range_high: float | None = None,
                dual_clip: float | None = None, loss_agg: str | None = None,
                max_len: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), to minimize.

    logprobs: (B, T) log pi(a_t|s_t) under the current policy (differentiable); old_logprobs,
    advantages: (B, T) from the rollout (treated as constants); mask: (B, T). With
    ``ratio = exp(logprobs - old_logprobs)`` and ``hi = clip_range_high`` (default ``clip_range``)::

        pg_losses = max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + hi))
        pg_losses = min(pg_losses, -A * dual_clip)  where A < 0      (only with dual_clip)
        pg_loss   = masked_mean(pg_losses)
        clipfrac  = masked_mean(float(-A * clamp(ratio, ...) > -A * ratio))
        approx_kl = masked_mean((ratio - 1) - log(ratio))

    ``clip_range_high > clip_range`` is DAPO's clip-higher (Yu et al. 2025): more room for
    low-probability tokens to grow. ``dual_clip`` (a number > 1, Ye et al. 2020) bounds the loss of a
    negative-advantage token by ``dual_clip * |A|`` however large its ratio. With both off the loss is
    today's PPO loss, bit for bit. ``clipfrac_low`` / ``clipfrac_high`` split ``clipfrac`` into the
    tokens clipped at ``1 - clip_range`` (A < 0) and at ``1 + hi`` (A > 0); ``dual_clipfrac`` (only
    with dual_clip) counts the tokens the dual clip bounded.

    ``approx_kl`` is the k3 estimator of KL(pi_old || pi) (Schulman, "Approximating KL
    divergence"): unbiased for samples from pi_old and never negative, as CleanRL logs it.
    Half-precision inputs are upcast to float32 (the ratio is compared with 1 +- clip_range).
    ``loss_agg`` (with ``max_len``) reduces the per-token losses with ``critic_free.aggregate_loss``
    instead of the masked mean (GRPO / Dr. GRPO token weighting); the stats stay token means.
    Returns ``(pg_loss, stats)``; the stats are detached scalars. Padding may hold inf: it is zeroed
    before use, so the loss and the gradient stay finite.
    """
    clip_range_high = check_clip_options(clip_range, clip_range_high, dual_clip)
    logprobs, old_logprobs, adv = _clipped_loss_inputs(mask, clip_range, logprobs=logprobs,
                                                       old_logprobs=old_logprobs, advantages=advantages)
    t = clipped_token_losses(logprobs, old_logprobs, adv, clip_range, clip_range_high, dual_clip)
    clipped_losses, pg_losses, pg_losses_clipped, ratio, log_ratio, dual_active = t
    if loss_agg is None:
        loss = masked_mean(clipped_losses, mask)
    else:
        from .critic_free import aggregate_loss  # critic_free builds on this module
        loss = aggregate_loss(clipped_losses, mask, loss_agg, max_len=max_len)
    with torch.no_grad():
        clipped = pg_losses_clipped > pg_losses
        stats = {
            "clipfrac": masked_mean(clipped.to(ratio.dtype), mask),
            "clipfrac_low": masked_mean((clipped & (ratio < 1.0 - clip_range)).to(ratio.dtype), mask),
            "clipfrac_high": masked_mean((clipped & (ratio > 1.0 + clip_range_high)).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        }
        if dual_clip is not None:
            stats["dual_clipfrac"] = masked_mean(dual_active.to(ratio.dtype), mask)
    return loss, stats
