"""Oracle: the GPT loaded from HF GPT-2 against transformers' GPT-2: logits (plain and left-padded
with position_ids) against a float64 copy, logprobs and entropies against trl's functions on those
logits, and greedy generation against HF generate, token for token.
"""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import need_backend
from oracle_helpers import KERNEL_BACKENDS, left_padded, trl_entropy_from_logits, trl_selective_log_softmax
from parity import assert_close_to_reference


def _hf_gpt2(seed):
    """Random odd GPT-2: 3 heads of 16, vocab 301. Weights scaled up so greedy argmaxes are well separated."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=3, n_embd=48, vocab_size=301, n_positions=64, initializer_range=0.2,
                     bos_token_id=300, eos_token_id=300, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _ours(hf, backend, device):
    from rlhf_fast.model import GPT
    from rlhf_fast.model.hf import config_from_hf
    config = config_from_hf(hf.config)
    config.backend = backend
    return GPT.from_hf_gpt2(hf, config=config).to(device).eval()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpt_from_hf_gpt2_logits_vs_hf(backend, device):
    need_backend(backend, device)
    hf = _hf_gpt2(80)
    model = _ours(hf, backend, device)
    hf64 = _hf_gpt2(80).double()
    idx, mask = left_padded(81)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(idx.to(device)).cpu()
        padded = model(idx.to(device), attention_mask=mask.to(device)).cpu()
        logp, ent = model(idx.to(device), idx.roll(-1, 1).to(device), attention_mask=mask.to(device))
        for ours, kw in ((full, {}), (padded, dict(attention_mask=mask, position_ids=pos))):
            want = hf64(idx, **kw).logits
            same = hf(idx, **kw).logits
            real = mask.bool() if kw else torch.ones_like(mask, dtype=torch.bool)
            assert_close_to_reference(ours[real], want[real], same[real], atol=1e-5, name="logits")
        want = hf64(idx, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    lp_trl = trl_selective_log_softmax(want, idx.roll(-1, 1))
    torch.testing.assert_close(logp.cpu()[real].double(), lp_trl[real], atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.cpu()[real].double(), trl_entropy_from_logits(want)[real], atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_generate_greedy_vs_hf_generate(backend, device):
    need_backend(backend, device)
    from rlhf_fast.model import generate
    hf = _hf_gpt2(90)
    model = _ours(hf, backend, device)
    idx, mask = left_padded(91, T=7, lead=(0, 2, 6))
    n = 6
    with torch.no_grad():
        want = hf.generate(idx, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                           eos_token_id=300, output_scores=True, return_dict_in_generate=True)
    out = generate(model, idx.to(device), n, attention_mask=mask.to(device), temperature=0.0, eos_token_id=300,
                   pad_token_id=0)
    scores = torch.stack(want.scores, 1)  # (B, n, V)
    top2 = scores.topk(2, -1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-3  # no near-tie can excuse a mismatch
    got = want.sequences[:, idx.shape[1]:]
    assert torch.equal(out.tokens.cpu()[:, :got.shape[1]], got)
