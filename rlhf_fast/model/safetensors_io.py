"""Read safetensors tensors straight into existing tensors, and write a sharded safetensors folder.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each name to
{dtype, shape, data_offsets} (offsets relative to the end of the header), then the raw bytes. Reading
with `readinto` into the destination tensor's own bytes keeps peak memory at the model's size plus
one tensor (a memory map would leave every touched page of the file resident as well).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


def read_header(file: Path) -> dict[str, Entry]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {meta['dtype']}, not one of {sorted(DTYPES)}")
        begin, end = meta["data_offsets"]
        entries[name] = Entry(file, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, end - begin)
    return entries


def folder_entries(folder: Path) -> dict[str, Entry]:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards its index names."""
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        entries = {}
        for file in sorted(set(weight_map.values())):
            entries.update(read_header(folder / file))
        missing = sorted(set(weight_map) - set(entries))
        if missing:
            raise ValueError(f"{index} names tensors that its shards do not hold: {missing[:5]}")
        return entries
    if (folder / SINGLE).is_file():
        return read_header(folder / SINGLE)
    raise ValueError(f"path {str(folder)!r} has no {SINGLE} or {INDEX}")


def read_into(entry: Entry, out: torch.Tensor) -> None:
    """Copy the tensor's bytes into `out` (contiguous CPU tensor of entry's dtype and numel)."""
    if out.dtype != entry.dtype or out.numel() * out.element_size() != entry.nbytes or not out.is_contiguous():
        raise ValueError(f"internal: destination {out.dtype}{tuple(out.shape)} does not fit {entry}")
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(view) != entry.nbytes:
            raise ValueError(f"{entry.file} is truncated")


def read(entry: Entry) -> torch.Tensor:
    out = torch.empty(entry.shape, dtype=entry.dtype)
    read_into(entry, out)
    return out


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Write `tensors` as model.safetensors, or as model-0000i-of-0000n.safetensors shards of at most
    max_shard_bytes each (a larger tensor gets a shard of its own) plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        # clone: safetensors refuses tensors that share storage (e.g. q/k/v split from one c_attn)
        save_file({n: tensors[n].detach().cpu().contiguous().clone() for n in shard}, folder / file,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names
