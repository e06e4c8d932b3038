"""Token-row chunks shared by the reference logprob/KL ops.

Each op walks its N rows in chunks so that its largest fp32 temporary is (chunk_rows, V), never (N, V).
A chunk is (rows, zs): a slice of the N rows and, per input, that slice's fp32 logits divided by T.
The logits ops copy zs out of their (N, V) inputs (`logits_chunks`); the fused-linear ops compute them
from the lm_head into one reused buffer (`lm_head_chunks`) and push each chunk's d(logits) back
through it (`lm_head_backward`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

# Elements of the largest fp32 temporary: (rows_per_chunk, V). 2**23 * 4 bytes = 32 MiB: 256 rows at
# V = 32000, where a 1-thread fp32 matmul of the chunk runs ~10% faster than at 128 rows (AMD EPYC, MKL).
CHUNK_ELEMENTS = 1 << 23

Chunk = tuple[slice, list[torch.Tensor]]


# BLAS kernels accumulate a matmul whose row count is not a multiple of this less accurately (MKL 2024.2
# on AMD EPYC, fp32, K = V = 1000: 1.7x the error of 8 or 16 rows at 7 rows, 2x at 1 row), so chunks are
# sized in multiples of it and the lm_head backward pads a ragged chunk's rows up to it.
ROW_MULTIPLE = 8


def rows_per_chunk(vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    rows = max(1, chunk_elements // max(vocab, 1))
    return rows - rows % ROW_MULTIPLE if rows > ROW_MULTIPLE else rows


def _round_up(n: int) -> int:
    return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


def row_chunks(n: int, vocab: int, chunk_rows: int | None = None) -> list[slice]:
    """Consecutive slices of at most chunk_rows (default: rows_per_chunk(vocab)) rows covering range(n)."""
    step = chunk_rows or rows_per_chunk(vocab)
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


def logits_chunks(logits: Sequence[torch.Tensor], temperature: float,
                  chunk_rows: int | None = None) -> Iterator[Chunk]:
    """Chunks of (N, V) logits tensors: zs[i] = logits[i][rows] / T in fp32, in a buffer that the next chunk
    overwrites (callers may overwrite it too)."""
    n, vocab = logits[0].shape
    chunks = row_chunks(n, vocab, chunk_rows)
    if not chunks:
        return
    # one buffer per input, reused by every chunk: a fresh (rows, V) tensor per chunk costs its page faults
    bufs = torch.empty(len(logits), chunks[0].stop - chunks[0].start, vocab, dtype=torch.float32,
                       device=logits[0].device)
    for rows in chunks:
        zs = [buf[: rows.stop - rows.start].copy_(x[rows]) for x, buf in zip(logits, bufs)]
        yield rows, zs if temperature == 1.0 else [z.div_(temperature) for z in zs]


def lm_head_chunks(heads: Sequence[tuple], temperature: float, chunk_rows: int | None = None) -> Iterator[Chunk]:
    """Chunks of lm_head logits: zs[i] = linear(hidden[rows], weight, bias) / T in fp32, for heads[i] =
    (hidden (N, H_i), weight (V, H_i), bias (V,) or None). zs live in one buffer that the next chunk
    overwrites, so peak memory stays one (len(heads), chunk_rows, V) fp32 block."""
    n, vocab = heads[0][0].shape[0], heads[0][1].shape[0]
    chunks = row_chunks(n, vocab, chunk_rows)
    if not chunks:
        return
    first = chunks[0]
    # rows rounded up so that lm_head_backward can multiply a ragged chunk as a padded one
    buf = torch.empty(len(heads), _round_up(first.stop - first.start), vocab, dtype=torch.float32,
                      device=heads[0][0].device)
    for rows in chunks:
        yield rows, [_linear_into(h[rows], w, b, temperature, out) for (h, w, b), out in zip(heads, buf)]


def _linear_into(hidden, weight, bias, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """out[:n] <- (hidden @ weight.T + bias) / T in fp32, for hidden (n, H). Reuses `out` (no fresh pages)."""
    buf = out[: hidden.shape[0]]
    if hidden.dtype == torch.float32:
        if bias is None:
            torch.mm(hidden, weight.t(), out=buf)
        else:
            torch.addmm(bias, hidden, weight.t(), out=buf)
    else:
        buf.copy_(torch.nn.functional.linear(hidden, weight, bias))
    if temperature != 1.0:
        buf.div_(temperature)
    return buf


def lm_head_backward(grad_chunks: Iterable[tuple[slice, torch.Tensor]], hidden, weight, bias, need):
    """(d hidden, d weight, d bias) of logits = linear(hidden, weight, bias), given (rows, d(logits) fp32)
    for every chunk of rows; an entry is None where `need` (3 bools) says it is not wanted.

    d(hidden) is written per chunk in hidden's dtype; d(weight) and d(bias) accumulate over chunks in fp32.
    """
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    fp32 = hidden.dtype == torch.float32
    d_hidden = torch.empty_like(hidden) if need_h else None
    d_weight32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    d_bias32 = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    for rows, dz in grad_chunks:
        if need_h:
            if fp32:
                _mm_padded_rows(dz, weight, d_hidden[rows])
            else:
                d_hidden[rows] = dz.to(weight.dtype) @ weight
        if need_w:
            d_weight32.addmm_(dz.t(), hidden[rows] if fp32 else hidden[rows].float())
        if need_b:
            d_bias32 += dz.sum(0)
    d_weight = None if d_weight32 is None else d_weight32.to(weight.dtype)
    d_bias = None if d_bias32 is None else d_bias32.to(bias.dtype)
    return d_hidden, d_weight, d_bias


def _mm_padded_rows(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out <- a @ b for a (n, K), a row slice of a buffer with spare rows (lm_head_chunks' buffer): when n
    is not a multiple of ROW_MULTIPLE, multiply the rows rounded up (row i of a product depends on row i
    of a alone, so the spare rows' stale values only reach the discarded rows) for BLAS's accurate kernel."""
    n = a.shape[0]
    n_pad = _round_up(n)
    room = a.untyped_storage().nbytes() // a.element_size() - a.storage_offset()
    if n_pad == n or a.stride(1) != 1 or room < n_pad * a.stride(0):
        torch.mm(a, b, out=out)
        return
    out.copy_(torch.mm(a.as_strided((n_pad, a.shape[1]), a.stride()), b)[:n])
