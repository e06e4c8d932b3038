"""GPT.save_pretrained: HF -> GPT -> HF gives back the same tensors (bytes and dtypes), and the
folder it writes loads in transformers with the same logits; from-scratch GPTs export as the family
their switches match, or are refused naming the switch."""
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from hf_family_helpers import hf_model, saved
from oracle_helpers import left_padded
from rlhf_fast.model import GPT, GPTConfig


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16),
                                          ("mistral", torch.float16)])
def test_round_trip_is_bitwise_and_transformers_loads_it(family, dtype, tmp_path):
    hf = hf_model(family, seed=11).to(dtype)
    src = saved(hf, tmp_path / "src")
    GPT.from_pretrained(src).save_pretrained(tmp_path / "out")
    want, got = _tensors(src), _tensors(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    # both folders loaded the same way (attention implementation included): the config must agree too
    back, orig = (T.AutoModelForCausalLM.from_pretrained(f).eval() for f in (tmp_path / "out", src))
    assert type(back) is type(hf) and back.dtype == dtype
    idx, mask = left_padded(12, T=30, lead=(0, 5, 17))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        assert torch.equal(back(idx, attention_mask=mask, position_ids=pos).logits,
                           orig(idx, attention_mask=mask, position_ids=pos).logits)


def test_gpt2_round_trip(tmp_path):
    torch.manual_seed(13)
    hf = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_head=3, n_embd=48, vocab_size=301, n_positions=64)).eval()
    src = saved(hf, tmp_path / "src")
    GPT.from_pretrained(src).save_pretrained(tmp_path / "out")
    want, got = _tensors(src), _tensors(tmp_path / "out")
    assert sorted(got) == sorted(n for n in want if not n.endswith(".attn.bias"))
    assert all(torch.equal(got[n], want[n]) for n in got)
    idx = torch.randint(0, 301, (2, 20))
    back, orig = (T.AutoModelForCausalLM.from_pretrained(f).eval() for f in (tmp_path / "out", src))
    with torch.no_grad():
        assert torch.equal(back(idx).logits, orig(idx).logits)


def test_large_exports_are_sharded_with_an_index(tmp_path):
    model = GPT.from_pretrained(saved(hf_model("llama", seed=14), tmp_path / "src"))
    model.save_pretrained(tmp_path / "out", max_shard_bytes=60_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    again = GPT.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert T.AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None


def test_reward_head_exports_as_sequence_classification(tmp_path):
    hf = hf_model("llama", seed=15, seq_cls=True)
    model = GPT.from_pretrained(saved(hf, tmp_path / "src"), head="reward")
    model.save_pretrained(tmp_path / "out", extra_config={"pad_token_id": 0})
    back, orig = (T.AutoModelForSequenceClassification.from_pretrained(f).eval() for f in (tmp_path / "out",
                                                                                           tmp_path / "src"))
    assert type(back) is T.LlamaForSequenceClassification and back.config.num_labels == 1
    idx = torch.randint(1, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(idx).logits, orig(idx).logits)


def _scratch(**switches):
    torch.manual_seed(16)
    cfg = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, backend="reference",
                    **switches)
    return GPT(cfg)


def test_from_scratch_gpt_exports_as_the_family_its_switches_match(tmp_path):
    model = _scratch(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True, rope_theta=500.0,
                     tie_word_embeddings=False).eval()
    model.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path).double().eval()
    assert type(back) is T.Qwen2ForCausalLM
    idx = torch.randint(0, 97, (3, 32))
    with torch.no_grad():
        want = back(idx).logits
        assert float((model(idx).double() - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("switches,named", [
    (dict(norm="rmsnorm"), "norm='rmsnorm'"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=True), "bias=True"),
])
def test_from_scratch_gpt_without_a_family_is_refused_naming_the_switch(switches, named, tmp_path):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        _scratch(**switches).save_pretrained(tmp_path)


def test_score_bias_that_hf_cannot_hold_is_refused(tmp_path):
    model = _scratch(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False).with_head("reward")
    with torch.no_grad():
        model.score.bias.fill_(0.5)
    with pytest.raises(ValueError, match="score.bias"):
        model.save_pretrained(tmp_path)
