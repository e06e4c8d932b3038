"""Reward model: the SFT backbone with a scalar head, trained on preference pairs.

Loss: Bradley-Terry, ``-log sigmoid(r(chosen) - r(rejected))``, averaged over pairs; the reward is read at
each sequence's last token (EOS). Chosen and rejected sequences of a batch go through one forward,
packed into one row on CUDA (varlen attention) and right-padded on CPU.
After training the reward is normalized to mean 0, std 1 over responses sampled from the SFT policy,
by folding the affine map into the saved head (so the value model initialized from it starts normalized too).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint
from .config import Config
from .data import RM_KEYS, BatchSampler, data_format, read_jsonl, sequence_batch, tokenize_pairs
from .lora_stage import apply_run_lora
from .memory_switches import trained
from .microbatch import check_stage_accum, grad_sync, micro_batches
from .runtime import (Runtime, StageLog, autocast, check_finite, clip_and_step, load_checkpoint, lr_at,
                      make_optimizer, model_state, optimizer_state, resume_training, save_checkpoint, stage_model,
                      wrap_model)


def score_sequences(model, seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """(n,) rewards at each sequence's last token: packed on CUDA (varlen attention), padded on CPU."""
    idx, layout = sequence_batch(seqs, pad_id, packed=torch.device(device).type == "cuda", device=device)
    return model(idx, **layout)


def pair_rewards(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, device):
    """(r_chosen (n,), r_rejected (n,)) for n pairs, in one forward."""
    rewards = score_sequences(model, [c for c, _ in pairs] + [r for _, r in pairs], pad_id, device)
    return rewards[:len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def pair_accuracy(model, pairs, rt: Runtime, batch_size: int, pad_id: int) -> float:
    """Fraction of pairs with r(chosen) > r(rejected); pairs split over ranks."""
    hits = torch.zeros(2, dtype=torch.float64, device=rt.device)
    mine = pairs[rt.rank::rt.world]
    for start in range(0, len(mine), batch_size):
        rc, rr = pair_rewards(model, mine[start:start + batch_size], pad_id, rt.device)
        hits += torch.tensor([float((rc > rr).sum()), float(rc.numel())], dtype=torch.float64, device=rt.device)
    hits = rt.all_reduce_sum(hits)
    return float(hits[0] / hits[1])


@torch.no_grad()
def reward_moments(model, sequences: list[list[int]], rt: Runtime, batch_size: int,
                   pad_id: int) -> tuple[float, float]:
    """(mean, std) of the reward over `sequences` (split over ranks)."""
    rewards = []
    mine = sequences[rt.rank::rt.world]
    for start in range(0, len(mine), batch_size):
        rewards.append(score_sequences(model, mine[start:start + batch_size], pad_id, rt.device).double())
    r = torch.cat(rewards)
    moments = rt.all_reduce_sum(torch.stack([r.new_tensor(float(r.numel())), r.sum(), (r * r).sum()]))
    mean = moments[1] / moments[0]
    std = torch.sqrt(torch.clamp(moments[2] / moments[0] - mean * mean, min=1e-12))
    return float(mean), float(std)


def fold_normalization(state: dict, mean: float, std: float) -> dict:
    """Make the saved head output (r - mean) / std (applied to the checkpoint's full weights, which works
    the same for plain, DDP and FSDP-sharded models)."""
    weights = state["weights"]
    weights["score.weight"] = weights["score.weight"] / std
    weights["score.bias"] = (weights["score.bias"] - mean) / std
    return state


def train_rm(cfg: Config, rt: Runtime, tok, train_path, eval_path, init: str | Path | None, stage_dir: Path,
             resume: bool, norm_sequences=None, on_step=None) -> dict:
    """Train the reward model; returns {"rm_accuracy", "rm_train_accuracy", "reward_mean", "reward_std"}.

    norm_sequences: callable returning SFT-policy samples (token lists) to normalize on, or None.
    """
    c, accum = cfg.rm, cfg.train.grad_accum
    check_stage_accum(cfg, "rm", rt.world)
    pairs, eval_pairs = (tokenize_pairs(read_jsonl(p, RM_KEYS, **data_format(cfg, p)), tok, cfg.model.block_size)
                         for p in (train_path, eval_path))
    sampler = BatchSampler(len(pairs), c.batch_size, cfg.run.seed + 1)
    ckpt_path = stage_dir / checkpoint.NAME
    saved = checkpoint.stage_checkpoint(stage_dir)
    state = load_checkpoint(saved) if resume and saved.is_file() else None
    model = stage_model(cfg, rt, tok.vocab_size, "reward", state, init)
    if state is None:  # a resumed LoRA model has its adapters from the checkpoint
        apply_run_lora(cfg, model)
    trained(cfg, model)
    wrapped = wrap_model(model, rt)
    opt = make_optimizer(wrapped, c.lr, c.weight_decay)
    start = 0
    if state is not None:
        start = resume_training(state, str(saved), [(wrapped, opt, state["optimizer"])], sampler)
        if state.get("done"):
            return state["result"]
    log = StageLog(cfg, rt, stage_dir, "rm", c.steps, start)
    acc = float("nan")
    for step in range(start + 1, c.steps + 1):
        mine = [pairs[i] for i in sampler.next()[rt.rank::rt.world]]
        lr = lr_at(step - 1, c.steps, c.lr, c.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        n_global = c.batch_size
        loss_sum = hits = 0.0
        for i, micro in enumerate(micro_batches(mine, accum)):
            with grad_sync(i == accum - 1, wrapped):
                with autocast(cfg, rt.device):
                    rc, rr = pair_rewards(wrapped, micro, tok.pad_id, rt.device)
                margin = (rc - rr).float()
                losses = -F.logsigmoid(margin)
                (losses.sum() / n_global * rt.world).backward()  # a non-finite loss is refused below
            loss_sum, hits = loss_sum + losses.sum().detach(), hits + (margin > 0).sum().float()
        loss = float(rt.all_reduce_sum(loss_sum)) / n_global
        train_acc = float(rt.all_reduce_sum(hits)) / n_global
        check_finite("rm", step, loss=loss)
        grad_norm = clip_and_step(wrapped, opt, c.grad_clip, "rm", step)
        record = {"loss": loss, "train_accuracy": train_acc, "lr": lr, "grad_norm": grad_norm}
        if step % c.ckpt_every == 0 or step == c.steps:
            model.eval()
            acc = record["eval_accuracy"] = pair_accuracy(model, eval_pairs, rt, 4 * c.batch_size, tok.pad_id)
            model.train()
        log.step(step, record, loss=f"{loss:.3f}", acc=f"{train_acc:.2f}")
        if step % c.ckpt_every == 0 and step < c.steps:
            save_checkpoint(ckpt_path, rt, model=model_state(model), optimizer=optimizer_state(wrapped, opt),
                            sampler=sampler.state_dict(), step=step)
        if on_step is not None:
            on_step(step)
    log.close()
    model.eval()
    result = {"rm_accuracy": acc, "reward_mean": 0.0, "reward_std": 1.0}
    if norm_sequences is not None and c.norm_samples > 0:
        result["reward_mean"], result["reward_std"] = reward_moments(model, norm_sequences(), rt, 4 * c.batch_size,
                                                                    tok.pad_id)
    state = fold_normalization(model_state(model), result["reward_mean"], result["reward_std"])
    save_checkpoint(ckpt_path, rt, model=state, optimizer=optimizer_state(wrapped, opt),
                    sampler=sampler.state_dict(), step=c.steps, done=True, result=result)
    return result
