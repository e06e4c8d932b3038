"""The Hugging Face families the GPT reads and writes, as one table: per family, how its config.json
maps onto GPTConfig (and back), and how its tensor names map onto the GPT's parameters.

A key map entry says: our parameter `ours` ({i} = layer) is the HF tensors `theirs` concatenated
along dim 0 (q/k/v into c_attn, gate/up into c_fc), each `sizes(config)` rows long, transposed
first when `transpose` (GPT-2's Conv1D stores (in, out)). The same entry splits on export, so a
HF -> GPT -> HF round trip gives back the same bytes.

Config fields that would make the HF model compute something the GPT does not (sliding windows,
soft-capping, o_proj or MLP biases, unknown rope types or activations) are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .config import GPTConfig


@dataclass(frozen=True)
class KeyMap:
    ours: str
    theirs: tuple[str, ...]
    sizes: Callable[[GPTConfig], list[int]] | None = None  # rows of each of `theirs` when concatenated
    transpose: bool = False


def _qkv(c: GPTConfig) -> list[int]:
    return [c.n_head * c.head_size, c.n_kv_head * c.head_size, c.n_kv_head * c.head_size]


def _gate_up(c: GPTConfig) -> list[int]:
    return [c.mlp_hidden, c.mlp_hidden]


def _gpt2_keys() -> tuple[KeyMap, ...]:
    same = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "lm_head.weight", "score.weight"]
    layer = "transformer.h.{i}."
    same += [layer + n for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                                 "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")]
    conv1d = [layer + n for n in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")]
    return tuple(KeyMap(k, (k,)) for k in same) + tuple(KeyMap(k, (k,), transpose=True) for k in conv1d)


def _decoder_keys() -> tuple[KeyMap, ...]:
    """Llama, Qwen2 and Mistral share their tensor names."""
    h, m = "transformer.h.{i}.", "model.layers.{i}."
    qkv = lambda kind: tuple(f"{m}self_attn.{p}_proj.{kind}" for p in "qkv")  # noqa: E731
    return (
        KeyMap("transformer.wte.weight", ("model.embed_tokens.weight",)),
        KeyMap(h + "ln_1.weight", (m + "input_layernorm.weight",)),
        KeyMap(h + "attn.c_attn.weight", qkv("weight"), _qkv),
        KeyMap(h + "attn.c_attn.bias", qkv("bias"), _qkv),
        KeyMap(h + "attn.c_proj.weight", (m + "self_attn.o_proj.weight",)),
        KeyMap(h + "ln_2.weight", (m + "post_attention_layernorm.weight",)),
        KeyMap(h + "mlp.c_fc.weight", (m + "mlp.gate_proj.weight", m + "mlp.up_proj.weight"), _gate_up),
        KeyMap(h + "mlp.c_proj.weight", (m + "mlp.down_proj.weight",)),
        KeyMap("transformer.ln_f.weight", ("model.norm.weight",)),
        KeyMap("lm_head.weight", ("lm_head.weight",)),
        KeyMap("score.weight", ("score.weight",)),
    )


def _get(hf: dict, key: str, default=None):
    value = hf.get(key, default)
    return default if value is None else value


def _refuse_if(cond: bool, field_: str, value, why: str) -> None:
    if cond:
        raise ValueError(f"config.{field_}={value!r} is not supported: {why}")


# ---------------------------------------------------------------- config.json -> GPTConfig fields
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_SOFTCAPS = ("final_logit_softcapping", "attn_logit_softcapping")


def _gpt2_config(hf: dict) -> dict:
    act = _get(hf, "activation_function", "gelu_new")
    _refuse_if(act not in _TANH_GELU, "activation_function", act, f"the GPT's MLP is tanh GELU {_TANH_GELU}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        _refuse_if(bool(hf.get(flag, False)), flag, hf.get(flag), "GPT's attention is plain 1/sqrt(d)")
    _refuse_if(not _get(hf, "scale_attn_weights", True), "scale_attn_weights", False,
               "GPT scales attention by 1/sqrt(head size)")
    return dict(block_size=_get(hf, "n_positions", 1024), vocab_size=_get(hf, "vocab_size", 50257),
                n_layer=_get(hf, "n_layer", 12), n_head=_get(hf, "n_head", 12), n_embd=_get(hf, "n_embd", 768),
                n_inner=hf.get("n_inner"), norm_eps=_get(hf, "layer_norm_epsilon", 1e-5),
                tie_word_embeddings=_get(hf, "tie_word_embeddings", True), bias=True, norm="layernorm",
                mlp="gelu", pos_emb="learned")


def _rope_config(hf: dict) -> dict:
    """rope_theta and scaling from v5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    _refuse_if(partial != 1.0, "partial_rotary_factor", partial, "the GPT rotates the whole head")
    out = dict(rope_theta=float(rope.get("rope_theta", _get(hf, "rope_theta", 10000.0))))
    if kind == "default":
        return out
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    _refuse_if(kind not in need, f"{where}.rope_type", kind, f"supported rope types: default, {', '.join(need)}")
    for key in need[kind]:
        if rope.get(key) is None:
            raise ValueError(f"config.{where}.{key} is required by rope_type {kind!r}")
    out.update(rope_scaling=kind, rope_factor=float(rope["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_positions=int(rope["original_max_position_embeddings"]))
    return out


def _decoder_config(hf: dict, qkv_bias: bool) -> dict:
    act = _get(hf, "hidden_act", "silu")
    _refuse_if(act != "silu", "hidden_act", act, "the GPT's SwiGLU gate is SiLU")
    for key in _SOFTCAPS:
        _refuse_if(hf.get(key) is not None, key, hf.get(key), "the GPT has no logit soft-capping")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and n_embd % n_head == 0 and head_dim == n_embd // n_head:
        head_dim = None  # the default split: keep the config as a from-scratch one would read
    return dict(block_size=_get(hf, "max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=_get(hf, "num_key_value_heads", n_head),
                n_embd=n_embd, head_dim=head_dim, n_inner=hf["intermediate_size"], bias=False, qkv_bias=qkv_bias,
                norm="rmsnorm", norm_eps=_get(hf, "rms_norm_eps", 1e-6), mlp="swiglu", pos_emb="rope",
                tie_word_embeddings=_get(hf, "tie_word_embeddings", False), **_rope_config(hf))


def _llama_config(hf: dict) -> dict:
    _refuse_if(bool(hf.get("attention_bias")), "attention_bias", True, "it puts a bias on o_proj as well")
    _refuse_if(bool(hf.get("mlp_bias")), "mlp_bias", True, "the GPT's SwiGLU MLP has no biases")
    return _decoder_config(hf, qkv_bias=False)


def _sliding_window_check(hf: dict) -> None:
    window, max_pos = hf.get("sliding_window"), _get(hf, "max_position_embeddings", 2048)
    _refuse_if(window is not None and window < max_pos, "sliding_window", window,
               f"shorter than max_position_embeddings={max_pos}, and the GPT attends to the whole prefix")


def _qwen2_config(hf: dict) -> dict:
    if hf.get("use_sliding_window"):
        _sliding_window_check(hf)
    kinds = set(hf.get("layer_types") or ["full_attention"])
    _refuse_if(kinds != {"full_attention"}, "layer_types", sorted(kinds), "every layer must be full_attention")
    return _decoder_config(hf, qkv_bias=True)


def _mistral_config(hf: dict) -> dict:
    _sliding_window_check(hf)
    return _decoder_config(hf, qkv_bias=False)


# ---------------------------------------------------------------- GPTConfig -> config.json
def _gpt2_hf(c: GPTConfig) -> dict:
    return dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                n_head=c.n_head, n_inner=c.n_inner, activation_function="gelu_new", layer_norm_epsilon=c.norm_eps,
                tie_word_embeddings=c.tie_word_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _decoder_hf(c: GPTConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling != "none":
        rope.update(rope_type=c.rope_scaling, factor=c.rope_factor)
    if c.rope_scaling == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_positions)
    return dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                head_dim=c.head_size, hidden_act="silu", max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                tie_word_embeddings=c.tie_word_embeddings, rope_parameters=rope)


# ---------------------------------------------------------------- the table
_DECODER_SWITCHES = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
_ROPE_BUFFER = (".rotary_emb.inv_freq",)  # saved by transformers < 4.31; recomputed from rope_theta here


@dataclass(frozen=True)
class Family:
    model_type: str
    arch: str  # class name prefix: <arch>ForCausalLM, <arch>ForSequenceClassification
    prefix: str  # the base model's tensor prefix; files of the bare base model omit it
    keys: tuple[KeyMap, ...]
    read_config: Callable[[dict], dict]
    write_config: Callable[[GPTConfig], dict]
    switches: dict = field(default_factory=dict)  # GPTConfig values this family requires to export
    extra: dict = field(default_factory=dict)  # constant config.json fields written on export
    ignored: tuple[str, ...] = ()  # suffixes of HF tensors that are not weights (buffers old versions saved)

    def check_switches(self, c: GPTConfig) -> str | None:
        """The first GPTConfig switch this family cannot express, as 'name=value (needs X)', or None."""
        want = dict(self.switches)
        if self.model_type == "gpt2":
            want.update(n_kv_head=c.n_head, head_size=c.n_embd // c.n_head, rope_scaling="none",
                        has_qkv_bias=True)
        for name, value in want.items():
            if getattr(c, name) != value:
                return f"{name}={getattr(c, name)!r} (a {self.model_type} model needs {value!r})"
        return None


FAMILIES = {f.model_type: f for f in (
    Family("gpt2", "GPT2", "transformer.", _gpt2_keys(), _gpt2_config, _gpt2_hf,
           switches=dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True),
           ignored=(".attn.bias", ".attn.masked_bias")),
    Family("llama", "Llama", "model.", _decoder_keys(), _llama_config, _decoder_hf,
           switches=dict(_DECODER_SWITCHES, has_qkv_bias=False), extra=dict(attention_bias=False, mlp_bias=False),
           ignored=_ROPE_BUFFER),
    Family("qwen2", "Qwen2", "model.", _decoder_keys(), _qwen2_config, _decoder_hf,
           switches=dict(_DECODER_SWITCHES, has_qkv_bias=True), extra=dict(use_sliding_window=False,
                                                                          sliding_window=None),
           ignored=_ROPE_BUFFER),
    Family("mistral", "Mistral", "model.", _decoder_keys(), _mistral_config, _decoder_hf,
           switches=dict(_DECODER_SWITCHES, has_qkv_bias=False), extra=dict(sliding_window=None),
           ignored=_ROPE_BUFFER),
)}


def family_of(hf: dict) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.model_type must be one of {tuple(FAMILIES)}, got {model_type!r}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """GPTConfig equivalent to a config.json dict; refuses what the GPT would compute differently."""
    family = family_of(hf)
    return GPTConfig(**{**family.read_config(hf), "family": family.model_type, **overrides})


def export_family(c: GPTConfig) -> Family:
    """The family a GPTConfig is written as: its own `family`, else the first whose switches it matches."""
    if c.family is not None:
        if c.family not in FAMILIES:
            raise ValueError(f"config.family must be one of {tuple(FAMILIES)} or None, got {c.family!r}")
        problem = FAMILIES[c.family].check_switches(c)
        if problem:
            raise ValueError(f"cannot export as {c.family}: {problem}")
        return FAMILIES[c.family]
    problems = {}
    for name in ("gpt2", "llama", "qwen2"):
        problems[name] = FAMILIES[name].check_switches(c)
        if problems[name] is None:
            return FAMILIES[name]
    raise ValueError("this GPT matches no Hugging Face family: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
