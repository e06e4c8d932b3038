"""KernelSpec: one (kernel, config) the static GPU build check compiles ahead of time."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    name: str                 # readable id, e.g. "attn_fwd[D=128,BM=128,BN=64]"
    fn: Any                   # the @triton.jit function
    signature: dict           # arg name -> Triton type ("*fp32", "*bf16", "i32", "fp32", "constexpr")
    constexprs: dict          # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple = (80, 90)   # compute capabilities this config is launched on
    attrs: dict = field(default_factory=dict)  # optional ASTSource attrs (e.g. divisibility hints)
    ptx_contains: dict = field(default_factory=dict)  # arch -> texts its PTX must hold (e.g. "wgmma")
    maxnreg: int | None = None  # register budget per thread passed to ptxas (.maxnreg); None: ptxas picks
    # i32 arguments (token-axis strides) that may only be widened to int64 before any use: the static check
    # fails a config whose TTIR uses one any other way (an i32 multiply wraps past 2^31 elements).
    int64_args: tuple = ()
