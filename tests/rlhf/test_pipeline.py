"""The stages end to end on a tiny model: outputs, resume after a kill mid-PPO, NaN guard (seconds each)."""
import json
import re
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch

from rlhf_fast.rlhf import checkpoint, pipeline
from rlhf_fast.rlhf.config import build_config
from rlhf_fast.rlhf.run_io import read_metrics
from rlhf_fast.rlhf.runtime import NonFiniteError

from .stop_after import Stop, stop_after

TINY = {
    "run.progress": "false", "run.threads": 1, "run.plots": "false",
    "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 20,
    "task.min_digits": 2, "task.max_digits": 3, "task.n_sft": 64, "task.n_pairs": 32, "task.n_eval_pairs": 16,
    "task.n_prompts": 32, "task.n_eval_prompts": 8,
    "sft.steps": 3, "sft.batch_size": 16, "sft.ckpt_every": 1,
    "rm.steps": 2, "rm.batch_size": 8, "rm.norm_samples": 8, "rm.ckpt_every": 1,
    "ppo.steps": 4, "ppo.rollout_batch_size": 8, "ppo.gen_batch_size": 4, "ppo.minibatch_size": 4,
    "ppo.max_new_tokens": 5, "ppo.eval_every": 2, "ppo.ckpt_every": 2,
}


def tiny(out, device, **extra):
    return build_config(None, {**TINY, "run.out": str(out), "run.device": str(device), **extra})


@pytest.fixture(scope="module")
def sft_rm_run(tmp_path_factory, device):
    """SFT and RM stages of a tiny run, shared by the PPO tests (which copy the directory)."""
    out = tmp_path_factory.mktemp("base")
    cfg = tiny(out, device)
    pipeline.run_sft(cfg)
    pipeline.run_rm(cfg)
    return out


def test_demo_outputs(sft_rm_run, tmp_path, device):
    out = tmp_path / "run"
    shutil.copytree(sft_rm_run, out)
    cfg = tiny(out, device, **{"run.plots": "true"})
    summary = pipeline.run_ppo(cfg)
    for key in ("task_score_sft", "rm_accuracy", "task_score_ppo", "kl_final", "seconds_sft", "seconds_ppo"):
        assert key in summary and summary[key] is not None, key
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "config.yaml").is_file() and (out / "data" / "sft.jsonl").is_file()
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / checkpoint.NAME).is_file()
    assert {p.name for p in (out / "ppo" / "plots").glob("*.png")} >= {"score.png", "kl.png", "task_score.png"}
    assert pipeline.summary_plot(out).read_bytes()[:4] == b"\x89PNG"
    ppo = read_metrics(out / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in ppo] == [0, 1, 2, 3, 4]
    for key in ("score", "kl", "pg_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "explained_var"):
        assert all(key in r for r in ppo[1:]), key
    assert [r["step"] for r in ppo if "task_score" in r] == [0, 2, 4]
    assert len(read_metrics(out / "sft" / "metrics.jsonl")) == 3
    assert "eval_accuracy" in read_metrics(out / "rm" / "metrics.jsonl")[-1]
    # the RM was normalized over SFT samples, and the critic starts from it
    ckpt = checkpoint.load(out / "rm" / checkpoint.NAME)
    assert ckpt["done"] and ckpt["result"]["reward_std"] > 0


def test_resume_after_kill_mid_ppo_matches_uninterrupted(sft_rm_run, tmp_path, device):
    full, killed = tmp_path / "full", tmp_path / "killed"
    for d in (full, killed):
        shutil.copytree(sft_rm_run, d)
    pipeline.run_ppo(tiny(full, device))
    with pytest.raises(Stop):  # after step 3's update, before its checkpoint (ckpt_every=2): the resumed run redoes 3
        pipeline.run_ppo(tiny(killed, device), on_step=stop_after(3))
    assert checkpoint.load(killed / "ppo" / checkpoint.NAME)["step"] == 2
    pipeline.run_ppo(tiny(killed, device), resume=True)
    if device.type != "cpu":  # bitwise equality is the CPU guarantee; GPU kernels may reorder float sums
        assert len(read_metrics(killed / "ppo" / "metrics.jsonl")) == len(read_metrics(full / "ppo" / "metrics.jsonl"))
        return
    assert read_metrics(killed / "ppo" / "metrics.jsonl") == read_metrics(full / "ppo" / "metrics.jsonl")
    a = checkpoint.load(full / "ppo" / checkpoint.NAME)
    b = checkpoint.load(killed / "ppo" / checkpoint.NAME)
    for name in ("policy", "value"):
        for k, v in a[name]["weights"].items():
            assert torch.equal(v, b[name]["weights"][k]), (name, k)


def test_checkpoints_of_older_versions_resume_or_say_why(tmp_path, device):
    """Optimizer state keyed by parameter index (DDP and one-process checkpoints written before it was keyed
    by name) resumes to the uninterrupted run's metrics; None (what FSDP runs wrote then) is refused, naming
    the checkpoint."""
    full, old = tmp_path / "full", tmp_path / "old"
    pipeline.run_sft(tiny(full, device))
    with pytest.raises(Stop):
        pipeline.run_sft(tiny(old, device), on_step=stop_after(2))
    new = old / "sft" / checkpoint.NAME
    ckpt = checkpoint.load(new)
    new.unlink()
    path = old / "sft" / checkpoint.LEGACY_NAME  # older versions pickled the state: read with weights_only=True
    torch.save({**ckpt, "optimizer": None}, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " was written by an FSDP run of an older"):
        pipeline.run_sft(tiny(old, device), resume=True)
    saved = ckpt["optimizer"]
    index = {name: i for i, name in enumerate(name for group in saved["param_groups"] for name in group["params"])}
    by_index = {"state": {index[name]: s for name, s in saved["state"].items()},
                "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                 for group in saved["param_groups"]]}
    torch.save({**ckpt, "optimizer": by_index}, path)
    pipeline.run_sft(tiny(old, device), resume=True)
    resumed, uninterrupted = read_metrics(old / "sft" / "metrics.jsonl"), read_metrics(full / "sft" / "metrics.jsonl")
    if device.type == "cpu":  # bitwise equality is the CPU guarantee; GPU kernels may reorder float sums
        assert resumed == uninterrupted
    else:
        assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [1, 2, 3]


def test_nan_reward_stops_ppo_at_its_step(sft_rm_run, tmp_path, device, monkeypatch):
    module = types.ModuleType("nan_reward_module")
    module.reward = lambda prompts, responses: [float("nan")] * len(prompts)
    monkeypatch.setitem(sys.modules, "nan_reward_module", module)
    out = tmp_path / "run"
    shutil.copytree(sft_rm_run, out)
    cfg = tiny(out, device, **{"ppo.reward_mode": "sum", "ppo.reward_fn": "nan_reward_module:reward"})
    with pytest.raises(NonFiniteError, match=r"ppo step 1: reward is not finite"):
        pipeline.run_ppo(cfg)
    assert not (out / "ppo" / checkpoint.NAME).exists()


def test_nan_guard_names_stage_and_step_and_keeps_checkpoint(tmp_path, device):
    cfg = tiny(tmp_path, device, **{"sft.lr": 1e30, "sft.warmup_steps": 0, "sft.grad_clip": 0})
    with pytest.raises(NonFiniteError, match=r"sft step 2: loss is not finite"):
        pipeline.run_sft(cfg)
    ckpt = checkpoint.load(tmp_path / "sft" / checkpoint.NAME)
    assert ckpt["step"] == 1


def test_custom_reward_function_replaces_the_reward_model(sft_rm_run, tmp_path, device):
    out = tmp_path / "run"
    shutil.copytree(sft_rm_run, out)
    cfg = tiny(out, device, **{"ppo.steps": 1, "ppo.reward_mode": "fn", "ppo.missing_eos_penalty": 0.0,
                               "ppo.reward_fn": "rlhf_fast.rlhf.task:task_reward"})
    pipeline.run_ppo(cfg)
    record = read_metrics(out / "ppo" / "metrics.jsonl")[-1]
    assert record["score"] == pytest.approx(record["task_score_rollout"])  # the score is the rule-based reward
    bad = tiny(out, device, **{"ppo.reward_mode": "sum", "ppo.reward_fn": "rlhf_fast.rlhf.task:no_such_fn"})
    with pytest.raises(ValueError, match="ppo.reward_fn='rlhf_fast.rlhf.task:no_such_fn' cannot be loaded"):
        pipeline.run_ppo(bad, overwrite=True)
    assert read_metrics(out / "ppo" / "metrics.jsonl")[-1] == record  # refused before anything was removed


def test_own_sft_data_is_used_and_no_builtin_task_is_written(tmp_path, device):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    summary = pipeline.run_sft(tiny(out, device, **{"sft.data": str(data), "sft.steps": 2}))
    assert summary["task_score_sft"] is None  # no held-out prompts or scorer for a user's own task
    assert not (out / "data").exists()
    assert len(read_metrics(out / "sft" / "metrics.jsonl")) == 2


def test_sigkill_mid_ppo_then_cli_resume_matches_uninterrupted(sft_rm_run, tmp_path, device):
    """A real kill (SIGKILL, no cleanup) of `rlhf-fast ppo`, then `rlhf-fast ppo --resume DIR`."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    for d in (full, killed):
        shutil.copytree(sft_rm_run, d)
    extra = {"ppo.steps": 6}
    pipeline.run_ppo(tiny(full, device, **extra))
    cfg = tiny(killed, device, **extra)
    opts = [f"--{section}.{k}={v}" for section in ("run", "model", "task", "ppo")
            for k, v in vars(getattr(cfg, section)).items()]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_fast", "ppo", *opts], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    metrics, deadline = killed / "ppo" / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and '"step": 3' in metrics.read_text()):  # step 3 logged, checkpoint is 2
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert checkpoint.load(killed / "ppo" / checkpoint.NAME)["step"] < 6
    done = subprocess.run([sys.executable, "-m", "rlhf_fast", "ppo", "--resume", str(killed)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if device.type == "cpu":
        assert read_metrics(metrics) == read_metrics(full / "ppo" / "metrics.jsonl")
