"""Load Hugging Face GPT-2 weights: a transformers model, a state dict, or a local safetensors folder.

GPT's module names match GPT-2's checkpoint, so loading is a key-by-key copy with two twists:
GPT-2's Conv1D layers store weights as (in, out), so c_attn / c_proj / c_fc are transposed into
nn.Linear's (out, in), and the causal-mask buffers (`attn.bias`, `attn.masked_bias`) are dropped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import GPTConfig
from .gpt import GPT

_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_MASK_BUFFER = re.compile(r"\.attn\.(masked_)?bias$")
# tanh-approximated GELU under its transformers names; GPT-2 checkpoints use "gelu_new"
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def config_from_hf(hf_config) -> GPTConfig:
    """GPTConfig equivalent to a transformers GPT2Config (or its config.json as a dict)."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    model_type = get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config.model_type must be 'gpt2', got {model_type!r}")
    act = get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise ValueError(f"config.activation_function must be one of {_TANH_GELU} (tanh GELU), got {act!r}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if get(flag, False):
            raise ValueError(f"config.{flag}=True is not supported (GPT's attention is plain 1/sqrt(d))")
    if not get("scale_attn_weights", True):
        raise ValueError("config.scale_attn_weights=False is not supported (GPT scales by 1/sqrt(head size))")
    return GPTConfig(
        block_size=get("n_positions", 1024), vocab_size=get("vocab_size", 50257), n_layer=get("n_layer", 12),
        n_head=get("n_head", 12), n_embd=get("n_embd", 768), n_inner=get("n_inner", None),
        norm_eps=get("layer_norm_epsilon", 1e-5), tie_word_embeddings=get("tie_word_embeddings", True),
        dropout=0.0, bias=True, norm="layernorm", mlp="gelu", pos_emb="learned",
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 keys (with or without the `transformer.` prefix) -> GPT keys, Conv1D weights transposed."""
    out = {}
    for key, value in state_dict.items():
        if _MASK_BUFFER.search(key):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # GPT2Model and the original checkpoints have no prefix
        if _CONV1D.search(key):
            value = value.t()
        out[key] = value.contiguous()
    return out


def from_hf_gpt2(model_or_state_dict, config=None, *, head: str = "lm") -> GPT:
    """A GPT holding the weights of a transformers GPT2LMHeadModel / GPT2Model, or of a GPT-2 state dict.

    config: a GPT2Config, a config.json dict or a GPTConfig; needed with a state dict (a model
    carries its own). The result has the model's dtype and sits on CPU: move it with .to().
    """
    if isinstance(model_or_state_dict, dict):
        state_dict = model_or_state_dict
        if config is None:
            raise ValueError("config is required when loading from a state dict (GPT2Config, dict or GPTConfig)")
    elif isinstance(model_or_state_dict, torch.nn.Module):
        state_dict = model_or_state_dict.state_dict()
        config = model_or_state_dict.config if config is None else config
    else:
        raise ValueError("model_or_state_dict must be a transformers GPT-2 model or a state dict, "
                         f"got {type(model_or_state_dict).__name__}")
    gpt_config = config if isinstance(config, GPTConfig) else config_from_hf(config)
    weights = convert_state_dict(state_dict)
    if "lm_head.weight" not in weights and gpt_config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    dtype = weights["transformer.wte.weight"].dtype
    model = GPT(gpt_config, head="lm").to(dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict does not match GPT-2 with this config: missing {missing}, "
                         f"unexpected {unexpected}")
    return model if head == "lm" else model.with_head(head)


def from_pretrained(path, *, head: str = "lm") -> GPT:
    """Load a local Hugging Face GPT-2 folder: config.json and model.safetensors (or a sharded index)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"path must be a folder with config.json, got {str(folder)!r}")
    hf_config = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"path {str(folder)!r} has no model.safetensors or model.safetensors.index.json")
    state_dict = {}
    for name in files:
        state_dict.update(load_file(folder / name))
    return from_hf_gpt2(state_dict, hf_config, head=head)
