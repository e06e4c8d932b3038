"""Issue 15's end-to-end check: a LoRA PPO run from tiny Hugging Face Llama folders (a *ForCausalLM policy,
a *ForSequenceClassification reward model) trains, holds one copy of the policy's base weights (the
reference is the policy with its adapters off) and one of the reward model's (the value model is adapters
on it), resumes to identical metrics, and exports PEFT adapters
that peft + transformers load with the logits of the trained policy."""
import shutil

import pytest
import torch

from rlhf_fast.rlhf import checkpoint, pipeline, ppo
from rlhf_fast.rlhf.export import export_run
from rlhf_fast.rlhf.run_io import read_metrics
from rlhf_fast.rlhf.runtime import load_model, unwrap

from .stop_after import Stop, stop_after
from .test_pipeline import tiny

peft = pytest.importorskip("peft")
hf = pytest.importorskip("hf_family_helpers")

LORA = {"lora.r": 4, "lora.alpha": 8.0, "ppo.lr": 0.02, "ppo.steps": 4, "ppo.ckpt_every": 2, "ppo.eval_every": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    policy = hf.saved(hf.hf_model("llama", seed=1), root / "policy")
    reward = hf.saved(hf.hf_model("llama", seed=2, seq_cls=True), root / "reward")
    return policy, reward


def _cfg(out, device, folders, **extra):
    policy, reward = folders
    return tiny(out, device, **{**LORA, "ppo.policy_init": str(policy), "ppo.reward_init": str(reward), **extra})


def _storages(models: dict) -> int:
    """Elements in the distinct parameter storages of every model of the stage."""
    seen = {}
    for m in models.values():
        for p in getattr(m, "policy", m).parameters():
            seen[p.untyped_storage().data_ptr()] = p.numel()
    return sum(seen.values())


def test_lora_ppo_from_hf_llama_folders(folders, tmp_path, device, monkeypatch):
    full, killed = tmp_path / "full", tmp_path / "killed"
    counted = {}
    real = ppo.train_ppo

    def spy(cfg, rt, tok, models, *args, **kwargs):
        counted["elements"] = _storages(models)
        counted["policy"] = sum(p.numel() for p in unwrap(models["policy"]).parameters())
        counted["value"] = sum(p.numel() for p in unwrap(models["value"]).parameters() if p.requires_grad)
        counted["reward"] = sum(p.numel() for p in models["reward"].policy.parameters() if not p.requires_grad)
        return real(cfg, rt, tok, models, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(ppo, "train_ppo", spy)
        pipeline.run_ppo(_cfg(full, device, folders))
    # one copy of each base: the reference is the policy with adapters off, the value model is adapters and
    # a head on the reward model's backbone (its trainable parameters are all it adds)
    assert counted["elements"] == counted["policy"] + counted["value"] + counted["reward"]

    rows = read_metrics(full / "ppo" / "metrics.jsonl")
    assert len(rows) == 5 and abs(rows[1]["kl"]) < 1e-5  # fresh adapters: the policy is its reference
    state = checkpoint.load(full / "ppo" / checkpoint.NAME)["policy"]
    assert state["lora"]["r"] == 4
    assert any(float(t.abs().max()) > 0 for n, t in state["weights"].items() if ".lora_B." in n)  # it trained

    with pytest.raises(Stop):
        pipeline.run_ppo(_cfg(killed, device, folders), on_step=stop_after(3))
    pipeline.run_ppo(_cfg(killed, device, folders), resume=True)
    if device.type == "cpu":  # bitwise equality is the CPU guarantee
        assert read_metrics(killed / "ppo" / "metrics.jsonl") == rows

    import transformers
    out = export_run(full, tmp_path / "export", "ppo")
    trained = load_model(state, torch.device("cpu")).eval()
    idx = torch.randint(3, trained.config.vocab_size, (2, 13))
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    with torch.no_grad():
        want = trained(idx)
        plain = base(idx).logits
        got = peft.PeftModel.from_pretrained(base, out).eval()(idx).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-4 * scale  # fp32 matmuls in another order
    assert float((plain - want).abs().max()) > 1e-3 * scale  # the adapters matter
    shutil.rmtree(out)
