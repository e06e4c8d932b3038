"""Micro-batches: gradient accumulation (``train.grad_accum``) and rollout scoring in smaller forwards
(``train.score_batch_size``), shared by every trainer.

Accumulation never changes what a step computes, only how many forwards it takes: every trainer already
scales a rank's loss by (its share of the loss's denominator * world / the global denominator) so that
DDP's gradient average equals one process's gradient; a micro-batch is scaled the same way with its own
share of the *whole* batch's denominator, and the gradients of the micro-batches add up to the batch's
(to fp32 rounding of the sums). The optimizer steps once per batch, after the last micro-batch. DDP and
FSDP2 communicate gradients once per batch too, in the last micro-batch's backward (grad_sync).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


def check_grad_accum(grad_accum: int, per_rank: int, what: str) -> None:
    """ValueError unless `grad_accum` micro-batches split each rank's `per_rank` rows of a step evenly.

    what: the config key of the batch being split and how it is counted, e.g. "sft.batch_size (64) / 2 ranks".
    """
    if grad_accum < 1 or per_rank % grad_accum:
        raise ValueError(f"train.grad_accum={grad_accum} must divide each rank's share of {what} = {per_rank} "
                         "rows (micro-batches of equal size)")


def check_stage_accum(cfg, stage: str, world: int) -> None:
    """check_grad_accum for the batch `stage` splits into micro-batches (its rows per optimizer step)."""
    key, size = {"sft": ("sft.batch_size", cfg.sft.batch_size), "rm": ("rm.batch_size", cfg.rm.batch_size),
                 "ppo": ("ppo.minibatch_size", cfg.ppo.minibatch_size),
                 "rl": (("ppo.minibatch_size", cfg.ppo.minibatch_size) if cfg.rl.algo == "ppo" else
                        ("rl.minibatch_size", cfg.rl.minibatch_size))}[stage]
    check_grad_accum(cfg.train.grad_accum, size // world, f"{key} ({size}) over {world} rank(s)")


def micro_batches(rows: Sequence[T] | torch.Tensor, grad_accum: int) -> list:
    """`rows` (this rank's share of one optimizer step: indices, examples or pairs) as `grad_accum`
    consecutive micro-batches of equal size, in order (check_grad_accum has checked that they divide)."""
    k = len(rows) // grad_accum
    return [rows[i * k:(i + 1) * k] for i in range(grad_accum)]


@contextlib.contextmanager
def grad_sync(last: bool, *models):
    """Context for one micro-batch's forward and backward: DDP and FSDP2 models reduce gradients only in
    the last micro-batch's backward; before it each rank adds its gradients up locally (DDP: no_sync, into
    .grad; FSDP2: set_requires_gradient_sync(False), into unsharded gradients that the last backward adds
    in before its reduce-scatter, so until then a rank holds a full-size gradient, as under DDP). FSDP2's
    flag is a module attribute, not a context: it is True again on leaving, even if the micro-batch raises.
    One process: nothing to do."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
                model.set_requires_gradient_sync(last)
                stack.callback(model.set_requires_gradient_sync, True)
            elif not last and hasattr(model, "no_sync"):  # DDP
                stack.enter_context(model.no_sync())
        yield


def in_chunks(fn: Callable[..., torch.Tensor | tuple], size: int, *tensors: torch.Tensor, **kwargs):
    """``fn(*tensors, **kwargs)`` computed on row chunks of at most `size` rows (size 0: in one call) and
    concatenated along dim 0 (each element, when fn returns a tuple of tensors): a frozen model scoring a
    rollout chunk without holding the whole chunk's activations. Every output row depends on its own input
    row only, so the result is the one-call result (to fp32 rounding: a matmul's blocking may depend on its
    row count)."""
    n = tensors[0].shape[0]
    if size <= 0 or size >= n:
        return fn(*tensors, **kwargs)
    parts = [fn(*(t[i:i + size] for t in tensors), **kwargs) for i in range(0, n, size)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)
