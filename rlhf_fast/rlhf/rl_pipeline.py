"""The `rl` stage (``run_rl``) and the critic-free demo (``run_rl_demo``: SFT, then GRPO or another
critic-free algorithm on the built-in task's verifiable answers).

``rl.algo=ppo`` runs the PPO stage (``pipeline.run_ppo``, configured by the ppo section). The other
algorithms write the stage folder ``<out>/rl/`` (whichever the algorithm: a run holds one rl stage; as
every stage, config.yaml, metrics.jsonl, checkpoint.safetensors, plots/, result.json written last) under
the run-safety rules of ``run_dir`` (validated first, refused without --resume or --overwrite) and load
only what they need: the policy, the frozen reference when ``rl.kl_coef > 0``, and a reward model only
when no reward function is given on prompts other than the built-in task's. Summary keys: ``algo``, ``task_score_rl``,
``kl_final``, ``score_final``, ``seconds_rl``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import pipeline
from .config import Config
from .data import Line, tokenize_prompts
from .evaluate import task_score
from .model_init import init_model_state
from .checkpoint import stage_checkpoint
from .reward_fns import RewardFunctions, read_prompt_records, rl_rewards
from .run_dir import preflight_stages, stage_init
from .run_io import read_metrics
from .lora_stage import apply_run_lora, reference_policy
from .memory_switches import frozen, trained
from .runtime import load_checkpoint, load_model, wrap_model
from .task import task_reward
from .tokenizer import get_tokenizer

def _records(path, tok, cfg: Config) -> tuple[list[list[int]], list[dict]]:
    records = read_prompt_records(path)
    lines = [Line(f"{path}:{i + 1}", r) for i, r in enumerate(records)]
    return tokenize_prompts(lines, tok, cfg.model.block_size, cfg.rl.max_new_tokens), records


def _field_scorer(rewards: RewardFunctions, records: list[dict]):
    """scorer(prompt_texts, responses) for held-out prompts: the reward functions with each prompt's fields,
    found by its text; unscored responses count as 0."""
    by_text = {r["prompt"]: r for r in records}

    def scorer(prompts: list[str], responses: list[str]) -> list[float]:
        missing = [p for p in prompts if p not in by_text]
        if missing:
            raise ValueError(f"rl.eval_prompts: decoded prompt {missing[0]!r} matches no line; the tokenizer does "
                             "not round-trip the prompt text")
        scores = rewards(prompts, responses, [by_text[p] for p in prompts])
        return [float(s) if s == s else 0.0 for s in scores.tolist()]
    return scorer


def run_rl(cfg: Config, resume: bool = False, on_step=None, overwrite: bool = False) -> dict:
    """The rl stage into cfg.run.out/rl (rl.algo='ppo': the ppo stage, into cfg.run.out/ppo). resume:
    continue it (a finished stage is left as it is); overwrite: start it again. Neither, into a run that
    has the stage: ValueError. Everything is validated before the run directory is touched."""
    if cfg.rl.algo == "ppo":
        return pipeline.run_ppo(cfg, resume, on_step=on_step, overwrite=overwrite)
    from .critic_free_trainer import train_critic_free
    t0 = time.time()
    plan, rt = pipeline._begin(cfg, "rl", resume, overwrite)
    if rt is None:
        return pipeline._read_summary(plan.out)
    cfg, out, tok = plan.cfg, plan.out, get_tokenizer(plan.cfg.run.tokenizer)
    c = cfg.rl
    builtin = not c.prompts
    data = pipeline._task_data(cfg, rt, out) if builtin else None
    prompts, fields = _records(c.prompts or data["prompts"], tok, cfg)
    rewards = rl_rewards(c)
    eval_prompts, scorer = [], None
    if c.eval_prompts:  # the config requires reward functions for them
        eval_prompts, eval_records = _records(c.eval_prompts, tok, cfg)
        scorer = _field_scorer(rewards, eval_records)
    elif builtin:
        eval_prompts, scorer = _records(data["eval_prompts"], tok, cfg)[0], task_reward
    prompt_len = max(map(len, prompts + eval_prompts))
    ckpt = stage_checkpoint(out / "rl")
    state = load_checkpoint(ckpt) if resume and ckpt.is_file() else None
    init = stage_init(c.policy_init, out, "sft")
    lora = cfg.lora.r > 0
    sft_state = (init_model_state(init, need_head=True, backend=cfg.run.backend)
                 if (state is None or (c.kl_coef > 0 and not lora)) else None)
    if state is not None:
        policy = load_model(state["policy"], rt.device)
    else:
        policy = apply_run_lora(cfg, load_model(sft_state, rt.device, merge=True))
    models = {"policy": wrap_model(trained(cfg, policy), rt), "ref": None, "reward": None}
    if c.kl_coef > 0:  # LoRA: the policy with its adapters off, no second copy of the weights
        models["ref"] = frozen(cfg, reference_policy(cfg, policy, sft_state, rt.device))
    del sft_state  # the host copy of the weights: the models hold their own
    if rewards is None:
        rm = init_model_state(stage_init(c.reward_init, out, "rm"), head="reward", need_head=True,
                              backend=cfg.run.backend)
        models["reward"] = frozen(cfg, load_model(rm, rt.device, merge=True))
    def evaluate(step):  # noqa: ARG001 - a fixed seed: every evaluation sees the same sampling noise
        return task_score(policy, eval_prompts, prompt_len, tok, scorer, rt, chunk=c.gen_batch_size,
                          max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                          top_p=c.top_p, min_p=c.min_p, seed=cfg.run.seed)
    eval_fn = evaluate if eval_prompts else None
    record = train_critic_free(cfg, rt, tok, models, prompts, fields, prompt_len, out / "rl", state,
                               eval_fn=eval_fn, rewards=rewards, scorer=task_reward if builtin else None,
                               on_step=on_step)
    pipeline._plots(cfg, out / "rl", "rl", rt)
    return pipeline._finish(plan, rt, algo=c.algo, task_score_rl=record.get("task_score"),
                            kl_final=record.get("kl"), score_final=record.get("reward_mean"),
                            seconds_rl=time.time() - t0)


def run_rl_demo(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """SFT -> cfg.rl.algo on the built-in task, scored by its reference answers; both stages are checked
    before the first starts. summary.json has the PPO demo's keys: task_score_sft and task_score_ppo are
    the RL stage's task scores at step 0 (the SFT policy) and at the end, so that they differ by the policy
    only, not by the evaluation's sampling settings (rl.* rather than ppo.*); rm_accuracy is None (no
    reward model). A --resume that finds both stages finished leaves summary.json as it is."""
    t0 = time.time()
    ran = preflight_stages(cfg, ("sft", "rl"), resume, overwrite)
    pipeline.run_sft(cfg, resume, overwrite=overwrite)  # --overwrite sets aside the stages built on SFT too
    summary = run_rl(cfg, resume, overwrite=overwrite)
    rt = pipeline.setup_runtime(cfg)
    out = Path(cfg.run.out)
    if ran:
        first = read_metrics(out / "rl" / "metrics.jsonl")[0]
        summary = pipeline._update_summary(out, rt, rm_accuracy=None, task_score_sft=first.get("task_score"),
                                           task_score_ppo=summary.get("task_score_rl"), seconds=time.time() - t0)
    if rt.is_main:
        print(json.dumps({k: summary.get(k) for k in ("algo", "task_score_sft", "task_score_ppo", "rm_accuracy",
                                                       "kl_final", "seconds")}, indent=2))
    return summary
