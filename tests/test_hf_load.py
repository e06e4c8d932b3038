"""GPT.from_pretrained on tiny random Llama / Qwen2 / Mistral folders saved by transformers: logits on a
left-padded batch against transformers in float64, greedy generation against transformers' generate,
sequence-classification heads, and every config or tensor the GPT cannot honour refused by name."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_family_helpers import FAMILIES, hf_model, saved
from oracle_helpers import left_padded
from rlhf_fast.model import GPT, generate


def _rel_err(ours, ref):
    return float((ours.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_left_padded_batch(family, tmp_path):
    hf = hf_model(family, seed=1)
    model = GPT.from_pretrained(saved(hf, tmp_path), backend="reference")
    assert model.config.head_size == 24 and model.config.n_kv_head == 2
    idx, mask = left_padded(2, T=40, lead=(0, 7, 23))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ours = model(idx, attention_mask=mask)
        want = hf.double()(idx, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert _rel_err(ours[real], want[real]) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(family, tmp_path):
    hf = hf_model(family, seed=3)
    model = GPT.from_pretrained(saved(hf, tmp_path), backend="reference")
    idx, mask = left_padded(4, T=9, lead=(0, 3, 6))
    n = 32
    with torch.no_grad():
        want = hf.generate(idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=300, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(want.scores, 1).topk(2, -1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-4  # no near-tie can excuse a mismatch
    out = generate(model, idx, n, attention_mask=mask, temperature=0.0, pad_token_id=0)
    assert torch.equal(out.tokens, want.sequences[:, idx.shape[1]:])


@pytest.mark.parametrize("head", ["reward", "value"])
def test_sequence_classification_folder_gives_the_score_head(head, tmp_path):
    hf = hf_model("qwen2", seed=5, seq_cls=True)
    model = GPT.from_pretrained(saved(hf, tmp_path), head=head)
    idx = torch.randint(1, 300, (2, 11))
    mask = torch.ones_like(idx)
    mask[1, 8:] = 0
    idx[1, 8:] = 0  # pad_token_id: transformers scores the last non-pad token
    with torch.no_grad():
        ours = model(idx, attention_mask=mask)
        want = hf.double()(idx, attention_mask=mask).logits[:, 0]
        per_token = hf.double().model(idx, attention_mask=mask).last_hidden_state @ hf.score.weight.double().T
    if head == "value":
        want = per_token[..., 0]
        ours, want = ours[mask.bool()], want[mask.bool()]
    assert _rel_err(ours, want) < 1e-4
    with pytest.raises(ValueError, match="ForCausalLM"):
        GPT.from_pretrained(tmp_path, head="lm")


def test_bf16_folder_loads_in_bf16_and_dtype_can_be_asked(tmp_path):
    hf = hf_model("llama", seed=6).to(torch.bfloat16)
    folder = saved(hf, tmp_path)
    model = GPT.from_pretrained(folder)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(model.transformer.h[1].mlp.c_proj.weight, hf.model.layers[1].mlp.down_proj.weight)
    as32 = GPT.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(as32.lm_head.weight, hf.lm_head.weight.float())


def test_sharded_folder_loads(tmp_path):
    hf = hf_model("mistral", seed=7)
    model = GPT.from_pretrained(saved(hf, tmp_path, max_shard_size="100KB"))
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight[-48:], hf.model.layers[0].self_attn.v_proj.weight)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


BAD_CONFIGS = [
    ("mistral", dict(sliding_window=32), "sliding_window"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16), "sliding_window"),
    ("qwen2", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "factor": 2.0, "rope_theta": 1e4}), "low_freq_factor"),
    ("llama", dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    ("llama", dict(attention_bias=True), "attention_bias"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("llama", dict(model_type="gemma"), "model_type"),
    ("qwen2", dict(hidden_act="gelu"), "hidden_act"),
    ("llama", dict(intermediate_size=101), "mlp.gate_proj.weight"),
]


@pytest.mark.parametrize("family,changes,field", BAD_CONFIGS, ids=[b[2] + "-" + b[0] for b in BAD_CONFIGS])
def test_unsupported_configs_are_refused_by_name(family, changes, field, tmp_path):
    folder = saved(hf_model(family), tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=field):
        GPT.from_pretrained(folder)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"), "k_proj.weight is missing"),
    (lambda sd: sd.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(96)}), "unexpected.*o_proj.bias"),
    (lambda sd: sd.update({"model.norm.weight": torch.ones(95)}), "model.norm.weight has shape"),
])
def test_missing_unexpected_or_misshapen_tensors_are_refused(edit, message, tmp_path):
    folder = saved(hf_model("llama"), tmp_path)
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(folder)


def test_generate_stops_at_any_of_several_eos_ids_like_transformers(tmp_path):
    hf = hf_model("llama", seed=3)
    model = GPT.from_pretrained(saved(hf, tmp_path), backend="reference")
    idx, mask = left_padded(4, T=9, lead=(0, 3, 6))
    free = generate(model, idx, 12, attention_mask=mask, temperature=0.0, pad_token_id=0).tokens
    eos = [int(free[0, 3]), int(free[2, 7])]  # tokens the rows would emit: each row must stop at its first
    with torch.no_grad():
        want = hf.generate(idx, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=eos)[:, idx.shape[1]:]
    out = generate(model, idx, 12, attention_mask=mask, temperature=0.0, pad_token_id=0, eos_token_id=eos)
    n = want.shape[1]  # transformers stops once every row is done; our later slots are padding
    assert torch.equal(out.tokens[:, :n], want) and bool((out.tokens[:, n:] == 0).all())
    assert int(out.mask[0].sum()) <= 4 and int(out.mask[2].sum()) <= 8
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, idx, 4, attention_mask=mask, eos_token_id=[])


def test_packed_layout_and_gradients_match_transformers(tmp_path):
    """head_dim 24 is zero-padded for the kernels: packed sequences and backward must see through it."""
    hf = hf_model("llama", seed=8).double()
    model = GPT.from_pretrained(saved(hf, tmp_path), dtype=torch.float32, backend="reference")  # vs float64
    lens = [7, 12, 5]
    idx = torch.randint(1, 300, (sum(lens),))
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    w = torch.randn(sum(lens), 301, dtype=torch.float64)
    ours = model(idx, cu_seqlens=cu, max_seqlen=12)
    (ours.double() * w).sum().backward()
    want = torch.cat([hf(s[None]).logits[0] for s in idx.split(lens)])
    (want * w).sum().backward()
    assert _rel_err(ours.detach(), want.detach()) < 1e-4
    attn, hf_attn = model.transformer.h[1].attn, hf.model.layers[1].self_attn
    hf_grad = torch.cat([hf_attn.q_proj.weight.grad, hf_attn.k_proj.weight.grad, hf_attn.v_proj.weight.grad])
    assert _rel_err(attn.c_attn.weight.grad, hf_grad) < 1e-4
    assert _rel_err(model.transformer.wte.weight.grad, hf.model.embed_tokens.weight.grad) < 1e-4


def test_rotary_buffers_of_old_checkpoints_are_skipped(tmp_path):
    folder = saved(hf_model("llama"), tmp_path)
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(12)  # transformers < 4.31 saved it
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(GPT.from_pretrained(folder).transformer.ln_f.weight, sd["model.norm.weight"])
