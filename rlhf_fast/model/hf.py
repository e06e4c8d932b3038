"""Hugging Face folders in and out: GPT-2, Llama, Qwen2 and Mistral (the table in hf_families.py).

Loading builds the GPT on the meta device, allocates it once in the target dtype, then reads each
tensor of the folder straight into its parameter (q/k/v and gate/up into their rows of the fused
c_attn / c_fc). Every parameter must be filled and every tensor of the folder used: a missing,
unexpected or wrongly shaped tensor is refused by name.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import safetensors_io as st
from .config import GPTConfig
from .gpt import GPT
from .hf_families import FAMILIES, Family, KeyMap, export_family, family_of
from .hf_families import config_from_hf as _config_from_dict

MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size ("5GB")
_SEQ_CLS = "ForSequenceClassification"


def _layer_keys(family: Family, n_layer: int) -> dict[str, KeyMap]:
    """Our parameter name -> its key map with {i} filled in, for every name the family knows."""
    out = {}
    for k in family.keys:
        for i in (range(n_layer) if "{i}" in k.ours else [None]):
            name = k.ours.format(i=i)
            out[name] = KeyMap(name, tuple(t.format(i=i) for t in k.theirs), k.sizes, k.transpose)
    return out


def _normalize(family: Family, name: str) -> str:
    """Files of the bare base model (GPT2Model, LlamaModel, the original GPT-2 release) lack the prefix."""
    if name.startswith((family.prefix, "lm_head.", "score.")):
        return name
    return family.prefix + name


def _params(model: GPT) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    if model.head == "lm" and model.config.tie_word_embeddings:
        params.pop("lm_head.weight")
    return params


def load_weights(model: GPT, family: Family, entries: dict[str, st.Entry]) -> None:
    """Fill every parameter of `model` (allocated, not meta) from `entries` (HF name -> safetensors entry)."""
    entries = {_normalize(family, n): e for n, e in entries.items() if not n.endswith(family.ignored)}
    cfg, keys = model.config, _layer_keys(family, model.config.n_layer)
    used = set()
    with torch.no_grad():
        for name, param in _params(model).items():
            if name not in keys:
                raise ValueError(f"the {family.model_type} key map has no tensor for parameter {name}")
            k = keys[name]
            sizes = k.sizes(cfg) if k.sizes else [param.shape[0]]
            rows = 0
            for hf_name, n in zip(k.theirs, sizes):
                if hf_name not in entries:
                    raise ValueError(f"tensor {hf_name} is missing from the folder (needed for {name})")
                e = entries[hf_name]
                want = (n, *param.shape[1:])
                if k.transpose:
                    want = want[::-1]
                if e.shape != want:
                    raise ValueError(f"tensor {hf_name} has shape {list(e.shape)}, expected {list(want)} "
                                     "from config.json")
                _copy_rows(e, param[rows:rows + n], k.transpose)
                rows += n
                used.add(hf_name)
    tied = "lm_head.weight" in entries and model.head == "lm" and cfg.tie_word_embeddings
    if tied:
        if not torch.equal(st.read(entries["lm_head.weight"]).to(model.lm_head.weight), model.lm_head.weight):
            raise ValueError("tensor lm_head.weight differs from the embedding but tie_word_embeddings is true")
        used.add("lm_head.weight")
    unexpected = sorted(set(entries) - used)
    if unexpected:
        raise ValueError(f"unexpected tensors in the folder (not part of a {family.model_type} GPT with "
                         f"head={model.head!r}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


def _copy_rows(entry: st.Entry, dst: torch.Tensor, transpose: bool) -> None:
    if not transpose and dst.device.type == "cpu" and dst.dtype == entry.dtype and dst.is_contiguous():
        st.read_into(entry, dst)  # straight into the parameter's storage, no temporary
        return
    src = st.read(entry)
    dst.copy_(src.t() if transpose else src)


def _head_of_folder(hf: dict, entries) -> str:
    archs = hf.get("architectures") or []
    if any(a.endswith(_SEQ_CLS) for a in archs) or "score.weight" in entries:
        return "score"
    return "lm"


@dataclass(frozen=True)
class FolderInfo:
    """What `from_pretrained` builds from a folder, known before any weight is read."""
    config: GPTConfig
    head: str  # "lm" (*ForCausalLM or a bare base model) or "score" (*ForSequenceClassification)
    arch: str  # the folder's architectures[0], or a description of its head
    family: Family
    entries: dict[str, st.Entry]  # HF tensor name -> where it lies in the safetensors files


def inspect_folder(path, **overrides) -> FolderInfo:
    """Read a local HF folder's config.json and safetensors headers (no weights): ValueError naming the
    config field, file or tensor that `from_pretrained` would refuse. overrides: GPTConfig fields."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"path must be a folder with config.json, got {str(folder)!r}")
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{folder / 'config.json'} is not readable JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{folder / 'config.json'} must hold a JSON object, got {type(hf).__name__}")
    family = family_of(hf)
    try:
        config = _config_from_dict(hf, **overrides)
    except KeyError as exc:
        raise ValueError(f"config.{exc.args[0]} is required by model_type {family.model_type!r}") from None
    entries = {_normalize(family, n): e for n, e in st.folder_entries(folder).items()}
    head = _head_of_folder(hf, entries)
    if head == "score":
        labels = hf.get("num_labels", len(hf.get("id2label") or {0: 0}))
        if labels != 1:
            raise ValueError(f"config.num_labels must be 1 for a reward model, got {labels}")
    embed = family.keys[0].theirs[0]  # the token embedding: its dtype is the checkpoint's
    if embed not in entries:
        raise ValueError(f"tensor {embed} is missing from the folder")
    return FolderInfo(config, head, (hf.get("architectures") or ["a " + head + " head"])[0], family, entries)


def from_pretrained(path, *, head: str = "lm", dtype: torch.dtype | None = None, device=None,
                    **overrides) -> GPT:
    """A GPT holding a local HF folder (config.json + model.safetensors or a sharded index).

    head="lm" reads *ForCausalLM (or bare base model) folders; "reward" and "value" read
    *ForSequenceClassification folders with num_labels=1 (the `score` head). dtype: default the
    checkpoint's; device: default CPU. overrides: GPTConfig fields that do not change the
    architecture (backend, dropout, gradient_checkpointing).
    """
    info = inspect_folder(path, **({"score_bias": False} | overrides))
    if (head == "lm") != (info.head == "lm"):
        kind = "a *ForCausalLM" if head == "lm" else f"a *{_SEQ_CLS}"
        raise ValueError(f"head={head!r} needs {kind} folder; {str(path)!r} holds {info.arch} (load it with "
                         "the head it has, then .with_head(...))")
    config, family, entries = info.config, info.family, info.entries
    embed = family.keys[0].theirs[0]
    dtype = dtype or entries[embed].dtype
    with torch.device("meta"), _no_init():
        model = GPT(config, head=head)
    model.to(dtype).to_empty(device=device or "cpu")
    if head == "lm" and config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # to_empty gives each reference its own storage
    load_weights(model, family, entries)
    return model.eval()


@contextlib.contextmanager
def _no_init():
    """Parameters built on the meta device hold no values, so their init is skipped: running it would
    only make torch import its meta reference kernels (torch._dynamo: seconds) to do nothing."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


# ---------------------------------------------------------------- export
def hf_state_dict(model: GPT) -> tuple[Family, dict[str, torch.Tensor]]:
    """The model's tensors under its family's HF names (views of the parameters; fused ones split)."""
    cfg = model.config
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("model has LoRA adapters: write them with save_adapters(model, dir), or fold them in "
                         "with merge_lora(model) first")
    family = export_family(cfg)
    keys = _layer_keys(family, cfg.n_layer)
    out = {}
    params = _params(model)
    if model.head != "lm" and "score.bias" in params:
        if bool(params["score.bias"].detach().ne(0).any()):
            raise ValueError("score.bias is nonzero but a *ForSequenceClassification head has no bias: "
                             "train the head with GPTConfig.score_bias=False")
        params.pop("score.bias")
    for name, p in params.items():
        if name not in keys:
            raise ValueError(f"parameter {name} has no {family.model_type} equivalent")
        k = keys[name]
        p = p.detach()
        pieces = p.split(k.sizes(cfg)) if k.sizes else (p,)
        for hf_name, piece in zip(k.theirs, pieces):
            out[hf_name] = piece.t() if k.transpose else piece
    return family, out


def hf_config(model: GPT, dtype: torch.dtype) -> dict:
    family = export_family(model.config)
    arch = family.arch + ("ForCausalLM" if model.head == "lm" else _SEQ_CLS)
    if family.model_type == "gpt2" and model.head == "lm":
        arch = "GPT2LMHeadModel"
    hf = {"architectures": [arch], "model_type": family.model_type, **family.write_config(model.config),
          **family.extra, "dtype": str(dtype).removeprefix("torch.")}
    if model.head != "lm":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


def save_pretrained(model: GPT, path, *, max_shard_bytes: int = MAX_SHARD_BYTES, extra_config: dict | None = None):
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) in the model's family
    format; extra_config adds config.json fields (e.g. bos/eos/pad token ids). Returns the folder."""
    family, tensors = hf_state_dict(model)
    dtype = next(iter(tensors.values())).dtype
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf = {**hf_config(model, dtype), **(extra_config or {})}
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    st.write_folder(folder, tensors, max_shard_bytes)
    return folder


# ---------------------------------------------------------------- GPT-2 from memory (model or state dict)
def from_hf_gpt2(model_or_state_dict, config=None, *, head: str = "lm") -> GPT:
    """A GPT holding the weights of a transformers GPT2LMHeadModel / GPT2Model, or of a GPT-2 state dict.

    config: a GPT2Config, a config.json dict or a GPTConfig; needed with a state dict (a model
    carries its own). The result has the weights' dtype and sits on CPU: move it with .to().
    """
    if isinstance(model_or_state_dict, dict):
        state_dict = model_or_state_dict
        if config is None:
            raise ValueError("config is required when loading from a state dict (GPT2Config, dict or GPTConfig)")
    elif isinstance(model_or_state_dict, torch.nn.Module):
        state_dict = model_or_state_dict.state_dict()
        config = model_or_state_dict.config if config is None else config
    else:
        raise ValueError("model_or_state_dict must be a transformers GPT-2 model or a state dict, "
                         f"got {type(model_or_state_dict).__name__}")
    if not isinstance(config, GPTConfig):
        config = config_from_hf(config)
    family = FAMILIES["gpt2"]
    state_dict = {_normalize(family, n): t for n, t in state_dict.items() if not n.endswith(family.ignored)}
    model = GPT(config, head="lm").to(state_dict[_normalize(family, "wte.weight")].dtype)
    weights = {}
    for name, k in _layer_keys(family, config.n_layer).items():
        if k.theirs[0] in state_dict:
            weights[name] = state_dict.pop(k.theirs[0]).t() if k.transpose else state_dict.pop(k.theirs[0])
    if "lm_head.weight" not in weights and config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected or state_dict:
        raise ValueError(f"state dict does not match GPT-2 with this config: missing {missing}, "
                         f"unexpected {sorted(state_dict) + unexpected}")
    return model if head == "lm" else model.with_head(head)


def config_from_hf(hf_config, **overrides) -> GPTConfig:
    """GPTConfig equivalent to a transformers config (GPT2Config, LlamaConfig, ...) or its config.json dict."""
    hf = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    return _config_from_dict({"model_type": "gpt2", **hf}, **overrides)
