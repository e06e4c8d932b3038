"""GPTConfig: every hyperparameter of the model, validated when the config is built."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .._backend import BACKENDS

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (prompt + response); size of the learned position table
    vocab_size: int = 50257  # number of token ids; GPT-2's BPE has 50257
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # query heads per attention layer
    n_kv_head: int | None = None  # key/value heads (GQA); None means n_head (plain multi-head attention)
    n_embd: int = 768  # residual stream width
    head_dim: int | None = None  # size of each attention head; None means n_embd // n_head
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd (GPT-2's choice)
    dropout: float = 0.0  # embedding and residual dropout; attention probabilities are never dropped
    bias: bool = True  # biases in the Linear layers and norms, as in GPT-2
    qkv_bias: bool | None = None  # bias on the q, k, v projections; None means `bias` (Qwen2: True with bias=False)
    score_bias: bool = True  # bias on the reward/value head's Linear (False in HF *ForSequenceClassification)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm"
    norm_eps: float = 1e-5  # epsilon of every norm (GPT-2's layer_norm_epsilon)
    mlp: str = "gelu"  # "gelu" (GPT-2's tanh-approximated GELU) or "swiglu" (gated SiLU, LLaMA style)
    pos_emb: str = "learned"  # "learned" absolute positions (GPT-2) or "rope" (rotary, applied to q and k)
    rope_theta: float = 10000.0  # RoPE base frequency; only read when pos_emb == "rope"
    rope_scaling: str = "none"  # RoPE frequency scaling: "none", "linear" (positions / rope_factor) or "llama3"
    rope_factor: float = 1.0  # scaling factor of "linear" and "llama3"
    rope_low_freq_factor: float = 1.0  # "llama3": wavelengths above original_max / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # "llama3": wavelengths below original_max / this are kept
    rope_original_max_positions: int = 8192  # "llama3": the context length the model was pretrained on
    tie_word_embeddings: bool = True  # lm_head shares its weight with the token embedding, as in GPT-2
    gradient_checkpointing: bool = False  # recompute each block in backward to save activation memory
    backend: str = "auto"  # rlhf_fast backend for every op the model calls: "auto"|"triton"|"cuda"|"reference"
    family: str | None = None  # Hugging Face model_type the weights came from (export writes it); None = from scratch

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _positive_int("n_kv_head", self.n_kv_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head must divide n_head={self.n_head}, got n_kv_head={self.n_kv_head}")
        if self.head_dim is not None:
            _positive_int("head_dim", self.head_dim)
        elif self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be a multiple of n_head={self.n_head} (or head_dim set), "
                             f"got n_embd={self.n_embd}")
        if self.n_inner is not None:
            _positive_int("n_inner", self.n_inner)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        _choice("norm", self.norm, NORMS)
        _choice("mlp", self.mlp, MLPS)
        _choice("pos_emb", self.pos_emb, POSITIONS)
        _choice("backend", self.backend, BACKENDS)
        _choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.pos_emb == "rope":
            if self.head_size % 2:
                raise ValueError(f"pos_emb='rope' needs an even head size (head_dim), got {self.head_size}")
            if not self.rope_theta > 0:
                raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        elif self.rope_scaling != "none":
            raise ValueError(f"rope_scaling={self.rope_scaling!r} needs pos_emb='rope', got {self.pos_emb!r}")
        if self.rope_scaling != "none" and not self.rope_factor > 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor}")
        if self.rope_scaling == "llama3":
            _positive_int("rope_original_max_positions", self.rope_original_max_positions)
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ValueError("rope_low_freq_factor must be > 0 and < rope_high_freq_factor, got "
                                 f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def mlp_hidden(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
