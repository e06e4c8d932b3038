"""The `lora` section in the stages on a tiny Llama-shaped model: SFT trains only adapters; the rl stage
starts from the merged SFT model with fresh adapters, takes its reference from the policy with adapters
off (one model loaded), keeps the base weights bit for bit and resumes to identical metrics; export
writes PEFT adapters that peft + transformers load with the same logits, or merged weights (--merge)."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_fast.model import GPT
from rlhf_fast.rlhf import checkpoint, pipeline
from rlhf_fast.rlhf.export import export_run
from rlhf_fast.rlhf.rl_pipeline import run_rl
from rlhf_fast.rlhf.run_io import read_metrics
from rlhf_fast.rlhf.runtime import load_model

from .stop_after import Stop, stop_after
from .test_distributed import _same_metrics, _torchrun
from .test_rl import RL, rl_cfg

LORA = {"lora.r": 2, "lora.alpha": 4.0, "model.bias": "false", "model.norm": "rmsnorm", "model.mlp": "swiglu",
        "model.pos_emb": "rope", "model.family": "llama", "sft.lr": 0.03, "rl.lr": 0.02}


def length(prompts, responses, **fields):
    """A reward that varies within every group, so the policy moves away from its reference."""
    return [float(len(r)) for r in responses]


def _cfg(out, device, **extra):
    return rl_cfg(out, device, **{**LORA, "rl.reward_fn": f"{__name__}:length", **extra})


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("lora_sft")
    pipeline.run_sft(_cfg(out, device))
    return out


def _sft_state(run):
    return checkpoint.load(run / "sft" / checkpoint.NAME)


def test_lora_sft_trains_only_the_adapters(lora_sft):
    state = _sft_state(lora_sft)
    model = state["model"]
    assert model["lora"] == {"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": list(model["lora"]["targets"])}
    adapters = {n for n in model["weights"] if ".lora_" in n}
    assert len(adapters) == 2 * 7 * 1  # A and B of 7 projections, 1 layer
    assert set(state["optimizer"]["state"]) == adapters  # AdamW holds moments of the adapters only
    assert all(float(model["weights"][n].abs().max()) > 0 for n in adapters if ".lora_B." in n)


def test_rl_with_lora_loads_one_model_keeps_the_base_and_resumes_exactly(lora_sft, tmp_path, device, monkeypatch):
    from rlhf_fast.rlhf import rl_pipeline
    full, killed = tmp_path / "full", tmp_path / "killed"
    shutil.copytree(lora_sft, full)
    shutil.copytree(lora_sft, killed)
    loads = []
    real = rl_pipeline.load_model
    monkeypatch.setattr(rl_pipeline, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    run_rl(_cfg(full, device))
    assert len(loads) == 1  # the policy; the KL reference is the same weights with adapters off
    with pytest.raises(Stop):
        run_rl(_cfg(killed, device), on_step=stop_after(3))
    run_rl(_cfg(killed, device), resume=True)
    a, b = read_metrics(killed / "rl" / "metrics.jsonl"), read_metrics(full / "rl" / "metrics.jsonl")
    assert len(a) == len(b) == 5
    if device.type == "cpu":  # bitwise equality is the CPU guarantee
        assert a == b
    # first rollout: fresh adapters (B = 0), the policy is its reference exactly; the logged KL still
    # compares the sampler's behaviour logprobs (C++ or reference sampler) with the reference model's
    # (the fused logprob op): the same numbers by two fp32 algorithms, a few ulps of |log p| apart
    assert abs(b[1]["kl"]) < 1e-6
    assert 0 < b[1]["kl_loss"] < b[-1]["kl_loss"]  # then the policy moves away from the reference
    merged_sft = load_model(_sft_state(full)["model"], torch.device("cpu"), merge=True).state_dict()
    policy = checkpoint.load(full / "rl" / checkpoint.NAME)["policy"]
    assert policy["lora"]["r"] == 2
    base = {n: t for n, t in policy["weights"].items() if ".lora_" not in n}
    assert base.keys() == merged_sft.keys() and all(torch.equal(base[n], merged_sft[n]) for n in base)


def test_export_writes_peft_adapters_or_merged_weights(lora_sft, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers
    adapted = load_model(_sft_state(lora_sft)["model"], torch.device("cpu")).eval()
    idx = torch.randint(3, adapted.config.vocab_size, (2, 17))
    with torch.no_grad():
        want = adapted(idx)
    merged = export_run(lora_sft, tmp_path / "merged", "sft", merge=True)
    assert not (merged / "adapter_config.json").exists()
    with torch.no_grad():
        got = GPT.from_pretrained(merged, backend="reference")(idx)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-5 * scale
    out = export_run(lora_sft, tmp_path / "adapters", "sft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    with torch.no_grad():
        plain = hf(idx).logits
        got = peft.PeftModel.from_pretrained(hf, out).eval()(idx).logits
    assert float((got - want).abs().max()) < 1e-4 * scale
    assert float((plain - want).abs().max()) > 1e-3 * scale  # the adapters matter


def test_ppo_with_lora_takes_its_reference_from_the_policy(lora_sft, tmp_path, device, monkeypatch):
    out = tmp_path / "ppo"
    shutil.copytree(lora_sft, out)
    cfg = _cfg(out, device, **{"ppo.steps": 2, "ppo.eval_every": 2})
    pipeline.run_rm(cfg)  # from the LoRA SFT model merged, a new head, and fresh adapters
    rm_state = checkpoint.load(out / "rm" / checkpoint.NAME)
    rm = rm_state["model"]
    adapters = {n for n in rm["weights"] if ".lora_" in n}
    assert rm["lora"]["r"] == 2 and len(adapters) == 2 * 7
    assert set(rm_state["optimizer"]["state"]) == adapters | {"score.weight", "score.bias"}  # and the head
    loads = []
    real = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    pipeline.run_ppo(cfg)
    assert len(loads) == 2  # reward, policy: no reference copy, the value model is on the reward's backbone
    state = checkpoint.load(out / "ppo" / checkpoint.NAME)
    assert state["policy"]["lora"]["r"] == state["value"]["lora"]["r"] == 2
    rows = read_metrics(out / "ppo" / "metrics.jsonl")
    assert abs(rows[1]["kl"]) < 1e-5 and len(rows) == 3  # the reference is the merged SFT policy (sampling's
    # logprobs come from generate, not the scoring pass: fp32 rounding apart)


def test_lora_rl_on_two_gloo_processes_matches_one(lora_sft, tmp_path, device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("the gloo equivalence tests run on CPU")
    tests_dir = str(Path(__file__).parents[1])  # where this module's name (the reward_fn's) resolves
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(lora_sft, one)
    shutil.copytree(lora_sft, two)
    # token_mean: the logged pg_loss of GRPO's default seq_mean_token_mean is combined over ranks weighted
    # by tokens, not sequences, so it differs from one process's when ranks' lengths differ (LoRA or not)
    run_rl(_cfg(one, device, **{"rl.loss_agg": "token_mean"}))
    opts = {**RL, **LORA, "rl.algo": "grpo", "rl.reward_fn": f"{__name__}:length", "rl.loss_agg": "token_mean"}
    _torchrun(["-m", "rlhf_fast"], "rl", two, device, *[f"--{k}={v}" for k, v in opts.items()])
    _same_metrics(one, two, "rl")


def test_cli_takes_the_lora_section_and_refuses_bad_values():
    from rlhf_fast import cli
    _, cfg, _, _ = cli.parse(["rl", "--out", "runs/x", "--lora.r=4", "--lora.alpha", "8",
                              "--lora.targets=q_proj,v_proj"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == (4, 8.0, "q_proj,v_proj")
    with pytest.raises(ValueError, match="lora.r must be >= 0"):
        cli.parse(["sft", "--out", "runs/x", "--lora.r=-1"])
    with pytest.raises(ValueError, match="lora.dropout"):
        cli.parse(["ppo", "--out", "runs/x", "--lora.dropout=1"])
    with pytest.raises(ValueError, match="lora.targets must be 'all' or comma-separated names"):
        cli.parse(["ppo", "--out", "runs/x", "--lora.targets=q_proj,lm_head"])
