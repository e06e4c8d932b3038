"""The `lora` config section in the stages: adapters on a freshly started policy, and the reference policy
as that same policy with its adapters switched off (no second copy of the weights is loaded).

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
