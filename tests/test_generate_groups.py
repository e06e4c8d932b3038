"""generate(group_size=G): one prefill per prompt, its cache broadcast to G rows, gives exactly the
samples of generating each prompt G times (same seed: the sampler keys its noise by row and step)."""
import pytest
import torch

from gpt_helpers import V, gpt2_config, modern_config, sharpen
from rlhf_fast.model import GPT, generate



def test_grouped_generation_equals_repeated_prompts(device):
    # reference ops and GQA + RoPE: what is tested is the grouping, not the kernels (test_generate.py)
    model = sharpen(GPT(modern_config(backend="reference"))).to(device).eval()
    prompts = [torch.randint(1, V, (n,), device=device) for n in (5, 1, 9)]
    G = 3
    kw = dict(temperature=1.0, top_k=40, seed=77, eos_token_id=int(prompts[0][0]), pad_token_id=0)
    grouped = generate(model, prompts, 10, group_size=G, **kw)
    repeated = generate(model, [p for p in prompts for _ in range(G)], 10, **kw)
    assert grouped.tokens.shape == (len(prompts) * G, 10)
    for name_ in ("tokens", "mask", "prompts", "prompt_mask"):
        assert torch.equal(getattr(grouped, name_), getattr(repeated, name_)), name_
    torch.testing.assert_close(grouped.logprobs, repeated.logprobs, rtol=0, atol=1e-5)
    # the samples of a group differ (else the test could not tell rows apart)
    assert len({tuple(r) for r in grouped.tokens[:G].tolist()}) > 1
    # and equal the no-cache oracle's grouped rows
    oracle = generate(model, prompts, 10, group_size=G, use_cache=False, **kw)
    assert torch.equal(grouped.tokens, oracle.tokens)


def test_group_size_must_be_a_positive_int(device):
    model = GPT(gpt2_config()).to(device).eval()
    prompts = [torch.ones(3, dtype=torch.long, device=device)]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="group_size"):
            generate(model, prompts, 2, group_size=bad)
