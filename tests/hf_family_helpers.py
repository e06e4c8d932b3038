"""Tiny random transformers models of each family the GPT loads, saved to a folder (no download).

Odd sizes on purpose: 6 query heads over 2 KV heads, head_dim 24 (not hidden / heads, and not a size
the attention kernels take), vocab 301, intermediate 100; Llama uses llama3 rope scaling with an
original context short enough that the scaled band is exercised within 64 positions.
"""
import torch
import transformers as T

COMMON = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=24, num_hidden_layers=2,
              intermediate_size=100, vocab_size=301, max_position_embeddings=64, initializer_range=0.2,
              bos_token_id=1, eos_token_id=300, pad_token_id=0, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500.0}
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, T.LlamaForSequenceClassification,
              dict(rope_parameters=LLAMA3_ROPE)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, T.Qwen2ForSequenceClassification,
              dict(tie_word_embeddings=True)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, T.MistralForSequenceClassification,
                dict(sliding_window=None, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 1000.0})),
}


def hf_config(family: str, **changes):
    config_cls, _, _, extra = FAMILIES[family]
    return config_cls(**{**COMMON, **extra, **changes})


def hf_model(family: str, seed: int = 0, *, seq_cls: bool = False, **changes):
    _, lm_cls, cls_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = hf_config(family, **({"num_labels": 1} if seq_cls else {}), **changes)
    return (cls_cls if seq_cls else lm_cls)(config).eval()


def saved(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder
