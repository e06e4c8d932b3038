"""The InstructGPT pipeline on rlhf_fast: SFT -> reward model -> PPO, as a library and the `rlhf-fast` CLI.

Stages (each also a CLI subcommand, see ``rlhf_fast.cli``): ``run_sft``, ``run_rm``, ``run_ppo`` and
``run_demo`` (all three on the built-in sorting task), taking a ``Config`` from ``build_config``.
The PPO math is exposed as small pure functions: ``compute_gae``, ``masked_mean``, ``masked_whiten``,
``value_loss`` and friends (``rlhf_fast.rlhf.ppo_math``), ``policy_loss`` (``rlhf_fast.rlhf.ppo_loss``); the
critic-free math
(GRPO, Dr. GRPO, RLOO, REINFORCE++) as ``group_advantages``, ``aggregate_loss`` and
``reinforce_pp_advantages`` (``rlhf_fast.rlhf.critic_free``), trained by ``run_rl`` (``rl.algo``).

Names are loaded lazily so that ``import rlhf_fast.rlhf`` stays cheap.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    **{name: "rlhf_fast.rlhf.ppo_math" for name in (
        "masked_mean", "masked_var", "masked_whiten", "compute_gae", "value_loss",
        "explained_variance", "FixedKLController", "AdaptiveKLController", "per_token_rewards")},
    **{name: "rlhf_fast.rlhf.critic_free" for name in (
        "group_advantages", "aggregate_loss", "aggregate_weights", "discounted_returns", "reinforce_pp_advantages")},
    "policy_loss": "rlhf_fast.rlhf.ppo_loss",
    "Config": "rlhf_fast.rlhf.config",
    "build_config": "rlhf_fast.rlhf.config",
    "get_tokenizer": "rlhf_fast.rlhf.tokenizer",
    "SortTask": "rlhf_fast.rlhf.task",
    "run_sft": "rlhf_fast.rlhf.pipeline",
    "run_rm": "rlhf_fast.rlhf.pipeline",
    "run_ppo": "rlhf_fast.rlhf.pipeline",
    "run_demo": "rlhf_fast.rlhf.pipeline",
    "run_rl": "rlhf_fast.rlhf.rl_pipeline",
    "NonFiniteError": "rlhf_fast.rlhf.runtime",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
