"""NaN inputs in the logprob/KL family: every backend gives NaN exactly where the reference does.

A NaN logit (or a NaN hidden state, which makes its whole row of logits NaN) must reach that row's
outputs and gradients, as in PyTorch, so the pipeline's NaN guard fires on GPU too. Each test plants
NaN in some rows, checks that the NaN positions of every output and gradient equal the reference
backend's, that NaN rows are NaN, and that the other rows match float64 (parity rule), untouched.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical
from torch.distributions import kl_divergence as torch_kl

import rlhf_fast
from conftest import need_backend
from parity import assert_close_to_reference

BACKENDS = ["reference", "triton"]
NAN, INF = float("nan"), float("inf")


def fwd_bwd(fn, tensors, w, const=(), dtype=None):
    """fn(*tensors) -> outputs (each (n,)); backward of sum_k (k + 1) out_k * w; returns the outputs and
    the gradients of the tensors not in const."""
    xs = [t.to(dtype) if dtype is not None else t.clone() for t in tensors]
    for k, x in enumerate(xs):
        x.requires_grad_(k not in const)
    outs = fn(*xs)
    w = w.to(outs[0].dtype)
    sum((o * w * (k + 1)).sum() for k, o in enumerate(outs)).backward()
    return [o.detach() for o in outs] + [x.grad for k, x in enumerate(xs) if k not in const]


def check(backend, fn, oracle, tensors, nan_rows, row_args, const=()):
    """fn(backend) and oracle: callables of the tensors; row_args: which tensors are indexed by row
    (the others, weights, are whole); const: tensors that get no gradient.

    Returns our outputs and gradients."""
    n = tensors[0].shape[0]
    w = torch.linspace(-1.0, 2.0, n, device=tensors[0].device)
    ours = fwd_bwd(fn(backend), tensors, w, const)
    ref = fwd_bwd(fn("reference"), tensors, w, const)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert torch.equal(a.isnan(), b.isnan()), f"tensor {i}: NaN positions differ from the reference backend"
    diff = [k for k in range(len(tensors)) if k not in const]
    n_out = len(ours) - len(diff)
    clean = torch.ones(n, dtype=torch.bool)
    clean[nan_rows] = False
    sub = [t[clean.to(t.device)] if k in row_args else t for k, t in enumerate(tensors)]
    w_clean = w[clean.to(w.device)]
    ref64, same = fwd_bwd(oracle, sub, w_clean, const, torch.float64), fwd_bwd(oracle, sub, w_clean, const)
    grad_rows = [n_out + j for j, k in enumerate(diff) if k in row_args]
    for i in list(range(n_out)) + grad_rows:
        assert_close_to_reference(ours[i][clean.to(ours[i].device)], ref64[i], same[i], torch.float32,
                                  name=f"tensor {i}, rows without NaN")
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_and_entropy(backend, device):
    need_backend(backend, device)
    n, vocab = 6, 5000  # wider than the widest Triton tile: a NaN in the 2nd tile meets a carried max
    logits = torch.randn(n, vocab, device=device) * 3
    logits[1, 4500] = NAN
    logits[3, 0] = NAN
    logits[4, 7] = -INF  # a zero-probability token in a clean row keeps its meaning
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[3] = targets[5] = -100  # a NaN row and a clean row that are ignored
    targets[4] = 9

    def fn(backend):
        return lambda x: rlhf_fast.token_logprobs(x, targets, return_entropy=True, backend=backend)

    def oracle(x):
        t = targets[[0, 2, 4, 5]]
        logsm = (x if x.dtype == torch.float64 else x.float()).log_softmax(-1)
        zero = torch.zeros((), dtype=logsm.dtype)
        p_logp = logsm.exp() * logsm.masked_fill(logsm.isneginf(), 0.0)  # 0 log 0 = 0, and no NaN gradient
        return (torch.where(t != -100, logsm.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1), zero),
                torch.where(t != -100, -p_logp.sum(-1), zero))

    logp, entropy, grad = check(backend, fn, oracle, [logits], [1, 3], row_args=(0,))
    assert logp[1].isnan() and entropy[1].isnan()
    assert logp[3] == 0 and entropy[3] == 0  # ignored stays 0 (as in the reference); its gradient is NaN
    assert grad[[1, 3]].isnan().all() and grad[4, 7] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_divergence(backend, device):
    need_backend(backend, device)
    n, vocab = 5, 37
    logits = torch.randn(n, vocab, device=device) * 2
    ref_logits = logits + torch.randn(n, vocab, device=device)
    logits[1, 30] = NAN      # NaN on the policy side
    ref_logits[3, 2] = NAN   # NaN on the reference side only

    def fn(backend):
        return lambda x, y: (rlhf_fast.kl_divergence(x, y, backend=backend),)

    def oracle(x, y):
        up = (lambda t: t) if x.dtype == torch.float64 else (lambda t: t.float())
        return (torch_kl(Categorical(logits=up(x)), Categorical(logits=up(y))),)

    kl, d_x, d_y = check(backend, fn, oracle, [logits, ref_logits], [1, 3], row_args=(0, 1))
    assert kl[[1, 3]].isnan().all() and d_x[1].isnan().all() and d_y[[1, 3]].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs(backend, device):
    need_backend(backend, device)
    n, h, vocab = 7, 24, 300
    hidden = torch.randn(n, h, device=device)
    weight = torch.randn(vocab, h, device=device) / h ** 0.5 * 2
    bias = torch.randn(vocab, device=device)
    hidden[2, 5] = NAN
    hidden[6, 0] = NAN  # the last row: padded tile rows re-read it
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[0] = -100

    def fn(backend):
        return lambda x, w, b: rlhf_fast.fused_linear_logprobs(x, w, targets, bias=b, return_entropy=True,
                                                               backend=backend)

    def oracle(x, w, b):
        t = targets[[0, 1, 3, 4, 5]]
        z = F.linear(x, w, b)
        logsm = (z if z.dtype == torch.float64 else z.float()).log_softmax(-1)
        zero = torch.zeros((), dtype=logsm.dtype)
        return (torch.where(t != -100, logsm.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1), zero),
                torch.where(t != -100, -(logsm.exp() * logsm).sum(-1), zero))

    logp, entropy, d_x, d_w, d_b = check(backend, fn, oracle, [hidden, weight, bias], [2, 6], row_args=(0,))
    assert logp[[2, 6]].isnan().all() and entropy[[2, 6]].isnan().all()
    assert d_x[[2, 6]].isnan().all() and d_w.isnan().all() and d_b.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_kl_divergence(backend, device):
    need_backend(backend, device)
    n, h, h_ref, vocab = 6, 16, 24, 150
    hidden = torch.randn(n, h, device=device)
    weight = torch.randn(vocab, h, device=device) / h ** 0.5 * 2
    ref_hidden = torch.randn(n, h_ref, device=device)
    ref_weight = torch.randn(vocab, h_ref, device=device) / h_ref ** 0.5 * 2
    hidden[1, 3] = NAN
    ref_hidden[4, 0] = NAN

    def fn(backend):
        return lambda x, w, xr: (rlhf_fast.fused_linear_kl_divergence(x, w, xr, ref_weight, backend=backend),)

    def oracle(x, w, xr):
        wr = ref_weight.to(x.dtype)
        up = (lambda t: t) if x.dtype == torch.float64 else (lambda t: t.float())
        return (torch_kl(Categorical(logits=up(F.linear(x, w))), Categorical(logits=up(F.linear(xr, wr)))),)

    kl, d_x, d_w = check(backend, fn, oracle, [hidden, weight, ref_hidden], [1, 4], row_args=(0, 2),
                         const=(2,))
    assert kl[[1, 4]].isnan().all() and d_x[1].isnan().all() and d_w.isnan().all()
