"""Causal attention and decode attention (rlhf_fast, Triton) next to torch SDPA's flash and cuDNN backends.

    python -m benchmarks.bench_attention --suite gpu [--quick]

Training shapes (bf16, B*T = 16k tokens, Hq = 16, MHA and GQA 16:4, D in {64, 128}, T in {1k, 4k, 16k}):
forward, backward and forward+backward TFLOP/s, counting the causal half only:
    forward FLOPs = 2 * 2 * B * Hq * T * T * D / 2      (QK^T and PV, half the square)
    backward FLOPs = 2.5 * forward                      (dV, dP, dS->dQ, dS->dK, plus the recomputed QK^T)
Decode shapes (bf16, Hq = 16, D = 128, MHA and GQA 16:4, B in {1, 64}, cache 4k and 32k, every row full):
microseconds and achieved GB/s = bytes of K and V read / time, against the copy bandwidth
(y.copy_(x), 2 * bytes / time) measured in the same run.
Times are triton.testing.do_bench medians. `ratio` = best SDPA backend time / ours (> 1: we are faster).
Targets (issue 3, H200): forward >= 450 TFLOP/s at D=128, T >= 4k, and >= 1.3x SDPA flash; backward >=
1.0x SDPA flash; decode >= 70% of the copy bandwidth at B=64, cache 32k. --quick (the gpu_check.sh run)
keeps D=128, T in {4k, 16k} and the 32k decode rows.
The suite needs CUDA; on a CPU-only machine it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import machine, markdown_table, write_results

TOKENS, HQ = 16384, 16


def _do_bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sdpa(backend_name: str):
    """SDPA restricted to one backend; None when this torch lacks it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return None

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def _without_tma(fn):
    """fn with the forward's TMA descriptors off (RLHF_FAST_ATTN_TMA=0): the pointer path of the same kernel."""
    def run(*args):
        old = os.environ.get("RLHF_FAST_ATTN_TMA")
        os.environ["RLHF_FAST_ATTN_TMA"] = "0"
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ["RLHF_FAST_ATTN_TMA"]
            else:
                os.environ["RLHF_FAST_ATTN_TMA"] = old
    return run


def _providers() -> dict:
    import rlhf_fast
    ours = lambda q, k, v: rlhf_fast.causal_attention(q, k, v, backend="triton")  # noqa: E731
    table = {"ours": ours}
    if torch.cuda.get_device_capability()[0] in (9, 10):  # TMA on by default there: time the pointer path too
        table["ours_no_tma"] = _without_tma(ours)
    for name, backend in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
        fn = _sdpa(backend)
        if fn is not None:
            table[name] = fn
    return table


def _time_train(fn, q, k, v) -> dict:
    """{fwd, bwd, fwd_bwd: ms} for one provider; raises RuntimeError if the backend rejects the shape."""
    out = fn(q, k, v)
    do = torch.randn_like(out)
    fwd = _do_bench(lambda: fn(q, k, v))
    bwd = _do_bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    both = _do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": both}


def train_rows(quick: bool) -> list[dict]:
    rows = []
    dims = (128,) if quick else (64, 128)
    lengths = (4096, 16384) if quick else (1024, 4096, 16384)
    heads = ((16, 16),) if quick else ((16, 16), (16, 4))
    for d in dims:
        for t in lengths:
            for hq, hkv in heads:
                b = TOKENS // t
                q = torch.randn(b, hq, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                fwd_flops = 2 * 2 * b * hq * t * t * d / 2
                flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd_bwd": 3.5 * fwd_flops}
                times = {}
                for name, fn in _providers().items():
                    try:
                        times[name] = _time_train(fn, q, k, v)
                    except RuntimeError as exc:  # e.g. a backend without GQA or this head dim
                        print(f"{name} unavailable for B={b} Hq={hq} Hkv={hkv} T={t} D={d}: {str(exc)[:120]}")
                for phase in ("fwd", "bwd", "fwd_bwd"):
                    row = {"op": f"attention_{phase}", "shape": f"B={b} Hq={hq} Hkv={hkv} T={t} D={d}",
                           "dtype": "bf16"}
                    for name, ms in times.items():
                        row[f"{name}_ms"] = ms[phase]
                        row[f"{name}_tflops"] = flops[phase] / (ms[phase] * 1e-3) / 1e12
                    baselines = [ms[phase] for name, ms in times.items() if name.startswith("sdpa")]
                    row["ours"] = times["ours"][phase]
                    row["baseline"] = min(baselines) if baselines else None
                    row["ratio"] = row["baseline"] / row["ours"] if baselines else None
                    rows.append(row)
                del q, k, v
    return rows


def copy_gbps() -> float:
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = _do_bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def decode_rows(quick: bool, ceiling: float) -> list[dict]:
    import rlhf_fast
    rows = []
    d = 128
    caches = (32768,) if quick else (4096, 32768)
    heads = ((16, 16),) if quick else ((16, 16), (16, 4))
    for tmax in caches:
        for b in (1, 64):
            for hq, hkv in heads:
                q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(b, hkv, tmax, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(b, hkv, tmax, d, device="cuda", dtype=torch.bfloat16)
                seqlens = torch.full((b,), tmax, device="cuda", dtype=torch.int32)
                ours = _do_bench(lambda: rlhf_fast.decode_attention(q, k, v, seqlens, backend="triton"))
                q4 = q[:, :, None]
                base = _do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q4, k, v, enable_gqa=True))
                gbps = 2 * k.numel() * k.element_size() / (ours * 1e-3) / 1e9
                rows.append({"op": "decode_attention", "shape": f"B={b} Hq={hq} Hkv={hkv} cache={tmax} D={d}",
                             "dtype": "bf16", "ours": ours, "baseline": base, "ratio": base / ours,
                             "ours_us": ours * 1e3, "sdpa_us": base * 1e3, "gbps": gbps, "copy_gbps": ceiling,
                             "of_copy": gbps / ceiling})
                del q, k, v
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["gpu"], default="gpu")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("RLHF_FAST_BENCH_QUICK") == "1")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: the GPU suite needs CUDA (none here); nothing measured")
        return 0
    torch.manual_seed(0)
    ceiling = copy_gbps()
    rows = train_rows(args.quick) + decode_rows(args.quick, ceiling)
    print(markdown_table([r for r in rows if r["op"] != "decode_attention"]))
    print()
    print(markdown_table([r for r in rows if r["op"] == "decode_attention"]))
    path = write_results("attention", rows, {"copy_gbps": ceiling, "quick": args.quick})
    print(f"\n{machine().get('gpu')}: results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
