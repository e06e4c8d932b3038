"""Every config of every tuning set timed at the benchmark shapes: the table that refreshes the config tables.

    python -m benchmarks.tune_check [--quick] [--budget-s 60]

Each workload calls the public ops (backend="triton") at one benchmark shape with autotuning on and a
cache directory of its own, empty, so every kernel the call launches times its whole tuning set
(rlhf_fast/ops/_autotune.py, the same code a user's first call runs); the cache files then hold each
config's median time and the winner. Rows: kernel, regime, config, ms, TFLOP/s (matmul kernels) or GB/s
(bandwidth-bound kernels), and whether it won; the winners are printed last. The winners are also copied
into the user's autotune cache, so the benchmarks that follow start tuned. Written to
benchmarks/results/tune-<machine>.json. --budget-s is the wall time of the whole run: each workload tunes
within what is left, and one that starts with nothing left is skipped (and listed), so the table of a
`timeout`-capped run (gpu_check.sh) is always written.

Work per kernel, under the name its cache files carry (each workload's `work` maps it to (unit, amount)):
  attention, padded or packed: B sequences, Hq heads, T tokens, D; S = B Hq T^2 D / 2 (the causal half)
    attn_fwd              2 matmuls (QK^T, PV)                 4 S FLOPs
    attn_bwd_dkdv         4 matmuls (QK^T, dV, dP, dK)         8 S
    attn_bwd_dkdv_atomic  the same + dQ (fp32 atomics)        10 S
    attn_bwd_dq           3 matmuls (QK^T, dP, dQ)             6 S
    (attn_bwd_pre, the preprocess, has a one-config set: nothing to time)
    decode_split          reads K and V of the cache           2 B Hkv T D E bytes
  row kernels: N rows of V logits, E bytes an element; the least traffic (one pass over each tensor)
    token_logprobs_fwd    reads the logits                     N V E bytes
    token_logprobs_bwd    reads them, writes d(logits)         2 N V E
    kl_fwd                reads both models' logits            2 N V E
    kl_bwd                reads both, writes d(logits)         3 N V E
  fused-linear kernels: N tokens, hidden H, vocab V; M = 2 N H V, the FLOPs of one (N, H) @ (H, V)
  matmul; d(hidden) and d(weight) wanted, no bias
    fused_linear_logprobs_fwd         1 matmul (the logits)                            M
    fused_linear_logprobs_bwd         3 (the logits again, d(hidden), d(weight))     3 M
    fused_linear_logprobs_bwd_reduce  4 (each of 2 passes recomputes the logits)    4 M
    fused_linear_kl_fwd               2 (both models' logits)                        2 M
    fused_linear_kl_bwd               4 (both again, d(hidden), d(weight))           4 M
    fused_linear_kl_bwd_reduce        6 (each pass recomputes both)                  6 M
The fused-linear workloads run the backward twice, under RLHF_FAST_FUSED_LINEAR_BWD=atomic then =reduce,
so both backward kernels are timed (the forward's winner is remembered from the first pass).
The suite needs CUDA; on a CPU-only machine it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table, write_results

BF16 = torch.bfloat16


def attention_work(n_seq: int, hq: int, t: int, d: int) -> dict:
    """The attention stages' FLOPs for n_seq causal sequences of t tokens (the module docstring)."""
    s = n_seq * hq * t * t * d / 2
    return {"attn_fwd": ("TFLOP/s", 4 * s), "attn_bwd_dkdv": ("TFLOP/s", 8 * s),
            "attn_bwd_dkdv_atomic": ("TFLOP/s", 10 * s), "attn_bwd_dq": ("TFLOP/s", 6 * s)}


def attention_workload(b: int, hq: int, hkv: int, t: int, d: int, deterministic: bool, device: str = "cuda"):
    from rlhf_fast import causal_attention

    def run():
        q = torch.randn(b, hq, t, d, device=device, dtype=BF16, requires_grad=True)
        k, v = (torch.randn(b, hkv, t, d, device=device, dtype=BF16, requires_grad=True) for _ in "kv")
        causal_attention(q, k, v, deterministic=deterministic, backend="triton").backward(torch.randn_like(q))

    name = f"causal_attention B={b} Hq={hq} Hkv={hkv} T={t} D={d} bf16{' deterministic' if deterministic else ''}"
    return name, run, attention_work(b, hq, t, d)


def varlen_workload(n_seq: int, hq: int, hkv: int, t: int, d: int, deterministic: bool, device: str = "cuda"):
    """n_seq sequences of t tokens packed into one (n_seq t, H, D) batch: the layout the GPT trains on
    (rlhf_fast/model/layers.py), tuned as its own ("packed") regime."""
    from rlhf_fast import causal_attention_varlen

    def run():
        q = torch.randn(n_seq * t, hq, d, device=device, dtype=BF16, requires_grad=True)
        k, v = (torch.randn(n_seq * t, hkv, d, device=device, dtype=BF16, requires_grad=True) for _ in "kv")
        cu_seqlens = torch.arange(0, n_seq * t + 1, t, device=device, dtype=torch.int32)
        causal_attention_varlen(q, k, v, cu_seqlens, t, deterministic=deterministic,
                                backend="triton").backward(torch.randn_like(q))

    det = " deterministic" if deterministic else ""
    name = f"causal_attention_varlen {n_seq}x{t} Hq={hq} Hkv={hkv} D={d} bf16{det}"
    return name, run, attention_work(n_seq, hq, t, d)


def decode_workload(b: int, hq: int, hkv: int, t: int, d: int, device: str = "cuda"):
    from rlhf_fast import decode_attention

    def run():
        q = torch.randn(b, hq, d, device=device, dtype=BF16)
        k, v = (torch.randn(b, hkv, t, d, device=device, dtype=BF16) for _ in "kv")
        decode_attention(q, k, v, torch.full((b,), t, device=device, dtype=torch.int32), backend="triton")

    name = f"decode_attention B={b} Hq={hq} Hkv={hkv} cache={t} D={d} bf16"
    return name, run, {"decode_split": ("GB/s", 2 * b * hkv * t * d * 2)}


def token_logprobs_workload(n: int, v: int, device: str = "cuda"):
    from rlhf_fast import token_logprobs

    def run():
        logits = torch.randn(n, v, device=device, dtype=BF16, requires_grad=True)
        targets = torch.randint(0, v, (n,), device=device)
        token_logprobs(logits, targets, backend="triton").sum().backward()

    nbytes = n * v * 2
    work = {"token_logprobs_fwd": ("GB/s", nbytes), "token_logprobs_bwd": ("GB/s", 2 * nbytes)}
    return f"token_logprobs N={n} V={v} bf16", run, work


def kl_divergence_workload(n: int, v: int, device: str = "cuda"):
    from rlhf_fast import kl_divergence

    def run():
        logits = torch.randn(n, v, device=device, dtype=BF16, requires_grad=True)
        ref_logits = torch.randn(n, v, device=device, dtype=BF16)  # the frozen reference: no d(ref_logits)
        kl_divergence(logits, ref_logits, backend="triton").sum().backward()

    nbytes = n * v * 2
    work = {"kl_fwd": ("GB/s", 2 * nbytes), "kl_bwd": ("GB/s", 3 * nbytes)}
    return f"kl_divergence N={n} V={v} bf16", run, work


@contextlib.contextmanager
def fused_linear_backward(mode: str):
    """RLHF_FAST_FUSED_LINEAR_BWD=mode (atomic or reduce) inside the block, restored after."""
    from rlhf_fast.ops._fused_linear_launch import BWD_ENV

    before = os.environ.get(BWD_ENV)
    os.environ[BWD_ENV] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ[BWD_ENV]
        else:
            os.environ[BWD_ENV] = before


def lm_head(n: int, h: int, v: int, device: str, grad: bool):
    """hidden (N, H) and weight (V, H) bf16 at a trained model's scale (logits of unit variance)."""
    hidden = torch.randn(n, h, device=device, dtype=BF16).requires_grad_(grad)
    weight = (torch.randn(v, h, device=device, dtype=BF16) / h ** 0.5).requires_grad_(grad)
    return hidden, weight


def fused_linear_logprobs_workload(n: int, h: int, v: int, device: str = "cuda"):
    from rlhf_fast import fused_linear_logprobs

    def run():
        hidden, weight = lm_head(n, h, v, device, grad=True)
        targets = torch.randint(0, v, (n,), device=device)
        for mode in ("atomic", "reduce"):
            with fused_linear_backward(mode):
                fused_linear_logprobs(hidden, weight, targets, backend="triton").sum().backward()

    m = 2 * n * h * v
    work = {"fused_linear_logprobs_fwd": ("TFLOP/s", m), "fused_linear_logprobs_bwd": ("TFLOP/s", 3 * m),
            "fused_linear_logprobs_bwd_reduce": ("TFLOP/s", 4 * m)}
    return f"fused_linear_logprobs N={n} H={h} V={v} bf16", run, work


def fused_linear_kl_workload(n: int, h: int, v: int, device: str = "cuda"):
    from rlhf_fast import fused_linear_kl_divergence

    def run():
        hidden, weight = lm_head(n, h, v, device, grad=True)
        ref_hidden, ref_weight = lm_head(n, h, v, device, grad=False)
        for mode in ("atomic", "reduce"):
            with fused_linear_backward(mode):
                fused_linear_kl_divergence(hidden, weight, ref_hidden, ref_weight, backend="triton").sum().backward()

    m = 2 * n * h * v
    work = {"fused_linear_kl_fwd": ("TFLOP/s", 2 * m), "fused_linear_kl_bwd": ("TFLOP/s", 4 * m),
            "fused_linear_kl_bwd_reduce": ("TFLOP/s", 6 * m)}
    return f"fused_linear_kl_divergence N={n} H={h} V={v} bf16", run, work


def workloads(quick: bool) -> list:
    """The quick list first (gpu_check.sh), the benchmarks' kernels first: a run out of budget skips the tail.
    The logprob shapes are bench_logprobs' GPU suite's (N=8192, H=4096, V=128256), so its first calls find
    their winners cached; quick times the fused-linear KL (6 matmuls in its reduce backward) at V=32000."""
    out = [attention_workload(4, 16, 16, 4096, 128, False), attention_workload(4, 16, 16, 4096, 128, True),
           decode_workload(64, 16, 4, 32768, 128), fused_linear_logprobs_workload(8192, 4096, 128256),
           token_logprobs_workload(8192, 128256), kl_divergence_workload(8192, 128256),
           fused_linear_kl_workload(8192, 4096, 32000), varlen_workload(4, 16, 16, 4096, 128, False)]
    if not quick:
        out += [attention_workload(4, 16, 4, 4096, 64, False), attention_workload(1, 16, 16, 16384, 128, True),
                varlen_workload(8, 16, 4, 2048, 128, True), decode_workload(1, 16, 4, 32768, 128),
                fused_linear_logprobs_workload(32768, 4096, 128256), fused_linear_kl_workload(8192, 4096, 128256),
                token_logprobs_workload(8192, 32000), kl_divergence_workload(8192, 32000)]
    return out


def rows_from_cache(workload: str, cache: Path, work: dict) -> list[dict]:
    from rlhf_fast.ops import _autotune

    rows = []
    for path in sorted(cache.glob("*.json")):
        data = json.loads(path.read_text())
        kernel, winner = data["key"]["kernel"], _autotune.label(data["winner"])
        unit, amount = work.get(kernel, ("", None))
        for cfg, ms in data["timings_ms"].items():
            rate = None if amount is None else amount / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
            rows.append({"workload": workload, "kernel": kernel, "regime": data["key"]["regime"], "config": cfg,
                         "ms": ms, "rate": rate, "unit": unit, "winner": "*" if cfg == winner else ""})
    return rows


def tune(loads: list, budget_s: float) -> tuple[list[dict], dict]:
    """Run each (name, run, work) workload with an empty cache directory of its own, within what is left of
    budget_s (wall seconds, from the first workload); return the table rows and {workload: what it lacks}
    for the workloads that failed, were skipped or ran out of budget. The winners are copied into the
    user's cache."""
    from rlhf_fast.ops import _autotune

    os.environ[_autotune.ENV_ENABLE] = "1"
    user_cache = _autotune.cache_dir()
    rows, incomplete = [], {}
    t0 = time.perf_counter()
    for name, run, work in loads:
        left = budget_s - (time.perf_counter() - t0)
        if left <= 0:
            incomplete[name] = "skipped: budget spent"
            print(f"tune_check: {name}: skipped, the {budget_s:.0f} s budget is spent", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="rlhf_fast_tune_") as cache:
            os.environ[_autotune.ENV_DIR] = cache
            os.environ[_autotune.ENV_BUDGET] = str(left)
            _autotune.reset()  # forget winners and time spent: each workload times its whole sets
            try:
                run()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()  # the next workload's tensors differ in shape
                if _autotune._spent_s >= left:
                    incomplete[name] = "the budget ran out in it: any kernel tuned after that launched its table pick"
            except Exception as exc:  # a failing workload is reported; the others still run
                incomplete[name] = f"{type(exc).__name__}: {exc}"
                print(f"tune_check: {name}: {incomplete[name]}")
            new = rows_from_cache(name, Path(cache), work)
            rows += new
            user_cache.mkdir(parents=True, exist_ok=True)
            for path in Path(cache).glob("*.json"):
                shutil.copy2(path, user_cache / path.name)
        print(f"tune_check: {name}: {len(new)} configs timed ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    os.environ[_autotune.ENV_DIR] = str(user_cache)
    return rows, incomplete


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the benchmark's quick shapes only (gpu_check.sh)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="wall time allowed in all, compiles included; each workload tunes within what is left "
                         "(RLHF_FAST_AUTOTUNE_BUDGET_S), one that starts with nothing left is skipped")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_check: no CUDA device: nothing to time")
        return 0
    t0 = time.perf_counter()
    rows, incomplete = tune(workloads(args.quick), args.budget_s)
    print(markdown_table(rows))
    print("\nwinners:")
    print(markdown_table([r for r in rows if r["winner"]],
                         ["workload", "kernel", "regime", "config", "ms", "rate", "unit"]))
    for name, why in incomplete.items():
        print(f"incomplete: {name}: {why}")
    path = write_results("tune", rows, {"machine": machine(), "seconds": time.perf_counter() - t0,
                                        "incomplete": incomplete})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
