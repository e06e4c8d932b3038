"""`--train.fused_loss` (default on): the RL updates take the policy loss's gradient inside the lm_head pass
(rlhf_fast.fused_linear_token_loss through GPT.forward's token_loss) instead of logprobs, loss, backward.
Both compute the same per-token terms, so every optimizer step sees the same gradient to fp32 rounding
(compared step by step, as tests/rlhf/test_grad_accum.py does for accumulation), and the logged metrics
agree; with sampling filters the update keeps the op path (the cutoffs go through the logprob op)."""
import shutil

import pytest

import rlhf_fast
from .test_distributed import _same_metrics
from .test_grad_accum import _run, _tolerance, sft_rm_run  # noqa: F401  (a fixture)


CASES = {"ppo": ("ppo", {}), "grpo-k3-in-loss": ("rl", {}), "grpo-exact-kl": ("rl", {"rl.kl_kind": "full"}),
         "dr_grpo": ("rl", {"rl.algo": "dr_grpo"}), "rloo": ("rl", {"rl.algo": "rloo"})}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_gives_the_gradient_of_logprobs_then_loss(sft_rm_run, tmp_path, device, monkeypatch,  # noqa: F811
                                                             case):
    stage, extra = CASES[case]
    runs, calls, real = {}, [], rlhf_fast.fused_linear_token_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(rlhf_fast, "fused_linear_token_loss", counting)
    for fused in (False, True):
        out = tmp_path / f"fused{int(fused)}"
        shutil.copytree(sft_rm_run, out)
        calls.clear()
        runs[fused] = (out, _run(stage, out, device, monkeypatch, **{**extra, "train.fused_loss": fused}))
        assert bool(calls) == fused, (fused, len(calls))  # the switch decides which path the updates take
    (plain_out, plain), (fused_out, fused) = runs[False], runs[True]
    assert len(plain) == len(fused) > 0
    for step, (g_plain, g_fused) in enumerate(zip(plain, fused)):
        assert float(g_plain.abs().max()) > 0, step
        err = float((g_fused - g_plain).abs().max())
        assert err <= _tolerance(g_plain), (stage, step, err, float(g_plain.abs().max()))
    _same_metrics(plain_out, fused_out, stage)
