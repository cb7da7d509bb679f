"""The dilated unmasking order of the mask source: which positions a planned step reveals.

A factorised step draws the positions it moves independently given x_t. Its error is the total
correlation of those positions given x_t, and for text (or any chain-like law) that is largest for
neighbours. The dilated order (after DUS, arXiv 2506.19037) reveals positions far apart first
and fills the gaps between revealed ones later: position i gets the key rev(i), the bit reversal
of i in ceil(log2 L) bits (the van der Corput sequence), and is revealed in increasing key order.
For L = 32 that is 0, 16, 8, 24, 4, 20, 12, 28, 2, 18, ...: the first 2^j positions are evenly
spread, L / 2^j apart, and the next 2^j lie one in each of their gaps. So any two positions that
a step takes from one such run have a revealed position between them; for an order-1 Markov
chain they are then conditionally independent given x_t and the factorised step over them is
exact. Only the first steps (positions far apart, so weakly coupled) and steps that straddle two
runs approximate.

With the schedule kappa and M positions to generate in a row, the step from t to t + h reveals
those of rank r (in that row's generated positions, by key) with

    round(M kappa_t) <= r < round(M kappa_{t+h}),

(round: half to even, as torch.round), so the share revealed by time t is the path's kappa_t
(SPEC 1) and the last step reveals the rest. The sampler computes both ends of a step from its
integer number, so consecutive steps share their boundary count: every rank is revealed once.
"""

from __future__ import annotations

import torch


def dilated_keys(length: int) -> torch.Tensor:
    """rev(i) for i = 0..length-1 [length] (int64): the bit reversal of i in ceil(log2 length)
    bits. Distinct for distinct i, so sorting by them gives a permutation of the positions."""
    bits = max(1, (length - 1).bit_length())
    i = torch.arange(length)
    key = torch.zeros_like(i)
    for b in range(bits):
        key |= ((i >> b) & 1) << (bits - 1 - b)
    return key


def dilated_order(length: int) -> torch.Tensor:
    """The positions 0..length-1 in the order they are revealed [length] (int64)."""
    return torch.argsort(dilated_keys(length))


def reveal_ranks(generated: torch.Tensor | None, batch_size: int, length: int, device):
    """(rank [B, L] int64, count [B] float64): each generated position's rank in its row's
    dilated order, and the number M of generated positions per row. Frozen positions (False in
    ``generated``) rank after every generated one, so they are never revealed. Device work only
    (no host synchronisation)."""
    keys = dilated_keys(length).to(device).expand(batch_size, length)
    if generated is None:
        frozen = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
    else:
        frozen = ~generated
    order = torch.argsort(keys + frozen.long() * (2 * length))
    positions = torch.arange(length, device=device).expand(batch_size, length)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return rank, (~frozen).sum(1).double()


def revealed_now(rank, count, kappa_t, kappa_next) -> torch.Tensor:
    """Where the step from kappa_t to kappa_next reveals [B, L] (bool): the ranks in
    [round(M kappa_t), round(M kappa_next)) of each row (kappa as float64 scalars or [B])."""
    low = torch.round(count * kappa_t)[:, None]
    high = torch.round(count * kappa_next)[:, None]
    return (rank >= low) & (rank < high)
