"""The one tl.dot wrapper every kernel uses, so precision handling cannot drift between kernels."""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """a @ b + acc with fp32 accumulation.

    DOT_PRECISION: "ieee" for fp32 inputs (no TF32), "tf32" for half inputs (where it has no effect), or
    one of two modes the launchers pass only to Triton's CPU interpreter: "upcast" (the interpreter holds
    bf16 as bit patterns and cannot multiply them, so operands go to fp32 first; bf16 products are exact
    in fp32: same math) and "ieee_dx64" (kernels/_fused_linear.py: fp32 at "ieee" here; its backward
    takes one product in fp64). GPUs only ever see "ieee" and "tf32".
    """
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if DOT_PRECISION == "ieee_dx64":
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
