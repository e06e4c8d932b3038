"""The train section's memory switches in the stages: gradient checkpointing recomputes every block and
changes no number; frozen models (reference, reward, a LoRA policy's base) held in bfloat16 train and
resume exactly; scoring in smaller forwards (train.score_batch_size) logs what one forward per chunk logs."""
import shutil

import pytest
import torch

from rlhf_fast.model.layers import Block
from rlhf_fast.rlhf import checkpoint, pipeline, ppo, sft
from rlhf_fast.rlhf.rl_pipeline import run_rl
from rlhf_fast.rlhf.run_io import read_metrics

from .stop_after import Stop, stop_after
from .test_distributed import _same_metrics
from .test_grad_accum import _grads_per_step, sft_rm_run  # noqa: F401 - the fixture
from .test_lora_stages import _cfg, lora_sft  # noqa: F401 - the fixture
from .test_pipeline import tiny
from .test_rl import RL


def _block_calls(monkeypatch):
    calls = []
    real = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def test_grad_checkpointing_recomputes_each_block_and_gives_the_same_gradients(tmp_path, device, monkeypatch):
    runs = {}
    for flag in ("false", "true"):
        with monkeypatch.context() as m:
            calls, grads = _block_calls(m), _grads_per_step(m, sft)
            pipeline.run_sft(tiny(tmp_path / flag, device, **{"train.grad_checkpointing": flag, "run.plots": "false"}))
        runs[flag] = (len(calls), grads)
    (plain_calls, plain), (remat_calls, remat) = runs["false"], runs["true"]
    assert remat_calls > plain_calls  # the training forwards ran twice per block (evaluation: once)
    assert len(plain) == len(remat) == 3
    for a, b in zip(plain, remat):  # the same operations on the same numbers, recomputed
        assert torch.equal(a, b)
    _same_metrics(tmp_path / "false", tmp_path / "true", "sft")


def test_bf16_frozen_models_with_lora_ppo_train_and_resume_exactly(lora_sft, tmp_path, device, monkeypatch):
    extra = {"ppo.steps": 4, "ppo.ckpt_every": 2, "train.frozen_dtype": "bfloat16"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    shutil.copytree(lora_sft, full)
    pipeline.run_rm(_cfg(full, device))
    shutil.copytree(full, killed)
    seen = {}
    real = ppo.train_ppo

    def spy(cfg, rt, tok, models, *args, **kwargs):
        seen.update({k: {p.dtype for p in getattr(m, "policy", m).parameters() if not p.requires_grad}
                     for k, m in models.items()})
        seen["adapters"] = {p.dtype for p in models["policy"].parameters() if p.requires_grad}
        return real(cfg, rt, tok, models, *args, **kwargs)
    monkeypatch.setattr(ppo, "train_ppo", spy)
    pipeline.run_ppo(_cfg(full, device, **extra))
    assert seen["reward"] == seen["ref"] == seen["policy"] == {torch.bfloat16}  # ref: the policy's own base
    assert seen["adapters"] == {torch.float32} and seen["value"] == {torch.bfloat16}  # the reward's base
    with pytest.raises(Stop):
        pipeline.run_ppo(_cfg(killed, device, **extra), on_step=stop_after(2))
    pipeline.run_ppo(_cfg(killed, device, **extra), resume=True)
    a, b = (read_metrics(o / "ppo" / "metrics.jsonl") for o in (killed, full))
    assert len(a) == len(b) == 5 and all(r["score"] == r["score"] for r in b[1:])
    if device.type == "cpu":
        assert a == b
    base = checkpoint.load(full / "ppo" / checkpoint.NAME)["policy"]["weights"]
    assert {t.dtype for n, t in base.items() if ".lora_" not in n} == {torch.bfloat16}


@pytest.mark.parametrize("stage", ["ppo", "rl"])
def test_scoring_in_smaller_forwards_logs_the_same_metrics(sft_rm_run, tmp_path, device, stage):
    extra = {**RL, "rl.algo": "grpo", "rl.kl_coef": 0.1, "rl.reward_fn": "", "rl.prompts": "",
             "ppo.steps": 2, "rl.steps": 2}
    outs = []
    for size in (0, 1):
        out = tmp_path / f"score{size}"
        shutil.copytree(sft_rm_run, out)
        cfg = tiny(out, device, **{**extra, "train.score_batch_size": size})
        pipeline.run_ppo(cfg) if stage == "ppo" else run_rl(cfg)
        outs.append(out)
    _same_metrics(*outs, stage)  # one row per forward: the same numbers to fp32 rounding of the matmuls
