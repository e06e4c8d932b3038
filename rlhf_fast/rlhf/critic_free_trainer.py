"""Critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++): G samples per prompt, no value model.

One iteration: sample G responses for each of `rollout_batch_size` prompts (``generate(group_size=G)``:
one prefill per prompt), score them (reward functions or a reward model, minus ``missing_eos_penalty``),
take the frozen reference's logprobs when ``kl_coef > 0``, compute advantages from the group (or, for
REINFORCE++, from the batch), then ``epochs`` passes of clipped policy updates over shuffled minibatches.

Distributed as PPO (``ppo.py``): chunk j of ``gen_batch_size`` prompts (all G samples of each: a group is
never split) is generated on rank j % world with a seed of (seed, step, j), the rollout is all-gathered,
every rank computes the same advantages, and each minibatch is split across ranks with the loss scaled
so that DDP's gradient average equals the single-process gradient.
"""
from __future__ import annotations

import torch

import rlhf_fast

from . import checkpoint
from .critic_free import aggregate_loss, aggregate_weights, group_advantages, reinforce_pp_advantages
from .data import BatchSampler
from .microbatch import check_stage_accum, grad_sync, in_chunks, micro_batches
from .ppo import UpdateStats, chunk_seed, minibatch_rows
from .ppo_loss import policy_loss, ppo_token_loss
from .ppo_math import masked_mean, per_token_rewards
from .policy_space import (drop_left_kept, filters_on, no_cutoffs, reference_hidden, response_terms,
                           score_logprobs, training_cutoffs)
from .rollout import (Rollout, decode_rows, gather_rollout, kl_per_token, left_pad, response_logprobs,
                      response_targets, response_token_loss, spread_response)
from .runtime import (Runtime, StageLog, autocast, check_finite, clip_and_step, make_optimizer, model_state,
                      optimizer_state, resume_training, save_checkpoint, unwrap)

# what each algorithm means by "auto": advantage scale, baseline, loss aggregation, where the KL goes
PRESETS = {
    "grpo": dict(scale="group", leave_one_out=False, loss_agg="seq_mean_token_mean", kl_in="loss"),
    "dr_grpo": dict(scale="none", leave_one_out=False, loss_agg="seq_mean_token_sum_norm", kl_in="loss"),
    "rloo": dict(scale="none", leave_one_out=True, loss_agg="token_mean", kl_in="reward"),
    "reinforce_pp": dict(scale="batch", leave_one_out=False, loss_agg="token_mean", kl_in="reward"),
}


def resolve(c) -> dict:
    """The rl section's algorithm preset with every non-'auto' field overriding it."""
    if c.algo not in PRESETS:
        raise ValueError(f"rl.algo={c.algo!r} has no critic-free preset; expected one of {sorted(PRESETS)}")
    out = dict(PRESETS[c.algo])
    for name in ("scale", "loss_agg", "kl_in"):
        if getattr(c, name) != "auto":
            out[name] = getattr(c, name)
    return out


@torch.no_grad()
def make_group_rollout(models: dict, prompts: list[list[int]], fields: list[dict], prompt_len: int, tok, c,
                       seed: int, device, rewards=None, scorer=None, score_batch_size: int = 0) -> Rollout:
    """Sample and score G responses for each prompt of one chunk -> a Rollout of len(prompts) * G rows.

    ``scores`` is NaN for a response a reward function could not score; ``values`` are zeros (no critic);
    ``ref_logprobs`` are the behaviour logprobs when there is no reference model (KL 0). Which distribution
    the logprobs are taken under with sampling filters on: ``rl.logprob_space`` (policy_space.py).
    """
    G = c.group_size
    idx, pmask = left_pad(prompts, prompt_len, tok.pad_id)
    idx, pmask = idx.to(device), pmask.to(device)
    stop = tok.stop_ids[0] if len(tok.stop_ids) == 1 else list(tok.stop_ids)  # EOS, and a chat's end of turn
    kw = {"return_cutoffs": True} if filters_on(c) else {}
    gen = unwrap(models["policy"]).generate(idx, c.max_new_tokens, attention_mask=pmask, temperature=c.temperature,
                                            top_k=c.top_k, top_p=c.top_p, min_p=c.min_p, eos_token_id=stop,
                                            pad_token_id=tok.pad_id, seed=seed, group_size=G, **kw)
    seqs = torch.cat((idx.repeat_interleave(G, 0), gen.tokens), 1)
    amask = torch.cat((pmask.repeat_interleave(G, 0), gen.mask), 1)
    mask = gen.mask.float()
    cutoffs = gen.cutoffs if kw else no_cutoffs(*mask.shape, device)
    logprobs, ref_logprobs, kl = in_chunks(
        lambda s, a, m, lp, cut: score_logprobs(models["policy"], models.get("ref"), s, a, m, prompt_len, c, lp, cut,
                                                c.kl_kind),
        score_batch_size, seqs, amask, mask, gen.logprobs, cutoffs)
    has_eos = (torch.isin(gen.tokens, torch.tensor(tok.stop_ids, device=device)) & (gen.mask > 0)).any(1).float()
    prompt_texts, responses = decode_rows(tok, seqs, mask, prompt_len)
    if rewards is not None:
        rows = [f for f in fields for _ in range(G)]
        scores = rewards([f["prompt"] for f in rows], responses, rows).to(device, torch.float32)
    else:
        scores = in_chunks(lambda s, a: models["reward"](s, attention_mask=a), score_batch_size, seqs, amask).float()
    scores = scores - c.missing_eos_penalty * (1.0 - has_eos)
    task = (torch.tensor(scorer(prompt_texts, responses), device=device, dtype=torch.float32) if scorer is not None
            else torch.full((len(responses),), float("nan"), device=device))
    return Rollout(seqs, amask, mask, logprobs, ref_logprobs, torch.zeros_like(mask), scores, task, has_eos, cutoffs,
                   kl)


def collect_group_rollout(models: dict, prompts: list[list[int]], fields: list[dict], prompt_len: int, tok, cfg,
                          rt: Runtime, step: int, rewards=None, scorer=None) -> Rollout:
    """The global batch's rollout (prompts x G rows), generated in chunks over ranks and all-gathered."""
    c, g = cfg.rl, cfg.rl.gen_batch_size
    parts = []
    for j, start in enumerate(range(0, len(prompts), g)):
        if j % rt.world != rt.rank:
            continue
        with autocast(cfg, rt.device):
            parts.append(make_group_rollout(models, prompts[start:start + g], fields[start:start + g], prompt_len,
                                            tok, c, chunk_seed(cfg.run.seed, step, j), rt.device, rewards, scorer,
                                            cfg.train.score_batch_size))
    return gather_rollout(rt, Rollout.cat(parts), g * c.group_size)


def advantages(b: Rollout, c, preset: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token KL (B, T), advantages (B, T)) of a global rollout; unscored rows get advantage 0."""
    kl = kl_per_token(b, c.kl_kind)
    valid = torch.isfinite(b.scores)
    score = torch.where(valid, b.scores, 0.0)
    beta = c.kl_coef if preset["kl_in"] == "reward" else 0.0
    if c.algo == "reinforce_pp":
        rewards = per_token_rewards(score, kl, beta, b.mask)
        return kl, reinforce_pp_advantages(rewards, b.mask * valid[:, None]).float()
    seq_reward = torch.where(valid, score - beta * kl.sum(1), float("nan"))
    adv = group_advantages(seq_reward, c.group_size, scale=preset["scale"], leave_one_out=preset["leave_one_out"],
                           valid=valid)
    return kl, adv[:, None] * b.mask


def policy_update(models: dict, opt, b: Rollout, adv: torch.Tensor, prompt_len: int, cfg, rt: Runtime, step: int,
                  preset: dict) -> dict:
    """`epochs` passes over the rollout in minibatches; returns the token-weighted mean stats."""
    c = cfg.rl
    B = b.mask.shape[0]
    agg = preset["loss_agg"]
    kl_loss_coef = c.kl_coef if preset["kl_in"] == "loss" and models.get("ref") is not None else 0.0
    clip_kw = dict(clip_range_high=c.clip_range_high or None, dual_clip=c.dual_clip or None, loss_agg=agg,
                   max_len=c.max_new_tokens)
    exact_kl = kl_loss_coef > 0 and c.kl_kind == "full"
    width = b.sequences.shape[1]
    out = UpdateStats(rt)
    for rows in minibatch_rows(B, c.minibatch_size, c.epochs, cfg.run.seed, step, rt, b.mask.device):
        # the loss's own denominator: tokens for token_mean, sequences otherwise
        denominator = (lambda m: m.sum()) if agg == "token_mean" else (lambda m: m.new_tensor(float(len(m))))
        n_tokens_global = rt.all_reduce_sum(b.mask[rows].sum())
        n_local_global = rt.all_reduce_sum(denominator(b.mask[rows]))
        for i, micro in enumerate(micro_batches(rows, cfg.train.grad_accum)):
            mb, mb_adv = b.index(micro), adv[micro]
            n_tokens, n_local = mb.mask.sum(), denominator(mb.mask)
            scale = n_local * rt.world / n_local_global  # this micro-batch's share of the minibatch's loss
            kept = training_cutoffs(c, mb.cutoffs, prompt_len, width)
            with grad_sync(i == cfg.train.grad_accum - 1, models["policy"]):
                if kept is None and cfg.train.fused_loss:  # the loss's gradient in the lm_head pass
                    with autocast(cfg, rt.device):
                        loss, pg_loss, stats, entropy = fused_update_loss(models, mb, mb_adv, scale, prompt_len,
                                                                          c, clip_kw, kl_loss_coef, exact_kl)
                    check_finite("rl", step, loss=loss)
                    loss.backward()
                    out.add({"pg_loss": pg_loss, "entropy": masked_mean(entropy.float(), mb.mask), **stats},
                            n_tokens, n_tokens_global, loss_n=(n_local, n_local_global), new_update=i == 0)
                    continue
                with autocast(cfg, rt.device):
                    if exact_kl:  # the reference's hidden states again (not kept from scoring: (B, T, C) each)
                        reference = reference_hidden(models["ref"], mb.sequences, mb.attention_mask)
                        logprobs, entropy, kl, _ = response_terms(
                            models["policy"], reference, mb.sequences, mb.attention_mask,
                            response_targets(mb.sequences, mb.mask, prompt_len), kept, prompt_len, mb.mask.shape[1],
                            c.temperature, return_entropy=True, check_kept=False)
                    else:
                        logprobs, entropy = response_logprobs(models["policy"], mb.sequences, mb.attention_mask,
                                                              mb.mask, prompt_len, c.temperature, return_entropy=True,
                                                              cutoffs=kept, check_kept=False)
                    logprobs = logprobs.float()
                    loss_mask, left = drop_left_kept(logprobs, mb.mask)
                    pg_loss, stats = policy_loss(logprobs, mb.logprobs, mb_adv, loss_mask, c.clip_range, **clip_kw)
                    if kept is not None:
                        stats["left_kept_set"] = left
                    loss = pg_loss
                    if kl_loss_coef > 0:
                        seen = torch.where(loss_mask > 0, logprobs, mb.ref_logprobs)  # no -inf into k3's exp
                        per_token = kl.float() if exact_kl else rlhf_fast.kl_penalty(seen, mb.ref_logprobs, "k3")
                        kl_loss = aggregate_loss(per_token, loss_mask, agg, max_len=c.max_new_tokens)
                        loss = loss + kl_loss_coef * kl_loss
                        stats["kl_loss"] = kl_loss.detach()
                check_finite("rl", step, loss=loss)
                (loss * scale).backward()
            out.add({"pg_loss": pg_loss.detach(), "entropy": masked_mean(entropy.detach().float(), mb.mask),
                     **stats}, n_tokens, n_tokens_global, loss_n=(n_local, n_local_global), new_update=i == 0)
        clip_and_step(models["policy"], opt, c.grad_clip, "rl", step)
    return out.means()


def fused_update_loss(models: dict, mb: Rollout, mb_adv, scale, prompt_len: int, c, clip_kw: dict,
                      kl_loss_coef: float, exact_kl: bool):
    """policy_update's micro-batch loss (times scale) with its gradient taken in the policy's lm_head pass
    (rlhf_fast.fused_linear_token_loss) -> (that loss, pg_loss and stats as policy_update logs them,
    entropy (B, T)): the same per-token terms and aggregation weights as policy_loss + aggregate_loss."""
    width, agg = mb.sequences.shape[1], clip_kw["loss_agg"]
    def flat(x):
        return spread_response(x.float(), width, prompt_len)
    w = flat(aggregate_weights(mb.mask, agg, max_len=clip_kw["max_len"]) * scale)
    pg_fn = ppo_token_loss(flat(mb.logprobs), flat(mb_adv), w, c.clip_range, clip_kw["clip_range_high"],
                           clip_kw["dual_clip"])
    ref_logprobs = flat(mb.ref_logprobs)

    def loss_fn(positions, st):
        loss = pg_fn(positions, st)
        if kl_loss_coef > 0:
            per_token = st.kl if exact_kl else rlhf_fast.kl_penalty(st.logp, ref_logprobs[positions], "k3")
            loss = loss + kl_loss_coef * (per_token * w[positions]).sum()
        return loss
    reference = reference_hidden(models["ref"], mb.sequences, mb.attention_mask) if exact_kl else None
    loss, st = response_token_loss(models["policy"], mb.sequences, mb.attention_mask, mb.mask, prompt_len,
                                   c.temperature, loss_fn, reference=reference)
    with torch.no_grad():  # the same terms, for the log
        pg_loss, stats = policy_loss(st.logp, mb.logprobs, mb_adv, mb.mask, c.clip_range, **clip_kw)
        if kl_loss_coef > 0:
            per_token = st.kl if exact_kl else rlhf_fast.kl_penalty(st.logp, mb.ref_logprobs, "k3")
            stats["kl_loss"] = aggregate_loss(per_token, mb.mask, agg, max_len=c.max_new_tokens)
    return loss, pg_loss, stats, st.entropy


def rollout_stats(b: Rollout, kl: torch.Tensor, group_size: int, has_ref: bool) -> dict:
    valid = torch.isfinite(b.scores)
    scores = b.scores[valid].double()
    groups = b.scores.view(-1, group_size)
    lo = torch.where(torch.isfinite(groups), groups, float("inf")).amin(1)
    hi = torch.where(torch.isfinite(groups), groups, float("-inf")).amax(1)
    out = {
        "reward_mean": float(scores.mean()) if len(scores) else float("nan"),
        "reward_std": float(scores.std()) if len(scores) > 1 else float("nan"),
        "groups_all_equal": float((~(hi > lo)).double().mean()),  # no learning signal in such a group
        "unscored": int((~valid).sum()),
        "response_len": float(b.mask.sum(1).mean()), "eos_rate": float(b.has_eos.mean()),
    }
    if has_ref:
        out["kl"] = float(kl.sum(1).mean())
    if not torch.isnan(b.task_scores).any():
        out["task_score_rollout"] = float(b.task_scores.mean())
    return out


def train_critic_free(cfg, rt: Runtime, tok, models: dict, prompts: list[list[int]], fields: list[dict],
                      prompt_len: int, stage_dir, resume_state: dict | None, eval_fn=None, rewards=None, scorer=None,
                      on_step=None) -> dict:
    """Run iterations 1..cfg.rl.steps (from the checkpoint in `resume_state` if given).

    models: {"policy" (possibly DDP-wrapped), "ref" (frozen, or None when kl_coef is 0), "reward" (frozen
    reward model, or None with reward functions)}; fields[i]: prompt i's JSONL line; eval_fn(step) -> task
    score or None. Returns the last logged metrics.
    """
    c = cfg.rl
    preset = resolve(c)
    if c.minibatch_size % rt.world or c.rollout_batch_size % (c.gen_batch_size * rt.world):
        raise ValueError(f"with {rt.world} ranks, rl.minibatch_size must be a multiple of {rt.world} and "
                         f"rl.rollout_batch_size a multiple of gen_batch_size * {rt.world}")
    check_stage_accum(cfg, "rl", rt.world)
    opt = make_optimizer(models["policy"], c.lr, 0.0)
    sampler = BatchSampler(len(prompts), c.rollout_batch_size, cfg.run.seed)
    ckpt_path = stage_dir / checkpoint.NAME
    start = 0
    if resume_state is not None:
        start = resume_training(resume_state, str(checkpoint.stage_checkpoint(stage_dir)),
                                [(models["policy"], opt, resume_state["optimizer"])], sampler)
    log = StageLog(cfg, rt, stage_dir, "rl", c.steps, start)
    if start == 0 and eval_fn is not None:
        log.log(0, task_score=eval_fn(0))
    record = resume_state.get("record", {}) if resume_state is not None else {}
    for step in range(start + 1, c.steps + 1):
        unwrap(models["policy"]).eval()  # dropout off while sampling and training alike
        ids = sampler.next()
        b = collect_group_rollout(models, [prompts[i] for i in ids], [fields[i] for i in ids], prompt_len, tok,
                                  cfg, rt, step, rewards, scorer)
        check_finite("rl", step, ref_logprobs=b.ref_logprobs)
        if rewards is None:  # NaN marks an unscored response only when a reward function says so
            check_finite("rl", step, reward=b.scores)
        kl, adv = advantages(b, c, preset)
        record = rollout_stats(b, kl, c.group_size, models.get("ref") is not None)
        record.update(policy_update(models, opt, b, adv, prompt_len, cfg, rt, step, preset))
        if eval_fn is not None and (step % c.eval_every == 0 or step == c.steps):
            record["task_score"] = eval_fn(step)
        log.step(step, record, reward=f"{record['reward_mean']:.3f}")
        if step % c.ckpt_every == 0 or step == c.steps:
            save_checkpoint(ckpt_path, rt, policy=model_state(models["policy"]),
                            optimizer=optimizer_state(models["policy"], opt), sampler=sampler.state_dict(),
                            step=step, record=record)
        if on_step is not None:
            on_step(step)
    log.close()
    return record
