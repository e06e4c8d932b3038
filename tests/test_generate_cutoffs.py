"""generate(return_cutoffs=True): each step's kept set, (B, T_new, 2), (-inf, 0) after EOS.

Checked against the training forward: the logits it computes for the generated sequences (within
~1e-5 of the decode step's), restricted to the kept set the cutoffs describe, give the behaviour
logprobs generate returned; grouped, no-cache and CUDA-graph runs give the same cutoffs. The kept
set is read off the recomputed logits with the plain rule: t lies mid-gap, so ~1e-6 of recomputation
noise does not move a token across it (fp32 logits of a random model: no tie at a cut).
"""
import pytest
import torch

from gpt_helpers import V, modern_config, sharpen
from conftest import need_backend
from rlhf_fast.model import GPT, generate

FILTERS = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)


def make_model(device, backend="reference"):
    return sharpen(GPT(modern_config(backend=backend))).to(device).eval()


def prompts(device, lengths=(5, 1, 9)):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, V, (n,), generator=g).to(device) for n in lengths]


def kept_logprobs(model, out, temperature):
    """(B, T_new) log_softmax over each step's kept set at the generated token, from the training forward."""
    P = out.prompts.shape[1]
    with torch.no_grad():
        logits = model(out.sequences[:, :-1], attention_mask=out.attention_mask[:, :-1])[:, P - 1:]
    x = logits.float() / temperature  # (B, T_new, V)
    t, i = out.cutoffs[..., 0].float()[..., None], out.cutoffs[..., 1][..., None]
    v = torch.arange(x.shape[-1], device=x.device, dtype=torch.float64)
    kept = (x > t) | ((x == t) & (v >= i))
    return torch.log_softmax(x.masked_fill(~kept, float("-inf")), -1).gather(-1, out.tokens[..., None])[..., 0]


@pytest.mark.parametrize("sample_backend", ["reference", "cuda"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_cutoffs_give_the_behaviour_logprobs(device, sample_backend, group_size):
    need_backend(sample_backend, device)
    model = make_model(device)
    kw = dict(seed=5, group_size=group_size, sample_backend=sample_backend, **FILTERS)
    plain = generate(model, prompts(device), 12, **kw)
    kw["eos_token_id"] = int(plain.tokens[0, 4])  # row 0 stops at step 4 (or before): later steps are pads
    plain = generate(model, prompts(device), 12, **kw)
    out = generate(model, prompts(device), 12, return_cutoffs=True, **kw)
    assert plain.cutoffs is None
    assert torch.equal(out.tokens, plain.tokens) and torch.equal(out.logprobs, plain.logprobs)
    B = 3 * group_size
    assert out.cutoffs.shape == (B, 12, 2) and out.cutoffs.dtype == torch.float64
    real = out.mask.bool()
    assert not bool(real.all()), "no row stopped early: the padding rule is not exercised"
    pad = out.cutoffs[~real]
    assert (pad[:, 0] == float("-inf")).all() and (pad[:, 1] == 0).all()
    assert torch.isfinite(out.cutoffs[real]).all()  # every step of a real token had a filter on
    lp = kept_logprobs(model, out, FILTERS["temperature"])
    assert (lp[real] - out.logprobs[real]).abs().max().item() < 1e-4
    oracle = generate(model, prompts(device), 12, return_cutoffs=True, use_cache=False, **kw)
    assert torch.equal(oracle.tokens, out.tokens)
    torch.testing.assert_close(oracle.cutoffs, out.cutoffs, rtol=1e-5, atol=1e-5)


def test_unfiltered_and_greedy_steps(device):
    model = make_model(device)
    out = generate(model, prompts(device), 4, temperature=1.0, seed=1, return_cutoffs=True)
    assert (out.cutoffs[..., 0] == float("-inf")).all() and (out.cutoffs[..., 1] == 0).all()
    greedy = generate(model, prompts(device), 4, temperature=0.0, return_cutoffs=True)
    assert torch.equal(greedy.cutoffs[..., 1].long(), greedy.tokens)  # (x_max, argmax)
    with pytest.raises(ValueError, match="return_cutoffs"):
        generate(model, prompts(device), 2, return_cutoffs=1)


def test_cuda_graph_cutoffs_equal_eager(device):
    if device.type != "cuda":
        pytest.skip("needs --device=cuda")
    need_backend("cuda", device)
    model = make_model(device, backend="auto")
    kw = dict(seed=11, eos_token_id=7, return_cutoffs=True, **FILTERS)
    eager = generate(model, prompts(device), 24, **kw)
    graphed = generate(model, prompts(device), 24, cuda_graph=True, **kw)
    assert torch.equal(eager.tokens, graphed.tokens)
    assert torch.equal(eager.cutoffs, graphed.cutoffs)
