"""The KL penalty's kind on a PPO step: cost of the exact KL (kl_kind=full) against the k1 estimator, and
the spread of the per-step KL each kind reports.

    python -m benchmarks.bench_kl_kind --suite cpu [--threads 1]   # small GPT on CPU
    python -m benchmarks.bench_kl_kind --suite gpu                 # 125M GPT-2 shape, bf16 autocast

Cost, on random weights and prompts (no EOS: every row runs max_new_tokens):
- scoring: ``score_logprobs`` (reference logprobs; with kl_kind=full or a filter on, the reference's
  hidden states plus one policy forward without logits feeding ``fused_linear_kl_divergence`` on the
  response tokens), the value model and the reward model; PPO's generation and update do not depend on
  the kind, so the step is generation + scoring + training with each phase timed once per kind;
- GRPO's update with the KL in the loss: k3 on the scored logprobs, or the exact KL (differentiable), which
  recomputes the reference's hidden states for each minibatch.
Each is timed without filters and with temperature 0.7, top_k 20, top_p 0.9, min_p 0.05
(logprob_space=filtered: the cutoffs go to every op); see `cost_rows` for how the runs are paired.

Spread: a reference that differs from the policy (weights + noise of half their std: KL ~0.08 a token),
`steps` rollouts of B rows from different seeds; the per-step KL is what the trainers log (mean over rows of the summed per-token KL).
k1 and k3 are sampled estimates of KL(pi || pi_ref); full is the exact KL at every visited position, so
its spread is only that of the visited states.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch

from benchmarks.common import machine, markdown_table, stand_in_tokenizer, timed, write_results

SUITES = {
    # name: (model kwargs, batch, prompt length, new tokens, autocast dtype, device)
    "cpu": (dict(n_layer=2, n_head=4, n_embd=128, vocab_size=259), 32, 24, 16, None, "cpu"),
    "gpu": (dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257), 64, 512, 128, torch.bfloat16, "cuda"),
}
FILTERS = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05}


def _config(model_kwargs: dict, P: int, T: int, B: int, device: str, filters: bool, kl_kind: str, algo="ppo"):
    from rlhf_fast.rlhf.config import build_config
    overrides = {f"model.{k}": v for k, v in model_kwargs.items() if k != "vocab_size"}
    overrides.update({"model.block_size": P + T, "run.device": device, "run.progress": "false",
                      "ppo.max_new_tokens": T, "ppo.rollout_batch_size": B, "ppo.gen_batch_size": B,
                      "ppo.minibatch_size": B, "ppo.ppo_epochs": 1, "ppo.kl_kind": "k1" if kl_kind == "k3" else kl_kind,
                      "rl.algo": algo, "rl.max_new_tokens": T, "rl.group_size": 2, "rl.rollout_batch_size": B // 2,
                      "rl.gen_batch_size": B // 2, "rl.minibatch_size": B, "rl.kl_in": "loss",
                      "rl.kl_kind": "full" if kl_kind == "full" else "k1"})
    if filters:
        overrides.update({f"{s}.{k}": v for s in ("ppo", "rl") for k, v in FILTERS.items()})
    return build_config(None, overrides)


def _models(cfg, V: int, device: str, noisy_ref: bool = False) -> dict:
    from rlhf_fast.rlhf.runtime import build_model
    torch.manual_seed(0)
    policy = build_model(cfg, V).to(device).eval()
    with torch.no_grad():  # sharper than GPT-2's init: the filters keep 2 to 18 tokens (17 on average)
        policy.transformer.wte.weight.mul_(1.5)
    ref = copy.deepcopy(policy).requires_grad_(False)
    if noisy_ref:
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.5 * p.std() * torch.randn_like(p))
    value = build_model(cfg, V, head="value").to(device).eval()
    reward = build_model(cfg, V, head="reward").to(device).eval().requires_grad_(False)
    return {"policy": policy, "ref": ref, "value": value, "reward": reward}


def cost_rows(name: str, reps: int) -> list[dict]:
    """Per filter setting: generation and PPO's update once (best of 5: the kind does not enter them), then
    scoring and GRPO's update for each kind, the two kinds of a phase back to back in alternating order
    (a shared machine's load then hits both alike): the median time of `reps` runs, and the median of
    the paired ratios (vs_estimator)."""
    from rlhf_fast.rlhf.critic_free_trainer import policy_update, resolve
    from rlhf_fast.rlhf.policy_space import score_logprobs
    from rlhf_fast.rlhf.ppo import ppo_update
    from rlhf_fast.rlhf.rollout import Rollout, generate_chunk, response_values
    from rlhf_fast.rlhf.runtime import Runtime, autocast, make_optimizer

    model_kwargs, B, P, T, dtype, device = SUITES[name]
    V = model_kwargs["vocab_size"]
    shape = f"B={B} P={P} T={T} {model_kwargs}"
    rows = []
    for filters in (False, True):
        cfgs = {kind: _config(model_kwargs, P, T, B, device, filters, kind) for kind in ("k1", "full")}
        rl_cfgs = {kind: _config(model_kwargs, P, T, B, device, filters, kind, "grpo") for kind in ("k3", "full")}
        for cfg in (*cfgs.values(), *rl_cfgs.values()):
            if dtype is not None:
                cfg.run.dtype = "bfloat16"
        cfg, c, rt = cfgs["k1"], cfgs["k1"].ppo, Runtime(device=torch.device(device))
        models = _models(cfg, V, device)
        # the updates train copies: the policy that generated the rollout keeps scoring it
        trained = {**models, "policy": copy.deepcopy(models["policy"]), "value": copy.deepcopy(models["value"])}
        opts = {k: make_optimizer(trained[k], 1e-5, 0.0) for k in ("policy", "value")}
        prompts = torch.randint(1, V, (B, P)).tolist()
        state = {}

        def generation():
            with autocast(cfg, rt.device):
                state["gen"] = generate_chunk(models["policy"], prompts, P, stand_in_tokenizer((V - 1,)), max_new_tokens=T,
                                              temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                              min_p=c.min_p, seed=0, device=rt.device, return_cutoffs=True)

        def scoring(kind):
            @torch.no_grad()
            def run():
                seqs, amask, mask, logprobs, cutoffs = state["gen"]
                with autocast(cfg, rt.device):
                    lp, ref_lp, kl = score_logprobs(models["policy"], models["ref"], seqs, amask, mask, P, c,
                                                    logprobs, cutoffs, kind)
                    values = response_values(models["value"], seqs, amask, P, T)
                    scores = models["reward"](seqs, attention_mask=amask).float()
                state["rollout"] = Rollout(seqs, amask, mask, lp, ref_lp, values.float(), scores,
                                           torch.full_like(scores, float("nan")), torch.ones_like(scores), cutoffs, kl)
            return run

        def training():
            b = state["rollout"]
            adv = torch.randn_like(b.values) * b.mask
            ppo_update(trained, opts, b, adv, b.values + adv, P, cfg, rt, step=1)

        def grpo_update(kind):
            rl_opt = make_optimizer(trained["policy"], 1e-5, 0.0)

            def run():
                b = state["rollout"]
                adv = torch.randn_like(b.values) * b.mask
                policy_update(trained, rl_opt, b, adv, P, rl_cfgs[kind], rt, 1, resolve(rl_cfgs[kind].rl))
            return run

        gen_s, _ = timed(generation, device, min(reps, 5))
        scoring("full")()
        train_s, _ = timed(training, device, min(reps, 5))
        phases = {("scoring", "k1"): scoring("k1"), ("scoring", "full"): scoring("full"),
                  ("grpo_update_kl_in_loss", "k3"): grpo_update("k3"),
                  ("grpo_update_kl_in_loss", "full"): grpo_update("full")}
        for fn in phases.values():
            fn()  # warm-up
        times = {key: [] for key in phases}
        for rep in range(reps):  # the two kinds of a phase back to back, in alternating order
            for phase in ("scoring", "grpo_update_kl_in_loss"):
                pair = [key for key in phases if key[0] == phase]
                for key in (pair if rep % 2 == 0 else pair[::-1]):
                    times[key].append(timed(phases[key], device, 1, warm_up=False)[0])
        tag = "on" if filters else "off"
        rows.append({"op": "kl_kind/generation", "filters": tag, "kl_kind": "any", "ms": gen_s * 1e3, "shape": shape})
        rows.append({"op": "kl_kind/ppo_update", "filters": tag, "kl_kind": "any", "ms": train_s * 1e3,
                     "shape": shape})
        for (phase, kind), seconds in times.items():
            base = times[(phase, "k1" if phase == "scoring" else "k3")]
            rows.append({"op": f"kl_kind/{phase}", "filters": tag, "kl_kind": kind,
                         "ms": statistics.median(seconds) * 1e3,
                         "vs_estimator": statistics.median(a / b for a, b in zip(seconds, base)), "shape": shape})
        for kind in ("k1", "full"):
            step = gen_s + statistics.median(times[("scoring", kind)]) + train_s
            rows.append({"op": "kl_kind/ppo_step", "filters": tag, "kl_kind": kind, "ms": step * 1e3,
                         "shape": shape})
    for r in rows:  # the step (and the kind-free phases) over k1's
        if "vs_estimator" not in r:
            base = next(x for x in rows if x["op"] == r["op"] and x["filters"] == r["filters"]
                        and x["kl_kind"] in ("k1", "any"))
            r["vs_estimator"] = r["ms"] / base["ms"]
    return rows


def spread_rows(name: str, steps: int) -> list[dict]:
    import rlhf_fast
    from rlhf_fast.rlhf.policy_space import score_logprobs
    from rlhf_fast.rlhf.rollout import generate_chunk
    from rlhf_fast.rlhf.runtime import autocast

    model_kwargs, B, P, T, dtype, device = SUITES[name]
    V = model_kwargs["vocab_size"]
    rows = []
    for filters in (False, True):
        cfg = _config(model_kwargs, P, T, B, device, filters, "full")
        if dtype is not None:
            cfg.run.dtype = "bfloat16"
        c = cfg.ppo
        models = _models(cfg, V, device, noisy_ref=True)
        per_step = {"k1": [], "k3": [], "full": []}
        token_sq = {"k1": [], "k3": [], "full": []}
        for s in range(steps):
            prompts = torch.randint(1, V, (B, P), generator=torch.Generator().manual_seed(s)).tolist()
            with torch.no_grad(), autocast(cfg, torch.device(device)):
                seqs, amask, mask, logprobs, cutoffs = generate_chunk(
                    models["policy"], prompts, P, stand_in_tokenizer((V - 1,)), max_new_tokens=T, temperature=c.temperature, top_k=c.top_k,
                    top_p=c.top_p, min_p=c.min_p, seed=1000 + s, device=torch.device(device), return_cutoffs=True)
                lp, ref_lp, kl = score_logprobs(models["policy"], models["ref"], seqs, amask, mask, P, c, logprobs,
                                                cutoffs, "full")
            on = mask > 0
            for kind in per_step:
                k = kl if kind == "full" else rlhf_fast.kl_penalty(lp, ref_lp, kind)
                k = torch.where(on, k.double(), 0.0)
                per_step[kind].append(float(k.sum(1).mean()))
                token_sq[kind].append(k[on])
        for kind, values in per_step.items():
            tokens = torch.cat(token_sq[kind])
            rows.append({"op": "kl_kind/per_step_kl", "filters": "on" if filters else "off", "kl_kind": kind,
                         "steps": steps, "mean": statistics.fmean(values), "std_over_steps": statistics.stdev(values),
                         "per_token_std": float(tokens.std()), "shape": f"B={B} T={T} {model_kwargs}"})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (cpu suite)")
    parser.add_argument("--steps", type=int, default=8, help="rollouts for the spread of the per-step KL")
    parser.add_argument("--reps", type=int, default=15, help="paired runs of each kind's phases (median kept)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("RLHF_FAST_BENCH_QUICK") == "1"
    if SUITES[args.suite][-1] == "cuda" and not torch.cuda.is_available():
        print(f"suite {args.suite!r} skipped: no CUDA device")
        return
    if args.suite == "cpu":
        torch.set_num_threads(args.threads)
    cost = cost_rows(args.suite, reps=1 if quick else args.reps)
    spread = spread_rows(args.suite, 3 if quick else args.steps)
    print(machine(), f"torch threads: {torch.get_num_threads()}")
    print(markdown_table(cost, ["op", "filters", "kl_kind", "ms", "vs_estimator"]))
    print(markdown_table(spread, ["op", "filters", "kl_kind", "steps", "mean", "std_over_steps", "per_token_std"]))
    print(write_results(f"kl_kind-{args.suite}", cost + spread, {"torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
