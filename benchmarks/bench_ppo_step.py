"""One PPO step split in its three phases, fused ops vs reference ops: tokens/s and peak memory.

    python -m benchmarks.bench_ppo_step --suite cpu   # small GPT on CPU
    python -m benchmarks.bench_ppo_step --suite gpu   # 125M GPT-2 shape, bf16 autocast (skipped without CUDA)

Phases, on random weights and random prompts (no EOS, so every row runs max_new_tokens):
- generation: ``policy.generate`` (prefill + KV-cache decode + ``rlhf_fast.sample``); tokens/s counts
  the B * max_new_tokens sampled tokens;
- scoring: the reference policy's response logprobs (fused linear logprob), the value model and the
  reward model over the B * (P + T) rollout tokens;
- training: one policy and one value update (forward + backward + AdamW) over the rollout batch,
  through ``ppo_update`` (one epoch, one minibatch); tokens/s counts B * (P + T).
"fused" runs every model with backend="auto" (Triton / CUDA kernels on GPU; on CPU "auto" resolves to
the reference ops except where an op has a C++ kernel; the `backends` column says what "auto" chose);
"reference" forces the plain-PyTorch ops. Times are the best of `reps` synchronized runs after one warm-up (a phase
is tens of ms to seconds, too long for do_bench's repetition loop). Peak memory is CUDA-only.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from benchmarks.common import machine, markdown_table, stand_in_tokenizer, timed, write_results

SUITES = {
    # name: (model kwargs, batch, prompt length, new tokens, autocast dtype, device)
    "cpu": (dict(n_layer=2, n_head=4, n_embd=128, vocab_size=259), 32, 24, 16, None, "cpu"),
    "gpu": (dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257), 64, 512, 128, torch.bfloat16, "cuda"),
}


def _config(model_kwargs: dict, backend: str, P: int, T: int, B: int, device: str):
    from rlhf_fast.rlhf.config import build_config
    overrides = {f"model.{k}": v for k, v in model_kwargs.items() if k != "vocab_size"}
    overrides.update({"model.block_size": P + T, "run.backend": backend, "run.device": device,
                      "run.progress": "false", "ppo.max_new_tokens": T, "ppo.rollout_batch_size": B,
                      "ppo.gen_batch_size": B, "ppo.minibatch_size": B, "ppo.ppo_epochs": 1})
    return build_config(None, overrides)


def _chosen() -> str:
    """What backend="auto" resolved to for each op the phase called (extension_info()["chosen"])."""
    from rlhf_fast import extension_info
    return ", ".join(f"{op}={how}" for op, how in sorted(extension_info()["chosen"].items()))


def run_suite(name: str, reps: int) -> list[dict]:
    from rlhf_fast.rlhf.ppo import ppo_update
    from rlhf_fast.rlhf.rollout import Rollout, generate_chunk, response_logprobs, response_values
    from rlhf_fast.rlhf.runtime import Runtime, autocast, build_model, make_optimizer

    model_kwargs, B, P, T, dtype, device = SUITES[name]
    if device == "cuda" and not torch.cuda.is_available():
        print(f"suite {name!r} skipped: no CUDA device")
        return []
    rows = []
    for backend, label in (("auto", "fused"), ("reference", "reference")):
        cfg = _config(model_kwargs, backend, P, T, B, device)
        if dtype is not None:
            cfg.run.dtype = "bfloat16"
        rt = Runtime(device=torch.device(device))
        torch.manual_seed(0)
        V = model_kwargs["vocab_size"]
        policy = build_model(cfg, V).to(device).eval()
        ref = copy.deepcopy(policy).requires_grad_(False)
        value = build_model(cfg, V, head="value").to(device).eval()
        reward = build_model(cfg, V, head="reward").to(device).eval().requires_grad_(False)
        models = {"policy": policy, "ref": ref, "value": value, "reward": reward}
        opts = {"policy": make_optimizer(policy, 1e-5, 0.0), "value": make_optimizer(value, 1e-5, 0.0)}
        tok = stand_in_tokenizer((V - 1,))  # one stop id in V: rows rarely stop before T tokens
        prompts = torch.randint(1, V, (B, P)).tolist()
        state = {}

        def generation():
            with autocast(cfg, rt.device):
                state["gen"] = generate_chunk(policy, prompts, P, tok, max_new_tokens=T, temperature=1.0, top_k=0,
                                              top_p=1.0, seed=0, device=rt.device)

        @torch.no_grad()
        def scoring():
            seqs, amask, mask, logprobs = state["gen"]
            with autocast(cfg, rt.device):
                ref_lp, _ = response_logprobs(ref, seqs, amask, mask, P, 1.0)
                values = response_values(value, seqs, amask, P, T)
                scores = reward(seqs, attention_mask=amask)
            state["rollout"] = Rollout(seqs, amask, mask, logprobs.float(), ref_lp.float(), values.float(),
                                       scores.float(), torch.full_like(scores, float("nan")), torch.ones_like(scores))

        def training():
            b = state["rollout"]
            adv = torch.randn_like(b.values) * b.mask
            ppo_update(models, opts, b, adv, b.values + adv, P, cfg, rt, step=1)

        for phase, fn, tokens in (("generation", generation, B * T), ("scoring", scoring, B * (P + T)),
                                  ("training", training, B * (P + T))):
            seconds, peak = timed(fn, device, reps)
            rows.append({"op": f"ppo_step/{phase}", "shape": f"B={B} P={P} T={T} {model_kwargs}",
                         "dtype": "bf16-autocast" if dtype else "fp32", "provider": label,
                         "ms": seconds * 1e3, "tokens_per_s": tokens / seconds, "peak_gib": peak,
                         "backends": _chosen() if backend == "auto" else "reference"})
    for r in rows:  # ratio of fused over reference throughput, per phase
        base = next(x for x in rows if x["op"] == r["op"] and x["provider"] == "reference")
        r["speedup_vs_reference"] = r["tokens_per_s"] / base["tokens_per_s"]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("RLHF_FAST_BENCH_QUICK") == "1"
    if args.suite == "cpu":
        torch.set_num_threads(1)
    rows = run_suite(args.suite, reps=1 if quick else 5)
    print(machine())
    print(markdown_table(rows, ["op", "provider", "dtype", "ms", "tokens_per_s", "speedup_vs_reference",
                                "peak_gib", "shape"]))
    if rows:
        print(write_results(f"ppo_step-{args.suite}", rows))


if __name__ == "__main__":
    main()
