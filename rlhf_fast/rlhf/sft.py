"""Supervised fine-tuning: next-token loss on the response (and EOS) of each demonstration.

Sequences are packed into one row per step (``cu_seqlens``, varlen attention), so no compute is spent
on padding (``sft.packing``; on CPU the default pads instead, as the reference varlen attention loops
over sequences); the loss is the mean negative logprob over every response token of the global batch,
computed through ``fused_linear_logprobs`` inside the model (no logits in memory).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .config import Config
from .data import (IGNORE_INDEX, SFT_KEYS, BatchSampler, data_format, read_jsonl, sft_batch, sft_padded_batch,
                   tokenize_sft)
from .lora_stage import apply_run_lora
from .memory_switches import trained
from .microbatch import check_stage_accum, grad_sync, micro_batches
from .runtime import (Runtime, StageLog, autocast, check_finite, clip_and_step, load_checkpoint, lr_at,
                      make_optimizer, model_state, optimizer_state, resume_training, save_checkpoint, stage_model,
                      unwrap, wrap_model)


def sft_loss(model, batch: dict, n_global: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate on this rank, summed negative logprob of this rank's tokens).

    The local sum is divided by the global token count and multiplied by `world` because DDP averages
    gradients over ranks: the result is the gradient of the global token mean, whatever the split.
    """
    layout = ({"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else
              {"cu_seqlens": batch["cu_seqlens"], "max_seqlen": batch["max_seqlen"]})
    logprobs, _ = model(batch["input_ids"], batch["targets"], return_entropy=False, **layout)
    nll = -logprobs.sum()  # ignored positions give logprob 0
    return nll / n_global * world, nll.detach()


def train_sft(cfg: Config, rt: Runtime, tok, data_path: str | Path, stage_dir: Path, resume: bool,
              on_step=None) -> dict:
    """Run SFT; returns {"steps", "loss"}. `on_step(step)` is called after each step (tests use it to stop)."""
    c, accum = cfg.sft, cfg.train.grad_accum
    check_stage_accum(cfg, "sft", rt.world)
    lines = read_jsonl(data_path, SFT_KEYS, **data_format(cfg, data_path))
    examples = tokenize_sft(lines, tok, cfg.model.block_size)
    sampler = BatchSampler(len(examples), c.batch_size, cfg.run.seed)
    ckpt_path = stage_dir / checkpoint.NAME
    saved = checkpoint.stage_checkpoint(stage_dir)
    state = load_checkpoint(saved) if resume and saved.is_file() else None
    model = stage_model(cfg, rt, tok.vocab_size, "lm", state, c.init or cfg.model.init)
    if state is None:  # a resumed LoRA model has its adapters from the checkpoint
        apply_run_lora(cfg, model)
    trained(cfg, model)
    wrapped = wrap_model(model, rt)
    opt = make_optimizer(wrapped, c.lr, c.weight_decay)
    start, loss = 0, float("nan")
    if state is not None:
        start = resume_training(state, str(saved), [(wrapped, opt, state["optimizer"])], sampler)
        loss = state.get("loss", float("nan"))
    log = StageLog(cfg, rt, stage_dir, "sft", c.steps, start)
    packed = c.packing == "packed" or (c.packing == "auto" and rt.device.type == "cuda")
    for step in range(start + 1, c.steps + 1):
        ids = sampler.next()[rt.rank::rt.world]
        batches = []
        for micro in micro_batches([examples[i] for i in ids], accum):
            batch = sft_batch(micro) if packed else sft_padded_batch(micro, tok.pad_id)
            batches.append({k: (v.to(rt.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        n_global = rt.all_reduce_sum(sum((b["targets"] != IGNORE_INDEX).sum() for b in batches).float())
        lr = lr_at(step - 1, c.steps, c.lr, c.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        nll = 0.0
        for i, batch in enumerate(batches):
            with grad_sync(i == len(batches) - 1, wrapped):
                with autocast(cfg, rt.device):
                    local_loss, micro_nll = sft_loss(wrapped, batch, n_global, rt.world)
                local_loss.backward()  # a non-finite loss is refused below, before the step
            nll = nll + micro_nll
        loss = float(rt.all_reduce_sum(nll) / n_global)
        check_finite("sft", step, loss=loss)
        grad_norm = clip_and_step(wrapped, opt, c.grad_clip, "sft", step)
        log.step(step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_global)}, loss=f"{loss:.3f}")
        if step % c.ckpt_every == 0 or step == c.steps:
            save_checkpoint(ckpt_path, rt, model=model_state(model), optimizer=optimizer_state(wrapped, opt),
                            sampler=sampler.state_dict(), step=step, loss=loss)
        if on_step is not None:
            on_step(step)
    log.close()
    unwrap(wrapped).eval()
    return {"steps": c.steps, "loss": loss}
