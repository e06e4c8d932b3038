"""fused_linear_logprobs against float64 math, and against token_logprobs on materialized logits.

Parity rule (tests/parity.py): "PyTorch in the same dtype" is the unfused path a user would write,
`linear(hidden, weight, bias).float() / T` then trl's formulas, with autograd for the gradients of
hidden, weight and bias (in their dtype).
"""
import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
import rlhf_fast.ops._fused_linear_launch as launch
from conftest import need_backend
from parity import assert_close_to_reference
from rlhf_fast.reference import fused_linear_logprobs as ref

BACKENDS = ["reference", "triton"]
FP32, BF16 = torch.float32, torch.bfloat16
# (N, H, V, dtype, temperature, bias)
CASES = [(1, 16, 17, FP32, 1.0, True), (33, 32, 1000, FP32, 0.7, False), (33, 24, 1000, BF16, 1.0, True),
         (300, 16, 17, BF16, 0.7, False), (70, 40, 300, FP32, 1.0, True), (4, 32, 50257, FP32, 0.7, True)]


def unfused(hidden, weight, bias, targets, temperature, ignore_index=-100):
    z = F.linear(hidden, weight, bias)
    z = (z if z.dtype == torch.float64 else z.float()) / temperature
    logsm = z.log_softmax(-1)
    valid = targets != ignore_index
    zero = torch.zeros((), dtype=z.dtype)
    logp = torch.where(valid, logsm.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1), zero)
    entropy = torch.where(valid, -(logsm.exp() * logsm).sum(-1), zero)
    return logp, entropy


def make_inputs(n, h, vocab, dtype, device, with_bias):
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(vocab, h, device=device) / h ** 0.5 * 2).to(dtype)
    bias = torch.randn(vocab, device=device).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[torch.rand(n, device=device) < 0.2] = -100
    return hidden, weight, bias, targets


def run(fn, hidden, weight, bias, targets, temperature, g, **kw):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logp, ent = fn(leaves[0], leaves[1], leaves[2], targets, temperature, **kw)
    (logp * g[0] + ent * g[1]).sum().backward()
    return logp, ent, [t.grad if t is not None else None for t in leaves]


def fused(backend):
    def call(h, w, b, t, temperature, **kw):
        return rlhf_fast.fused_linear_logprobs(h, w, t, bias=b, temperature=temperature, return_entropy=True,
                                               backend=backend, **kw)
    return call


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, h, vocab, dtype, temperature, with_bias", CASES,
                         ids=[f"N{n}-H{h}-V{v}-{str(d)[6:]}-T{t}-{'b' if b else 'nob'}" for n, h, v, d, t, b in CASES])
def test_values_and_grads_match_float64(backend, n, h, vocab, dtype, temperature, with_bias, device):
    need_backend(backend, device)
    hidden, weight, bias, targets = make_inputs(n, h, vocab, dtype, device, with_bias)
    g = torch.randn(2, n, device=device)
    kw = {"chunk_size": 7} if backend == "reference" else {}
    logp, ent, grads = run(fused(backend), hidden, weight, bias, targets, temperature, g, **kw)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    logp64, ent64, grads64 = run(unfused, up(hidden), up(weight), up(bias), targets, temperature, g.double())
    logp_t, ent_t, grads_t = run(unfused, hidden, weight, bias, targets, temperature, g)

    assert_close_to_reference(logp, logp64, logp_t, FP32, name="logp")
    assert_close_to_reference(ent, ent64, ent_t, FP32, name="entropy")
    for name, ours, want, same in zip(("d_hidden", "d_weight", "d_bias"), grads, grads64, grads_t):
        if want is not None:
            assert ours.dtype == dtype
            assert_close_to_reference(ours, want, same, dtype, name=name)
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_logits_path(backend, device):
    """Same numbers as token_logprobs on the materialized fp32 logits (fp32 rounding apart)."""
    need_backend(backend, device)
    hidden, weight, bias, targets = make_inputs(40, 32, 500, FP32, device, True)
    got = rlhf_fast.fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.7,
                                          return_entropy=True, backend=backend)
    want = rlhf_fast.token_logprobs(F.linear(hidden, weight, bias), targets, temperature=0.7,
                                    return_entropy=True, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_twin(backend, device):
    """Only hidden requires grad (frozen lm_head): hidden's gradient alone is computed, no entropy asked;
    the reference autograd.Function twin agrees."""
    need_backend(backend, device)
    hidden, weight, bias, targets = make_inputs(20, 16, 300, FP32, device, True)
    grads = []
    for fn, kw in ((rlhf_fast.fused_linear_logprobs, {"backend": backend}), (ref.fused_linear_logprobs, {})):
        h = hidden.clone().requires_grad_()
        logp = fn(h, weight, targets, bias=bias, **kw)
        logp.sum().backward()
        grads.append((logp, h.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_only_gradient(backend, device):
    """Only the bias trains: its gradient is d(logits) summed over tokens, nothing else is computed."""
    need_backend(backend, device)
    hidden, weight, bias, targets = make_inputs(20, 16, 300, FP32, device, True)
    b = bias.clone().requires_grad_()
    rlhf_fast.fused_linear_logprobs(hidden, weight, targets, bias=b, temperature=0.7, backend=backend).sum().backward()
    z = F.linear(hidden, weight, bias).requires_grad_()
    rlhf_fast.token_logprobs(z, targets, temperature=0.7, backend="reference").sum().backward()
    torch.testing.assert_close(b.grad, z.grad.sum(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["atomic", "reduce"])
def test_triton_dweight_in_several_slices(mode, device, monkeypatch):
    """bf16 d(weight) accumulates in bounded fp32 vocab slices; force one vocab tile per slice."""
    need_backend("triton", device)
    monkeypatch.setenv(launch.BWD_ENV, mode)
    hidden, weight, bias, targets = make_inputs(33, 16, 1000, BF16, device, True)
    from rlhf_fast.kernels import fused_linear_logprobs as kmod
    block_v = launch.tile_config(BF16, kmod.CONFIGS)[0].block_v
    monkeypatch.setattr(launch, "DW_SLICE_ELEMENTS", 16 * block_v)
    g = torch.randn(2, 33, device=device)
    _, _, sliced = run(fused("triton"), hidden, weight, bias, targets, 1.0, g)
    monkeypatch.setattr(launch, "DW_SLICE_ELEMENTS", 1 << 26)
    _, _, whole = run(fused("triton"), hidden, weight, bias, targets, 1.0, g)
    for a, b in zip(sliced, whole):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, with_bias", [(FP32, True), (BF16, False)], ids=["fp32-b", "bf16-nob"])
def test_reduce_backward_matches_float64_and_repeats_bitwise(dtype, with_bias, device, monkeypatch):
    """The backward without atomics (deterministic mode): parity with float64 with several token blocks
    and vocab tiles per program (odd sizes), and two runs give bitwise-equal gradients."""
    need_backend("triton", device)
    from rlhf_fast.kernels import fused_linear_logprobs as kmod
    monkeypatch.setattr(kmod, "_fused_linear_logprobs_bwd_kernel", None)  # the atomic kernel must not run
    n, h, vocab = 37, 24, 1500
    hidden, weight, bias, targets = make_inputs(n, h, vocab, dtype, device, with_bias)
    g = torch.randn(2, n, device=device)
    with deterministic():
        logp, ent, grads = run(fused("triton"), hidden, weight, bias, targets, 0.7, g)
        _, _, again = run(fused("triton"), hidden, weight, bias, targets, 0.7, g)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    logp64, ent64, grads64 = run(unfused, up(hidden), up(weight), up(bias), targets, 0.7, g.double())
    logp_t, ent_t, grads_t = run(unfused, hidden, weight, bias, targets, 0.7, g)
    assert_close_to_reference(logp, logp64, logp_t, FP32, name="logp")
    assert_close_to_reference(ent, ent64, ent_t, FP32, name="entropy")
    for name, ours, second, want, same in zip(("d_hidden", "d_weight", "d_bias"), grads, again, grads64, grads_t):
        if want is not None:
            assert_close_to_reference(ours, want, same, dtype, name=name)
            assert torch.equal(ours, second), f"{name}: two deterministic runs differ"


class deterministic:
    """torch.use_deterministic_algorithms(True) for a block, restored after."""

    def __enter__(self):
        self.was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.was)


def test_backward_mode_and_passes(monkeypatch):
    """Deterministic mode always takes the reduce passes; the variable picks otherwise; bad values raise."""
    monkeypatch.delenv(launch.BWD_ENV, raising=False)
    assert launch.backward_mode() == "atomic"
    with deterministic():
        monkeypatch.setenv(launch.BWD_ENV, "atomic")
        assert launch.backward_mode() == "reduce"
    monkeypatch.setenv(launch.BWD_ENV, "reduce")
    assert launch.backward_mode() == "reduce"
    monkeypatch.setenv(launch.BWD_ENV, "fast")
    with pytest.raises(ValueError, match="RLHF_FAST_FUSED_LINEAR_BWD must be one of auto, atomic, reduce"):
        launch.backward_mode()
    from rlhf_fast.kernels._fused_linear import TileConfig
    cfg, dx_cfg, dw_cfg = TileConfig(32, 64, 32, 4, 2), TileConfig(16, 32, 32, 4, 2), TileConfig(8, 16, 32, 4, 2)
    passes = lambda n, v0, v1, need, mode: launch.backward_passes(n, v0, v1, cfg, (dx_cfg, dw_cfg), need, mode)  # noqa: E731
    assert [(p.grid, p.own_cols, p.cfg) for p in passes(97, 64, 384, (True, True, True), "atomic")] == \
        [((4, 5), None, cfg)]
    assert [tuple(p) for p in passes(97, 64, 384, (True, False, True), "reduce")] == \
        [((7,), False, True, False, False, dx_cfg), ((20,), True, False, False, True, dw_cfg)]
    assert [p.own_cols for p in passes(5, 0, 64, (True, False, False), "reduce")] == [False]


def test_bad_input_raises(device):
    hidden, weight, bias, targets = make_inputs(4, 8, 10, FP32, device, True)
    fl = rlhf_fast.fused_linear_logprobs
    t = targets.clone()
    t[1] = 10
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        fl(hidden, weight, t)
    with pytest.raises(ValueError, match="hidden must have 2 dimensions"):
        fl(hidden[0], weight, targets)
    with pytest.raises(ValueError, match="weight must have hidden size"):
        fl(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="weight must have dtype"):
        fl(hidden, weight.to(BF16), targets)
    with pytest.raises(ValueError, match="weight must have a vocabulary of at least 1 row"):
        fl(hidden, weight[:0], targets)
    with pytest.raises(ValueError, match="bias must have vocab size"):
        fl(hidden, weight, targets, bias=bias[:9])
    with pytest.raises(ValueError, match="targets must have token count"):
        fl(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="weight is on meta"):
        fl(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        fl(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fl(hidden, weight, targets, temperature=-0.5)
