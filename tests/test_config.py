"""ParallelConfig and the row plans of the exact strategies: pure, no processes."""

from __future__ import annotations

import itertools

import pytest

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.engine.mesh import Mesh, SequenceHint, check_job, fit, resolve
from parallel_backend.runtime.devices import PoolUnavailable, parse_devices, resolve_devices


def plan_rows(rows: int, branches: int, degrees: dict) -> list[range]:
    return Mesh("cfg", degrees.get("cfg", 1), degrees.get("batch", 1)).row_shares(rows, branches)


def test_device_specs():
    assert parse_devices("cuda:0,cuda:1") == ("cuda:0", "cuda:1")
    assert parse_devices("cpu:2") == parse_devices("cpu,cpu") == ("cpu", "cpu")
    assert parse_devices(["cuda:1", "cuda:0"]) == ("cuda:1", "cuda:0")
    assert parse_devices("auto") == ("auto",)


@pytest.mark.parametrize("spec, message", [
    ("gpu:0", "not understood"), ("", "empty"), ("cuda:0,cuda:0", "twice"), ("cpu,cuda:0", "mix"), ("cpu:0", "at least one"),
])
def test_bad_device_specs_say_what_to_write(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_devices(spec)


def test_missing_cuda_device_is_named(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices(("cuda:0", "cuda:1")) == ("cuda:0", "cuda:1")
    with pytest.raises(ValueError, match=r"cuda:3 does not exist: this machine has 2 CUDA devices \(cuda:0, cuda:1\)"):
        resolve_devices(("cuda:0", "cuda:3"))
    assert resolve_devices(("auto",)) == ("cuda:0", "cuda:1")
    with pytest.raises(ValueError, match=r"^cuda:6, cuda:7 do not exist: this machine has 2"):  # all, one sentence
        resolve_devices(("cuda:6", "cuda:7"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(devices="cpu:1", strategy="cfg"), r"cfg 2 x batch 1 = 2 devices, but there are 1"),
    (dict(devices="cpu:4", strategy="cfg", batch_degree=3), "give more devices or smaller degrees"),
    (dict(devices="cpu:4", batch_degree=2), "'auto' chooses the degrees itself"),
    (dict(devices="cpu:2", strategy="batch", cfg_degree=2), "choose strategy 'cfg'"),
    (dict(devices="cpu:2", strategy="cfg", cfg_degree=1), "use strategy 'batch'"),
    (dict(devices="cpu:2", strategy="cfg", cfg_degree=3), "only two branches"),
    (dict(devices="cpu:2", strategy="zigzag"), "unknown strategy"),
    (dict(devices="cpu:2", strategy="batch", batch_degree=0), "whole number >= 1"),
    (dict(devices="cpu:2", timeout_s=0), "timeout_s must be a finite number of seconds > 0"),
    (dict(devices="cpu:2", timeout_s=float("nan")), "timeout_s must be a finite number of seconds > 0; got nan"),
    (dict(devices="cpu:2", timeout_s=float("inf")), "timeout_s must be a finite number"),
    (dict(devices="cpu:2", timeout_s=-1), "timeout_s must be a finite number"),
    (dict(devices="cpu:2", strategy="cfg", stages=2), "cut the model into stages: choose a strategy that does \\(asyncdiff\\)"),
    (dict(devices="cpu:2", strategy="asyncdiff", stride=3), "stride must be 1 or 2"),
    (dict(devices="cpu:2", strategy="asyncdiff", warmup=-1), "warmup must be a whole number"),
    (dict(devices="cpu:4", strategy="asyncdiff", cfg_degree=2, stages=3), "x stages 3 = 6 devices, but there are 4"),
    (dict(devices="cpu:2", strategy="ulysses", ring=2), "ring 2: it splits the token sequence and passes keys and "
     "values around a ring: choose a strategy that does \\(ring, usp\\)"),
    (dict(devices="cpu:2", strategy="asyncdiff", ulysses=2), "choose a strategy that does \\(ulysses, usp\\)"),
    (dict(devices="cpu:2", strategy="usp", ulysses=4), "ring 1 x ulysses 4 = 4 devices, but there are 2"),
    (dict(devices="cpu:4", strategy="usp", ulysses=2, ring=3), "ring 3 x ulysses 2 = 6 devices, but there are 4"),
])
def test_bad_combinations_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_cfg_degree_two_with_cfg_one_is_refused_per_job():
    config = ParallelConfig("cpu:2", "cfg")
    assert check_job(config, 2, guided=True).degrees() == {"cfg": 2, "batch": 1}
    with pytest.raises(ValueError, match="cfg degree 2 needs cfg > 1; this job runs with cfg=1.0"):
        check_job(config, 2, guided=False)


def test_a_pool_without_a_machine_fits_the_mesh_to_the_devices_left():
    """mesh.fit: the configured mesh where it still fits, else auto's exact rule for the devices left."""
    with pytest.raises(ValueError, match="cfg 2 x batch 1 = 2 devices, but there are 1"):
        resolve(ParallelConfig("cpu:2", "cfg"), 1)
    assert fit(ParallelConfig("cpu:2", "cfg"), 1) == Mesh("batch", 1, 1, (), 1)  # both branches on the one device
    config = ParallelConfig("cpu:4", "asyncdiff", stages=4)
    assert fit(config, 3) == Mesh("cfg", 2, 1, (), 3)
    assert fit(ParallelConfig("cpu:4", "cfg"), 3) == resolve(ParallelConfig("cpu:4", "cfg"), 3)  # still fits: as is
    assert fit(ParallelConfig("cpu:4", "batch"), 2, branches=1, rows=2).degrees() == {"cfg": 1, "batch": 2}


def test_auto_picks_cfg_with_guidance_and_batch_without():
    config = ParallelConfig("cpu:4")
    assert check_job(config, 4, guided=True).degrees() == {"cfg": 2, "batch": 2}
    assert check_job(config, 4, guided=False).degrees() == {"cfg": 1, "batch": 4}


def test_asyncdiff_mesh_gives_the_remaining_devices_to_stages():
    assert check_job(ParallelConfig("cpu:2", "asyncdiff"), 2, True).degrees() == {"cfg": 1, "batch": 1, "stages": 2}
    config = ParallelConfig("cpu:4", "asyncdiff", cfg_degree=2)
    assert check_job(config, 4, True).degrees() == {"cfg": 2, "batch": 1, "stages": 2}
    with pytest.raises(ValueError, match="cfg degree 2 needs cfg > 1"):
        check_job(config, 4, False)
    # a call holding one branch keeps the ranks: the cfg degree folds into batch
    assert resolve(config, 4, branches=1).degrees() == {"cfg": 1, "batch": 2, "stages": 2}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("branches, rows", [(2, 2), (2, 4), (1, 1), (1, 3), (1, 8)])
def test_auto_gives_a_valid_mesh_for_any_device_count_and_call(n, branches, rows):
    mesh = resolve(ParallelConfig(f"cpu:{n}"), n, branches, rows)
    assert 1 <= mesh.size <= n and mesh.idle == n - mesh.size
    assert mesh.cfg == (2 if branches == 2 and n >= 2 else 1)  # cfg first when the call has both branches
    assert mesh.batch == max(1, min(n // mesh.cfg, rows // mesh.cfg))  # then batch over the rows it has
    shares = mesh.row_shares(rows, branches)
    assert [r for share in shares for r in share] == list(range(rows)) and all(len(share) for share in shares)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_every_strategy_that_fits_gets_a_mesh_and_the_rest_are_refused_with_a_sentence(n):
    for strategy in ("cfg", "batch", "asyncdiff"):
        if strategy == "cfg" and n < 2:
            with pytest.raises(ValueError, match="but there are 1"):
                ParallelConfig(f"cpu:{n}", strategy)
            continue
        mesh = resolve(ParallelConfig(f"cpu:{n}", strategy), n)
        assert mesh.size <= n and mesh.strategy == strategy


@pytest.mark.parametrize("n, branches, rows, heads, expected", [
    (2, 1, 1, 4, "ulysses (cfg 1 x batch 1 x ulysses 2)"),  # one image at cfg 1: the sequence
    (3, 1, 1, 4, "ring (cfg 1 x batch 1 x ring 3)"),  # 3 does not divide 4 heads
    (4, 1, 1, None, "ring (cfg 1 x batch 1 x ring 4)"),  # heads unknown: ring, which takes any
    (3, 1, 2, 6, "ulysses (cfg 1 x batch 1 x ulysses 3)"),  # 2 rows cannot give 3 devices a whole row each
    (2, 1, 2, 4, "batch (cfg 1 x batch 2)"),  # a whole row for each device: batch, nothing exchanged
    (4, 2, 2, 24, "ulysses (cfg 2 x batch 1 x ulysses 2)"),  # cfg first, the sequence on the devices beyond it
    (5, 2, 2, 24, "ulysses (cfg 2 x batch 1 x ulysses 2), 1 device idle"),
    (2, 2, 2, 24, "cfg (cfg 2 x batch 1)"),  # no device beyond cfg
    (5, 2, 4, 24, "cfg (cfg 2 x batch 2), 1 device idle"),  # 2 rows per branch for 2 devices
    (1, 1, 1, 4, "batch (cfg 1 x batch 1)"),
])
def test_auto_splits_the_sequence_of_a_dit_whose_rows_cannot_go_round(n, branches, rows, heads, expected):
    mesh = resolve(ParallelConfig(f"cpu:{n}"), n, branches, rows, SequenceHint(heads))
    assert mesh.describe() == expected
    assert bool(mesh.why) == (mesh.inner > 1)  # the log says why, for a sequence split only
    assert resolve(ParallelConfig(f"cpu:{n}"), n, branches, rows).inner == 1  # a UNet (no hint): today's rule


def test_a_sequence_split_that_does_not_fit_the_models_heads_is_refused_naming_ring():
    usp = ParallelConfig("cpu:6", "usp", ulysses=3)
    assert resolve(usp, 6, 1, 1, SequenceHint(6)).degrees() == {"cfg": 1, "batch": 1, "ring": 2, "ulysses": 3}
    six_for_eight_heads = resolve(ParallelConfig("cpu:6", "usp", ulysses=2), 6, 1, 1, SequenceHint(8))
    assert six_for_eight_heads.degrees() == {"cfg": 1, "batch": 1, "ring": 3, "ulysses": 2}  # ulysses 6 could not
    with pytest.raises(ValueError, match="ulysses degree 3 does not divide the model's 8 attention heads: use ring"):
        resolve(usp, 6, 1, 1, SequenceHint(8))
    with pytest.raises(ValueError, match="ulysses degree 3 does not divide the model's 8 attention heads: use ring"):
        resolve(ParallelConfig("cpu:3", "ulysses"), 3, 1, 1, SequenceHint(8))
    assert resolve(ParallelConfig("cpu:3", "ring"), 3, 1, 1, SequenceHint(8)).degrees()["ring"] == 3


def test_usp_takes_ulysses_and_ring_and_derives_the_missing_one_from_the_devices():
    def degrees(**knobs):
        return check_job(ParallelConfig("cpu:8", "usp", **knobs), 8, guided=True).degrees()

    assert degrees(ulysses=2) == {"cfg": 1, "batch": 1, "ring": 4, "ulysses": 2}
    assert degrees(ring=2) == {"cfg": 1, "batch": 1, "ring": 2, "ulysses": 4}
    assert degrees(ulysses=2, ring=2) == {"cfg": 1, "batch": 1, "ring": 2, "ulysses": 2}  # 4 devices idle
    assert degrees(cfg_degree=2, ulysses=2) == {"cfg": 2, "batch": 1, "ring": 2, "ulysses": 2}
    assert degrees(ulysses=3) == {"cfg": 1, "batch": 1, "ring": 2, "ulysses": 3}  # 8 // 3: 2 devices idle
    assert degrees() == {"cfg": 1, "batch": 1, "ring": 8, "ulysses": 1}  # no model yet: ring fits any heads


def _usp_oracle(left: int, heads: int | None, ulysses: int | None, ring: int | None) -> tuple[int, int] | None:
    """usp's (ring, ulysses) on `left` devices per row group, by brute force over every pair that fits them: the
    degrees given kept; a ulysses not given divides the model's heads (unknown: 1, or any with ring given); of
    those, the pair that uses the most devices, then the one with the larger ulysses. None: none fits (refused)."""
    pairs = [(r, u) for r in range(1, left + 1) for u in range(1, left + 1) if r * u <= left
             and ring in (None, r) and ulysses in (None, u)
             and (ulysses is not None or (heads % u == 0 if heads else (ring is not None or u == 1)))]
    return max(pairs, key=lambda pair: (pair[0] * pair[1], pair[1]), default=None)


@pytest.mark.parametrize("n", range(1, 9))
def test_usp_degrees_left_unset_take_what_the_devices_and_heads_allow(n):
    """Every cfg and batch degree, head count (None: unknown) and given degree on `n` devices against the oracle;
    a combination it finds no pair for is refused in one sentence, as is a given ulysses the heads do not take."""
    given = [(None, None), (2, 2), (3, 2)] + [(k, None) for k in range(1, 10)] + [(None, k) for k in range(1, 10)]
    for cfg, batch, heads, (ulysses, ring) in itertools.product((None, 2), (None, 2), (None, 1, 2, 3, 8, 24), given):
        config = ParallelConfig("auto", "usp", cfg_degree=cfg, batch_degree=batch, ulysses=ulysses, ring=ring)
        expected = _usp_oracle(n // ((cfg or 1) * (batch or 1)), heads, ulysses, ring)
        if expected is None:
            with pytest.raises(ValueError, match=r"devices, but there are \d+; give more devices"):
                resolve(config, n, 2, None, SequenceHint(heads))
        elif heads and ulysses and heads % ulysses:
            with pytest.raises(ValueError, match="does not divide the model's .* attention heads: use ring"):
                resolve(config, n, 2, None, SequenceHint(heads))
        else:
            mesh = resolve(config, n, 2, None, SequenceHint(heads))
            assert (mesh.cfg, mesh.batch, mesh.split) == (cfg or 1, batch or 1, expected), (config, heads)


def test_creating_a_config_checks_no_hardware():
    import threading

    before = threading.active_count()
    config = ParallelConfig("cuda:0,cuda:1", "cfg")  # this machine has no CUDA: creation must not look
    assert threading.active_count() == before and config.device_list == ("cuda:0", "cuda:1")


@pytest.mark.parametrize("rows, branches, degrees, expected", [
    (2, 2, {"cfg": 2}, [range(0, 1), range(1, 2)]),
    (4, 2, {"cfg": 2, "batch": 2}, [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]),
    (6, 2, {"cfg": 2, "batch": 2}, [range(0, 2), range(2, 3), range(3, 5), range(5, 6)]),
    (3, 1, {"batch": 2}, [range(0, 2), range(2, 3)]),
    (1, 1, {"batch": 2}, [range(0, 1), range(1, 1)]),
])
def test_row_plans_cover_every_row_once_in_order(rows, branches, degrees, expected):
    plan = plan_rows(rows, branches, degrees)
    assert plan == expected
    assert [r for share in plan for r in share] == list(range(rows))


def test_cfg_split_refuses_a_call_without_both_branches():
    with pytest.raises(ValueError, match="needs a call holding both branches"):
        plan_rows(2, 1, {"cfg": 2})


def test_gpu_pools_on_windows_are_refused_with_a_sentence(monkeypatch):
    import sys

    import torch

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # a pool that cannot take calls, not a fault: ComfyUI's nodes take the stock path with this sentence
    with pytest.raises(PoolUnavailable, match="GPU pools need NCCL, which PyTorch does not ship for Windows"):
        resolve_devices(("cuda:0", "cuda:1"))
    with pytest.raises(RuntimeError, match="use Linux or WSL2"):
        resolve_devices(("auto",))
    assert resolve_devices(("cpu", "cpu")) == ("cpu", "cpu")
