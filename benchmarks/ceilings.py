"""Measured ceilings of this machine: copy bandwidth and bf16 matmul throughput.

Benchmark suites report their GB/s and TFLOP/s against these, measured on the same machine, rather
than against datasheet peaks (an H200 lists 4.8 TB/s HBM3e and ~989 dense bf16 TFLOP/s; a device copy
and cuBLAS reach less, and what is reachable is the fair ceiling for a kernel).

- copy: y.copy_(x) of a large contiguous tensor; GB/s = 2 * bytes / time (each byte read once and
  written once).
- matmul: torch.matmul of (N, N) bf16 by (N, N) bf16 (cuBLAS on GPU); TFLOP/s = 2 * N^3 / time.

GPU times are triton.testing.do_bench medians; CPU times the median of repeated perf_counter runs.

    python -m benchmarks.ceilings [--quick] [--device cuda|cpu]

writes benchmarks/results/ceilings_<device>-<machine>.json (RLHF_FAST_RESULTS_DIR moves it); suites
read it back with `load_ceilings(device)`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import RESULTS_DIR, machine, machine_tag, markdown_table, write_results

# device -> (copy MiB, matmul N) for full and quick runs
SIZES = {
    "cuda": {"full": (2048, 8192), "quick": (1024, 4096)},
    "cpu": {"full": (512, 2048), "quick": (128, 1024)},
}


def _median_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(device: str = "cuda", quick: bool = False) -> list[dict]:
    """Rows {op, shape, dtype, ms, gbps | tflops} for the copy and bf16 matmul ceilings."""
    copy_mib, n = SIZES[device]["quick" if quick else "full"]
    numel = copy_mib * 2**20 // 4
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    ms = _median_ms(lambda: y.copy_(x), device)
    rows = [{"op": "copy", "shape": f"({numel},)", "dtype": "float32", "ms": ms,
             "gbps": 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9}]
    del x, y
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _median_ms(lambda: torch.matmul(a, b), device)
    rows.append({"op": "matmul", "shape": f"({n},{n})x({n},{n})", "dtype": "bfloat16", "ms": ms,
                 "tflops": 2 * n**3 / (ms * 1e-3) / 1e12})
    return rows


def load_ceilings(device: str = "cuda") -> dict | None:
    """{"copy_gbps": float, "bf16_tflops": float} measured on this machine, or None if not yet run."""
    path = RESULTS_DIR / f"ceilings_{device}-{machine_tag()}.json"
    if not path.is_file():
        return None
    rows = {r["op"]: r for r in json.loads(path.read_text())["rows"]}
    return {"copy_gbps": rows["copy"]["gbps"], "bf16_tflops": rows["matmul"]["tflops"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (seconds, for gpu_check.sh)")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    rows = measure(args.device, args.quick)
    print(machine())
    print(markdown_table(rows))
    print("results:", write_results(f"ceilings_{args.device}", rows, extra={"quick": args.quick}))


if __name__ == "__main__":
    main()
