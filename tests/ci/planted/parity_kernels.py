"""Row softmax in Triton, once right and once off by a bit, for tests/ci/test_parity_layer.py.

_softmax_kernel computes in float64 and rounds on the store, so it is at least as accurate as
PyTorch's own softmax on either device (Triton's float32 exp is an approximate ex2 on GPUs, which
could not promise that). Casts from float64 go through float32: Triton 3.9's interpreter turns a
float64 -> bfloat16 cast into garbage (0 or NaN). With PLANTED it rounds the max-subtracted logits
to bfloat16 before exp, a precision drop of the kind a kernel can hide
behind a loose tolerance: on randn rows its float32 outputs are off by up to ~1e-3 absolute (3%
relative on the small probabilities), which torch.allclose(atol=1e-2, rtol=1e-2), a tolerance common in
kernel tests, accepts and the parity rule (tests/parity.py) must reject: PyTorch's float32 error there is ~5e-9.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, n_cols, stride, BLOCK: tl.constexpr, PLANTED: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride + offs, mask=mask, other=-float("inf")).to(tl.float64)
    z = x - tl.max(x, axis=0)
    if PLANTED:
        z = z.to(tl.float32).to(tl.bfloat16).to(tl.float64)  # the planted precision drop
    num = tl.exp(z)
    y = num / tl.sum(num, axis=0)
    tl.store(y_ptr + row * stride + offs, y.to(tl.float32).to(y_ptr.dtype.element_ty), mask=mask)


def softmax(x: torch.Tensor, planted: bool = False) -> torch.Tensor:
    """softmax(x, dim=-1) for a contiguous (rows, cols) tensor, one program per row."""
    rows, cols = x.shape
    y = torch.empty_like(x)
    _softmax_kernel[(rows,)](x, y, cols, x.stride(0), BLOCK=triton.next_power_of_2(cols), PLANTED=planted)
    return y
