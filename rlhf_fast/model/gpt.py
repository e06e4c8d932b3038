"""GPT: GPT-2's decoder (module names match its checkpoint) with GQA, RoPE, RMSNorm and SwiGLU switches.

Inputs come in three layouts (see layers.py for how attention handles each):

- `model(idx)`, idx (B, T): every row is real tokens. Attention: `causal_attention`.
- `model(idx, attention_mask=m)`, m (B, T) with 1 on real tokens: rows may be left- and/or
  right-padded, but each row's real tokens must be contiguous. Left pads would sit *before* a row's
  real tokens, where a causal query sees them, so each row is first rolled left by its number of
  leading pads: its real tokens then fill columns 0..len-1 and every pad sits after them, invisible
  to causal attention. Positions are 0..len-1 as for the prompt alone, so a prompt alone and inside
  a padded batch give the same outputs. Results are rolled back; outputs at pad positions are
  unspecified (logprobs there are 0). All shapes are static (torch.compile-friendly).
- `model(idx, cu_seqlens=cu, max_seqlen=m)`, idx (N,): packed sequences, no padding at all.
  Attention: `causal_attention_varlen`; positions restart at each sequence.

What comes out depends on `head` and `targets`:

==========  ====================  =====================================================
head        targets               returns
==========  ====================  =====================================================
"lm"        None                  logits (B, T, V)
"lm"        (B, T) token ids      (logprobs (B, T) fp32, entropy (B, T) fp32 or None),
                                  via `fused_linear_logprobs`: no (B, T, V) logits in memory
"lm"        targets + reference   (logprobs, entropy, kl, ref_logprobs), each (B, T) fp32 or None:
                                  the exact KL(pi || pi_ref) per position via
                                  `fused_linear_kl_divergence` (and, when scoring, the
                                  reference's logprob of the targets from the same pass)
"lm"        targets + token_loss  (loss, TokenStats (logp, entropy, kl) of (B, T) fp32 or None):
                                  a training loss with its gradient taken in the forward
                                  (`fused_linear_token_loss`; targeted positions only)
"lm"        return_hidden=True    final hidden states (B, T, C), the lm_head's input
"value"     -                     values (B, T) fp32: one scalar per token (PPO critic)
"reward"    -                     rewards (B,) fp32 at each row's last real token
==========  ====================  =====================================================
(with packed inputs, B*T reads N and B reads the number of sequences.)
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..fused_loss import TokenStats
from . import head_rows
from .config import GPTConfig
from .layers import (Block, Decode, KVCache, Packed, Padded, init_weights, make_norm, rope_cos_sin,
                     rope_inv_freq)

HEADS = ("lm", "value", "reward")


class GPT(nn.Module):
    """The decoder with one head: "lm" (next-token logits, tied to wte by default), "value" or "reward"
    (a Linear(n_embd, 1) named `score`). Weights get GPT-2's init; see the module docstring for calls."""

    def __init__(self, config: GPTConfig, head: str = "lm"):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.config, self.head = config, head
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=make_norm(config),
        ))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if head == "lm":
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        else:  # a scalar per token (value) or per sequence (reward)
            self.score = nn.Linear(config.n_embd, 1, bias=config.score_bias)
        init_weights(self, config)
        if head == "lm" and config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    # ---------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, temperature: float = 1.0, return_entropy: bool = True,
                ignore_index: int = -100, cutoffs: torch.Tensor | None = None, reference=None,
                return_hidden: bool = False, check_kept: bool = True, token_loss=None,
                outputs_at: torch.Tensor | None = None):
        """See the module docstring for layouts and outputs.

        idx: (B, T) int64, or (N,) with cu_seqlens (S + 1,) int32 and max_seqlen (int).
        targets: same shape as idx, token ids whose logprob under logits / temperature is returned
            (already shifted by the caller: targets[..., t] is scored by the logits at t);
            `ignore_index` marks positions to skip (logprob 0). lm head only.
        cutoffs: optional targets.shape + (2,) float64, the sampler's kept set of each position
            (``rlhf_fast.sample(..., return_cutoffs=True)``): logprobs, entropy and KL are then those of
            the tempered distribution renormalized over that set. Ignored positions may hold anything.
            A target off its set raises ValueError, or with ``check_kept=False`` gets logprob -inf (an
            RL update whose policy moved since the rollout handles it).
        reference: optional (ref_hidden, ref_weight) of a frozen reference model: ref_hidden of the
            shape of this model's hidden states (B, T, C_ref) (``ref(idx, return_hidden=True)``),
            ref_weight (V, C_ref) its lm_head weight, or None when it shares this model's lm_head (a
            LoRA policy with its adapters off). With targets, also returns the per-position exact
            KL(pi || pi_ref) (differentiable in this model) and the reference's logprob of the
            targets (a constant), both 0 at ignored positions; computed on the targeted positions only.
            Without gradient and entropy (scoring) the logprobs come from that same pass; otherwise they
            and the entropy come from fused_linear_logprobs and ref_logprobs is None.
        return_hidden: return the final hidden states (B, T, C) (lm head, no targets): what a model
            passes as `reference` to another.
        token_loss: a training loss known in the forward, ``token_loss(positions, stats) -> 0-dim tensor``
            for the flat positions (int64 indices into targets.reshape(-1)) of some targeted rows and
            their TokenStats (logp, entropy or None, kl or None with `reference`): a sum of per-position
            terms (rlhf_fast.fused_linear_token_loss, which takes its gradient in the forward: one lm_head
            matmul fewer). Returns (loss, TokenStats of targets' shape, detached, 0 at ignored
            positions) instead; only the targeted positions go through the lm_head.
        """
        if targets is not None and self.head != "lm":
            raise ValueError(f"targets are only accepted by the 'lm' head, this model has head={self.head!r}")
        if (cutoffs is not None or reference is not None or token_loss is not None) and targets is None:
            raise ValueError("cutoffs, reference and token_loss need targets (the tokens they score)")
        if token_loss is not None and not callable(token_loss):
            raise ValueError(f"token_loss must be callable (positions, stats) -> loss, got {type(token_loss).__name__}")
        if return_hidden and (self.head != "lm" or targets is not None):
            raise ValueError("return_hidden is for the 'lm' head without targets")
        if outputs_at is not None and (self.head != "value" or not isinstance(outputs_at, torch.Tensor)
                                       or outputs_at.dtype != torch.bool or outputs_at.shape != idx.shape):
            raise ValueError(f"outputs_at is a bool tensor of idx's shape {tuple(idx.shape)} for the 'value' head "
                             f"(this model has head={self.head!r}), got {getattr(outputs_at, 'shape', outputs_at)!r}")
        if cutoffs is not None and (not isinstance(cutoffs, torch.Tensor) or cutoffs.shape != (*targets.shape, 2)):
            raise ValueError(f"cutoffs must be a tensor of shape targets.shape + (2,) = {(*targets.shape, 2)}, "
                             f"got {getattr(cutoffs, 'shape', type(cutoffs).__name__)}")
        extra = dict(cutoffs=cutoffs, reference=reference, return_hidden=return_hidden, check_kept=check_kept,
                     token_loss=token_loss)
        if cu_seqlens is not None:
            return self._forward_packed(idx, targets, cu_seqlens, max_seqlen, temperature, return_entropy,
                                        ignore_index, outputs_at, extra)
        _check_idx(idx, 2, self.config)
        B, T = idx.shape
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        starts = torch.arange(B, device=idx.device) * T  # (B,) flat index of each row's column 0
        if attention_mask is None:
            rows = starts + T - 1 if self.head == "reward" else head_rows.wanted_rows(
                self._wanted(idx, targets, ignore_index, outputs_at))
            x = self._backbone(idx, pos, Padded(self.config.backend), rows)  # (B, T, C), or (M, C) of rows
        else:
            _check_mask(attention_mask, idx)
            mask = attention_mask.to(torch.bool)
            lead = (mask.cumsum(1) == 0).sum(1)  # (B,) leading pads per row
            roll = (pos[None, :] + lead[:, None]) % T  # rolled[b, j] = original[b, roll[b, j]]
            idx = idx.masked_fill(~mask, 0)  # pad ids may be anything (e.g. -1); they are never attended
            last = lead + mask.sum(1) - 1  # (B,) last real token
            if targets is not None:
                targets = targets.masked_fill(~mask, ignore_index)
            if self.head == "reward":  # rolled, a row's real tokens fill its first columns
                keep, rows = starts + mask.sum(1) - 1, starts + last
            else:
                want = self._wanted(idx, targets, ignore_index, outputs_at)
                keep = head_rows.wanted_rows(None if want is None else (want & mask).gather(1, roll))  # rolled
                # the kept rows' original flat positions, ascending as they are
                rows = None if keep is None else (starts[:, None] + roll).reshape(-1)[keep]
            x = self._backbone(idx.gather(1, roll), pos, Padded(self.config.backend), keep)  # rolled
            if keep is None:
                unroll = (pos[None, :] - lead[:, None]) % T  # original[b, t] = rolled[b, unroll[b, t]]
                x = x.gather(1, unroll[:, :, None].expand_as(x))  # (B, T, C) original layout
        return self._head(x, rows, idx.shape, targets, temperature, return_entropy, ignore_index, **extra)

    def _wanted(self, idx, targets, ignore_index, outputs_at) -> torch.Tensor | None:
        """idx-shaped bool: the positions the lm or value head reads, or None for every position (or where
        row indices cannot be taken: head_rows.rows_allowed). A reward model reads each sequence's last
        token: one row per sequence, a static size, which the callers index directly (no sync)."""
        if not head_rows.rows_allowed(idx):
            return None
        if self.head == "value":
            return outputs_at
        return None if targets is None else targets != ignore_index

    def _forward_packed(self, idx, targets, cu_seqlens, max_seqlen, temperature, return_entropy, ignore_index,
                        outputs_at, extra):
        _check_idx(idx, 1, self.config)
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor of sequence boundaries (S + 1,)")
        if not isinstance(max_seqlen, int) or not 0 < max_seqlen <= self.config.block_size:
            raise ValueError(f"max_seqlen must be an int in [1, block_size={self.config.block_size}] "
                             f"with packed inputs, got {max_seqlen!r}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        N = idx.shape[0]
        starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()  # (S,)
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=idx.device), lengths, output_size=N)
        pos = torch.arange(N, device=idx.device) - starts[seq]  # (N,) position inside its own sequence
        last = cu_seqlens[1:].long() - 1  # (S,) each sequence's last token: what a reward model reads
        rows = last if self.head == "reward" else head_rows.wanted_rows(self._wanted(idx, targets, ignore_index,
                                                                                     outputs_at))
        x = self._backbone(idx, pos, Packed(self.config.backend, cu_seqlens, max_seqlen), rows)  # (N, C) or (M, C)
        return self._head(x, rows, idx.shape, targets, temperature, return_entropy, ignore_index, **extra)

    def _backbone(self, idx: torch.Tensor, pos: torch.Tensor, attend, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (...,) at positions pos (broadcastable to idx) -> final-normed hidden (..., C), or with
        `keep` (M,) flat indices into idx's positions only those rows (M, C): the last block runs its
        output projection and MLP on them alone."""
        tf, cfg = self.transformer, self.config
        x = tf.wte(idx)  # (..., C)
        rope = None
        if cfg.pos_emb == "learned":
            x = x + tf.wpe(pos)
        else:
            rope = rope_cos_sin(pos, rope_inv_freq(cfg, pos.device))
        x = tf.drop(x)
        remat = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(tf.h):
            rows = keep if layer == len(tf.h) - 1 else None
            if remat:
                x = checkpoint(block, x, layer, attend, rope, rows, use_reentrant=False)
            else:
                x = block(x, layer, attend, rope, rows)
        return tf.ln_f(x)

    def _head(self, x, rows, shape, targets, temperature, return_entropy, ignore_index, cutoffs=None,
              reference=None, return_hidden=False, check_kept=True, token_loss=None):
        """x: final hidden (*shape, C), or (M, C) of the flat positions `rows` (then only those are read:
        head_rows; a reward head's rows are each sequence's last token, one per sequence in order)."""
        n = shape.numel()
        if self.head != "lm":  # a trainable fp32 head over a frozen bf16 backbone (LoRA value model) reads fp32
            x = x.to(self.score.weight.dtype)
        if self.head == "value":
            return head_rows.scatter_rows(self.score(x).squeeze(-1).float(), rows, n).view(shape)  # (*shape)
        if self.head == "reward":  # x holds each sequence's last row only, in order (forward's rows)
            return self.score(x).squeeze(-1).float()  # (B,)
        if return_hidden:
            return x
        if targets is None:
            return self.lm_head(x)  # (..., V)
        hidden, weight = x.reshape(-1, x.shape[-1]), self.lm_head.weight  # (N or M, C), (V, C)
        if torch.is_autocast_enabled(x.device.type):  # custom ops are not autocast: cast as a matmul would
            dtype = torch.get_autocast_dtype(x.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        flat_targets = targets.reshape(-1)
        flat_cutoffs = None if cutoffs is None else cutoffs.reshape(-1, 2)
        backend = self.config.backend
        if token_loss is not None:
            loss, stats = head_rows.token_loss_terms(hidden, rows, weight, reference, flat_targets, flat_cutoffs,
                                                     token_loss, temperature, return_entropy, ignore_index,
                                                     check_kept, backend)
            return loss, TokenStats(*(None if v is None else v.view(targets.shape) for v in stats))
        scoring = not return_entropy and not torch.is_grad_enabled()
        if reference is not None:
            kl, logp, ref_logp = head_rows.reference_terms(hidden, rows, weight, reference, flat_targets, flat_cutoffs,
                                                           temperature, ignore_index, backend, scoring)
            if scoring:  # the KL pass has the logprobs
                return logp.view(targets.shape), None, kl.view(targets.shape), ref_logp.view(targets.shape)
        logprobs, entropy = head_rows.logprob_terms(hidden, rows, weight, flat_targets, flat_cutoffs, temperature,
                                                    return_entropy, ignore_index, check_kept, backend)
        logprobs = logprobs.view(targets.shape)
        entropy = None if entropy is None else entropy.view(targets.shape)
        if reference is None:
            return logprobs, entropy
        return logprobs, entropy, kl.view(targets.shape), None

    # ---------------------------------------------------------------- generation steps (used by generate.py)
    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Right-padded prompts idx (B, T), lengths (B,) -> logits (B, V) fp32 after each row's last token.

        Fills cache slots 0..T-1 (slots past lengths[b] hold pad keys that decoding overwrites or masks)
        and sets cache.seqlens = lengths.
        """
        T = idx.shape[1]
        last = cache.rows * T + lengths.long() - 1  # (B,) flat index of each row's last token
        x = self._backbone(idx, torch.arange(T, device=idx.device), Padded(self.config.backend, cache), last)  # (B, C)
        cache.seqlens.copy_(lengths)
        return self.lm_head(x).float()

    @torch.no_grad()
    def decode(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append one token per row, token (B,), at position cache.seqlens -> logits (B, V) fp32 for the next."""
        x = self._backbone(token, cache.seqlens.long(), Decode(self.config.backend, cache))  # (B, C)
        cache.seqlens += 1
        return self.lm_head(x).float()

    # ---------------------------------------------------------------- conveniences
    def generate(self, prompts, max_new_tokens: int, **kwargs):
        """`rlhf_fast.model.generate(self, prompts, max_new_tokens, **kwargs)`."""
        from .generate import generate
        return generate(self, prompts, max_new_tokens, **kwargs)

    def with_head(self, head: str) -> "GPT":
        """A new model with this backbone's weights (copied) and a fresh `head`: e.g. a critic from the SFT model."""
        if getattr(self, "lora_config", None) is not None:
            raise ValueError("with_head needs plain weights: this model has LoRA adapters (merge_lora(model) first)")
        model = GPT(copy.deepcopy(self.config), head=head)
        param = next(self.parameters())
        model.to(device=param.device, dtype=param.dtype)
        model.transformer.load_state_dict(self.transformer.state_dict())
        return model

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    @classmethod
    def from_hf_gpt2(cls, model_or_state_dict, config=None, *, head: str = "lm") -> "GPT":
        """Load transformers' GPT2LMHeadModel (or GPT2Model, or their state dict + config). See hf.py."""
        from .hf import from_hf_gpt2
        return from_hf_gpt2(model_or_state_dict, config, head=head)

    @classmethod
    def from_pretrained(cls, path, *, head: str = "lm", dtype: torch.dtype | None = None, device=None,
                        **overrides) -> "GPT":
        """Load a local Hugging Face folder (GPT-2, Llama, Qwen2, Mistral; *ForCausalLM for head="lm",
        *ForSequenceClassification for "reward"/"value"). See hf.py."""
        from .hf import from_pretrained
        return from_pretrained(path, head=head, dtype=dtype, device=device, **overrides)

    def save_pretrained(self, path, **kwargs):
        """Write a Hugging Face folder (config.json + safetensors) in this model's family format. See hf.py."""
        from .hf import save_pretrained
        return save_pretrained(self, path, **kwargs)


def _check_idx(idx, ndim: int, config: GPTConfig) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != ndim or idx.dtype not in (torch.int64, torch.int32):
        want = "(B, T)" if ndim == 2 else "(N,) with cu_seqlens"
        got = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an int64 or int32 tensor of shape {want}, got {got}")
    T = idx.shape[-1] if ndim == 2 else 0
    if T > config.block_size:
        raise ValueError(f"idx has {T} positions, more than block_size={config.block_size}")


def _check_mask(attention_mask, idx) -> None:
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask must be a tensor of the shape of idx {tuple(idx.shape)}")
    if torch.compiler.is_compiling():
        return
    mask = attention_mask.to(torch.bool)
    T = mask.shape[1]
    col = torch.arange(T, device=mask.device)
    first = torch.where(mask, col, T).amin(1)
    last = torch.where(mask, col, -1).amax(1)
    count = mask.sum(1)
    if bool(((last - first + 1 != count) | (count == 0)).any()):  # one host sync; skipped when compiled
        raise ValueError("attention_mask must mark one contiguous, non-empty run of real tokens per row "
                         "(left and/or right padding)")
