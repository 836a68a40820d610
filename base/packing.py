"""base/packing.py: sequences packed into rows without padding, and prompt sharing (docs/packing.md).

Owns: a Piece (tokens that stay together in one row, with positions, segments and branches), the pieces of
one sequence (sequence_piece) or of one pair with its prompt once (shared_piece), their first-fit decreasing
rows (pack) and the shared layout's attention mask (shared_attention_mask).
Does not own: which layout a batch takes or its keys (data.collate), or scoring packed rows (training/scoring.py,
srpo.py).
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from srpo import IGNORE_INDEX


@dataclass
class Piece:
    """Tokens that stay together in one packed row, with each token's position, sequence and branch."""
    ids: list
    labels: list
    positions: list
    segments: list
    branches: list

    def __len__(self):
        return len(self.ids)


def sequence_piece(ids, labels, segment):
    """One sequence on its own: positions from 0, one segment, branch 0."""
    n = len(ids)
    return Piece(list(ids), list(labels), list(range(n)), [segment] * n, [0] * n)


def shared_piece(chosen_ids, chosen_labels, rejected_ids, rejected_labels, group, n_pairs):
    """One pair with its prompt once: prompt[:-1], then prompt[-1] + chosen, then prompt[-1] + rejected.

    The prompt is the longest unscored common prefix of the two sequences. Its last token is written
    twice, once before each response, so that each response's first token is predicted from its own copy
    (positions and attention as in the unshared sequence). Branch 0 is the shared prefix, 1 the chosen
    branch, 2 the rejected one; the chosen branch is segment `group`, the rejected branch `group + n_pairs`.
    """
    n = 0
    while (n < min(len(chosen_ids), len(rejected_ids)) and chosen_ids[n] == rejected_ids[n]
           and chosen_labels[n] == rejected_labels[n] == IGNORE_INDEX):
        n += 1
    head = max(n - 1, 0)
    c, r = len(chosen_ids) - head, len(rejected_ids) - head
    return Piece(chosen_ids + rejected_ids[head:], chosen_labels + rejected_labels[head:],
                  list(range(len(chosen_ids))) + list(range(head, len(rejected_ids))),
                  [group] * (head + c) + [group + n_pairs] * r, [0] * head + [1] * c + [2] * r)


def _first_fit(lengths, capacity):
    """Indices grouped into bins of total length <= capacity, first-fit decreasing (stable, deterministic)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, left in enumerate(room) if lengths[i] <= left), len(bins))
        if k == len(bins):
            bins.append([])
            room.append(capacity)
        bins[k].append(i)
        room[k] -= lengths[i]
    return bins


def _balanced_bins(lengths, pack_length):
    """Bins of total length at most pack_length (a longer item gets its own), first-fit decreasing under the
    capacity that leaves the fewest padded tokens (bins x longest bin): rows padded to the longest row."""
    top = max(pack_length, max(lengths))
    first = _first_fit(lengths, top)
    low = max(max(lengths), -(-sum(lengths) // len(first)))
    step = max(1, (top - low) // 64)

    def padded_size(bins):
        return len(bins) * max(sum(lengths[i] for i in b) for b in bins)

    tighter = (_first_fit(lengths, capacity) for capacity in range(top - step, low - 1, -step))
    return min(itertools.chain([first], tighter), key=padded_size)


def pack(pieces, pack_length, pad_token_id, shared):
    """Pieces in rows of at most pack_length tokens (a longer piece gets a row of its own), tail-padded.

    Returns input_ids, position_ids, labels, segment_ids [R, L] (the tail: pad id, positions restarting
    at 0, -100, segment -1), and when shared the 4D attention_mask [R, 1, L, L] bool (True: attend).
    """
    bins = _balanced_bins([len(p) for p in pieces], pack_length)
    width = max(sum(len(pieces[i]) for i in b) for b in bins)
    rows = [[pieces[i] for i in b] for b in bins]
    for row in rows:
        tail = width - sum(len(p) for p in row)
        if tail:
            row.append(Piece([pad_token_id] * tail, [IGNORE_INDEX] * tail, list(range(tail)), [-1] * tail,
                              [0] * tail))
    t = {name: torch.tensor([[x for p in row for x in getattr(p, name)] for row in rows], dtype=torch.int64)
         for name in ("ids", "labels", "positions", "segments")}
    batch = {"input_ids": t["ids"], "position_ids": t["positions"], "labels": t["labels"], "segment_ids": t["segments"]}
    if shared:  # numpy: single-threaded, so small ops do not wait on torch's threads in a busy process
        mask = np.zeros((len(rows), 1, width, width), dtype=bool)
        for r, row in enumerate(rows):
            at = 0
            for p in row:  # the mask is block-diagonal: one block a pair (or the tail)
                mask[r, 0, at:at + len(p), at:at + len(p)] = shared_attention_mask(p.branches)
                at += len(p)
        batch["attention_mask"] = torch.from_numpy(mask)
    return batch


def shared_attention_mask(branches):
    """Who attends to whom within one prompt-shared pair: causal, and a response branch sees the shared
    prefix (branch 0) and itself, never the other response.

    Shape: branches list of n ints (0 prefix, 1 chosen, 2 rejected), in row order.
    Returns [n, n] numpy bool, True where query token i may attend to key token j.
    """
    b = np.asarray(branches)
    causal = np.tri(len(b), dtype=bool)
    return causal & ((b[None, :] == 0) | (b[:, None] == b[None, :]))

