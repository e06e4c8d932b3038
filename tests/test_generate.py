"""generate(): KV cache vs full recompute, ragged batches vs each prompt alone, seeds, EOS handling,
and agreement of the returned logprobs with the training forward.

Token sequences are compared exactly (greedy is deterministic and the two paths differ in logits by
~1e-6 on logits spread over +-4, far from any near-tie at these seeds); logprobs to 1e-4 as in fp32
forward parity.
"""
import pytest
import torch

from gpt_helpers import V, gpt2_config, modern_config, sharpen
from rlhf_fast.model import GPT, GPTConfig, generate

# untied embeddings: a random tied GPT-2 mostly repeats its last input token, which would make
# token-for-token comparisons nearly vacuous
CONFIGS = {"gpt2": lambda: gpt2_config(tie_word_embeddings=False), "modern": modern_config}


def make_model(name, device):
    return sharpen(GPT(CONFIGS[name]())).to(device).eval()


def ragged_prompts(device, lengths=(5, 1, 12, 8)):
    return [torch.randint(1, V, (n,), device=device) for n in lengths]


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_greedy_with_cache_equals_full_recompute(device, name):
    model = make_model(name, device)
    prompts = ragged_prompts(device)
    cached = generate(model, prompts, 16, temperature=0.0)
    recomputed = generate(model, prompts, 16, temperature=0.0, use_cache=False)
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert len(set(cached.tokens.flatten().tolist())) > 8  # not a degenerate repeat of one token
    assert cached.mask.all()


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_ragged_batch_equals_each_prompt_alone(device, name):
    model = make_model(name, device)
    prompts = ragged_prompts(device)
    batch = generate(model, prompts, 12, temperature=0.0)
    for b, p in enumerate(prompts):
        alone = generate(model, [p], 12, temperature=0.0)
        assert torch.equal(batch.tokens[b], alone.tokens[0])


def test_left_padded_tensor_input_equals_list_input(device):
    model = make_model("gpt2", device)
    prompts = ragged_prompts(device)
    P = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    mask = torch.zeros_like(idx)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):], mask[b, P - len(p):] = p, 1
    from_list = generate(model, prompts, 6, seed=3)
    from_tensor = generate(model, idx, 6, attention_mask=mask, seed=3)
    assert torch.equal(from_list.tokens, from_tensor.tokens)
    assert torch.equal(from_list.prompts, idx) and torch.equal(from_list.prompt_mask, mask)


def test_seeded_sampling_is_reproducible(device):
    model = make_model("modern", device)
    prompts = ragged_prompts(device)
    kw = dict(temperature=0.9, top_k=50, top_p=0.95)
    a = generate(model, prompts, 16, seed=1234, **kw)
    b = generate(model, prompts, 16, seed=1234, **kw)
    c = generate(model, prompts, 16, seed=4321, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_rows_stop_at_eos_and_are_padded(device):
    model = make_model("gpt2", device)
    prompts = ragged_prompts(device)
    free = generate(model, prompts, 10, temperature=0.0)
    eos = free.tokens[0, 3].item()  # row 0 emits it at step 3 (or earlier, if it repeats)
    out = generate(model, prompts, 10, temperature=0.0, eos_token_id=eos, pad_token_id=-1)
    no_cache = generate(model, prompts, 10, temperature=0.0, eos_token_id=eos, pad_token_id=-1, use_cache=False)
    assert torch.equal(out.tokens, no_cache.tokens)
    for b in range(len(prompts)):
        hits = (free.tokens[b] == eos).nonzero()
        stop = hits[0].item() + 1 if len(hits) else 10  # tokens kept, EOS included
        assert torch.equal(out.tokens[b, :stop], free.tokens[b, :stop])
        assert (out.tokens[b, stop:] == -1).all() and (out.logprobs[b, stop:] == 0).all()
        assert out.mask[b].tolist() == [1] * stop + [0] * (10 - stop)


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_logprobs_match_the_training_forward(device, name):
    """What PPO relies on: the behaviour logprobs from sampling equal model(seq, targets) at those tokens."""
    model = make_model(name, device)
    out = generate(model, ragged_prompts(device), 9, temperature=0.7, seed=7)
    seq, mask = out.sequences, out.attention_mask
    P = out.prompts.shape[1]
    with torch.no_grad():
        logprobs, _ = model(seq[:, :-1], seq[:, 1:], attention_mask=mask[:, :-1], temperature=0.7)
    resp = logprobs[:, P - 1:]  # logprob of each response token, (B, 9)
    assert (resp - out.logprobs).abs().max().item() < 1e-4
    assert (out.logprobs <= 0).all() and out.logprobs.min() < -0.1


def test_bad_arguments_raise(device):
    model = make_model("gpt2", device)
    prompts = ragged_prompts(device)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts, 0)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, prompts, 60)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(model, [prompts[0], prompts[1][:0]], 3)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, prompts, 3, attention_mask=torch.ones(4, 3, device=device))
    with pytest.raises(ValueError, match="head='lm'"):
        generate(model.with_head("value"), prompts, 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompts, 3, temperature=-1.0)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_k=40, top_p=0.9, seed=11)])
def test_cuda_graph_decode_equals_eager(device, sampling):
    model = make_model("modern", device)
    prompts = ragged_prompts(device)
    if device.type != "cuda":
        with pytest.raises(ValueError, match="cuda_graph"):
            generate(model, prompts, 4, cuda_graph=True, **sampling)
        return
    eager = generate(model, prompts, 24, eos_token_id=7, **sampling)
    graphed = generate(model, prompts, 24, eos_token_id=7, cuda_graph=True, **sampling)
    assert torch.equal(eager.tokens, graphed.tokens) and torch.equal(eager.mask, graphed.mask)
    assert (eager.logprobs - graphed.logprobs).abs().max().item() < 1e-5


def test_generate_method_and_config_backend(device):
    model = GPT(GPTConfig(**{**gpt2_config().to_dict(), "backend": "reference"})).to(device).eval()
    out = model.generate(ragged_prompts(device), 4, temperature=0.0)
    assert out.tokens.shape == (4, 4) and out.tokens.dtype == torch.int64
    assert out.sequences.shape == (4, 12 + 4)
