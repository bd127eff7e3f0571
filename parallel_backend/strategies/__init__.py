"""Strategies: how one model call is shared among devices. One module per strategy, one interface.

Row strategies (batch, cfg) give each device a contiguous share of the call's rows; they compose as a mesh
(cfg outer, batch inner: rank = cfg_index * batch_degree + batch_index) and are exact. Model-splitting
strategies (AsyncDiff stages, patches) will form the inner axes: each row share runs on a group of devices.
"""

from __future__ import annotations

from . import batch, cfg

ROW_STRATEGIES = (cfg, batch)  # outer to inner


def plan_rows(total_rows: int, branches: int, degrees: dict[str, int]) -> list[range]:
    """Rows of each rank, rank order. degrees: {"cfg": 1|2, "batch": k}; product = number of ranks."""
    shares = [range(total_rows)]
    for strategy in ROW_STRATEGIES:
        shares = [part for share in shares
                  for part in strategy.partition(share, degrees.get(strategy.NAME, 1), branches)]
    return shares
