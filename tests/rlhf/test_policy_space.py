"""The policy that samples is the policy that trains (rlhf_fast/rlhf/policy_space.py), and the exact KL.

With temperature 0.7, top_k 20, top_p 0.9 and min_p 0.05, a PPO and a GRPO rollout must give ratio 1 at
every token of the first minibatch (before any update) and a KL of 0 against an identical reference,
for the reference and the Triton backends. On a loop that takes the new and the reference logprobs over
the whole vocabulary while the sampler's behaviour logprobs are over the kept set, the ratio is the kept
mass (0.3 to 0.9 here), and the k1 KL its log. The exact KL (kl_kind=full), the reference's filtered
logprobs and the recomputed behaviour logprobs of logprob_space=full are checked against float64
computations from the materialized logits.
"""
import copy

import pytest
import torch

from conftest import need_backend
from parity import assert_close_to_reference

from rlhf_fast.model import GPT, GPTConfig
from rlhf_fast.rlhf import critic_free_trainer, ppo
from rlhf_fast.rlhf.config import build_config
from rlhf_fast.rlhf.critic_free_trainer import make_group_rollout, policy_update, resolve
from rlhf_fast.rlhf.rollout import kl_per_token, make_rollout, response_targets
from rlhf_fast.rlhf.runtime import Runtime, make_optimizer
from rlhf_fast.rlhf.tokenizer import get_tokenizer

FILTERS = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05}
T_NEW, B, G = 5, 3, 2


def tiny_models(backend, device, *, perturb_ref=False):
    tok = get_tokenizer("byte")
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=16, backend=backend)
    torch.manual_seed(1)
    policy = GPT(cfg).to(device).eval()
    with torch.no_grad():  # logits of std ~0.7 (GPT-2's init gives ~0.16): the filters keep 1 to 18 tokens
        policy.transformer.wte.weight.mul_(4.0)
    ref = copy.deepcopy(policy).requires_grad_(False)
    if perturb_ref:
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p) * p.std())
    return tok, {"policy": policy, "ref": ref, "value": policy.with_head("value").eval(),
                 "reward": policy.with_head("reward").eval().requires_grad_(False)}


def prompts_of(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(L),), generator=g).tolist() for L in torch.randint(2, 6, (n,), generator=g)]


def section(prefix, **kw):
    return {f"{prefix}.{k}": v for k, v in kw.items()}


def ppo_cfg(device, filters=True, **kw):
    over = {"run.device": str(device), "ppo.max_new_tokens": T_NEW, "ppo.rollout_batch_size": B,
            "ppo.gen_batch_size": B, "ppo.minibatch_size": B, "ppo.ppo_epochs": 1, "model.block_size": 16,
            **(section("ppo", **FILTERS) if filters else {}), **section("ppo", **kw)}
    return build_config(None, over)


def rl_cfg(device, filters=True, **kw):
    over = {"run.device": str(device), "rl.algo": "grpo", "rl.max_new_tokens": T_NEW, "rl.rollout_batch_size": B,
            "rl.gen_batch_size": B, "rl.group_size": G, "rl.minibatch_size": B * G, "rl.epochs": 1,
            "model.block_size": 16, **(section("rl", **FILTERS) if filters else {}), **section("rl", **kw)}
    return build_config(None, over)


def capture_policy_loss(monkeypatch, module):
    """Record the (new, behaviour, mask) logprobs every policy_loss call of `module` sees."""
    calls, real = [], module.policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), mask.clone()))
        return real(logprobs, old_logprobs, advantages, mask, *args, **kwargs)
    monkeypatch.setattr(module, "policy_loss", spy)
    return calls


def ppo_first_minibatch(models, tok, cfg, device, monkeypatch):
    prompts = prompts_of(B)
    prompt_len = max(map(len, prompts))
    b = make_rollout(models["policy"], models["ref"], models["value"], models["reward"], prompts, prompt_len, tok,
                     cfg, seed=3, device=device)
    calls = capture_policy_loss(monkeypatch, ppo)
    opts = {k: make_optimizer(models[k], 1e-3, 0.0) for k in ("policy", "value")}
    _, _, adv, ret = ppo.advantages_and_returns(b, 0.1, cfg.ppo)
    ppo.ppo_update(models, opts, b, adv, ret, prompt_len, cfg, Runtime(device), step=1)
    return b, calls[0], prompt_len


def grpo_first_minibatch(models, tok, cfg, device, monkeypatch):
    prompts = prompts_of(B)
    prompt_len = max(map(len, prompts))
    fields = [{"prompt": str(p)} for p in prompts]
    preset = resolve(cfg.rl)

    def length_reward(prompt_texts, responses, rows):
        return torch.tensor([float(len(r)) for r in responses])
    b = make_group_rollout(models, prompts, fields, prompt_len, tok, cfg.rl, seed=3, device=device,
                           rewards=length_reward)
    calls = capture_policy_loss(monkeypatch, critic_free_trainer)
    _, adv = critic_free_trainer.advantages(b, cfg.rl, preset)
    stats = policy_update(models, make_optimizer(models["policy"], 1e-3, 0.0), b, adv, prompt_len, cfg,
                          Runtime(device), 1, preset)
    return b, calls[0], stats


def assert_ratio_one(call):
    new, old, mask = call
    on = mask > 0
    assert bool(on.any())
    ratio = torch.exp(new[on] - old[on])
    assert float((ratio - 1).abs().max()) <= 1e-5, f"ratio off 1 by {float((ratio - 1).abs().max()):.3g}"


def every_position_cut(b) -> bool:
    """The filters removed tokens at every response position (a cut below which tokens were dropped)."""
    return bool(torch.isfinite(b.cutoffs[..., 0])[b.mask > 0].all())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kl_kind", ["k1", "full"])
def test_ppo_ratio_is_one_and_kl_zero_with_every_filter(backend, kl_kind, device, monkeypatch):
    need_backend(backend, device)
    tok, models = tiny_models(backend, device)
    cfg = ppo_cfg(device, kl_kind=kl_kind)
    b, call, _ = ppo_first_minibatch(models, tok, cfg, device, monkeypatch)
    assert every_position_cut(b)
    assert_ratio_one(call)
    kl = kl_per_token(b, kl_kind)
    assert float(kl[b.mask > 0].abs().max()) <= 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kl_kind", ["k1", "full"])
def test_grpo_ratio_is_one_and_kl_zero_with_every_filter(backend, kl_kind, device, monkeypatch):
    need_backend(backend, device)
    tok, models = tiny_models(backend, device)
    kl_in = "reward" if kl_kind == "k1" else "loss"  # k1 shapes the reward; the exact KL also goes in the loss
    cfg = rl_cfg(device, kl_kind=kl_kind, kl_in=kl_in)
    b, call, stats = grpo_first_minibatch(models, tok, cfg, device, monkeypatch)
    assert_ratio_one(call)
    assert float(kl_per_token(b, kl_kind)[b.mask > 0].abs().max()) <= 1e-6
    if kl_in == "loss":
        assert abs(stats["kl_loss"]) <= 1e-6


def float64_terms(models, b, prompt_len, temperature, cutoffs):
    """(policy logprobs, reference logprobs, exact KL), each (B, T) float64 and float32 versions, from the
    materialized logits; over the kept set decided on the policy's float32 logits when `cutoffs`."""
    targets = response_targets(b.sequences, b.mask, prompt_len)
    cols = slice(prompt_len - 1, prompt_len - 1 + b.mask.shape[1])
    with torch.no_grad():
        z = models["policy"](b.sequences, attention_mask=b.attention_mask)[:, cols].float()  # (B, T, V)
        zr = models["ref"](b.sequences, attention_mask=b.attention_mask)[:, cols].float()
    tgt = targets[:, cols].clamp_min(0)
    x = z / torch.tensor(temperature, dtype=torch.float32)
    keep = torch.ones_like(x, dtype=torch.bool)
    if cutoffs is not None:
        t, i = cutoffs[..., 0].float()[..., None], cutoffs[..., 1][..., None]
        v = torch.arange(x.shape[-1], device=x.device)
        keep = (x > t) | ((x == t) & (v >= i))
    out = []
    for dtype in (torch.float64, torch.float32):
        lp = (z.to(dtype) / temperature).masked_fill(~keep, float("-inf")).log_softmax(-1)
        lq = (zr.to(dtype) / temperature).masked_fill(~keep, float("-inf")).log_softmax(-1)
        kl = torch.where(keep, lp.exp() * (lp - lq), 0.0).sum(-1)
        m = b.mask > 0
        out.append([torch.where(m, lp.gather(-1, tgt[..., None])[..., 0], 0.0),
                    torch.where(m, lq.gather(-1, tgt[..., None])[..., 0], 0.0), torch.where(m, kl, 0.0)])
    return out


@pytest.mark.parametrize("space", ["filtered", "full"])
def test_scoring_terms_match_float64_with_a_different_reference(space, device):
    tok, models = tiny_models("reference", device, perturb_ref=True)
    cfg = ppo_cfg(device, kl_kind="full", logprob_space=space)
    prompts = prompts_of(B)
    prompt_len = max(map(len, prompts))
    b = make_rollout(models["policy"], models["ref"], models["value"], models["reward"], prompts, prompt_len, tok,
                     cfg, seed=3, device=device)
    (lp64, lq64, kl64), (lp32, lq32, kl32) = float64_terms(models, b, prompt_len, cfg.ppo.temperature,
                                                           b.cutoffs if space == "filtered" else None)
    assert_close_to_reference(b.ref_logprobs, lq64, lq32, name="ref_logprobs")
    assert_close_to_reference(b.kl, kl64, kl32, name="kl")
    assert float(kl64[b.mask > 0].max()) > 1e-3  # the reference differs (a kept set of 1 token has KL 0)
    assert_close_to_reference(b.logprobs, lp64, lp32, name="behaviour logprobs")


def test_full_space_recomputes_the_behaviour_logprobs(device, monkeypatch):
    """The sampler's logprobs are over the kept set; under logprob_space=full they are replaced by the
    unfiltered ones (never mixed), which are lower by the log of the kept mass."""
    tok, models = tiny_models("reference", device)
    gen_lp = []
    real_generate = GPT.generate
    monkeypatch.setattr(GPT, "generate",
                        lambda self, *a, **k: gen_lp.append(real_generate(self, *a, **k)) or gen_lp[-1])
    b, call, _ = ppo_first_minibatch(models, tok, ppo_cfg(device, logprob_space="full"), device, monkeypatch)
    sampled = gen_lp[0].logprobs
    on = b.mask > 0
    assert float((sampled[on] - b.logprobs[on]).min()) > 1e-3  # the kept mass was < 1 at every token
    assert_ratio_one(call)


def test_no_filter_and_an_estimator_do_no_extra_work(device, monkeypatch):
    """Without a filter both definitions are one distribution: no cutoffs asked or passed, no KL pass,
    no hidden-state forward."""
    import rlhf_fast
    tok, models = tiny_models("reference", device)
    real_forward, real_generate, real_logprobs = GPT.forward, GPT.generate, rlhf_fast.fused_linear_logprobs

    def forward(self, *args, **kwargs):
        assert kwargs.get("cutoffs") is None and kwargs.get("reference") is None, sorted(kwargs)
        assert not kwargs.get("return_hidden")
        return real_forward(self, *args, **kwargs)

    def logprobs(*args, **kwargs):
        assert kwargs.get("cutoffs") is None
        return real_logprobs(*args, **kwargs)

    def generate(self, *args, **kwargs):
        assert "return_cutoffs" not in kwargs
        return real_generate(self, *args, **kwargs)

    def no_kl(*args, **kwargs):
        raise AssertionError("fused_linear_kl_divergence called without a filter or kl_kind=full")
    monkeypatch.setattr(GPT, "forward", forward)
    monkeypatch.setattr(GPT, "generate", generate)
    monkeypatch.setattr(rlhf_fast, "fused_linear_kl_divergence", no_kl)
    monkeypatch.setattr(rlhf_fast, "fused_linear_logprobs", logprobs)
    for space in ("filtered", "full"):
        b, call, _ = ppo_first_minibatch(models, tok, ppo_cfg(device, filters=False, logprob_space=space), device,
                                         monkeypatch)
        assert_ratio_one(call)


def test_exact_kl_gradient_through_the_model_matches_float64(device):
    """GPT.forward(reference=...) gives a KL whose gradient w.r.t. every policy weight is the gradient of
    the KL over the same kept sets computed from the materialized logits, in float64 (the backbone, which
    has no float64 path, stays float32 in both)."""
    tok, models = tiny_models("reference", device, perturb_ref=True)
    policy, ref = models["policy"], models["ref"]
    g = torch.Generator().manual_seed(4)
    seqs = torch.randint(0, 256, (2, 9), generator=g).to(device)
    amask = torch.ones_like(seqs)
    with torch.no_grad():
        x = policy(seqs, attention_mask=amask).float() / torch.tensor(0.7)
        zr = ref(seqs, attention_mask=amask).float() / torch.tensor(0.7)
    t = x.topk(5, -1).values[..., -1]  # a cut at each position's 5th largest x: the kept set is x >= t
    cutoffs = torch.stack((t.double(), torch.zeros_like(t, dtype=torch.float64)), -1)
    keep = x >= t[..., None]
    targets = x.argmax(-1)  # a kept token at every position but the last
    targets[:, -1] = -100
    reference = (ref(seqs, attention_mask=amask, return_hidden=True), ref.lm_head.weight)
    weights = torch.rand(targets.shape, generator=g).to(device)
    grads = []
    for head_dtype in (None, torch.float64, torch.float32):
        policy.zero_grad()
        if head_dtype is None:
            kl = policy(seqs, targets, attention_mask=amask, temperature=0.7, cutoffs=cutoffs, reference=reference)[2]
        else:
            z = policy(seqs, attention_mask=amask).to(head_dtype) / 0.7
            lp = torch.where(keep, z.masked_fill(~keep, float("-inf")).log_softmax(-1), 0.0)  # 0 off K: no
            lq = torch.where(keep, zr.to(head_dtype).masked_fill(~keep, float("-inf")).log_softmax(-1), 0.0)  # inf-inf
            kl = (keep * lp.exp() * (lp - lq)).sum(-1) * (targets != -100)
        (kl * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    for name in grads[0]:
        assert_close_to_reference(grads[0][name], grads[1][name], grads[2][name], name=f"d {name}")


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_tokens_that_leave_their_kept_set_are_dropped_from_the_loss(algo, device):
    """After an update the drawn token can fall off its position's kept set (probability 0 under the
    current pi_K): the later minibatches leave it out of the loss (and of GRPO's k3 term) and count it,
    instead of failing or turning the gradient NaN (clip_and_step raises on a non-finite one)."""
    tok, models = tiny_models("reference", device)
    prompts = prompts_of(B)
    prompt_len = max(map(len, prompts))
    rt = Runtime(device)
    if algo == "ppo":
        cfg = ppo_cfg(device, ppo_epochs=4)
        b = make_rollout(models["policy"], models["ref"], models["value"], models["reward"], prompts, prompt_len,
                         tok, cfg, seed=3, device=device)
        opts = {k: make_optimizer(models[k], 0.05, 0.0) for k in ("policy", "value")}
        _, _, adv, ret = ppo.advantages_and_returns(b, 0.1, cfg.ppo)
        stats = ppo.ppo_update(models, opts, b, adv, ret, prompt_len, cfg, rt, step=1)
    else:
        cfg = rl_cfg(device, epochs=4)
        preset = resolve(cfg.rl)
        b = make_group_rollout(models, prompts, [{"prompt": str(p)} for p in prompts], prompt_len, tok, cfg.rl,
                               seed=3, device=device,
                               rewards=lambda p, responses, rows: torch.tensor([float(sum(map(ord, r)) % 7)
                                                                                for r in responses]))
        _, adv = critic_free_trainer.advantages(b, cfg.rl, preset)
        assert bool(adv.abs().sum() > 0)
        stats = policy_update(models, make_optimizer(models["policy"], 0.05, 0.0), b, adv, prompt_len, cfg, rt, 1,
                              preset)
    assert stats["left_kept_set"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if k != "left_kept_set")


def test_lora_reference_is_the_policy_with_adapters_off(device, monkeypatch):
    """A LoRA policy's reference (AdaptersOff: no second copy, the same lm_head) goes through the same
    path: ratio 1 and exact KL 0 at the first minibatch, with every filter on."""
    from rlhf_fast.model import apply_lora
    from rlhf_fast.rlhf.lora_stage import AdaptersOff
    tok, models = tiny_models("reference", device)
    apply_lora(models["policy"], 2, 4.0, 0.0, "all")
    models["ref"] = AdaptersOff(models["policy"])
    b, call, _ = ppo_first_minibatch(models, tok, ppo_cfg(device, kl_kind="full"), device, monkeypatch)
    assert every_position_cut(b)
    assert_ratio_one(call)
    assert float(kl_per_token(b, "full")[b.mask > 0].abs().max()) <= 1e-6


@pytest.mark.parametrize("with_ref", [True, False])
def test_grpo_full_space_recomputes_the_behaviour_logprobs(with_ref, device, monkeypatch):
    """GRPO under logprob_space=full, with a reference (the KL pass gives the recomputed logprobs) and
    without one (kl_coef 0: a policy forward gives them): not the sampler's, and ratio 1."""
    tok, models = tiny_models("reference", device)
    if not with_ref:
        models["ref"] = None
    gen_lp = []
    real_generate = GPT.generate
    monkeypatch.setattr(GPT, "generate",
                        lambda self, *a, **k: gen_lp.append(real_generate(self, *a, **k)) or gen_lp[-1])
    cfg = rl_cfg(device, logprob_space="full", **({} if with_ref else {"kl_coef": 0.0}))
    b, call, _ = grpo_first_minibatch(models, tok, cfg, device, monkeypatch)
    on = b.mask > 0
    assert float((gen_lp[0].logprobs.to(device)[on] - b.logprobs[on]).min()) > 1e-3
    assert_ratio_one(call)
