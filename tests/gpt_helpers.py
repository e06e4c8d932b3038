"""Small models shared by test_model.py and test_generate.py: odd sizes, random weights, no download."""
import torch
import transformers

from rlhf_fast.model import GPT, GPTConfig

V = 301


def hf_gpt2(device, n_positions=64):
    cfg = transformers.GPT2Config(n_head=3, n_embd=48, vocab_size=V, n_layer=2, n_positions=n_positions,
                                  bos_token_id=0, eos_token_id=0)
    return sharpen(transformers.GPT2LMHeadModel(cfg).to(device).eval())


def sharpen(model):
    """Scale the final norm so that logits spread over ~+-4 instead of GPT-2 init's near-uniform ~+-0.1:
    logprobs, entropies and greedy choices then depend on the model, not on noise."""
    final_norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    with torch.no_grad():
        final_norm.weight.mul_(30.0)
    return model


def modern_config(**kw):
    base = dict(block_size=64, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_inner=96,
                bias=False, norm="rmsnorm", mlp="swiglu", pos_emb="rope", rope_theta=500.0,
                tie_word_embeddings=False)
    return GPTConfig(**{**base, **kw})


def gpt2_config(**kw):
    return GPTConfig(**{**dict(block_size=64, vocab_size=V, n_layer=2, n_head=3, n_embd=48), **kw})


CONFIGS = {"gpt2": gpt2_config, "modern": modern_config}


def llama_twin(model: GPT):
    """transformers' LLaMA holding the weights of a `modern_config` GPT: an independent oracle."""
    c = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, pad_token_id=0,
        bos_token_id=0, eos_token_id=0))
    sd, D = {}, c.head_size
    for i, blk in enumerate(model.transformer.h):
        q, k, v = blk.attn.c_attn.weight.split([c.n_head * D, c.n_kv_head * D, c.n_kv_head * D])
        gate, up = blk.mlp.c_fc.weight.chunk(2)
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": blk.attn.c_proj.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": blk.mlp.c_proj.weight,
                   p + "input_layernorm.weight": blk.ln_1.weight,
                   p + "post_attention_layernorm.weight": blk.ln_2.weight})
    sd.update({"model.embed_tokens.weight": model.transformer.wte.weight,
               "model.norm.weight": model.transformer.ln_f.weight, "lm_head.weight": model.lm_head.weight})
    hf.load_state_dict({k: t.detach().clone() for k, t in sd.items()}, strict=True)
    return hf.to(next(model.parameters()).device).eval()


def randomize_norms(model):
    """Non-trivial norm weights, so a wrong norm placement cannot hide behind weight = 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model
