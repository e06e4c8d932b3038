"""LoRA (rlhf_fast/model/lora.py, lora_peft.py): gradients reach only the adapters and equal those of the
merged weight computed independently in float64; disabled adapters give the base model bit for bit;
merging matches the adapted model; PEFT + transformers load our adapters with the same logits, and we
load PEFT's."""
import copy

import pytest
import torch
from torch import nn

from gpt_helpers import gpt2_config, hf_gpt2, modern_config, randomize_norms, sharpen
from hf_family_helpers import hf_model, saved
from rlhf_fast.model import GPT
from rlhf_fast.model.lora import (LoRALinear, adapters_disabled, apply_lora, lora_sites, lora_state_dict,
                                  merge_lora)
from rlhf_fast.model.lora_peft import load_adapters, save_adapters


def _rel_err(ours, ref, scale=None):
    """max|ours - ref| / max|ref|, or / scale where the error's magnitude is set elsewhere."""
    scale = ref.double().abs().max() if scale is None else scale
    return float((ours.double() - ref.double()).abs().max() / scale)


def _randomize_adapters(model, scale=0.3):
    """Nonzero B (a fresh adapter is B = 0, which would make every comparison pass trivially)."""
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * scale)
    return model


def _lora_gpt(config, r=3, targets="all", dtype=torch.float32):
    model = sharpen(randomize_norms(GPT(config).to(dtype)))  # logits of a few units: gradients carry signal
    base = copy.deepcopy(model)
    apply_lora(model, r=r, alpha=5.0, targets=targets)
    return base, _randomize_adapters(model)


def _independent_merge(model, base):
    """A plain GPT whose weights are base + scaling * B @ A (the product in float64), written from the
    adapter tensors by hand, not by merge_lora. (The attention ops take fp32 at most.)"""
    twin = copy.deepcopy(base)
    cfg, scaling = model.config, model.lora_config.scaling
    for i, (block, twin_block) in enumerate(zip(model.transformer.h, twin.transformer.h)):
        for path, rows in lora_sites(cfg):
            module, w = block.get_submodule(path), twin_block.get_submodule(path).weight
            start = 0
            for target, n in rows:
                if isinstance(module, LoRALinear) and target in module.lora_A:
                    A, B = module.lora_A[target].double(), module.lora_B[target].double()
                    with torch.no_grad():
                        w[start:start + n] += (scaling * B @ A).to(w.dtype)
                start += n
    return twin


@pytest.mark.parametrize("make_config,targets", [(modern_config, "all"), (modern_config, ["k_proj", "up_proj"]),
                                                 (gpt2_config, "q_proj,v_proj,down_proj")])
def test_gradients_reach_only_adapters_and_match_the_merged_twin(make_config, targets):
    """Loss through the fused logprob path; dL/dB_t = s * G_t @ A_t^T and dL/dA_t = s * B_t^T @ G_t
    (products in float64), where G_t is dL/dW of target t's rows in a plain twin holding the merged
    weights. fp32 throughout (the ops' widest dtype): 1e-4 relative allows its rounding only."""
    base, model = _lora_gpt(make_config(backend="reference"), targets=targets)
    twin = _independent_merge(model, base)
    idx = torch.randint(0, 301, (2, 13))
    tgt = torch.randint(0, 301, (2, 13))
    loss = -model(idx, tgt)[0].sum()
    loss.backward()
    twin_loss = -twin(idx, tgt)[0].sum()
    twin_loss.backward()
    assert abs(float(loss) - float(twin_loss)) <= 1e-5 * abs(float(twin_loss))

    adapters = set(lora_state_dict(model))
    assert adapters and {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    assert all(p.grad is None for n, p in model.named_parameters() if n not in adapters)
    s = model.lora_config.scaling
    for block, twin_block in zip(model.transformer.h, twin.transformer.h):
        for path, rows in lora_sites(model.config):
            module, G = block.get_submodule(path), twin_block.get_submodule(path).weight.grad
            start = 0
            for target, n in rows:
                if isinstance(module, LoRALinear) and target in module.lora_A:
                    A, B = module.lora_A[target], module.lora_B[target]
                    g, A64, B64 = G[start:start + n].double(), A.detach().double(), B.detach().double()
                    assert float(A.grad.abs().max()) > 0 and float(B.grad.abs().max()) > 0
                    # B's fp32 error follows the whole fused matmul (GPT-2's c_attn: q, k, v rows in one
                    # weight), whose q rows' gradients pass through the softmax backward's cancellation and
                    # can be ~1e4x smaller than its v rows': measured against the site's own product scale
                    site = (s * G.double() @ A64.T).abs().max()
                    assert _rel_err(B.grad, s * g @ A64.T, site) < 1e-4
                    assert _rel_err(A.grad, s * B64.T @ g) < 1e-4
                start += n
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)


@pytest.mark.parametrize("make_config", [modern_config, gpt2_config])
def test_disabled_adapters_give_the_base_model_exactly(make_config):
    base, model = _lora_gpt(make_config(backend="reference"))
    idx = torch.randint(0, 301, (3, 17))
    tgt = torch.randint(0, 301, (3, 17))
    with torch.no_grad():
        want_logits, (want_lp, want_ent) = base(idx), base(idx, tgt)
        adapted = model(idx)
        with adapters_disabled(model):
            logits, (lp, ent) = model(idx), model(idx, tgt)
        after = model(idx)
    assert torch.equal(logits, want_logits) and torch.equal(lp, want_lp) and torch.equal(ent, want_ent)
    assert float((adapted - want_logits).abs().max()) > 1e-2  # the adapters do change the model
    assert torch.equal(after, adapted)  # switched back on when the block ends


@pytest.mark.parametrize("make_config", [modern_config, gpt2_config])
def test_merged_model_matches_adapted_and_the_hand_merged_twin(make_config):
    base, model = _lora_gpt(make_config(backend="reference"), targets=["q_proj", "v_proj", "o_proj", "up_proj"])
    twin = _independent_merge(model, base)
    idx = torch.randint(0, 301, (2, 19))
    with torch.no_grad():
        adapted, want = model(idx), twin(idx)
        names = set(base.state_dict())
        merge_lora(model)
        merged = model(idx)
    assert _rel_err(adapted, want) < 1e-5 and _rel_err(merged, want) < 1e-5
    assert _rel_err(merged, adapted) < 1e-5
    assert set(model.state_dict()) == names and model.lora_config is None
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def _check_peft_logits(hf, tmp_path, r, alpha, targets, randint_args):
    """Our GPT loaded from `hf`'s folder with random adapters, saved in PEFT's format: peft + transformers
    give the same logits, and without the adapters they differ (so the comparison can fail).
    Returns (base folder, input ids, our logits)."""
    peft = pytest.importorskip("peft")
    base_dir = saved(hf, tmp_path / "base")
    model = GPT.from_pretrained(base_dir, backend="reference")
    apply_lora(model, r=r, alpha=alpha, targets=targets)
    _randomize_adapters(model, scale=0.2)
    save_adapters(model, tmp_path / "adapters")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapters").eval()
    idx = torch.randint(*randint_args)
    with torch.no_grad():
        ours, want = model(idx), peft_model(idx).logits
        with adapters_disabled(model):
            plain = model(idx)
    assert _rel_err(ours, want) < 1e-4
    assert _rel_err(plain, want) > 1e-2  # the adapters matter, so the comparison above can fail
    return base_dir, idx, ours


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_loads_our_adapters_with_the_same_logits(family, tmp_path):
    base_dir, idx, ours = _check_peft_logits(hf_model(family, seed=2), tmp_path, 4, 7.0, "all", (1, 300, (2, 21)))
    again = load_adapters(GPT.from_pretrained(base_dir, backend="reference"), tmp_path / "adapters")
    with torch.no_grad():
        assert torch.equal(again(idx), ours)


@pytest.mark.parametrize("targets", ["all", ["q_proj", "v_proj", "down_proj"]])
def test_peft_loads_our_gpt2_adapters_with_the_same_logits(targets, tmp_path):
    """GPT-2's single c_attn: our q/k/v adapters go out as one block-diagonal PEFT adapter."""
    base_dir, _, _ = _check_peft_logits(hf_gpt2("cpu"), tmp_path, 3, 5.0, targets, (0, 301, (2, 23)))
    with pytest.raises(ValueError, match="read for llama, qwen2 and mistral"):
        load_adapters(GPT.from_pretrained(base_dir), tmp_path / "adapters")


def test_we_load_adapters_saved_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    hf = hf_model("mistral", seed=4)
    base_dir = saved(hf, tmp_path / "base")
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj", "gate_proj"],
                                                         task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapters")
    model = load_adapters(GPT.from_pretrained(base_dir, backend="reference"), tmp_path / "adapters")
    assert model.lora_config.targets == ("v_proj", "gate_proj")
    idx = torch.randint(1, 300, (2, 15))
    with torch.no_grad():
        assert _rel_err(model(idx), peft_model.eval()(idx).logits) < 1e-4


def test_bad_arguments_are_refused_by_name(tmp_path):
    model = GPT(gpt2_config())
    with pytest.raises(ValueError, match="r must be a positive int"):
        apply_lora(model, r=0)
    with pytest.raises(ValueError, match="alpha must be"):
        apply_lora(model, r=2, alpha=-1)
    with pytest.raises(ValueError, match="dropout must be"):
        apply_lora(model, r=2, dropout=1.0)
    with pytest.raises(ValueError, match="GELU MLP has no gate"):
        apply_lora(model, r=2, targets=["gate_proj"])
    with pytest.raises(ValueError, match="'lm_head' is not a projection"):
        apply_lora(model, r=2, targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="no LoRA adapters to disable"):
        with adapters_disabled(model):
            pass
    apply_lora(model, r=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, r=2)
    with pytest.raises(ValueError, match="head='lm'"):
        save_adapters(apply_lora(GPT(gpt2_config(), head="value"), r=2), tmp_path / "value")
    with pytest.raises(ValueError, match="has LoRA adapters: write them with save_adapters"):
        model.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="merge_lora"):
        model.with_head("value")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "LORA", "use_rslora": true, '
                                                          '"target_modules": ["q_proj"], "r": 2, "lora_alpha": 2}')
    with pytest.raises(ValueError, match="use_rslora=True is not supported"):
        load_adapters(GPT(modern_config()), tmp_path / "bad")
