"""Critic-free RL math (GRPO, Dr. GRPO, RLOO, REINFORCE++) as small pure functions.

Without a value model the baseline of a sample comes from the other samples: the G responses drawn
for the same prompt (a *group*) or the whole batch. Rewards are (B,) with B = prompts x G, the G
samples of a prompt stored as a consecutive run (rows ``g*G .. g*G + G-1``).

References: Shao et al. 2024 (DeepSeekMath, GRPO), Liu et al. 2025 (Dr. GRPO: no std scaling, no
length normalization), Ahmadian et al. 2024 (RLOO, "Back to Basics"), Hu 2025 (REINFORCE++),
Yu et al. 2025 (DAPO: token-level loss, clip-higher).
"""
from __future__ import annotations

import torch

from .ppo_math import _check_float, _check_mask, _is_real, masked_whiten

__all__ = ["group_advantages", "aggregate_loss", "discounted_returns", "reinforce_pp_advantages"]

_SCALES = ("group", "batch", "none")
_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def _group_view(rewards: torch.Tensor, group_size) -> torch.Tensor:
    _check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size} "
                         f"(B must be prompts x group_size, each prompt's samples consecutive)")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     leave_one_out: bool = False, eps: float = 1e-4,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample advantages from group baselines, (B,) float32.

    rewards: (B,) float, B = prompts x group_size, each prompt's G samples consecutive. With the
    mean and the unbiased sample std taken over a sample's group::

        baseline = mean of its group                      (leave_one_out=False: GRPO)
                 = mean of the other G-1 of its group     (leave_one_out=True: RLOO)
        scale="group":  A = (r - baseline) / (std of its group + eps)    (GRPO, as trl)
        scale="batch":  A = (r - baseline) / (std of the whole batch + eps)
        scale="none":   A = r - baseline                                 (Dr. GRPO, RLOO)

    valid: optional (B,) bool; a False sample (a response no reward function could score: its
    reward may be NaN) is left out of every mean and std and gets advantage 0. A group with one valid
    sample has no baseline to compare with: its advantage is 0. Computed in float64.
    Raises ValueError on a bad shape, group_size, scale or eps, or a non-finite valid reward.
    """
    groups = _group_view(rewards, group_size)
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if not _is_real(eps) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if valid is None:
        ok = torch.ones_like(groups, dtype=torch.bool)
    else:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != rewards.shape:
            raise ValueError(f"valid must be a bool tensor of shape {tuple(rewards.shape)}, got "
                             f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
        ok = valid.to(rewards.device).view_as(groups)
    r = torch.where(ok, groups.detach().to(torch.float64), 0.0)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contains NaN or inf at a valid sample (mark unscorable samples in valid)")
    n = ok.sum(dim=1, keepdim=True).to(torch.float64)                     # valid samples per group
    total = r.sum(dim=1, keepdim=True)
    mean = total / n.clamp(min=1)
    if leave_one_out:
        baseline = (total - r) / (n - 1).clamp(min=1)
    else:
        baseline = mean
    centered = torch.where(ok & (n > 1), r - baseline, 0.0)
    if scale == "group":
        var = torch.where(ok, (r - mean) ** 2, 0.0).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    elif scale == "batch":
        flat, flat_ok = r.flatten(), ok.flatten()
        count = flat_ok.sum().clamp(min=1)
        batch_mean = flat.sum() / count
        var = torch.where(flat_ok, (flat - batch_mean) ** 2, 0.0).sum() / (count - 1).clamp(min=1)
    if scale != "none":
        # std 0 means equal rewards and so a 0 numerator: with eps = 0 keep the 0 rather than 0/0
        denom = var.sqrt() + eps
        centered = torch.where(denom > 0, centered / torch.where(denom > 0, denom, 1.0), 0.0)
    return centered.flatten().to(torch.float32)


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str, *,
                   max_len: int | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar, the way each algorithm weighs tokens.

    per_token_loss: (B, T) float; mask: (B, T), nonzero on the response tokens that count::

        "seq_mean_token_mean":      mean over the B sequences of each one's token mean   (GRPO)
        "token_mean":               sum over all tokens / number of tokens               (DAPO, BNPO)
        "seq_mean_token_sum_norm":  sum over all tokens / (B * max_len)                  (Dr. GRPO)

    ``max_len`` defaults to T (pass the generation budget so the constant does not depend on the
    batch's longest response). A sequence with no token counts as a token mean of 0 and a batch with
    no token gives 0: nothing divides by zero. Padding is never read (it may hold inf or NaN).
    """
    _check_float("per_token_loss", per_token_loss)
    if per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss must have shape (B, T), got {tuple(per_token_loss.shape)}")
    _check_mask(mask, per_token_loss, "per_token_loss")
    if mode not in _AGGREGATIONS:
        raise ValueError(f"mode must be one of {_AGGREGATIONS}, got {mode!r}")
    valid = mask != 0
    loss = torch.where(valid, per_token_loss, 0.0)
    if mode == "seq_mean_token_mean":
        return (loss.sum(dim=1) / valid.sum(dim=1).clamp(min=1)).mean()
    if mode == "token_mean":
        return loss.sum() / valid.sum().clamp(min=1)
    T = per_token_loss.shape[1]
    if max_len is None:
        max_len = T
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < T:
        raise ValueError(f"max_len must be an int >= T={T} (the generation budget), got {max_len!r}")
    return loss.sum() / (per_token_loss.shape[0] * max_len)


def aggregate_weights(mask: torch.Tensor, mode: str, *, max_len: int | None = None) -> torch.Tensor:
    """(B, T) float32 per-token weights w with aggregate_loss(x, mask, mode) == (w * x).sum() for finite x:
    the form a loss taken token by token needs (rlhf_fast.fused_linear_token_loss); 0 off the mask."""
    valid = (mask != 0).float()
    if mode not in _AGGREGATIONS:
        raise ValueError(f"mode must be one of {_AGGREGATIONS}, got {mode!r}")
    if mode == "seq_mean_token_mean":
        return valid / (valid.sum(dim=1, keepdim=True).clamp(min=1) * valid.shape[0])
    if mode == "token_mean":
        return valid / valid.sum().clamp(min=1)
    T = valid.shape[1]
    max_len = T if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < T:
        raise ValueError(f"max_len must be an int >= T={T} (the generation budget), got {max_len!r}")
    return valid / (valid.shape[0] * max_len)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Per-token returns ``R_t = r_t + gamma * R_{t+1}`` within each row's response, (B, T).

    rewards: (B, T) float per-token rewards (e.g. ``per_token_rewards``); mask: (B, T). A 0 in the
    mask ends the episode (nothing flows back across it); returns are 0 there. float32 at least.
    """
    _check_float("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (B, T), got {tuple(rewards.shape)}")
    _check_mask(mask, rewards, "rewards")
    if not _is_real(gamma) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    valid = mask != 0
    r = torch.where(valid, rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32)), 0.0)
    returns = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        running = torch.where(valid[:, t], r[:, t] + gamma * running, 0.0)
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025) advantages: per-token returns whitened over the whole batch, (B, T).

    rewards: (B, T) per-token rewards with the KL penalty already in them (``per_token_rewards``:
    score at the last token, ``-kl_coef * kl`` everywhere); ``A = masked_whiten(discounted_returns(
    rewards, mask, gamma), mask)``: the batch, not the group, gives the baseline and the scale.
    """
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)
