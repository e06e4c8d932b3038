"""generate(): KV cache vs full recompute, ragged batches vs each prompt alone, seeds, EOS handling,
and agreement of the returned logprobs with the training forward.

Token sequences are compared exactly (greedy is deterministic and the two paths differ in logits by
~1e-6 on logits spread over +-4, far from any near-tie at these seeds); logprobs to 1e-4 as in fp32
forward parity.
"""
import pytest
import torch

from gpt_helpers import V, gpt2_config, modern_config, sharpen
from sync_helpers import HostReads
import rlhf_fast
from rlhf_fast.model import GPT, GPTConfig, KVCache, decode_one_token, generate, prefill
from rlhf_fast.model.generate import decode_n_tokens, sampling_state
from rlhf_fast.reference.sample import PARAM_DTYPES

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
    pad = model.config.vocab_size - 1  # pads are ids of the vocabulary (sequences feed them to the model)
    out = generate(model, prompts, 10, temperature=0.0, eos_token_id=eos, pad_token_id=pad)
    no_cache = generate(model, prompts, 10, temperature=0.0, eos_token_id=eos, pad_token_id=pad, use_cache=False)
    assert torch.equal(out.tokens, no_cache.tokens)
    for b in range(len(prompts)):
        hits = (free.tokens[b] == eos).nonzero()
        stop = hits[0].item() + 1 if len(hits) else 10  # tokens kept, EOS included
        assert torch.equal(out.tokens[b, :stop], free.tokens[b, :stop])
        assert (out.tokens[b, stop:] == pad).all() and (out.logprobs[b, stop:] == 0).all()
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


def test_holes_and_ids_outside_the_vocabulary_are_refused_by_name(device):
    """Issue 14.7: a mask with a hole, and token / EOS / pad ids outside the vocabulary, each a ValueError
    naming the argument (an embedding lookup would raise a bare IndexError, or read out of bounds on GPU)."""
    model = make_model("gpt2", device)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (2, 5), device=device)
    holed = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 1]], device=device)
    with pytest.raises(ValueError, match=r"attention_mask row 0 has a hole"):
        generate(model, prompts, 3, attention_mask=holed)
    with pytest.raises(ValueError, match=r"attention_mask row 1 has no token"):
        generate(model, prompts, 3, attention_mask=torch.tensor([[1, 1, 1, 0, 0], [0] * 5], device=device))
    with pytest.raises(ValueError, match="only 0 and 1"):
        generate(model, prompts, 3, attention_mask=torch.full_like(prompts, 2))
    bad = prompts.clone()
    bad[1, 3] = vocab
    with pytest.raises(ValueError, match=rf"prompts\[1\] holds token id {vocab} at position 3"):
        generate(model, bad, 3)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds token id -1"):
        generate(model, [torch.tensor([3, -1], device=device)], 3)
    for kwargs, name in ((dict(eos_token_id=vocab), "eos_token_id"), (dict(eos_token_id=[1, -2]), "eos_token_id"),
                         (dict(pad_token_id=vocab + 5), "pad_token_id")):
        with pytest.raises(ValueError, match=name):
            generate(model, prompts, 3, **kwargs)
    # padding left and right, an id outside the vocabulary in a padded slot: accepted (never read)
    padded = prompts.clone()
    padded[0, 0] = vocab + 100
    out = generate(model, padded, 2, attention_mask=torch.tensor([[0, 1, 1, 1, 0], [1] * 5], device=device))
    assert out.tokens.shape == (2, 2)


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


def test_decode_step_has_no_host_sync(device):
    """What CUDA-graph capture needs, checked on any device: sampling (seed/offset/parameters as device
    tensors, check_nan=False) plus `decode_one_token` trace as one graph (fullgraph: any .item() or
    data-dependent shape would break it), and replaying it matches eager steps, cache state included."""
    model = make_model("modern", device)
    B = 3
    idx = torch.randint(0, V, (B, 5), device=device)
    lengths = torch.tensor([5, 2, 4], dtype=torch.int32, device=device)
    caches = [KVCache(model.config, B, 12, device, torch.float32) for _ in range(2)]
    logits = [prefill(model, idx, lengths, c) for c in caches]
    sampling = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.0, seed=3)
    params = [sampling_state(sampling, B, device) for _ in range(2)]  # what both decode loops use

    def step(logits, cache, params):
        token, logprob = rlhf_fast.sample(logits, return_logprobs=True, check_nan=False, **params)
        params["offset"].add_(1)
        return token, logprob, decode_one_token(model, token, cache)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(3):
            (tok_c, lp_c, logits[0]), (tok_e, lp_e, logits[1]) = (compiled(logits[0], caches[0], params[0]),
                                                                    step(logits[1], caches[1], params[1]))
            assert torch.equal(tok_c, tok_e) and torch.equal(lp_c, lp_e)
            assert (logits[0] - logits[1]).abs().max().item() < 1e-5
    assert caches[0].seqlens.tolist() == caches[1].seqlens.tolist() == [8, 5, 7]
    assert torch.equal(caches[0].k, caches[1].k)


def test_generate_method_and_config_backend(device, monkeypatch):
    """GPT.generate runs generate() on the config's backend: with backend="reference" the sampler takes
    its reference path (spied), and the greedy tokens equal an argmax loop over full forwards."""
    from rlhf_fast import _backend
    model = sharpen(GPT(gpt2_config(tie_word_embeddings=False, backend="reference"))).to(device).eval()
    prompts = ragged_prompts(device)
    asked = []
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda op, backend, *a, **kw: asked.append((op, backend)) or
                        real(op, backend, *a, **kw))
    out = model.generate(prompts, 4, temperature=0.0)
    ops = {op for op, _ in asked}
    assert {"sample", "causal_attention"} <= ops and ({"decode_attention", "causal_attention_varlen"} & ops), ops
    assert {backend for _, backend in asked} == {"reference"}, asked
    assert out.sequences.shape == (4, 12 + 4)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            seq = prompt
            for step in range(4):
                nxt = model(seq[None])[0, -1].argmax()
                assert out.tokens[row, step].item() == nxt.item(), (row, step)
                seq = torch.cat([seq, nxt[None]])


def _top_p_boundary_rows(device):
    """Rows [0] * m + [x] whose last token's float32 probability lies in (float32(1 - 0.9),
    1 - float32(0.9)]: top_p=0.9 keeps that token when top_p is float64, as the op takes it, and cuts it
    when top_p was rounded to float32 first."""
    rows = []
    for m in range(1, 40):
        lows = (torch.log(torch.tensor(m / 9.0)) + torch.arange(-30, 30) * 1.2e-7).float()
        cand = torch.cat([torch.zeros(len(lows), m), lows[:, None], torch.full((len(lows), 40 - m), float("-inf"))], 1)
        p_low = torch.softmax(cand, -1)[:, m]
        rows.append(cand[(p_low > 0.10000000149011612) & (p_low <= 0.10000002384185791)])
    rows = torch.cat(rows)
    assert len(rows) >= 20
    return rows.to(device)


def test_sampling_state_draws_what_eager_scalars_draw(device):
    """The parameters the decode loops (eager and CUDA-graph) build match the op's own scalar conversion:
    same dtypes, and the same tokens and logprobs on rows where float32 top_p would move the cut."""
    rows = _top_p_boundary_rows(device)
    sampling = dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=4, backend="reference")
    state = sampling_state(sampling, rows.shape[0], device)
    assert {name: state[name].dtype for name in PARAM_DTYPES} == PARAM_DTYPES
    assert state["seed"].tolist() == [4] and state["offset"].tolist() == [0]
    eager = rlhf_fast.sample(rows, top_p=0.9, seed=4, return_logprobs=True, backend="reference")
    built = rlhf_fast.sample(rows, return_logprobs=True, backend="reference", **state)
    assert torch.equal(eager[0], built[0]) and torch.equal(eager[1], built[1])
    rounded = rlhf_fast.sample(rows, return_logprobs=True, backend="reference",
                               **{**state, "top_p": state["top_p"].float()})
    assert not torch.equal(rounded[1], eager[1])  # float32 top_p does move the cut on these rows


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_decode_loop_reads_the_host_once_not_per_token(device, backend, monkeypatch):
    """16 sampled tokens: no host read per token (seed and offset stay on the device, the sampler's
    check is off); the one read is the end-of-loop check for unsampled rows. The decode attention
    reference's CPU shortcut (it reads the cache lengths, free on CPU, never on a GPU) is off, so the
    loop runs as it would on CUDA."""
    from conftest import need_backend
    from rlhf_fast.reference import decode_attention as decode_ref
    need_backend(backend, device)
    monkeypatch.setattr(decode_ref, "host_length_span", lambda seqlens: None)
    model = make_model("modern", device)
    idx = torch.randint(0, V, (3, 5), device=device)
    cache = KVCache(model.config, 3, 21, device, torch.float32)
    with torch.no_grad():
        logits = prefill(model, idx, torch.tensor([5, 2, 4], dtype=torch.int32, device=device), cache)
        rlhf_fast.sample(logits, seed=1, backend=backend)  # builds/loads the extension outside the count
        sampling = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3, backend=backend)
        reads = HostReads(monkeypatch)
        tokens, _, mask = decode_n_tokens(model, logits, cache, 16, sampling, None, 0)
    assert reads.calls == ["__bool__"], reads.calls
    assert mask.all() and (tokens >= 0).all()


def test_unsampled_row_is_reported_after_the_loop(device):
    """With the per-step check off, a NaN row still raises, naming the step and row."""
    model = make_model("modern", device)
    logits = torch.randn(3, V, device=device)
    logits[1, 4] = float("nan")
    cache = KVCache(model.config, 3, 8, device, torch.float32)
    cache.seqlens.fill_(1)
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, backend="reference")
    with torch.no_grad(), pytest.raises(ValueError, match="step 0 could not sample row 1"):
        decode_n_tokens(model, logits, cache, 3, sampling, None, 0)
