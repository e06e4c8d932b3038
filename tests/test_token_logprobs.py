"""token_logprobs against float64 math (trl's selective_log_softmax / entropy_from_logits), per backend.

Parity rule (tests/parity.py): the values are fp32 math on the given logits, so PyTorch's error is
that of the same formula on `logits.float()`; d(logits) is rounded once to the logits' dtype, so
PyTorch's error is that of autograd through the upcast path, in the logits' dtype.
"""
import pytest
import torch

import rlhf_fast
from conftest import need_backend
from rlhf_fast.reference import token_logprobs as ref
from parity import assert_close_to_reference

BACKENDS = ["reference", "triton"]
FP32, BF16 = torch.float32, torch.bfloat16
# (N, V, dtype, temperature): every N and V the issue names, each dtype and temperature several times,
# without the full product: the interpreter runs one program per row, so N = 300 and V = 50257 appear
# only where they add a case (many rows; a vocab far wider than one tile).
CASES = [(1, 1, FP32, 1.0), (1, 1000, BF16, 0.7), (33, 17, FP32, 0.7), (33, 17, BF16, 1.0),
         (33, 1000, FP32, 1.0), (33, 1000, BF16, 0.7), (300, 17, BF16, 0.7), (3, 50257, FP32, 0.7),
         (2, 50257, BF16, 1.0)]

def naive(logits, targets, temperature, ignore_index=-100):
    """trl's formulas on logits / T in the logits' own float dtype (upcast first for half inputs)."""
    z = (logits if logits.dtype == torch.float64 else logits.float()) / temperature
    logsm = z.log_softmax(-1)
    valid = targets != ignore_index
    logp = logsm.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def make_inputs(n, vocab, dtype, device, ignore_frac=0.2):
    logits = (torch.randn(n, vocab, device=device) * 3).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[torch.rand(n, device=device) < ignore_frac] = -100
    return logits, targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, vocab, dtype, temperature", CASES,
                         ids=[f"N{n}-V{v}-{str(d)[6:]}-T{t}" for n, v, d, t in CASES])
def test_values_and_grads_match_float64(backend, n, vocab, dtype, temperature, device):
    need_backend(backend, device)
    logits, targets = make_inputs(n, vocab, dtype, device)
    g_logp, g_ent = torch.randn(n, device=device), torch.randn(n, device=device)

    x = logits.clone().requires_grad_()
    logp, entropy = rlhf_fast.token_logprobs(x, targets, temperature=temperature, return_entropy=True,
                                             backend=backend)
    (logp * g_logp + entropy * g_ent).sum().backward()

    x64 = logits.double().requires_grad_()
    logp64, ent64 = naive(x64, targets, temperature)
    (logp64 * g_logp.double() + ent64 * g_ent.double()).sum().backward()

    xs = logits.clone().requires_grad_()
    logp_t, ent_t = naive(xs, targets, temperature)
    (logp_t * g_logp + ent_t * g_ent).sum().backward()

    assert logp.dtype == entropy.dtype == torch.float32 and x.grad.dtype == dtype
    assert_close_to_reference(logp, logp64, logp_t, torch.float32, name="logp")
    assert_close_to_reference(entropy, ent64, ent_t, torch.float32, name="entropy")
    assert_close_to_reference(x.grad, x64.grad, xs.grad, dtype, name="d_logits")

    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (x.grad[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shape_without_entropy(backend, device):
    need_backend(backend, device)
    logits = torch.randn(2, 5, 41, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 41, (2, 5), device=device)
    logp = rlhf_fast.token_logprobs(logits, targets, backend=backend)
    assert logp.shape == (2, 5) and logp.dtype == torch.float32
    logp.sum().backward()
    x64 = logits.detach().double().requires_grad_()
    logp64, _ = naive(x64, targets, 1.0)
    logp64.sum().backward()
    xs = logits.detach().clone().requires_grad_()
    naive(xs, targets, 1.0)[0].sum().backward()
    assert_close_to_reference(logp, logp64, naive(logits.detach(), targets, 1.0)[0], name="logp")
    assert_close_to_reference(logits.grad, x64.grad, xs.grad, name="d_logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend, device):
    need_backend(backend, device)
    logits = torch.randn(6, 9, device=device, requires_grad=True)
    targets = torch.tensor([0, 8, 3, 3, 5, 3], device=device)
    logp = rlhf_fast.token_logprobs(logits, targets, ignore_index=3, backend=backend)
    logp.sum().backward()
    assert (logp[targets == 3] == 0).all() and (logits.grad[targets == 3] == 0).all()
    assert (logp[targets != 3] < 0).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_and_reference_twin_agree(backend, device):
    """The op on each kernel backend and the autograd.Function twin in rlhf_fast.reference agree to fp32
    rounding (1e-5 on values of magnitude ~10 and on gradients of magnitude <= 1). The op's "reference"
    backend runs the twin's own functions, so it is not a case here (it is checked against float64)."""
    need_backend(backend, device)
    logits, targets = make_inputs(17, 300, torch.float32, device)
    g = torch.randn(2, 17, device=device)
    results = []
    for fn, kw in ((rlhf_fast.token_logprobs, {"backend": backend}), (ref.token_logprobs, {})):
        x = logits.clone().requires_grad_()
        logp, ent = fn(x, targets, temperature=0.7, return_entropy=True, **kw)
        (logp * g[0] + ent * g[1]).sum().backward()
        results.append((logp, ent, x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("op", ["token_logprobs", "fused_linear_logprobs"])
def test_target_check_has_no_host_sync_under_graph_capture(op, device, monkeypatch):
    """While a CUDA graph is being captured (simulated here), the ops' target check reads nothing on the
    host (bool()/.item() would abort the capture) and queues a device-side assert instead."""
    monkeypatch.setattr(ref, "capturing", lambda t: True)

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync during graph capture")

    logits = torch.randn(5, 11, device=device)
    hidden, weight = torch.randn(5, 8, device=device), torch.randn(11, 8, device=device)
    targets = torch.tensor([0, 10, -100, 3, 4], device=device)
    call = {"token_logprobs": lambda t: rlhf_fast.token_logprobs(logits, t, backend="reference"),
            "fused_linear_logprobs": lambda t: rlhf_fast.fused_linear_logprobs(hidden, weight, t,
                                                                               backend="reference")}[op]
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", host_sync)
        m.setattr(torch.Tensor, "item", host_sync)
        m.setattr(torch.Tensor, "tolist", host_sync)
        logp = call(targets)
        bad = targets.clone()
        bad[1] = 11
        with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 11\)"):  # CPU: the assert fires at once
            call(bad)
    assert torch.isfinite(logp).all()


def test_bad_input_raises(device):
    logits = torch.randn(4, 10, device=device)
    targets = torch.randint(0, 10, (4,), device=device)
    tl = rlhf_fast.token_logprobs
    for bad, match in [(10, r"targets must lie in \[0, 10\)"), (-1, "targets must lie"), (-7, "found -7")]:
        t = targets.clone()
        t[2] = bad
        with pytest.raises(ValueError, match=match):
            tl(logits, t)
    with pytest.raises(ValueError, match="targets must have shape"):
        tl(logits, targets[:3])
    with pytest.raises(ValueError, match="targets must have dtype"):
        tl(logits, targets.float())
    with pytest.raises(ValueError, match="logits must have dtype"):
        tl(logits.long(), targets)
    with pytest.raises(ValueError, match="logits must have at least 1 dimension"):
        tl(torch.tensor(1.0, device=device), torch.tensor(0, device=device))
    with pytest.raises(ValueError, match="targets is on meta"):
        tl(logits, targets.to("meta"))
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            tl(logits, targets, temperature=temperature)
    with pytest.raises(ValueError, match="backend must be one of"):
        tl(logits, targets, backend="fast")
    with pytest.raises(rlhf_fast.BackendUnavailable, match="no 'cuda' backend"):
        tl(logits, targets, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_are_impossible_tokens(backend, device):
    """-inf logits (a masked vocabulary, here also a whole leading tile) have p = 0: 0 log 0 = 0 in the
    entropy and zero gradient, and the live part matches float64 torch.distributions."""
    need_backend(backend, device)
    dead = 4200  # wider than the widest row tile, so a whole tile is -inf before any live logit
    live = torch.randn(3, 29, device=device) * 2
    logits = torch.cat([torch.full((3, dead), float("-inf"), device=device), live,
                        torch.full((3, 12), float("-inf"), device=device)], 1).requires_grad_()
    targets = torch.tensor([0, 7, 28], device=device)
    logp, ent = rlhf_fast.token_logprobs(logits, targets + dead, temperature=0.8, return_entropy=True,
                                         backend=backend)
    (logp.sum() + ent.sum()).backward()
    z = (live.double() / 0.8).requires_grad_()
    cat = torch.distributions.Categorical(logits=z)
    lp64, ent64 = cat.logits.gather(-1, targets[:, None]).squeeze(-1), cat.entropy()
    (lp64.sum() + ent64.sum()).backward()
    torch.testing.assert_close(logp.double(), lp64.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits.grad[:, dead:dead + 29].double(), z.grad / 0.8, rtol=0, atol=1e-5)
    assert (logits.grad[:, :dead] == 0).all() and (logits.grad[:, dead + 29:] == 0).all()
