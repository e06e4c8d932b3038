"""The kept set of a chunk of filtered logits (cutoffs, CUTOFFS.md), for the reference logprob ops.

A sampler's kept set is small (top-k 50 of a 128k vocabulary; top-p keeps tens to hundreds): then the
statistics are computed on a compact (rows, K) copy of the kept logits (K = the chunk's largest kept
count, padded with -inf), not on the (rows, V) chunk, and d(logits) is zero but for a scatter of the
compact gradient. The test "kept?" is the only full pass over the chunk besides building it, so a
filtered forward and backward cost no more than plain ones (which exp, sum and scale every logit).
A wide kept set (K > V / SPARSE_FRACTION) takes the dense path instead: the dropped logits are set to
-inf in place and the plain math runs on the chunk.

Both paths compute the same formulas (token_logprobs.row_stats / grad_z_) on the same kept values with
the same per-row max, so they agree to the rounding of the row sums' order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Compact path when every mask block, and every row, of the chunk keeps at most 1 / SPARSE_FRACTION of its
# logits: its indices then take at most 1 byte per logit, and its math on (rows, K) costs little.
SPARSE_FRACTION = 16
# The kept mask is built this many logits at a time (1 MiB of bools), so it never holds a chunk's worth.
MASK_ELEMENTS = 1 << 20
# ignore_index of Compact.targets (its columns are >= 0, so no target collides with it)
IGNORE = -1


def keeps_all(cuts, rows: slice) -> bool:
    """Whether every row of the chunk is unfiltered (threshold -inf: only -inf logits, whose p is 0 anyway,
    can be dropped), so the plain math serves it. One host sync."""
    return bool((cuts[0][rows] == float("-inf")).all())


def _blocks(n: int, vocab: int) -> list[tuple[int, int]]:
    step = max(1, MASK_ELEMENTS // max(vocab, 1))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def mask_buffer(z: torch.Tensor) -> torch.Tensor:
    """The reused bool buffer of kept_mask for chunks shaped like z: MASK_ELEMENTS bools, not a chunk's."""
    return torch.empty(min(z.shape[0], _blocks(*z.shape)[0][1]), z.shape[1], dtype=torch.bool, device=z.device)


def kept_mask(z: torch.Tensor, t: torch.Tensor, i: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(b, V) bool in `out` (a reused bool buffer of >= b rows): True where z (b rows of logits / T) lies in
    its row's kept set: not (z < t, or z == t at an index below i); t (b, 1), i (b,). A NaN logit counts
    as kept, so that its row turns NaN as without cutoffs. Only rows with i > 0 (a top-p cut inside a run
    of ties) can drop a logit equal to t; their logits at the cut are few, so they are found as indices."""
    keep = torch.lt(z, t, out=out[: z.shape[0]]).logical_not_()
    tie_rows = torch.nonzero(i > 0).flatten()
    if tie_rows.numel():
        at_cut = torch.nonzero(z[tie_rows] == t[tie_rows])
        r, c = tie_rows[at_cut[:, 0]], at_cut[:, 1]
        below_i = c < i[r]
        keep[r[below_i], c[below_i]] = False
    return keep


def mask_dropped_(z: torch.Tensor, cuts, rows: slice, buf: torch.Tensor) -> torch.Tensor:
    """The dense path: z (logits / T of `rows`) with its dropped logits set to -inf, in place."""
    t, i = cuts[0][rows][:, None], cuts[1][rows]
    for a, b in _blocks(*z.shape):
        z[a:b].masked_fill_(kept_mask(z[a:b], t[a:b], i[a:b], buf).logical_not_(), float("-inf"))
    return z


@dataclass
class Compact:
    """The kept logits of a chunk: z[r, c] = zk[r, pos] for every kept (r, c); zk's other entries are -inf.
    targets: the targets mapped into zk's columns (IGNORE where ignored; column 0 where dropped); dropped:
    the valid targets off the kept set."""
    r: torch.Tensor
    c: torch.Tensor
    pos: torch.Tensor
    zk: torch.Tensor
    targets: torch.Tensor
    dropped: torch.Tensor

    def scatter_into(self, dz: torch.Tensor, dzk: torch.Tensor) -> torch.Tensor:
        """dz (n, V) <- 0 off the kept set, dzk's values on it."""
        dz.zero_()
        dz[self.r, self.c] = dzk[self.r, self.pos]
        return dz


def compact(z: torch.Tensor, cuts, rows: slice, targets: torch.Tensor, ignore_index: int,
            buf: torch.Tensor) -> Compact | None:
    """The kept logits of z (logits / T of `rows`) as a Compact, or None when a mask block, or a row, keeps
    more than 1 / SPARSE_FRACTION of its logits (the dense path is cheaper then). The mask is built in
    `buf` (mask_buffer) block by block; one host sync per block (its count) and one for the widest row."""
    n, vocab = z.shape
    t, i = cuts[0][rows][:, None], cuts[1][rows]
    rs, cs = [], []
    for a, b in _blocks(n, vocab):
        keep = kept_mask(z[a:b], t[a:b], i[a:b], buf)
        count = int(torch.count_nonzero(keep))  # bool.sum would first copy the block to int64
        if count * SPARSE_FRACTION > (b - a) * vocab:  # before nonzero: at most 1 / SPARSE_FRACTION of the
            return None                                # block's logits ever get (16-byte) indices
        r, c = keep.nonzero(as_tuple=True)  # row-major: each row's kept columns in order
        rs.append(r + a)
        cs.append(c)
    r, c = torch.cat(rs), torch.cat(cs)
    starts = torch.searchsorted(r, torch.arange(n + 1, device=z.device))  # (n + 1,) each row's first entry
    width = int(starts.diff().max()) if n else 0
    if width * SPARSE_FRACTION > vocab:
        return None
    pos = torch.arange(r.numel(), device=z.device) - starts[r]
    zk = z.new_full((n, max(width, 1)), float("-inf"))
    zk[r, pos] = z[r, c]
    valid = targets != ignore_index
    hit = c == targets[r].long()
    found = torch.zeros(n, dtype=torch.bool, device=z.device)
    found[r[hit]] = True
    mapped = torch.zeros(n, dtype=torch.long, device=z.device)  # a dropped target reads column 0; masked later
    mapped[r[hit]] = pos[hit]
    mapped = torch.where(valid, mapped, IGNORE)
    return Compact(r, c, pos, zk, mapped, valid & ~found)


class KeptSets:
    """The kept sets of one op call, walked chunk by chunk; holds the reused mask buffer."""

    def __init__(self, cuts):
        self.cuts, self.buf = cuts, None

    def prepare_(self, z: torch.Tensor, rows: slice, targets: torch.Tensor, ignore_index: int) -> Compact | None:
        """The chunk's Compact when its kept sets are small; else None, with z's dropped logits set to -inf
        in place (the dense path; nothing to set when every row is unfiltered)."""
        if keeps_all(self.cuts, rows):
            return None
        if self.buf is None:
            self.buf = mask_buffer(z)
        kept = compact(z, self.cuts, rows, targets, ignore_index, self.buf)
        if kept is None:
            mask_dropped_(z, self.cuts, rows, self.buf)
        return kept
