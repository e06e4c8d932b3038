"""The `train` section's model switches, applied where a stage has its models ready (fresh or resumed, so
a resumed run computes exactly what an unstopped one does): gradient checkpointing on the models a stage
trains, and the dtype of the weights no optimizer touches.

Frozen weights in bfloat16 halve their memory; the models then compute in bfloat16 (the fused logprob op
takes bf16 hidden states and weights and returns fp32 logprobs). A LoRA policy keeps its adapters in fp32
(they are what AdamW updates) over a bf16 base, as PEFT does for a bf16 base model.
"""
from __future__ import annotations

import torch

from .config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def trained(cfg: Config, model):
    """`model` (unwrapped, not yet DDP/FSDP-wrapped) with train.grad_checkpointing set, and, for a LoRA
    model, its frozen base in train.frozen_dtype. Returns `model`."""
    if cfg.train.grad_checkpointing:
        model.config.gradient_checkpointing = True
    if getattr(model, "lora_config", None) is not None:
        dtype = DTYPES[cfg.train.frozen_dtype]
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    return model


def frozen(cfg: Config, model):
    """A model nobody trains (reference, reward): eval mode, no gradients, weights in train.frozen_dtype.
    Its forwards run under torch.no_grad in the stages (rollout scoring is decorated with it)."""
    return model.eval().requires_grad_(False).to(DTYPES[cfg.train.frozen_dtype])
