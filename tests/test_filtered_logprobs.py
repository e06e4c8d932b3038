"""token_logprobs and fused_linear_logprobs with `cutoffs` (issue 13, CUTOFFS.md): logprob, entropy and
gradients of the kept, renormalized distribution, against a float64 oracle, on every backend.

The oracle knows nothing of the ops: it decides the kept set from the definition (x = float32(logit) /
float32(T); kept iff x > t or (x == t and index >= i)), masks the logits to -inf off it and takes
log_softmax in float64 with torch, autograd for the gradients. Parity rule: tests/parity.py, with
"PyTorch in the same dtype" the same oracle on the float32 upcast (the unfused path a user would write).

Cutoffs are built here from the definition: per row a top-k-like threshold at a random rank, ties planted
exactly at the cut with the index rule splitting them, rows with no filter (-inf, 0), and ignored
positions (one with an invalid sampler row, (nan, 0)). The fused-linear inputs are small multiples of
1/8, so every logit is exact in float32 and bfloat16 whatever the summation order: the op's x and the
oracle's x are the same bits, and ties at the cut stay ties.
"""
import pytest
import torch
import torch.nn.functional as F

import rlhf_fast
import rlhf_fast.ops._fused_linear_launch as launch
from conftest import need_backend
from parity import assert_close_to_reference
from rlhf_fast.reference import fused_linear_logprobs as ref_fl
from rlhf_fast.reference import _kept
from rlhf_fast.reference import token_logprobs as ref_tl

# reference: its compact kept-set path forced on every chunk; reference-dense: its dense path (the op picks
# one per chunk by the kept sets' width: rlhf_fast/reference/_kept.py)
BACKENDS = ["reference", "reference-dense", "triton"]
FP32, BF16 = torch.float32, torch.bfloat16
IGNORE = -100
# (N, V, dtype, temperature)
TOKEN_CASES = [(1, 1, FP32, 0.7), (1, 17, BF16, 1.3), (17, 17, FP32, 1.3), (17, 17, BF16, 0.7),
               (17, 1000, FP32, 0.7), (17, 1000, BF16, 1.3), (1, 1000, FP32, 1.3), (17, 1, BF16, 0.7),
               (3, 5000, BF16, 0.7)]  # wider than a row tile: whole tiles off the kept set
# (N, H, V, dtype, temperature, bias)
FUSED_CASES = [(1, 16, 17, FP32, 0.7, True), (17, 24, 1000, FP32, 1.3, False), (17, 32, 1000, BF16, 0.7, True),
               (17, 16, 17, BF16, 1.3, False), (1, 8, 1, FP32, 1.3, True), (17, 8, 1, BF16, 0.7, False),
               (5, 16, 3000, FP32, 0.7, True)]  # several vocab splits, most with no kept logit


def use_backend(backend: str, device, monkeypatch) -> str:
    """need_backend, and the reference's kept-set path pinned (its mask built in small blocks); returns the
    op's backend name."""
    if backend.startswith("reference"):
        monkeypatch.setattr(_kept, "SPARSE_FRACTION", 1 << 62 if backend == "reference-dense" else 1)
        monkeypatch.setattr(_kept, "MASK_ELEMENTS", 2000)  # masks of 1 to 117 rows: several blocks per chunk
        backend = "reference"
    need_backend(backend, device)
    return backend


def kept_set(x32: torch.Tensor, cutoffs: torch.Tensor) -> torch.Tensor:
    """(N, V) bool from the definition; x32 = float32 logits / T. A NaN threshold keeps nothing."""
    t = cutoffs[:, 0].to(torch.float32)[:, None]
    i = cutoffs[:, 1][:, None]
    cols = torch.arange(x32.shape[-1], device=x32.device, dtype=torch.float64)
    return (x32 > t) | ((x32 == t) & (cols >= i))


def oracle(z, kept, targets):
    """logp and entropy of softmax(z) restricted to `kept`, z = logits / T in the computing dtype."""
    logsm = z.masked_fill(~kept, float("-inf")).log_softmax(-1)
    valid = targets != IGNORE
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logp = logsm.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    safe = logsm.masked_fill(~kept, 0.0)  # p = 0 off the set: 0 * log 0 = 0, and no 0 * inf in the backward
    entropy = -(safe.exp().masked_fill(~kept, 0.0) * safe).sum(-1)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def make_cutoffs(x32: torch.Tensor, gen: torch.Generator, tie_cols: torch.Tensor):
    """(cutoffs (N, 2) float64, targets (N,)) for x32 = float32 logits / T, where tie_cols[r] is a column
    that ties exactly with others in row r.

    Rows cycle through: no filter; a cut at the value of a random rank < 3 or < 50 keeping every tie (i = 0); a cut
    at the planted tie with i one of the tied indices (the tied tokens from i on kept, those below dropped).
    Each valid target is drawn from its row's kept set; about a fifth of the rows are ignored, the
    first ignored one with the invalid-row cutoffs (nan, 0)."""
    n, vocab = x32.shape
    cutoffs = torch.empty(n, 2, dtype=torch.float64)
    for r in range(n):
        row = x32[r].cpu()
        kind = r % 3
        if kind == 0:
            cutoffs[r] = torch.tensor([float("-inf"), 0.0])
            continue
        if kind == 1:
            cap = 3 if r % 2 else 50  # a top-k of up to 3 (whole vocab tiles dropped) or up to 50
            rank = int(torch.randint(0, min(vocab, cap), (), generator=gen))
            t, i = row.sort(descending=True).values[rank], 0
        else:
            t = row[int(tie_cols[r])]
            tied = torch.nonzero(row == t).flatten()
            i = int(tied[int(torch.randint(0, len(tied), (), generator=gen))])
        cutoffs[r] = torch.tensor([float(t), float(i)])
    kept = kept_set(x32.cpu(), cutoffs)
    targets = torch.empty(n, dtype=torch.int64)
    for r in range(n):
        choices = torch.nonzero(kept[r]).flatten()
        targets[r] = choices[int(torch.randint(0, len(choices), (), generator=gen))]
    ignored = torch.rand(n, generator=gen) < 0.2
    targets[ignored] = IGNORE
    if ignored.any():
        cutoffs[torch.nonzero(ignored)[0, 0]] = torch.tensor([float("nan"), 0.0])
    return cutoffs.to(x32.device), targets.to(x32.device)


def plant_ties(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """In place, per row of a (N, V) tensor: copy one entry onto up to 3 others (exact ties); returns the
    (N,) copied columns."""
    n, vocab = values.shape
    src = torch.randint(0, vocab, (n,), generator=gen)
    for r in range(n):
        values[r, torch.randint(0, vocab, (3,), generator=gen)] = values[r, src[r]].item()
    return src


def token_inputs(n, vocab, dtype, temperature, device):
    gen = torch.Generator().manual_seed(n * 1000 + vocab)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(dtype)
    tie_cols = plant_ties(logits, gen)
    logits = logits.to(device)
    cutoffs, targets = make_cutoffs(logits.float() / temperature, gen, tie_cols)
    return logits, targets, cutoffs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, vocab, dtype, temperature", TOKEN_CASES,
                         ids=[f"N{n}-V{v}-{str(d)[6:]}-T{t}" for n, v, d, t in TOKEN_CASES])
def test_token_logprobs_with_cutoffs_match_float64(backend, n, vocab, dtype, temperature, device, monkeypatch):
    backend = use_backend(backend, device, monkeypatch)
    logits, targets, cutoffs = token_inputs(n, vocab, dtype, temperature, device)
    kept = kept_set(logits.float() / temperature, cutoffs)
    g = torch.randn(2, n, device=device)

    x = logits.clone().requires_grad_()
    logp, entropy = rlhf_fast.token_logprobs(x, targets, temperature=temperature, return_entropy=True,
                                             cutoffs=cutoffs, backend=backend)
    (logp * g[0] + entropy * g[1]).sum().backward()

    results = []
    for cast in (torch.float64, torch.float32):
        leaf = logits.to(cast).requires_grad_()
        lp, ent = oracle(leaf / temperature, kept, targets)
        (lp * g[0].to(cast) + ent * g[1].to(cast)).sum().backward()
        results.append((lp, ent, leaf.grad))
    (lp64, ent64, grad64), (lp32, ent32, grad32) = results

    assert logp.dtype == entropy.dtype == FP32 and x.grad.dtype == dtype
    assert_close_to_reference(logp, lp64, lp32, FP32, name="logp")
    assert_close_to_reference(entropy, ent64, ent32, FP32, name="entropy")
    assert_close_to_reference(x.grad, grad64, grad32.to(dtype), dtype, name="d_logits")
    valid = targets != IGNORE
    assert (x.grad[valid][~kept[valid]] == 0).all(), "d(logits) must be 0 off the kept set"
    assert (x.grad[~valid] == 0).all() and (logp[~valid] == 0).all() and (entropy[~valid] == 0).all()


def fused_inputs(n, h, vocab, dtype, temperature, with_bias, device):
    """Multiples of 1/8 with |logit| < 32: exact in bf16 and fp32 in any order. Weight rows are copied
    onto others (with their bias), so those tokens tie exactly."""
    gen = torch.Generator().manual_seed(n * 7919 + vocab * 31 + h)
    hidden = torch.randint(-3, 4, (n, h), generator=gen).float() / 2
    weight = torch.randint(-2, 3, (vocab, h), generator=gen).float() / 4 / max(1, h // 16)
    bias = torch.randint(-4, 5, (vocab,), generator=gen).float() / 8 if with_bias else None
    src = int(torch.randint(0, vocab, (), generator=gen))
    for dst in torch.randint(0, vocab, (3,), generator=gen).tolist():
        weight[dst] = weight[src]
        if bias is not None:
            bias[dst] = bias[src]
    logits64 = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    assert logits64.abs().max() < 32, "inputs must keep every logit exact in bf16"
    x32 = logits64.float() / temperature
    cutoffs, targets = make_cutoffs(x32, gen, torch.full((n,), src))
    to = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return to(hidden), to(weight), to(bias), targets.to(device), cutoffs.to(device), kept_set(x32, cutoffs).to(device)


def run_fused(fn, leaves, targets, temperature, g, **kw):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    logp, ent = fn(*leaves, targets, temperature, **kw)
    (logp * g[0] + ent * g[1]).sum().backward()
    return logp, ent, [t.grad if t is not None else None for t in leaves]


def fused_oracle(hidden, weight, bias, targets, temperature, kept):
    return oracle(F.linear(hidden, weight, bias) / temperature, kept, targets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, h, vocab, dtype, temperature, with_bias", FUSED_CASES,
                         ids=[f"N{n}-H{h}-V{v}-{str(d)[6:]}-T{t}-{'b' if b else 'nob'}"
                              for n, h, v, d, t, b in FUSED_CASES])
def test_fused_linear_logprobs_with_cutoffs_match_float64(backend, n, h, vocab, dtype, temperature, with_bias,
                                                          device, monkeypatch):
    backend = use_backend(backend, device, monkeypatch)
    check_fused(backend, n, h, vocab, dtype, temperature, with_bias, device)


@pytest.mark.parametrize("n, h, vocab, dtype", [(17, 32, 1000, BF16), (5, 16, 3000, FP32)], ids=["bf16", "fp32-splits"])
def test_fused_reduce_backward_with_cutoffs(n, h, vocab, dtype, device, monkeypatch):
    """The Triton backward without atomics (its dx and dw passes) with cutoffs, against the oracle."""
    need_backend("triton", device)
    monkeypatch.setenv(launch.BWD_ENV, "reduce")
    check_fused("triton", n, h, vocab, dtype, 0.7, True, device)


def check_fused(backend, n, h, vocab, dtype, temperature, with_bias, device):
    hidden, weight, bias, targets, cutoffs, kept = fused_inputs(n, h, vocab, dtype, temperature, with_bias, device)
    g = torch.randn(2, n, device=device)
    kw = {"chunk_size": 7} if backend == "reference" else {}

    def ours(h_, w_, b_, t_, temp):
        return rlhf_fast.fused_linear_logprobs(h_, w_, t_, bias=b_, temperature=temp, return_entropy=True,
                                               cutoffs=cutoffs, backend=backend, **kw)

    def plain(h_, w_, b_, t_, temp):
        return fused_oracle(h_, w_, b_, t_, temp, kept)

    logp, ent, grads = run_fused(ours, (hidden, weight, bias), targets, temperature, g)
    up = lambda t, c: None if t is None else t.to(c)  # noqa: E731
    lp64, ent64, grads64 = run_fused(plain, [up(t, torch.float64) for t in (hidden, weight, bias)], targets,
                                     temperature, g.double())
    lp32, ent32, grads32 = run_fused(plain, [up(t, FP32) for t in (hidden, weight, bias)], targets, temperature, g)

    assert_close_to_reference(logp, lp64, lp32, FP32, name="logp")
    assert_close_to_reference(ent, ent64, ent32, FP32, name="entropy")
    for name, got, want, same in zip(("d_hidden", "d_weight", "d_bias"), grads, grads64, grads32):
        if want is not None:
            assert got.dtype == dtype
            assert_close_to_reference(got, want, same.to(dtype), dtype, name=name)
    ignored = targets == IGNORE
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_filter_rows_equal_plain_call(backend, device, monkeypatch):
    """cutoffs of only (-inf, 0) rows change nothing: the same numbers as cutoffs=None (fp32 rounding)."""
    backend = use_backend(backend, device, monkeypatch)
    logits = torch.randn(5, 3, 41, device=device)
    targets = torch.randint(0, 41, (5, 3), device=device)
    none = torch.zeros(5, 3, 2, dtype=torch.float64, device=device)
    none[..., 0] = float("-inf")
    outs = []
    for c in (None, none):
        x = logits.clone().requires_grad_()
        logp, ent = rlhf_fast.token_logprobs(x, targets, temperature=0.7, return_entropy=True, cutoffs=c,
                                             backend=backend)
        (logp.sum() + ent.sum()).backward()
        outs.append((logp, ent, x.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_twins_and_ops_agree_with_cutoffs(backend, device, monkeypatch):
    """The ops and their rlhf_fast.reference autograd.Function twins agree (fp32 rounding apart)."""
    backend = use_backend(backend, device, monkeypatch)
    logits, targets, cutoffs = token_inputs(17, 300, FP32, 0.7, device)
    hidden, weight, bias, f_targets, f_cutoffs, _ = fused_inputs(17, 16, 300, FP32, 0.7, True, device)
    kw = {"temperature": 0.7, "return_entropy": True}
    pairs = [
        (logits, lambda x: rlhf_fast.token_logprobs(x, targets, cutoffs=cutoffs, backend=backend, **kw),
         lambda x: ref_tl.token_logprobs(x, targets, cutoffs=cutoffs, **kw)),
        (hidden, lambda x: rlhf_fast.fused_linear_logprobs(x, weight, f_targets, bias=bias, cutoffs=f_cutoffs,
                                                           backend=backend, **kw),
         lambda x: ref_fl.fused_linear_logprobs(x, weight, f_targets, bias=bias, cutoffs=f_cutoffs, **kw)),
    ]
    for leaf, op, twin in pairs:
        results = []
        for fn in (op, twin):
            x = leaf.clone().requires_grad_()
            lp, ent = fn(x)
            (lp.sum() - ent.sum()).backward()
            results.append((lp, ent, x.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_off_the_kept_set_raises(backend, device, monkeypatch):
    """Row 0 keeps x > 2 and the tie x == 2 from index 3 on; row 1 has no filter. Both ops, each backend."""
    backend = use_backend(backend, device, monkeypatch)
    row = torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0], device=device)
    logits = row.repeat(2, 1)
    hidden, weight = torch.ones(2, 1, device=device), row[:, None].clone()  # hidden @ weight.T == logits
    cut = torch.tensor([[2.0, 3.0], [float("-inf"), 0.0]], dtype=torch.float64, device=device)
    ops = (lambda t, **k: rlhf_fast.token_logprobs(logits, t, backend=backend, **k),
           lambda t, **k: rlhf_fast.fused_linear_logprobs(hidden, weight, t, backend=backend, **k))
    for op in ops:
        assert torch.isfinite(op(torch.tensor([3, 0], device=device), cutoffs=cut)).all()  # the kept tie
        for bad in ([2, 0], [1, 0]):  # the tie below index i; a logit below t
            with pytest.raises(ValueError, match="targets must lie in the kept set that cutoffs describe"):
                op(torch.tensor(bad, device=device), cutoffs=cut)
        assert op(torch.tensor([-100, 0], device=device), cutoffs=cut)[0] == 0


def test_kernels_give_minus_inf_off_the_kept_set(device):
    """The backends' forward (below the op's check) gives logp = -inf to a target off the kept set."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 2.0, 3.0]], device=device)
    cut = torch.tensor([[2.0, 3.0]], dtype=torch.float64, device=device)
    logp, _, _ = ref_tl.forward(logits, torch.tensor([2], device=device), 1.0, False, IGNORE, cutoffs=cut)
    assert logp.item() == float("-inf")


def test_bad_cutoffs_raise(device):
    logits = torch.randn(2, 3, 7, device=device)
    targets = torch.randint(0, 7, (2, 3), device=device)
    good = torch.zeros(2, 3, 2, dtype=torch.float64, device=device)
    hidden, weight = torch.randn(6, 4, device=device), torch.randn(7, 4, device=device)
    for op, t, c in ((lambda c: rlhf_fast.token_logprobs(logits, targets, cutoffs=c), targets, good),
                     (lambda c: rlhf_fast.fused_linear_logprobs(hidden, weight, targets.flatten(), cutoffs=c),
                      targets.flatten(), good.reshape(6, 2))):
        with pytest.raises(ValueError, match="cutoffs must have dtype"):
            op(c.float())
        with pytest.raises(ValueError, match=r"cutoffs must have shape .*targets.shape \+ \(2,\)"):
            op(c[..., :1])
        with pytest.raises(ValueError, match="cutoffs must have shape"):
            op(c[:1])
        with pytest.raises(ValueError, match="cutoffs is on meta"):
            op(c.to("meta"))
        with pytest.raises(ValueError, match="cutoffs must be a torch.Tensor"):
            op([[0.0, 0.0]])


def test_compiled_with_cutoffs_matches_eager(device):
    """torch.compile(fullgraph=True) traces both ops with the optional cutoffs tensor (custom-op schemas,
    fake functions and autograd carry it) and gives eager's numbers, forward and backward (aot_eager: see
    tests/test_compile.py)."""
    logits, targets, cutoffs = token_inputs(17, 33, FP32, 0.7, device)
    hidden, weight, bias, f_targets, f_cutoffs, _ = fused_inputs(17, 16, 33, FP32, 1.3, True, device)

    def loss(x, h):
        logp, ent = rlhf_fast.token_logprobs(x, targets, temperature=0.7, return_entropy=True, cutoffs=cutoffs)
        f_logp = rlhf_fast.fused_linear_logprobs(h, weight, f_targets, bias=bias, temperature=1.3, cutoffs=f_cutoffs)
        return (logp - 0.1 * ent).sum() + f_logp.sum()

    explanation = torch._dynamo.explain(loss)(logits, hidden)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        x, h = logits.clone().requires_grad_(), hidden.clone().requires_grad_()
        out = fn(x, h)
        out.backward()
        results.append((out.detach(), x.grad, h.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_drawn_tokens_get_the_samplers_logprobs(backend, dtype, device, monkeypatch):
    """The consumer side of the contract: cutoffs from the reference sampler (top_k 20, top_p 0.9,
    min_p 0.05, T 0.7) make both ops return the sampler's logprob of each drawn token (within 1e-5).
    bf16 logits tie often, so cuts fall inside runs of tied tokens. The fused op's logits are exact (see
    fused_inputs), so it sees the sampler's x bit for bit."""
    backend = use_backend(backend, device, monkeypatch)
    kw = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "seed": 1234}
    logits = (torch.randn(64, 1000, device=device) * 2).to(dtype)
    hidden, weight, bias, _, _, _ = fused_inputs(64, 32, 1000, dtype, 0.7, True, device)
    for scores, op in ((logits, lambda t, c: rlhf_fast.token_logprobs(logits, t, temperature=0.7, cutoffs=c,
                                                                      backend=backend)),
                       (F.linear(hidden, weight, bias),
                        lambda t, c: rlhf_fast.fused_linear_logprobs(hidden, weight, t, bias=bias, temperature=0.7,
                                                                     cutoffs=c, backend=backend))):
        drawn, logprobs, cutoffs = rlhf_fast.sample(scores, return_logprobs=True, return_cutoffs=True,
                                                    backend="reference", **kw)
        assert (cutoffs[:, 0] > float("-inf")).all()  # every row filtered
        torch.testing.assert_close(op(drawn, cutoffs), logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_kept_false_gives_minus_inf_and_no_gradient_through_it(backend, device, monkeypatch):
    """check_kept=False: a target off its kept set gets logp = -inf instead of ValueError; that constant
    takes no gradient (a nonzero upstream gradient there changes nothing), the entropy and the other
    gradients stay finite; both ops (the fused one on hidden = I, weight = logits.T: the same logits)."""
    backend = use_backend(backend, device, monkeypatch)
    logits, _, cutoffs = token_inputs(17, 40, FP32, 0.7, device)
    kept = kept_set(logits.float() / 0.7, cutoffs)
    off = torch.nonzero(kept.any(-1) & ~kept.all(-1)).flatten()[:3]
    targets = kept.float().argmax(-1)  # a kept token per row, and a dropped one in rows `off`
    targets[off] = (~kept[off]).float().argmax(-1)
    targets[~kept.any(-1)] = IGNORE  # the invalid row (nan, 0) keeps nothing
    g = torch.randn(2, 17, device=device)
    weight = logits.t().contiguous()
    ops = ((lambda x, **kw: rlhf_fast.token_logprobs(x, targets, **kw), logits),
           (lambda x, **kw: rlhf_fast.fused_linear_logprobs(x, weight, targets, **kw), torch.eye(17, device=device)))
    for op, leaf in ops:
        with pytest.raises(ValueError, match="kept set"):
            op(leaf, temperature=0.7, cutoffs=cutoffs, backend=backend)
        outs = []
        for g_logp in (g[0], g[0].index_fill(0, off, 0.0)):
            x = leaf.clone().requires_grad_()
            logp, ent = op(x, temperature=0.7, cutoffs=cutoffs, return_entropy=True, check_kept=False,
                           backend=backend)
            torch.autograd.backward([logp, ent], [g_logp, g[1]])
            outs.append((logp, ent, x.grad))
        assert logp[off].isneginf().all() and logp.isneginf().sum() == len(off) > 0
        assert torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
