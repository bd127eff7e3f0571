"""Attention of queries to one block of keys, with the log-sum-exp that lets blocks be merged. Pure, but for one log
line when a fused kernel refuses (below).

For a query q and a block of keys k_j (values v_j), with scores s_j = scale * <q, k_j>:
    lse = log(sum_j exp(s_j)),   out = sum_j exp(s_j - lse) * v_j.
Two blocks merge exactly (the online-softmax rule): lse = log(exp(lse_a) + exp(lse_b)),
out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b; merging every block of the sequence gives full
attention, whatever the order of the blocks. A query that sees no key in a block (every key masked, or an empty
block) has lse = -inf and out = 0 there, which the merge weighs by 0 (never exp(-inf - -inf) = NaN).

Shapes: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); key_mask (B, Lk) bool, True where the key takes
part; out (B, H, Lq, Dv) and lse (B, H, Lq), both float32 (the merge accumulates in float32 whatever the input
dtype). Without a key mask, torch's fused attention kernels that also return the log-sum-exp compute it (the
flash kernel on CPU, the memory-efficient one on CUDA); a mask, an empty block or a kernel that refuses the
input takes the plain math form, which holds an (Lq x Lk) score block per head. A refusal is said once per
device type and dtype in the log (logger "tandem"), with the kernel's reason: that form is much slower.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("tandem")
_REFUSALS_SAID: set[tuple[str, torch.dtype]] = set()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of `q` attending to the block (`k`, `v`) alone; see the module doc for shapes."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if key_mask is None and q.shape[-2] and k.shape[-2]:
        fused = _fused(q, k, v, scale)
        if fused is not None:
            return fused
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - _finite(lse).unsqueeze(-1))  # rows with no key: exp(-inf) = 0 everywhere
    return torch.matmul(weights, v.float()), lse


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(out, lse) from torch's fused kernel for q's device, or None where there is none or it refuses."""
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
        elif q.device.type == "cuda":  # its log-sum-exp may be padded along the queries: cut to Lq
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
        else:
            return None
    except (RuntimeError, NotImplementedError) as exc:  # the plain math form computes it: said once, as it is slower
        _say_refusal(q, exc)
        return None
    return out.float(), lse[..., :q.shape[-2]].float()


def _say_refusal(q: torch.Tensor, exc: Exception) -> None:
    """Says once per device type and dtype that the fused kernel refused, and why."""
    kind = (q.device.type, q.dtype)
    if kind in _REFUSALS_SAID:
        return
    _REFUSALS_SAID.add(kind)
    reason = (str(exc).strip().splitlines() or [""])[0]
    log.warning("Tandem: torch's fused attention kernel refused %s %s input (%s: %s); sequence-parallel attention "
                "takes the plain float32 form instead, much slower (said once per device type and dtype)",
                q.device.type, str(q.dtype).removeprefix("torch."), type(exc).__name__, reason)


def merge(acc: tuple[torch.Tensor, torch.Tensor] | None,
          block: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, lse) of attention to the keys of both `acc` and `block`; `acc` None: nothing yet."""
    if acc is None:
        return block
    (out_a, lse_a), (out_b, lse_b) = acc, block
    top = _finite(torch.maximum(lse_a, lse_b))
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)  # 0 where a side saw no key
    total = weight_a + weight_b
    out = (out_a * weight_a.unsqueeze(-1) + out_b * weight_b.unsqueeze(-1)) / _nonzero(total).unsqueeze(-1)
    return out, top + torch.log(total)  # log(0) = -inf: still no key on either side


def _finite(x: torch.Tensor) -> torch.Tensor:
    """-inf (no key seen) replaced by 0, so subtracting it never gives -inf - -inf."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))
