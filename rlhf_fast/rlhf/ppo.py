"""PPO for RLHF (Ziegler et al. 2019, InstructGPT; "The N implementation details of RLHF with PPO").

One iteration: sample a rollout batch from the policy with ``rlhf_fast.sample`` (behaviour logprobs from
the sampler), score it (frozen SFT reference logprobs, value model, reward model at the last token,
minus ``missing_eos_penalty`` for responses without EOS), turn score and per-token KL into per-token
rewards, GAE, whiten the advantages, then ``ppo_epochs`` passes of clipped policy and value updates
over shuffled minibatches, with separate optimizers and gradient clipping. Every logprob and entropy
goes through the fused linear-logprob op (logits / temperature), the KL through ``kl_penalty`` or, with
``kl_kind=full``, exactly through ``fused_linear_kl_divergence``. With sampling filters on, which
distribution every logprob, entropy and KL is taken under is ``logprob_space`` (policy_space.py).

Distributed: every rank generates and scores its chunks, the rollout is all-gathered so every rank
computes the same advantages, and each minibatch is split across ranks. Losses are scaled by
(local tokens * world / global tokens), so DDP's gradient average equals the single-process gradient.
"""
from __future__ import annotations

import torch

from .ppo_loss import policy_loss, ppo_token_loss
from .ppo_math import (AdaptiveKLController, FixedKLController, compute_gae, explained_variance, masked_mean,
                       masked_whiten, per_token_rewards, value_loss)
from . import checkpoint
from .data import BatchSampler
from .microbatch import check_stage_accum, grad_sync, micro_batches
from .policy_space import drop_left_kept, training_cutoffs
from .rollout import (Rollout, gather_rollout, kl_per_token, make_rollout, response_logprobs, response_token_loss,
                      response_values, spread_response)
from .runtime import (Runtime, StageLog, autocast, check_finite, clip_and_step, make_optimizer, model_state,
                      optimizer_state, resume_training, save_checkpoint, unwrap)


def kl_controller(c):
    if c.adaptive_kl:
        return AdaptiveKLController(c.kl_coef, c.target_kl, c.kl_horizon)
    return FixedKLController(c.kl_coef)


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    return ((seed * 1_000_003 + step) * 1009 + chunk) % (2 ** 62)


def minibatch_rows(n_rows: int, minibatch_size: int, epochs: int, seed: int, step: int, rt: Runtime, device):
    """The rows this rank trains on in each minibatch of `epochs` shuffled passes over a global rollout of
    `n_rows` rows: every rank draws the same permutation and takes its share of each minibatch."""
    g = torch.Generator().manual_seed(chunk_seed(seed, step, 10 ** 6))
    for _ in range(epochs):
        perm = torch.randperm(n_rows, generator=g).to(device)
        for start in range(0, n_rows, minibatch_size):
            yield perm[start:start + minibatch_size][rt.rank::rt.world]


class UpdateStats:
    """Means of per-minibatch stats over the updates of one iteration, each minibatch's stats combined over
    ranks with the weight of their own denominator (= the single-process minibatch value): tokens for
    token means, and for the losses in `LOSSES` the denominator of the loss's aggregation when it is not
    tokens (`loss_n`: sequences for the critic-free algorithms' per-sequence means)."""

    LOSSES = ("pg_loss", "kl_loss")

    def __init__(self, rt: Runtime):
        self.rt, self.sums, self.n_updates = rt, {}, 0

    def add(self, stats: dict, n_tokens: torch.Tensor, n_tokens_global: torch.Tensor,
            loss_n: tuple[torch.Tensor, torch.Tensor] | None = None, new_update: bool = True) -> None:
        """One minibatch's stats; with gradient accumulation, one micro-batch's (its own denominators, the
        minibatch's global ones): new_update=False adds to the update the previous call started."""
        for k, v in stats.items():
            n, n_global = loss_n if loss_n is not None and k in self.LOSSES else (n_tokens, n_tokens_global)
            self.sums[k] = self.sums.get(k, 0.0) + self.rt.all_reduce_sum(v.float() * n) / n_global
        self.n_updates += int(new_update)

    def means(self) -> dict:
        return {k: float(v / self.n_updates) for k, v in self.sums.items()}


def collect_rollout(models: dict, prompt_batch: list[list[int]], prompt_len: int, tok, cfg, rt: Runtime,
                    step: int, reward_fn=None, scorer=None) -> Rollout:
    """Generate and score `prompt_batch` (the global batch) split in chunks over ranks; all-gathered."""
    g = cfg.ppo.gen_batch_size
    parts = []
    for j, start in enumerate(range(0, len(prompt_batch), g)):
        if j % rt.world != rt.rank:
            continue
        with autocast(cfg, rt.device):
            parts.append(make_rollout(models["policy"], models["ref"], models["value"], models["reward"],
                                      prompt_batch[start:start + g], prompt_len, tok, cfg,
                                      chunk_seed(cfg.run.seed, step, j), rt.device, reward_fn, scorer))
    return gather_rollout(rt, Rollout.cat(parts), g)


def advantages_and_returns(b: Rollout, kl_coef: float, c) -> tuple[torch.Tensor, ...]:
    """(per-token KL (B, T), rewards (B, T), advantages (B, T), returns (B, T)) of a global rollout."""
    kl = kl_per_token(b, c.kl_kind)
    rewards = per_token_rewards(b.scores, kl, kl_coef, b.mask)
    advantages, returns = compute_gae(rewards, b.values, b.mask, c.gamma, c.lam)
    if c.whiten_advantages:
        advantages = masked_whiten(advantages, b.mask)
    return kl, rewards, advantages, returns


def ppo_update(models: dict, opts: dict, b: Rollout, advantages, returns, prompt_len: int, cfg, rt: Runtime,
               step: int) -> dict:
    """`ppo_epochs` passes over the rollout in minibatches; returns the token-weighted mean stats."""
    c = cfg.ppo
    B, T = b.mask.shape
    width = b.sequences.shape[1]
    out = UpdateStats(rt)
    for rows in minibatch_rows(B, c.minibatch_size, c.ppo_epochs, cfg.run.seed, step, rt, b.mask.device):
        n_global = rt.all_reduce_sum(b.mask[rows].sum())
        for i, micro in enumerate(micro_batches(rows, cfg.train.grad_accum)):
            mb = b.index(micro)
            mb_adv, mb_ret = advantages[micro], returns[micro]
            n_local = mb.mask.sum()
            scale = n_local * rt.world / n_global  # this micro-batch's share of the minibatch's token mean
            with grad_sync(i == cfg.train.grad_accum - 1, models["policy"], models["value"]):
                with autocast(cfg, rt.device):
                    kept = training_cutoffs(c, mb.cutoffs, prompt_len, width)
                    if kept is None and cfg.train.fused_loss:  # the loss's gradient in the lm_head pass
                        weights = mb.mask * (scale / n_local)  # policy_loss's masked mean, times scale
                        fused, (logprobs, entropy, _) = response_token_loss(
                            models["policy"], mb.sequences, mb.attention_mask, mb.mask, prompt_len, c.temperature,
                            ppo_token_loss(*(spread_response(x.float(), width, prompt_len)
                                             for x in (mb.logprobs, mb_adv, weights)), c.clip_range))
                        with torch.no_grad():  # the same loss, for the log, and its stats
                            pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb_adv, mb.mask, c.clip_range)
                    else:
                        logprobs, entropy = response_logprobs(models["policy"], mb.sequences, mb.attention_mask,
                                                              mb.mask, prompt_len, c.temperature, return_entropy=True,
                                                              cutoffs=kept, check_kept=False)
                        loss_mask, left = drop_left_kept(logprobs, mb.mask)
                        pg_loss, pg_stats = policy_loss(logprobs.float(), mb.logprobs, mb_adv, loss_mask, c.clip_range)
                        fused = pg_loss * scale
                        if kept is not None:
                            pg_stats["left_kept_set"] = left
                check_finite("ppo", step, pg_loss=pg_loss)
                fused.backward()
                with autocast(cfg, rt.device):  # a separate model: its loss does not see the policy step
                    vpred = response_values(models["value"], mb.sequences, mb.attention_mask, prompt_len, T)
                    vf_loss, vf_stats = value_loss(vpred.float(), mb.values, mb_ret, mb.mask, c.value_clip_range)
                check_finite("ppo", step, vf_loss=vf_loss)
                (vf_loss * scale).backward()
            out.add({"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
                     "entropy": masked_mean(entropy.detach().float(), mb.mask), **pg_stats, **vf_stats},
                    n_local, n_global, new_update=i == 0)
        clip_and_step(models["policy"], opts["policy"], c.grad_clip, "ppo", step)
        clip_and_step(models["value"], opts["value"], c.grad_clip, "ppo", step)
    return out.means()


def rollout_stats(b: Rollout, kl, rewards, returns, kl_coef: float) -> dict:
    seq_kl = kl.sum(1)
    out = {
        "score": float(b.scores.mean()), "kl": float(seq_kl.mean()), "kl_coef": kl_coef,
        "reward_total": float(rewards.sum(1).mean()), "response_len": float(b.mask.sum(1).mean()),
        "eos_rate": float(b.has_eos.mean()),
        "explained_var": float(explained_variance(b.values, returns, b.mask)),
    }
    if not torch.isnan(b.task_scores).any():
        out["task_score_rollout"] = float(b.task_scores.mean())
    return out


def train_ppo(cfg, rt: Runtime, tok, models: dict, prompts: list[list[int]], prompt_len: int, stage_dir,
              resume_state: dict | None, eval_fn=None, reward_fn=None, scorer=None, on_step=None) -> dict:
    """Run PPO iterations 1..cfg.ppo.steps (from the checkpoint in `resume_state` if given).

    models: {"policy", "ref", "value", "reward"} (policy and value possibly DDP-wrapped, the others frozen);
    eval_fn(step) -> task score on held-out prompts, or None. Returns the last logged metrics.
    """
    c = cfg.ppo
    if c.minibatch_size % rt.world or c.rollout_batch_size % (c.gen_batch_size * rt.world):
        raise ValueError(f"with {rt.world} ranks, ppo.minibatch_size must be a multiple of {rt.world} and "
                         f"ppo.rollout_batch_size a multiple of gen_batch_size * {rt.world}")
    check_stage_accum(cfg, "ppo", rt.world)
    opts = {"policy": make_optimizer(models["policy"], c.lr, 0.0),
            "value": make_optimizer(models["value"], c.value_lr, 0.0)}
    sampler = BatchSampler(len(prompts), c.rollout_batch_size, cfg.run.seed)
    kl_ctl = kl_controller(c)
    ckpt_path = stage_dir / checkpoint.NAME
    start = 0
    if resume_state is not None:
        saved = resume_state["optimizers"]
        start = resume_training(resume_state, str(checkpoint.stage_checkpoint(stage_dir)),
                                [(models[k], opts[k], saved[k]) for k in opts], sampler)
        kl_ctl.load_state_dict(resume_state["kl_ctl"])
    log = StageLog(cfg, rt, stage_dir, "ppo", c.steps, start)
    if start == 0 and eval_fn is not None:
        log.log(0, task_score=eval_fn(0))
    record = resume_state.get("record", {}) if resume_state is not None else {}
    for step in range(start + 1, c.steps + 1):
        for m in ("policy", "value"):
            unwrap(models[m]).eval()  # dropout off while sampling and training alike
        batch = [prompts[i] for i in sampler.next()]
        b = collect_rollout(models, batch, prompt_len, tok, cfg, rt, step, reward_fn, scorer)
        check_finite("ppo", step, reward=b.scores, values=b.values, ref_logprobs=b.ref_logprobs)
        kl, rewards, advantages, returns = advantages_and_returns(b, kl_ctl.value, c)
        record = rollout_stats(b, kl, rewards, returns, kl_ctl.value)
        record.update(ppo_update(models, opts, b, advantages, returns, prompt_len, cfg, rt, step))
        kl_ctl.update(record["kl"], c.rollout_batch_size)
        if eval_fn is not None and (step % c.eval_every == 0 or step == c.steps):
            record["task_score"] = eval_fn(step)
        log.step(step, record, score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
        if step % c.ckpt_every == 0 or step == c.steps:
            save_checkpoint(ckpt_path, rt, policy=model_state(models["policy"]), value=model_state(models["value"]),
                            optimizers={k: optimizer_state(models[k], o) for k, o in opts.items()},
                            sampler=sampler.state_dict(),
                            kl_ctl=kl_ctl.state_dict(), step=step, record=record)
        if on_step is not None:
            on_step(step)
    log.close()
    return record
