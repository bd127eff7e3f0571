"""Ulysses (DeepSpeed-Ulysses): attention over the whole sequence, each rank for its own group of heads.

Before attention, rank r holds q, k, v of shape (B, H, L_r, D): its shard of the tokens (`Shards`), all heads.
An all-to-all turns that into (B, H/N, L, D): every token, heads [r*H/N, (r+1)*H/N). Attention runs there
unchanged (each head is independent of the others), and a second all-to-all brings the output back to
(B, H, L_r, D). Tokens after the first exchange lie rank after rank (`Shards.gathered_positions`), which is
exact for attention (see shards.py); a key mask is cut in that same order.

Hiding the exchanges (`_local_first`, with torch's attention): the part of its heads' q, k, v a rank already
holds (its own tokens) is attended while the rest travels, the other ranks' queries are answered as soon as
they arrive so their outputs travel while the rank's own queries attend to the keys that came in, and the two
blocks of its own queries merge by the online-softmax rule. On 2 CPU workers this took a Ulysses attention
of flux-small's shape from 32-33 ms (all q, k, v in, then attend, then the output back, in 2 pipelined
chunks of heads) to 27-30 ms, level with ring; 21-24 ms of it is the attention itself.
Over `Blocks` of single ranks it runs among a subset of a larger cut (USP's subgroups, usp.py).

The layout functions are pure (they say what goes to whom); `ulysses_attention` runs the exchange through
`primitives.all_to_all`. In a simulation, rank r's s-th received piece is rank s's r-th piece to send.
Traffic per attention per rank: q, k, v out and the output back, each (N-1)/N of the rank's share.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ...runtime import primitives
from .shards import Blocks, Shards
from .traffic import Traffic, timed_wait

HEADS, TOKENS = -3, -2  # dims of (..., H, L, D)


def heads_per_rank(heads: int, degree: int) -> int:
    if heads % degree:
        raise ValueError(f"ulysses degree {degree} does not divide the model's {heads} attention heads: use ring "
                         f"for this model, or a ulysses degree that divides {heads}")
    return heads // degree


def to_heads(x: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """The pieces a rank sends before attention: piece s holds heads group s of its tokens, (..., H/N, L_r, D)."""
    return list(x.split(heads_per_rank(x.shape[HEADS], degree), HEADS))


def join_tokens(received: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's tokens of this rank's heads, rank after rank: (..., H/N, L, D)."""
    return torch.cat(received, TOKENS)


def to_tokens(out: torch.Tensor, shards: Shards | Blocks) -> list[torch.Tensor]:
    """The pieces a rank sends after attention: piece s holds rank s's tokens of this rank's heads."""
    return list(out.split(shards.sizes, TOKENS))


def join_heads(received: list[torch.Tensor]) -> torch.Tensor:
    """The rank's own tokens with every head again: (..., H, L_r, D)."""
    return torch.cat(received, HEADS)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
         scale: float | None) -> torch.Tensor:
    """torch's attention, the default `attend`: key_mask (B, L) bool, True where the key takes part."""
    mask = None if key_mask is None else key_mask[:, None, None, :].to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "float | None"], torch.Tensor]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: Shards | Blocks, index: int,
                      peers: list[int] | None = None, key_mask: torch.Tensor | None = None,
                      scale: float | None = None, attend: Attend = sdpa,
                      traffic: Traffic | None = None) -> torch.Tensor:
    """Attention of the whole sequence, computed by the group together; returns this rank's rows.

    q, k, v: (B, H, L_r, D) with L_r = shards.sizes[index], the same D for all three. `peers`: the group's
    global ranks in shard order (default 0..N-1); this rank is peers[index]. key_mask: (B, L) bool over the
    whole joint sequence in joint order (True: the key takes part), the same on every rank. `attend(q, k, v,
    key_mask, scale)` computes attention on (B, H/N, L, D). Returns (B, H, L_r, D).
    """
    peers = list(range(shards.degree)) if peers is None else list(peers)
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"ulysses exchanges q, k and v of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (use ring for a value width other than the query's)")
    if attend is sdpa:
        return _local_first(q, k, v, shards, index, peers, key_mask, scale, traffic)
    batch, heads, _, dim = q.shape
    group = heads_per_rank(heads, shards.degree)
    chunk = group // pipeline_chunks(group)  # heads per exchange: the next chunk travels while one is attended
    stacked = torch.stack([q, k, v])  # one message per peer carries all three
    if key_mask is not None:
        key_mask = key_mask[:, shards.gathered_positions()]

    def start(c: int):
        pieces = [p.narrow(HEADS, c * chunk, chunk) for p in to_heads(stacked, shards.degree)]
        shapes = [(3, batch, chunk, size, dim) for size in shards.sizes]
        return primitives.start_all_to_all(pieces, shapes, peers, index, q.device)

    chunks = group // chunk
    incoming, outgoing = [start(0)], []
    for c in range(chunks):
        received = timed_wait(traffic, primitives.finish_all_to_all, incoming[c])
        if c + 1 < chunks:
            incoming.append(start(c + 1))
        gq, gk, gv = join_tokens(received).unbind(0)
        out = attend(gq, gk, gv, key_mask, scale)
        shapes = [(batch, chunk, shards.sizes[index], out.shape[-1])] * shards.degree
        outgoing.append(primitives.start_all_to_all(to_tokens(out, shards), shapes, peers, index, q.device))
    returned = [timed_wait(traffic, primitives.finish_all_to_all, started) for started in outgoing]
    for direction in (incoming, outgoing):  # one all-to-all each way, whatever the chunks
        _count(traffic, [torch.cat([started[2][s] for started in direction], HEADS)
                         for s in range(shards.degree)], index)
    return join_heads([torch.cat([chunk_out[s] for chunk_out in returned], HEADS) for s in range(shards.degree)])


def _local_first(q, k, v, shards, index: int, peers: list[int], key_mask, scale, traffic) -> torch.Tensor:
    """`ulysses_attention` with both exchanges hidden behind compute, for torch's attention. While the other
    ranks' q, k, v for this rank's heads travel, their part that is already here (this rank's own tokens) is
    attended: own queries to own keys, with the log-sum-exp. When they arrive, the other ranks' queries attend to
    every key first and their outputs leave at once; while those travel, the own queries attend to the other
    ranks' keys, merged with the first block by the online-softmax rule (attention.py): exact."""
    from .attention import block_attention, merge

    batch, heads, _, dim = q.shape
    n = shards.degree
    group = heads_per_rank(heads, n)
    mine = slice(index * group, (index + 1) * group)
    sent = to_heads(torch.stack([q, k, v]), n)
    incoming = primitives.start_all_to_all(sent, [(3, batch, group, size, dim) for size in shards.sizes], peers,
                                           index, q.device)
    others = [s for s in range(n) if s != index]

    def keys_mask(ranks: list[int]):
        return None if key_mask is None else key_mask[:, [p for s in ranks for p in shards.positions(s)]]

    own = block_attention(q[:, mine], k[:, mine], v[:, mine], scale, keys_mask([index]))
    received = timed_wait(traffic, primitives.finish_all_to_all, incoming)
    queries = join_tokens([received[s][0] for s in others]) if others else q[:, mine, :0]
    keys, values = (join_tokens([received[s][j] for s in range(n)]) for j in (1, 2))
    answers = (sdpa(queries, keys, values, keys_mask(list(range(n))), scale) if queries.shape[TOKENS]
               else queries)
    pieces = dict(zip(others, answers.split([shards.sizes[s] for s in others], TOKENS)))
    pieces[index] = q.new_empty((batch, group, 0, dim))  # stays here; replaced by the own result below
    outgoing = primitives.start_all_to_all([pieces[s] for s in range(n)],
                                           [(batch, group, shards.sizes[index], dim)] * n, peers, index, q.device)
    if others:
        rest = (join_tokens([received[s][j] for s in others]) for j in (1, 2))
        own = merge(own, block_attention(q[:, mine], *rest, scale, keys_mask(others)))
    returned = timed_wait(traffic, primitives.finish_all_to_all, outgoing)
    returned[index] = own[0].to(q.dtype)
    _count(traffic, sent, index)
    _count(traffic, [pieces[s] for s in range(n)], index)
    return join_heads(returned)


def pipeline_chunks(group: int) -> int:
    """Exchanges per direction per attention: 2 when the rank's heads split evenly (the second chunk's transfer
    overlaps the first chunk's attention, and the first output's the second's), else 1."""
    return 2 if group % 2 == 0 else 1


def _count(traffic: Traffic | None, pieces: list[torch.Tensor], index: int) -> None:
    if traffic is not None:
        traffic.record([p for s, p in enumerate(pieces) if s != index])
