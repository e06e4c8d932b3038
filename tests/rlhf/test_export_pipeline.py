"""A tiny Llama folder through sft -> rm -> ppo (--model.init, HF folders as stage inits), then
`rlhf-fast export` and transformers loading the result; the `model` section exposes every GPTConfig
architecture field for runs that start from scratch."""
import dataclasses

import pytest
import torch
import transformers as T

from rlhf_fast.cli import main
from rlhf_fast.model import GPT, GPTConfig
from rlhf_fast.rlhf import pipeline
from rlhf_fast.rlhf.config import ModelConfig, load_file
from rlhf_fast.rlhf.runtime import build_model, load_checkpoint, load_model

from .test_pipeline import tiny


def _char_tokenizer(folder):
    """A one-character-per-token HF tokenizer (103 ids: <pad>, <s>, </s>, then string.printable)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(string.printable)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                              pad_token="<pad>").save_pretrained(folder)
    return folder


def _llama_folder(folder):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=24, num_hidden_layers=1,
                        intermediate_size=64, vocab_size=103, max_position_embeddings=64, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_llama_folder_through_sft_rm_ppo_then_export(tmp_path, device):
    src = _llama_folder(tmp_path / "llama")
    out = tmp_path / "run"
    hf_run = {"model.init": str(src), "run.backend": "reference", "run.tokenizer": f"hf:{_char_tokenizer(tmp_path / 'tok')}"}
    cfg = tiny(out, device, **hf_run, **{"ppo.steps": 2})
    pipeline.run_sft(cfg)
    pipeline.run_rm(cfg)
    pipeline.run_ppo(cfg)
    for stage in ("sft", "rm", "ppo"):  # each stage records the Llama it trained, not the default model section
        m = load_file(out / stage / "config.yaml")["model"]
        assert (m["n_embd"], m["n_kv_head"], m["head_dim"], m["pos_emb"], m["family"]) == (48, 1, 24, "rope", "llama")
    state = load_checkpoint(out / "ppo" / "checkpoint.safetensors")["policy"]
    assert state["config"]["family"] == "llama" and state["config"]["head_dim"] == 24
    assert main(["export", str(out), "--stage", "ppo", "--out", str(tmp_path / "hf")]) == 0
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").double().eval()
    assert type(back) is T.LlamaForCausalLM and (back.config.eos_token_id, back.config.pad_token_id) == (2, 0)
    assert T.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("sort:12=", add_special_tokens=False) == \
        T.AutoTokenizer.from_pretrained(tmp_path / "tok").encode("sort:12=", add_special_tokens=False)
    policy = load_model(state, torch.device("cpu")).eval()
    idx = torch.randint(0, 103, (2, 30))
    with torch.no_grad():
        want = back(idx).logits
        assert float((policy(idx).double() - want).abs().max() / want.abs().max()) < 1e-4
    # the reward model folded its normalization into a score bias that *ForSequenceClassification cannot hold
    assert main(["export", str(out), "--stage", "rm", "--out", str(tmp_path / "rm")]) == 1
    # without normalization the bias stays 0 (Bradley-Terry's loss is blind to it): the reward model exports
    pipeline.run_rm(tiny(out, device, **hf_run, **{"rm.norm_samples": 0}), overwrite=True)
    assert main(["export", str(out), "--stage", "rm", "--out", str(tmp_path / "rm")]) == 0
    assert type(T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")) is T.LlamaForSequenceClassification


def test_ppo_reward_init_must_hold_a_reward_model(tmp_path, device):
    src = _llama_folder(tmp_path / "llama")
    cfg = tiny(tmp_path / "run", device, **{"ppo.policy_init": str(src), "ppo.reward_init": str(src),
                                             "run.tokenizer": f"hf:{_char_tokenizer(tmp_path / 'tok')}"})
    with pytest.raises(ValueError, match="expected 'reward'"):
        pipeline.run_ppo(cfg)


def test_model_section_exposes_every_architecture_field(tmp_path, device):
    ours = {f.name for f in dataclasses.fields(ModelConfig)} - {"init"}
    assert ours == {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size", "backend"}
    cfg = tiny(tmp_path, device, **{"model.pos_emb": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu",
                                    "model.bias": "false", "model.qkv_bias": "true", "model.n_kv_head": 1,
                                    "model.head_dim": 24, "model.rope_scaling": "linear", "model.rope_factor": 2.0})
    model = build_model(cfg, 259)
    c = model.config
    assert (c.n_kv_head, c.head_size, c.has_qkv_bias, c.rope_scaling, c.rope_factor) == (1, 24, True, "linear", 2.0)
    model.save_pretrained(tmp_path / "hf")
    assert type(T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")) is T.Qwen2ForCausalLM
    assert isinstance(GPT.from_pretrained(tmp_path / "hf"), GPT)
