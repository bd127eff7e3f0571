"""patch in the cost model (plan/costs.py `patch_cost`) and in auto's choice: its exchange hides behind the whole
call up to the call's length, warm-up calls cost as ring's, it is marked stale, and auto considers it only where
the config allows stale strategies (`allow_stale`). Made-up inputs: no timing is asserted."""

from __future__ import annotations

import pytest

from parallel_backend.engine.config import ParallelConfig, form_knobs
from parallel_backend.engine.mesh import Mesh
from parallel_backend.plan.choose import choose
from parallel_backend.plan.links import Link
from parallel_backend.plan.model import Inputs, candidates, predict
from parallel_backend.plan.traffic import CallShape, host_traffic

FLUX_512 = CallShape(rows=1, input_bytes=1024 * 64 * 4 + 256 * 512 * 4, output_bytes=1024 * 64 * 4, tokens=1280,
                     width=512, heads=8, attentions=6, itemsize=4)
LINK = Link("300 MB/s", 3e8, 0.0, "made up")  # a ring pass (2.6 MB) takes 8.7 ms, past the 5 ms it hides behind
PIECE = 1280 // 2 * 512 * 4  # a rank's k (or v) on 2 devices
GATHER = 1024 // 2 * 64 * 4  # a rank's share of the prediction


def inputs(link: Link, **fields) -> Inputs:
    return Inputs(FLUX_512, "diffusers_dit:flux", 1, {1: 0.2}, link, attention_seconds=0.02,
                  shard_seconds={(1, 2): 0.1}, **fields)


def host_seconds(link: Link, mesh: Mesh) -> float:
    host = host_traffic(mesh, FLUX_512, 1)
    return link.seconds(host.host_in, mesh.inner) + link.seconds(host.host_out, 1)


def test_patch_hides_its_exchange_behind_the_whole_call_where_ring_cannot():
    inp = inputs(LINK)
    mesh = Mesh("patch", 1, 1, (2,), 2)
    patch, ring = predict(inp, mesh), predict(inp, Mesh("ring", 1, 1, (2,), 2))
    exchange = 6 * LINK.seconds(2 * PIECE)
    assert exchange < 0.1  # shorter than a rank's compute: all of it hidden, only the final gather exposed
    assert patch.seconds_per_call == pytest.approx(0.1 + LINK.seconds(GATHER) + host_seconds(LINK, mesh), rel=1e-9)
    assert patch.transfer_seconds == pytest.approx(exchange + LINK.seconds(GATHER) + host_seconds(LINK, mesh))
    ring_exposed = 6 * (LINK.seconds(2 * PIECE) - 0.02 / 4)  # each pass longer than the block it hides behind
    assert ring.seconds_per_call == pytest.approx(patch.seconds_per_call + ring_exposed, rel=1e-9)
    assert patch.peer_bytes_per_call == ring.peer_bytes_per_call  # the same k/v cross, a call later
    assert not patch.exact and ring.exact
    assert "stale after 1 exact step" in patch.reason


def test_what_outlasts_the_compute_is_exposed_and_warm_up_costs_as_ring():
    slow = Link("10 MB/s", 1e7, 0.0, "made up")
    inp = inputs(slow, steps=10, warmup=3)
    mesh = Mesh("patch", 1, 1, (2,), 2)
    patch, ring = predict(inp, mesh), predict(inp, Mesh("ring", 1, 1, (2,), 2))
    exchange = 6 * slow.seconds(2 * PIECE)
    assert exchange > 0.1
    assert patch.seconds_per_call == pytest.approx(exchange + slow.seconds(GATHER) + host_seconds(slow, mesh))
    run = 3 * ring.seconds_per_call + 7 * patch.seconds_per_call
    assert patch.predicted_speedup_end_to_end == pytest.approx(10 * inp.one_device / run, rel=1e-9)


def test_auto_considers_patch_only_where_stale_strategies_are_allowed():
    inp = inputs(LINK)
    found = candidates(inp, 2)
    assert choose(found, exact_only=True).best.strategy != "patch"
    assert choose(found).best.strategy == "patch"


def test_allow_stale_is_one_setting_off_by_default_and_on_the_forms_after_the_memory_ones():
    assert ParallelConfig("cpu:2").allow_stale is False
    assert ParallelConfig("cpu:2", allow_stale=True).allow_stale is True
    names = [knob.name for knob in form_knobs()]
    assert names.index("allow_stale") == names.index("memory_per_device") + 1
    # saved workflows keep their widgets' order: the strategies added since come after every earlier input
    assert min(names.index(n) for n in ("patch", "pipefusion", "patches")) > names.index("allow_stale")
    with pytest.raises(TypeError, match="allow_stale must be True or False"):
        ParallelConfig("cpu:2", allow_stale="sometimes")
