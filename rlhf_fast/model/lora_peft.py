"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` loads what
`save_adapters` writes and computes the same logits; `load_adapters` reads PEFT's own folders back.
Tensor names are PEFT's for a *ForCausalLM: base_model.model.<HF module>.lora_A.weight (r, in) and
.lora_B.weight (out, r), where <HF module> comes from the family's key map (hf_families.py): the
i-th row block of our fused c_attn / c_fc is the i-th HF tensor that the key map concatenates there.
GPT-2 keeps c_attn whole, so its q/k/v adapters are written as one block-diagonal adapter (written only:
PEFT's GPT-2 adapters are not read back, as a general c_attn adapter has no q/k/v split).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import safetensors_io as st
from .hf_families import export_family
from .lora import LoRALinear, apply_lora, lora_sites

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _peft_names(model) -> dict[tuple[int, str], str]:
    """(layer, target) -> the HF module path PEFT wraps (e.g. model.layers.0.self_attn.q_proj)."""
    family = export_family(model.config)
    keys = {k.ours: k for k in family.keys}
    out = {}
    for path, rows in lora_sites(model.config):
        k = keys.get("transformer.h.{i}." + path + ".weight")
        if k is None or k.transpose or len(k.theirs) != len(rows):
            raise ValueError(f"PEFT adapters are read for llama, qwen2 and mistral models; a "
                             f"{family.model_type} model's {path} does not split into {[t for t, _ in rows]}")
        for i in range(model.config.n_layer):
            for (target, _), theirs in zip(rows, k.theirs):
                out[i, target] = theirs.format(i=i).removesuffix(".weight")
    return out


def _adapters(model) -> dict[tuple[int, str], LoRALinear]:
    if getattr(model, "lora_config", None) is None:
        raise ValueError("model has no LoRA adapters (call apply_lora or load_adapters first)")
    out = {}
    for i, block in enumerate(model.transformer.h):
        for path, rows in lora_sites(model.config):
            module = block.get_submodule(path)
            if isinstance(module, LoRALinear):
                out.update({(i, t): module for t, _ in rows if t in module.lora_A})
    return out


def save_adapters(model, path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of a LoRA GPT with head="lm" as a PEFT folder; returns the folder.
    llama, qwen2, mistral: one PEFT adapter per target; gpt2: see _gpt2_tensors."""
    if model.head != "lm":
        raise ValueError(f"PEFT adapters are written for head='lm' (CAUSAL_LM) models, this one has "
                         f"head={model.head!r}")
    adapters = _adapters(model)
    cfg = model.lora_config
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
                   "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets), "bias": "none",
                   "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
                   "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                   "base_model_name_or_path": base_model_name_or_path}
    if export_family(model.config).model_type == "gpt2":
        tensors = _gpt2_tensors(model, peft_config)
    else:
        names = _peft_names(model)
        tensors = {}
        for (i, target), module in adapters.items():
            stem = _PREFIX + names[i, target]
            tensors[stem + ".lora_A.weight"] = module.lora_A[target].detach()
            tensors[stem + ".lora_B.weight"] = module.lora_B[target].detach()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    from safetensors.torch import save_file
    save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


def _gpt2_tensors(model, peft_config: dict) -> dict[str, torch.Tensor]:
    """GPT-2's checkpoint has one c_attn (Conv1D) where we hold q/k/v adapters: PEFT gets one adapter of
    rank k * r there, A the k A's stacked, B block-diagonal (B_t in target t's rows and columns), and
    lora_alpha k * alpha through rank_pattern / alpha_pattern, so alpha / r and the product are ours.
    Module names keep their parent ("attn.c_proj" vs "mlp.c_proj"); Conv1D needs fan_in_fan_out."""
    cfg, tensors = model.lora_config, {}
    for path, rows in lora_sites(model.config):
        targeted = [t for t, _ in rows if t in cfg.targets]
        if not targeted:
            continue
        k = len(targeted)
        if k > 1:
            peft_config["rank_pattern"][path] = k * cfg.r
            peft_config["alpha_pattern"][path] = k * cfg.alpha
        for i, block in enumerate(model.transformer.h):
            module = block.get_submodule(path)
            B = torch.zeros(module.out_features, k * cfg.r)
            start, j = 0, 0
            for target, n in rows:
                if target in targeted:
                    B[start:start + n, j * cfg.r:(j + 1) * cfg.r] = module.lora_B[target].detach().cpu()
                    j += 1
                start += n
            stem = f"{_PREFIX}transformer.h.{i}.{path}"
            tensors[stem + ".lora_A.weight"] = torch.cat([module.lora_A[t].detach().cpu() for t in targeted])
            tensors[stem + ".lora_B.weight"] = B
    peft_config.update(target_modules=[p for p, rows in lora_sites(model.config)
                                       if any(t in cfg.targets for t, _ in rows)], fan_in_fan_out=True)
    return tensors


# PEFT options that change what the adapters compute, with the value our LoRALinear computes
_MUST_BE = {"peft_type": "LORA", "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None,
            "lora_bias": False, "layer_replication": None, "target_parameters": None,
            "trainable_token_indices": None, "use_qalora": False, "use_bdlora": None}


def read_adapter_config(path) -> dict:
    """adapter_config.json of a PEFT folder, checked: ValueError naming a field our LoRA cannot honour."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise ValueError(f"path must be a PEFT adapter folder with {CONFIG}, got {str(path)!r}")
    cfg = json.loads(file.read_text(encoding="utf-8"))
    for key, want in _MUST_BE.items():
        got = cfg.get(key, want)
        if got != want and not (want in ({}, None) and not got):
            raise ValueError(f"{file}: {key}={got!r} is not supported (need {want!r})")
    if not isinstance(cfg.get("target_modules"), list):
        raise ValueError(f"{file}: target_modules must be a list of module names, got {cfg.get('target_modules')!r}")
    return cfg


def load_adapters(model, path):
    """Load a PEFT LoRA folder into the GPT `model` (in place; returns it). A model without adapters gets
    them (apply_lora with the folder's r, lora_alpha, lora_dropout, target_modules); one with adapters
    must have the same r, alpha and targets. Every adapter tensor must be in the file, and nothing else."""
    family = export_family(model.config).model_type
    if family == "gpt2":
        raise ValueError("PEFT adapters are read for llama, qwen2 and mistral models; a gpt2 model's fused "
                         "c_attn adapter cannot be split into our q/k/v adapters")
    cfg = read_adapter_config(path)
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"])
    ours = model.lora_config
    if (ours.r, ours.alpha, set(ours.targets)) != (cfg["r"], float(cfg["lora_alpha"]), set(cfg["target_modules"])):
        raise ValueError(f"{path}: adapters have r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, targets="
                         f"{sorted(cfg['target_modules'])}; the model has r={ours.r}, alpha={ours.alpha}, "
                         f"targets={sorted(ours.targets)}")
    entries = st.read_header(Path(path) / WEIGHTS)
    names, used = _peft_names(model), set()
    with torch.no_grad():
        for (i, target), module in _adapters(model).items():
            for kind in ("lora_A", "lora_B"):
                name = f"{_PREFIX}{names[i, target]}.{kind}.weight"
                if name not in entries:
                    raise ValueError(f"{path}: tensor {name} is missing")
                dst = getattr(module, kind)[target]
                if entries[name].shape != tuple(dst.shape):
                    raise ValueError(f"{path}: tensor {name} has shape {list(entries[name].shape)}, "
                                     f"expected {list(dst.shape)}")
                dst.copy_(st.read(entries[name]))
                used.add(name)
    unexpected = sorted(set(entries) - used)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors (not adapters of this model): {unexpected[:8]}")
    return model
