"""Low-rank adapters (LoRA) on the GPT's attention and MLP projections, with the base weights frozen.

A target is a projection named as in Llama / Qwen2 / Mistral checkpoints (and PEFT's target_modules):
q_proj, k_proj, v_proj (row blocks of the fused `attn.c_attn`), o_proj (`attn.c_proj`), gate_proj and
up_proj (row blocks of the fused `mlp.c_fc`; a GELU MLP has only up_proj, the whole c_fc) and
down_proj (`mlp.c_proj`). Each target gets its own adapter, so a fused Linear computes

    y[..., rows of t] = x @ W[rows of t].T + b + (dropout(x) @ A_t.T @ B_t.T) * alpha / r

exactly as PEFT's separate q/k/v (or gate/up) modules would. A_t is (r, in), B_t (rows, r), both fp32
whatever the base dtype (as PEFT's autocast_adapter_dtype); B starts at zero, so a fresh adapter
changes nothing.

The targeted Linears become `LoRALinear`s holding the *same* weight and bias Parameters under the
same names, so base state dicts, HF export of the base and `fused_linear_logprobs` are untouched: no
adapter sits on lm_head, the fused logprob path still never builds full logits. `adapters_disabled`
switches every adapter off (the exact base model: the reference policy without a second copy of the
weights); `merge_lora` folds the adapters into the weights and gives back plain Linears.
PEFT's on-disk format (adapter_config.json + adapter_model.safetensors) is in lora_peft.py.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    r: int  # rank of every adapter
    alpha: float  # adapters are scaled by alpha / r
    dropout: float  # dropout on each adapter's input (training mode only)
    targets: tuple[str, ...]  # projections carrying an adapter, names from TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def lora_sites(config: GPTConfig) -> list[tuple[str, list[tuple[str, int]]]]:
    """Per block: (path of a Linear inside the block, [(target name, output rows)] in row order)."""
    D, C, H = config.head_size, config.n_embd, config.mlp_hidden
    mlp_in = [("gate_proj", H), ("up_proj", H)] if config.mlp == "swiglu" else [("up_proj", H)]
    return [("attn.c_attn", [("q_proj", config.n_head * D), ("k_proj", config.n_kv_head * D),
                             ("v_proj", config.n_kv_head * D)]),
            ("attn.c_proj", [("o_proj", C)]),
            ("mlp.c_fc", mlp_in),
            ("mlp.c_proj", [("down_proj", C)])]


class LoRALinear(nn.Module):
    """A Linear (same `weight` and `bias` Parameters) plus an adapter on some of its output row blocks.

    layout: [(target name or None, rows)] covering the output rows in order; None = no adapter there.
    """

    def __init__(self, base: nn.Linear, layout: list[tuple[str | None, int]], r: int, alpha: float,
                 dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.layout, self.scaling = layout, alpha / r
        self.adapters_enabled = True
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.ParameterDict({t: nn.Parameter(torch.empty(r, self.in_features, **kw))
                                        for t, _ in layout if t is not None})
        self.lora_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(rows, r, **kw))
                                        for t, rows in layout if t is not None})
        for A in self.lora_A.values():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init of lora_A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled:
            return y
        parts = []
        for (target, _), part in zip(self.layout, y.split([rows for _, rows in self.layout], dim=-1)):
            if target is not None:
                A, B = self.lora_A[target], self.lora_B[target]
                h = self.lora_dropout(x).to(A.dtype)  # a fresh mask per adapter, as PEFT's separate modules
                part = part + (F.linear(F.linear(h, A), B) * self.scaling).to(part.dtype)
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: what the adapters add to `weight` (zero rows where there is no adapter)."""
        blocks = []
        for target, rows in self.layout:
            if target is None:
                blocks.append(torch.zeros(rows, self.in_features, device=self.weight.device))
            else:
                blocks.append(self.lora_B[target] @ self.lora_A[target] * self.scaling)
        return torch.cat(blocks, dim=0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, layout={self.layout}, scaling={self.scaling}"


def _resolve_targets(config: GPTConfig, targets) -> tuple[str, ...]:
    available = [t for _, blocks in lora_sites(config) for t, _ in blocks]
    if targets == "all":
        return tuple(available)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"targets must be 'all' or a non-empty list of names from {TARGETS}, got {targets!r}")
    for t in targets:
        if t not in available:
            why = " (a GELU MLP has no gate: its c_fc is up_proj)" if t == "gate_proj" else ""
            raise ValueError(f"targets: {t!r} is not a projection of this model{why}; choose from {available}")
    return tuple(t for t in available if t in targets)  # row order, duplicates dropped


def _check_hparams(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int (the adapters' rank), got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0 (adapters are scaled by alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def _blocks(model):
    from .gpt import GPT
    if not isinstance(model, GPT):
        raise ValueError(f"model must be a rlhf_fast GPT, got {type(model).__name__}")
    return model.transformer.h


def _get(block: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    parent_path, _, attr = path.rpartition(".")
    parent = block.get_submodule(parent_path)
    return parent, attr, getattr(parent, attr)


def apply_lora(model, r: int, alpha: float = 16.0, dropout: float = 0.0, targets="all"):
    """Put rank-`r` adapters on `targets` of every block of the GPT `model` (in place; returns it).

    Every base parameter is frozen (requires_grad False) except a "value"/"reward" head's `score`
    Linear, which stays trainable (a fresh head has to learn; PEFT's modules_to_save for SEQ_CLS).
    targets: "all" (every projection the model has), or names from TARGETS (list or comma-separated).
    """
    blocks = _blocks(model)
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("model already has LoRA adapters (apply_lora was called before)")
    _check_hparams(r, alpha, dropout)
    targets = _resolve_targets(model.config, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    if model.head != "lm":
        model.score.requires_grad_(True)
    for block in blocks:
        for path, rows in lora_sites(model.config):
            if not any(t in targets for t, _ in rows):
                continue
            parent, attr, linear = _get(block, path)
            layout = [(t if t in targets else None, n) for t, n in rows]
            setattr(parent, attr, LoRALinear(linear, layout, r, alpha, float(dropout)))
    model.lora_config = LoRAConfig(r, float(alpha), float(dropout), targets)
    return model


def lora_modules(model) -> list[LoRALinear]:
    return [m for m in _blocks(model).modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under the model's own parameter names (…c_attn.lora_A.q_proj)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@contextlib.contextmanager
def adapters_disabled(model):
    """Within the block, `model` computes exactly what its base weights compute (adapters skipped).

    The switch is read when a Linear runs: a backward that recomputes blocks (gradient checkpointing)
    after the block has ended would recompute them with the adapters on. The reference policy runs
    under no_grad, so it never does."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA adapters to disable (call apply_lora first)")
    saved = [m.adapters_enabled for m in modules]
    for m in modules:
        m.adapters_enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, saved):
            m.adapters_enabled = was


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight (W += B @ A * alpha / r, in fp32 then cast to W's dtype) and
    put plain nn.Linears back (same weight/bias Parameters, still frozen). In place; returns model."""
    blocks = _blocks(model)
    if getattr(model, "lora_config", None) is None:
        raise ValueError("model has no LoRA adapters to merge")
    for block in blocks:
        for path, _ in lora_sites(model.config):
            parent, attr, module = _get(block, path)
            if not isinstance(module, LoRALinear):
                continue
            merged = (module.weight.float() + module.delta_weight()).to(module.weight.dtype)
            module.weight.copy_(merged)
            with torch.device("meta"):
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight, linear.bias = module.weight, module.bias
            setattr(parent, attr, linear)
    model.lora_config = None
    return model
