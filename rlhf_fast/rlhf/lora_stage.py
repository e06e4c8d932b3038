"""The `lora` config section in the stages: adapters on a freshly started policy (or reward model), the
reference policy as that same policy with its adapters switched off (no second copy of the weights is
loaded), and PPO's value model as adapters on the reward model's backbone (one copy for both).

A stage that resumes gets its adapters back from its checkpoint (runtime.load_model); a stage starting
from an earlier stage's LoRA model starts from the merged weights (load_model(..., merge=True)), so the
reference is that model exactly and the new adapters start at zero on top of it.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import Config


def apply_run_lora(cfg: Config, model):
    """`model` with cfg.lora's adapters when lora.r > 0 (base weights frozen), else unchanged."""
    c = cfg.lora
    if c.r > 0:
        from ..model import apply_lora
        apply_lora(model, c.r, c.alpha, c.dropout, c.targets)
    return model


class AdaptersOff(nn.Module):
    """Calls a LoRA policy with its adapters disabled and in eval mode: the frozen reference it started
    from. The policy is held outside the module tree, so `.eval()` or `.requires_grad_(False)` on the
    reference never reaches the policy's adapters."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.__dict__["policy"] = policy

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        from ..model import adapters_disabled
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            with adapters_disabled(policy):
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)


def reference_policy(cfg: Config, policy: nn.Module, init_state: dict | None, device):
    """The frozen KL reference: `policy` (unwrapped) with adapters off when LoRA is on, else a copy loaded
    from `init_state` (the policy's init, merged if it was a LoRA model)."""
    from .runtime import load_model
    if cfg.lora.r > 0:
        return AdaptersOff(policy)
    return load_model(init_state, device, merge=True).eval().requires_grad_(False)


def value_on_reward_backbone(cfg: Config, reward: nn.Module, saved: dict | None = None):
    """(value model, reward model) sharing one copy of the reward model's backbone, with LoRA on: the
    value model is that backbone, frozen, with cfg.lora's adapters and a value head started from the
    reward head; the reward model scores through the same backbone with those adapters switched off
    (`AdaptersOff`), so it computes exactly what it did. `reward` is the plain reward model as loaded;
    it is frozen here (train.frozen_dtype) before the adapters are added, which stay fp32. `saved`: the
    value model's checkpoint entry when resuming (its adapters and head; its base is the reward's)."""
    import copy

    from ..model import GPT, apply_lora
    from .memory_switches import frozen
    score = copy.deepcopy(reward.score).float().requires_grad_(True)
    reward = frozen(cfg, reward)
    with torch.device("meta"):  # only the module tree: the backbone and head are the reward's / the copy
        value = GPT(copy.deepcopy(reward.config), head="value")
    value.transformer, value.score = reward.transformer, score
    c = saved["lora"] if saved is not None else {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                                   "dropout": cfg.lora.dropout, "targets": cfg.lora.targets}
    apply_lora(value, c["r"], c["alpha"], c["dropout"], c["targets"])
    if saved is not None:
        value.load_state_dict(saved["weights"])  # the base it holds is the reward's, value for value
    return value.train(), AdaptersOff(reward)
