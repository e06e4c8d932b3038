"""Every config of every tuning set timed at the benchmark shapes: the table that refreshes the config tables.

    python -m benchmarks.tune_check [--quick] [--budget-s 60]

Each workload calls the public ops at one benchmark shape with autotuning on and a cache directory of its
own, empty, so every kernel the call launches times its whole tuning set (rlhf_fast/ops/_autotune.py, the
same code a user's first call runs); the cache files then hold each config's median time and the winner.
Rows: kernel, regime, config, ms, TFLOP/s (attention stages, causal half only) or GB/s (bandwidth-bound
kernels), and whether it won; the winners are printed last. The winners are also copied into the user's
autotune cache, so the benchmarks that follow start tuned. Written to benchmarks/results/tune-<machine>.json.

Work per kernel (B, Hq, T, D; S = B * Hq * T * T * D / 2, the causal half):
    attn_fwd  2 matmuls        4 S FLOPs      attn_bwd_dkdv  4 matmuls (QK^T, dV, dP, dK)   8 S
    attn_bwd_dkdv_atomic  + dQ 10 S           attn_bwd_dq    3 matmuls (QK^T, dP, dQ)       6 S
    attn_bwd_pre   reads O and dO: 2 B Hq T D elements     decode_split  reads K and V of the cache
The suite needs CUDA; on a CPU-only machine it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table, write_results


def attention_workload(b: int, hq: int, hkv: int, t: int, d: int, deterministic: bool):
    from rlhf_fast import causal_attention

    def run():
        q = torch.randn(b, hq, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        causal_attention(q, k, v, deterministic=deterministic).backward(torch.randn_like(q))

    s = b * hq * t * t * d / 2
    elt = 2
    work = {"attn_fwd": ("TFLOP/s", 4 * s), "attn_bwd_dkdv": ("TFLOP/s", 8 * s),
            "attn_bwd_dkdv_atomic": ("TFLOP/s", 10 * s), "attn_bwd_dq": ("TFLOP/s", 6 * s),
            "attn_bwd_pre": ("GB/s", 2 * b * hq * t * d * elt)}
    name = f"causal_attention B={b} Hq={hq} Hkv={hkv} T={t} D={d} bf16{' deterministic' if deterministic else ''}"
    return name, run, work


def decode_workload(b: int, hq: int, hkv: int, t: int, d: int):
    from rlhf_fast import decode_attention

    def run():
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        decode_attention(q, k, v, torch.full((b,), t, device="cuda", dtype=torch.int32))

    name = f"decode_attention B={b} Hq={hq} Hkv={hkv} cache={t} D={d} bf16"
    return name, run, {"decode_split": ("GB/s", 2 * b * hkv * t * d * 2)}


def workloads(quick: bool) -> list:
    out = [attention_workload(4, 16, 16, 4096, 128, False), attention_workload(4, 16, 16, 4096, 128, True),
           decode_workload(64, 16, 4, 32768, 128)]
    if not quick:
        out += [attention_workload(4, 16, 4, 4096, 64, False), attention_workload(1, 16, 16, 16384, 128, True),
                decode_workload(1, 16, 4, 32768, 128)]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the benchmark's quick shapes only (gpu_check.sh)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="tuning time allowed in all (RLHF_FAST_AUTOTUNE_BUDGET_S; compiles included)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_check: no CUDA device: nothing to time")
        return 0
    from rlhf_fast.ops import _autotune

    os.environ[_autotune.ENV_ENABLE] = "1"
    os.environ[_autotune.ENV_BUDGET] = str(args.budget_s)
    user_cache = _autotune.cache_dir()
    rows = []
    t0 = time.perf_counter()
    for name, run, work in workloads(args.quick):
        with tempfile.TemporaryDirectory(prefix="rlhf_fast_tune_") as cache:
            os.environ[_autotune.ENV_DIR] = cache
            _autotune.reset()  # forget winners and time spent: each workload times its whole sets
            try:
                run()
                torch.cuda.synchronize()
            except Exception as exc:  # a failing workload is reported; the others still run
                print(f"tune_check: {name}: {type(exc).__name__}: {exc}")
            new = rows_from_cache(name, Path(cache), work)
            rows += new
            user_cache.mkdir(parents=True, exist_ok=True)
            for path in Path(cache).glob("*.json"):
                shutil.copy2(path, user_cache / path.name)
        print(f"tune_check: {name}: {len(new)} configs timed ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    os.environ[_autotune.ENV_DIR] = str(user_cache)
    print(markdown_table(rows))
    print("\nwinners:")
    print(markdown_table([r for r in rows if r["winner"]],
                         ["workload", "kernel", "regime", "config", "ms", "rate", "unit"]))
    path = write_results("tune", rows, {"machine": machine(), "seconds": time.perf_counter() - t0})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
