"""PPO-for-RLHF math as small pure functions on (B, T) tensors (the clipped policy loss is in policy_loss.py).

Every function takes a ``mask`` of the same shape (bool, integer or float; nonzero = a response token
that counts). Rows are usually right-padded: ``mask[b] = [1, ..., 1, 0, ..., 0]``. Names follow
CleanRL and TRL (``pg_loss``, ``vf_clipfrac``, ``approx_kl``) so an RL reader recognises them.

References: Schulman et al. 2017 (PPO, clipped objectives), Schulman et al. 2016 (GAE),
Ziegler et al. 2019 (adaptive KL controller, per-token KL reward), Ouyang et al. 2022 (InstructGPT),
Huang et al. 2024 ("The N implementation details of RLHF with PPO").
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

__all__ = [
    "masked_mean", "masked_var", "masked_whiten", "compute_gae", "value_loss",
    "explained_variance", "FixedKLController", "AdaptiveKLController", "per_token_rewards",
]

_WHITEN_EPS = 1e-8


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(name: str, t) -> None:
    _check_tensor(name, t)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_mask(mask, like: torch.Tensor, like_name: str) -> None:
    _check_tensor("mask", mask)
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or float, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"mask must have the shape of {like_name} {tuple(like.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but {like_name} is on {like.device}")


def _check_same_shape(name: str, t, ref_name: str, ref: torch.Tensor) -> None:
    _check_float(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_2d(name: str, t) -> None:
    _check_float(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(t.shape)}")


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_clip_range(clip_range) -> None:
    if not _is_real(clip_range) or not clip_range > 0:
        raise ValueError(f"clip_range must be a number > 0, got {clip_range!r}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least: GAE accumulates over T steps, and a bf16 ratio is too coarse to clip."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_like_first(mask, **tensors) -> None:
    """The first of `tensors` a float tensor; the others float tensors of its shape and device; the mask too."""
    (ref_name, ref), *others = tensors.items()
    _check_float(ref_name, ref)
    for name, t in others:
        _check_same_shape(name, t, ref_name, ref)
    _check_mask(mask, ref, ref_name)


def _clipped_loss_inputs(mask, clip_range, **tensors) -> tuple[torch.Tensor, ...]:
    """The checked inputs of a clipped PPO loss, upcast by ``_compute_dtype`` and with padding zeroed.

    The first of `tensors` is the current prediction (its gradient flows); the others come from the
    rollout and are detached. Padding is zeroed before use: an inf there would turn the zero gradient
    into 0 * inf = NaN.
    """
    _check_like_first(mask, **tensors)
    _check_clip_range(clip_range)
    current, *rollout = tensors.values()
    dtype = _compute_dtype(current, *rollout)
    valid = mask != 0
    return (torch.where(valid, current.to(dtype), 0.0),
            *(torch.where(valid, t.detach().to(dtype), 0.0) for t in rollout))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is nonzero (float masks act as weights).

    x: (B, T) float, or any shape; mask: same shape. Returns ``sum(x * mask) / sum(mask)``, a scalar
    for ``dim=None`` or reduced over ``dim``. ``dim=None`` with an all-zero mask raises ValueError; a
    row with no response token along ``dim`` gives 0 (it carries no information, and a NaN would
    poison the batch). Entries where the mask is 0 are never read, so padding may hold inf or NaN.
    """
    _check_float("x", x)
    _check_mask(mask, x, "x")
    m = mask.to(x.dtype)
    weighted = torch.where(mask != 0, x, 0.0) * m  # padding may hold inf/NaN: select, don't multiply
    if dim is None:
        denom = m.sum()
        if not bool(denom > 0):
            raise ValueError("mask must have at least one nonzero entry (masked_mean of nothing)")
        return weighted.sum() / denom
    denom = m.sum(dim)
    num = weighted.sum(dim)
    return torch.where(denom > 0, num / torch.where(denom > 0, denom, 1), torch.zeros_like(num))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked entries, a scalar.

    ``var = masked_mean((x - masked_mean(x))**2)``, times the Bessel factor ``n / (n - 1)`` with
    ``n = mask.sum()`` when ``unbiased`` (as TRL's ``masked_var``). Unbiased needs n > 1.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if not bool(n > 1):
            raise ValueError(f"mask must have more than one nonzero entry for an unbiased variance, "
                             f"got mask.sum() = {float(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalize ``x`` to mean 0 and variance 1 over the masked entries.

    ``(x - mean) * rsqrt(var + 1e-8)`` with ``mean, var = masked_mean(x), masked_var(x)`` (unbiased);
    with ``shift_mean=False`` the mean is added back (only the scale changes, as for rewards in
    lm-human-preferences). Entries where ``mask`` is 0 are set to 0. Shape and dtype of ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros_like(whitened))


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), per token, one episode per row.

    rewards, values: (B, T) float (per-token rewards, e.g. from ``per_token_rewards``; values
    V(s_t) from the value head); mask: (B, T), nonzero on response tokens. A 0 in the mask ends the
    episode: the value after the last valid token bootstraps to 0, so right-padded rows work.
    With ``V_{T} = 0`` and ``m_t = mask[:, t] != 0``::

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = (delta_t + gamma * lam * A_{t+1}) * m_t
        R_t     = (A_t + V_t) * m_t

    Returns ``(advantages, returns)``, both (B, T), 0 where the mask is 0, in float32 (float64 if an
    input is float64). Detached: they are targets, never differentiated through.
    Raises ValueError on shape mismatch, gamma or lam outside [0, 1], or NaN/inf in rewards/values.
    """
    _check_2d("rewards", rewards)
    _check_same_shape("values", values, "rewards", rewards)
    _check_mask(mask, rewards, "rewards")
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not _is_real(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    _check_finite("rewards", rewards)
    _check_finite("values", values)
    dtype = _compute_dtype(rewards, values)
    valid = mask != 0
    r = torch.where(valid, rewards.detach().to(dtype), 0.0)
    v = torch.where(valid, values.detach().to(dtype), 0.0)
    B, T = r.shape
    advantages = torch.zeros_like(r)
    next_value = r.new_zeros(B)  # V_{t+1} * m_{t+1}
    next_adv = r.new_zeros(B)    # A_{t+1}, already 0 past the episode end
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = torch.where(valid[:, t], delta + gamma * lam * next_adv, 0.0)
        advantages[:, t] = adv
        next_value, next_adv = v[:, t], adv
    returns = torch.where(valid, advantages + v, 0.0)
    return advantages, returns


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 / TRL / InstructGPT), to minimize.

    values: (B, T) current value predictions (differentiable); old_values, returns: (B, T) from the
    rollout (constants); mask: (B, T)::

        v_clipped = old_values + clamp(values - old_values, -clip_range, clip_range)
        vf_loss   = 0.5 * masked_mean(max((values - returns)**2, (v_clipped - returns)**2))
        vf_clipfrac = masked_mean(float((v_clipped - returns)**2 > (values - returns)**2))

    Half-precision inputs are upcast to float32. Returns ``(vf_loss, {"vf_clipfrac"})``; the stat
    is a detached scalar. Padding is zeroed before use, so the loss and the gradient stay finite.
    """
    values, old, target = _clipped_loss_inputs(mask, clip_range, values=values, old_values=old_values,
                                               returns=returns)
    v_clipped = old + torch.clamp(values - old, -clip_range, clip_range)
    losses = (values - target) ** 2
    losses_clipped = (v_clipped - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((losses_clipped > losses).to(losses.dtype), mask)
    return loss, {"vf_clipfrac": vf_clipfrac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over the masked entries, a detached scalar.

    1 is a perfect value function, 0 is no better than a constant, negative is worse. NaN when the
    returns have zero variance (as CleanRL's ``np.nan``): the ratio is undefined there.
    """
    _check_like_first(mask, values=values, returns=returns)
    with torch.no_grad():
        var_returns = masked_var(returns, mask, unbiased=False)
        var_residual = masked_var(returns - values, mask, unbiased=False)
        return torch.where(var_returns > 0, 1.0 - var_residual / var_returns,
                           torch.full_like(var_returns, math.nan))


def per_token_rewards(score: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                      mask: torch.Tensor) -> torch.Tensor:
    """Per-token PPO rewards for RLHF (Ziegler et al. 2019; InstructGPT).

    score: (B,) scalar reward per sequence (reward model and/or custom reward); kl: (B, T)
    per-token KL estimate against the reference policy (e.g. ``logprobs - ref_logprobs``, k1);
    kl_coef: float >= 0; mask: (B, T) with at least one response token per row::

        rewards = -kl_coef * kl * mask;  rewards[b, last_valid(b)] += score[b]

    where ``last_valid(b)`` is the last index with a nonzero mask. Returns (B, T) float32 (float64
    if an input is float64), 0 where the mask is 0. Detached.
    """
    _check_2d("kl", kl)
    _check_float("score", score)
    if score.shape != kl.shape[:1]:
        raise ValueError(f"score must have shape (B,) = ({kl.shape[0]},), got {tuple(score.shape)}")
    if score.device != kl.device:
        raise ValueError(f"score is on {score.device} but kl is on {kl.device}")
    _check_mask(mask, kl, "kl")
    if not _is_real(kl_coef) or not kl_coef >= 0:
        raise ValueError(f"kl_coef must be a number >= 0, got {kl_coef!r}")
    valid = mask != 0
    has_token = valid.any(dim=1)
    if not bool(has_token.all()):
        row = int((~has_token).nonzero()[0, 0])
        raise ValueError(f"mask row {row} has no response token: the score has nowhere to go")
    dtype = _compute_dtype(score, kl)
    T = kl.shape[1]
    rewards = torch.where(valid, -kl_coef * kl.detach().to(dtype), 0.0)
    positions = torch.arange(T, device=kl.device).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(dim=1)  # (B,)
    rewards[torch.arange(kl.shape[0], device=kl.device), last] += score.detach().to(dtype)
    return rewards


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not _is_real(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _as_count(name: str, value) -> int:
    """Python, numpy or integer-tensor int >= 0 (bools and floats are refused)."""
    if not isinstance(value, bool):
        try:
            count = operator.index(value)
        except TypeError:
            count = -1
        if count >= 0:
            return count
    raise ValueError(f"{name} must be an int >= 0, got {value!r}")


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op so trainers can treat both kinds alike."""

    def __init__(self, kl_coef: float):
        self.value = _as_float("kl_coef", kl_coef)
        if self.value < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")

    def update(self, current_kl, n_steps: int) -> None:
        _as_float("current_kl", current_kl)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (sec. 2.2), a proportional controller.

    After a rollout batch whose mean KL (summed over the response tokens of a sequence) is
    ``current_kl``, covering ``n_steps`` samples::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    so ``value`` rises when the policy drifts past ``target`` nats and falls when it stays below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = _as_float("init_kl_coef", init_kl_coef)
        if self.value < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        self.target = _as_float("target", target)
        if not self.target > 0:
            raise ValueError(f"target must be > 0, got {target}")
        self.horizon = _as_float("horizon", horizon)
        if not self.horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")

    def update(self, current_kl, n_steps: int) -> None:
        current = _as_float("current_kl", current_kl)
        steps = _as_count("n_steps", n_steps)
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
