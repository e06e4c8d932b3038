"""Group sampling: generate(group_size=G) (one prefill per prompt, its KV cache broadcast to the G rows)
against prefilling the B * G repeated prompts, as a critic-free rollout of B prompts x G samples needs.

    python -m benchmarks.bench_group_generate --suite cpu   # small GPT on CPU, 64 prompts x G=8
    python -m benchmarks.bench_group_generate --suite gpu   # 125M GPT-2 shape, 64 prompts x G=8, bf16
    add --quick (or RLHF_FAST_BENCH_QUICK=1) for one timed run

Both calls sample the same tokens (same seed; tests/test_generate_groups.py checks it), for exactly
`new` tokens (no EOS), so the difference is the prefill: B x P tokens instead of B x G x P, and the copy
of the cache to its G rows. Each call is timed end to end, best of `--reps`, the two interleaved.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import machine, markdown_table, write_results

SUITES = {
    # name: (GPTConfig kwargs, prompts, group size, prompt length, new tokens, dtype, device)
    "cpu": (dict(n_layer=4, n_head=4, n_embd=256, block_size=160, vocab_size=512, backend="reference"),
            64, 8, 128, 16, torch.float32, "cpu"),
    "gpu": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1280, vocab_size=50257), 64, 8, 1024, 128,
            torch.bfloat16, "cuda"),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_suite(name: str, reps: int) -> list[dict]:
    from rlhf_fast.model import GPT, GPTConfig, generate

    kwargs, B, G, P, N, dtype, device = SUITES[name]
    if device == "cuda" and not torch.cuda.is_available():
        print(f"suite {name!r} skipped: no CUDA device")
        return []
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kwargs)).to(device=device, dtype=dtype).eval()
    prompts = torch.randint(1, kwargs["vocab_size"], (B, P), device=device)
    repeated = prompts.repeat_interleave(G, 0)
    fns = {"grouped": lambda: generate(model, prompts, N, seed=0, group_size=G),
           "repeated": lambda: generate(model, repeated, N, seed=0)}
    outs = {k: fn() for k, fn in fns.items()}  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            outs[k] = fn()
            _sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    same = torch.equal(outs["grouped"].tokens, outs["repeated"].tokens)
    return [dict(suite=name, shape=f"{B} prompts x G={G}, P={P}, new={N}", dtype=str(dtype).split(".")[-1],
                 grouped_s=best["grouped"], repeated_s=best["repeated"], speedup=best["repeated"] / best["grouped"],
                 same_tokens=same)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("RLHF_FAST_BENCH_QUICK") == "1",
                        help="one timed run (gpu_check.sh)")
    args = parser.parse_args(argv)
    reps = 1 if args.quick else args.reps
    rows = []
    for name in SUITES if args.suite == "all" else [args.suite]:
        rows += run_suite(name, reps)
    print(machine())
    print(markdown_table(rows))
    if rows:
        print("results:", write_results("group_generate", rows))


if __name__ == "__main__":
    main()
