"""Sharded weights (models/weight_shards.py): each rank keeps 1/N of every block's parameters and gathers a
block's whole weights as it runs. Oracle: the same model whole, in one process. A group's ranks run as threads
whose gathers meet at a barrier (tests/tensor_threads.py); tests/test_weights_sharded_pool.py runs them on a
pool over gloo."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from parallel_backend.models import forward_for_family
from parallel_backend.models.weight_shards import SMALL, shard_in_place, units_of
from parallel_backend.runtime.recipe import weights_bytes


def _load(name: str, file: str):
    """A module of this folder by its file (the tests are not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_built = _load("sequence_dit_cases", "test_sequence_dit.py")
run_cut = _load("tensor_threads", "tensor_threads.py").run_cut


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16).eval().requires_grad_(False)


def _unet_call():
    from parallel_backend.runtime.calls import ModelCall

    gen = torch.Generator().manual_seed(3)
    return ModelCall(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500.0, 20.0]),
                     torch.randn(2, 5, 32, generator=gen))


CASES = [("flux", _built.tiny_flux, _built.flux_call(2, 7, 3, 5), "diffusers_dit:flux"),
         ("wan", _built.tiny_wan, _built.wan_call(2, 3, 6, 10), "diffusers_dit:wan"),
         ("sd unet", _tiny_unet, _unet_call(), "diffusers_unet:sd")]


def _sharded(prefetch: bool):
    def cut(module, degree, index, group):
        shard_in_place(module, degree, index, group, prefetch=prefetch)
    return cut


@pytest.mark.parametrize("prefetch", [False, True], ids=["gathered as it runs", "next gather posted ahead"])
@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sharded_ranks_equal_the_whole_model_and_hold_a_share(case, degree, prefetch):
    _, build, call, family = case
    whole = build()
    reference = forward_for_family(family)(whole, call)
    modules = [copy.deepcopy(whole) for _ in range(degree)]

    def twice(module):  # the second forward runs with the order learnt (gathers posted ahead)
        forward_for_family(family)(module, call)
        return forward_for_family(family)(module, call)

    outs, held = run_cut(modules, family, twice, cut=_sharded(prefetch))
    for out in outs:
        assert torch.equal(out, reference)  # the same weights, the same arithmetic: bit for bit
    blocks = sum(weights_bytes(unit) for _, unit in units_of(whole))
    assert blocks > 0.3 * weights_bytes(whole)  # tiny models: their embedders and tables weigh more than usual
    for rank_bytes in held:
        assert rank_bytes <= weights_bytes(whole) - blocks + blocks / degree + 64 * degree * len(units_of(whole))
    for module in modules:
        sharded = module.__dict__["_tandem_sharded"]
        assert not sharded.gathers.mounted  # nothing stays gathered between calls
        assert sharded.gathers.units >= 2 * len(sharded.units)
        assert all(p is None for unit in sharded.units for o, a, *_ in unit.entries for p in [o._parameters[a]])


def test_units_are_the_blocks_and_large_leaf_layers():
    flux = _built.tiny_flux()
    names = [name for name, _ in units_of(flux)]
    assert names == ["transformer_blocks.0", "single_transformer_blocks.0"]  # its other layers are small
    big = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.LayerNorm(300), torch.nn.ModuleList(
        [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]))
    assert [name for name, _ in units_of(big)] == ["0", "2.0", "2.1"]
    assert 300 * 301 >= SMALL > 600


def test_a_failed_call_leaves_nothing_gathered_after_release():
    flux = _built.tiny_flux()
    call = _built.flux_call(1, 7, 3, 5)

    class Alone:  # a group of one: its own piece
        degree = 1

        def start(self, piece, name=""):
            return piece

        def finish(self, started):
            return started

    sharded = shard_in_place(flux, 1, 0, Alone())
    reference = forward_for_family("diffusers_dit:flux")(flux, call)
    failing = flux.single_transformer_blocks[0].register_forward_pre_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        forward_for_family("diffusers_dit:flux")(flux, call)
    assert sharded.gathers.mounted == {"transformer_blocks.0"} or sharded.gathers.mounted
    sharded.release()
    assert not sharded.gathers.mounted
    failing.remove()
    assert torch.equal(forward_for_family("diffusers_dit:flux")(flux, call), reference)


def test_a_parameter_read_outside_its_block_fails_naming_it():
    layer = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4)]))

    class Alone:
        degree = 1

        def start(self, piece, name=""):
            return piece

        def finish(self, started):
            return started

    shard_in_place(layer, 1, 0, Alone())
    assert layer[0][0].weight is None
    with pytest.raises(TypeError):
        torch.nn.functional.linear(torch.ones(4), layer[0][0].weight)


def test_under_a_tensor_cut_only_what_every_rank_holds_the_same_is_sharded():
    """tensor then shard over the same group: each rank's own cut stays (it differs between ranks); the rest of
    each block (Flux's modulation, its norms) is divided. The output equals the whole model's."""
    from parallel_backend.models.tensor_splits import plan_for, split_in_place

    family, whole, call = "diffusers_dit:flux", _built.tiny_flux(), _built.flux_call(2, 7, 3, 5)
    reference = forward_for_family(family)(whole, call)
    tensor_only = copy.deepcopy(whole)

    class Alone:
        def sum(self, partial):
            return partial

        def gather(self, piece):
            return torch.cat([piece, piece], dim=-1)

    split_in_place(tensor_only, plan_for(tensor_only, family), 2, 0, Alone())

    def cut(module, degree, index, group):
        split_in_place(module, plan_for(module, family), degree, index, group)
        shard_in_place(module, degree, index, group)

    outs, held = run_cut([copy.deepcopy(whole) for _ in range(2)], family,
                         lambda module: forward_for_family(family)(module, call), cut=cut)
    for out in outs:
        assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert all(size < weights_bytes(tensor_only) for size in held)


GATHER_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[4])
from gloo_rank import join
from parallel_backend.runtime import primitives
from parallel_backend.models import forward_for_family
from parallel_backend.models.weight_shards import PeerGroup, shard_in_place
from test_sequence_dit import flux_call, tiny_flux, tiny_wan, wan_call

rank, world = join()
peers = tuple(reversed(range(world)))  # an order other than the ranks'
for name, build, call, family in (("flux", tiny_flux, flux_call(2, 7, 3, 5), "diffusers_dit:flux"),
                                  ("wan", tiny_wan, wan_call(2, 3, 6, 10), "diffusers_dit:wan")):
    for prefetch in (False, True):
        model = build()
        with torch.inference_mode():
            expected = forward_for_family(family)(model, call)
            sharded = shard_in_place(model, world, peers.index(rank), PeerGroup(peers, peers.index(rank), "cpu"),
                                     prefetch=prefetch)
            outs = [forward_for_family(family)(model, call) for _ in range(3)]
        print(json.dumps({"case": name, "prefetch": prefetch, "equal": all(torch.equal(o, expected) for o in outs),
                          "gathers": sharded.gathers.units, "units": len(sharded.units),
                          "received": sharded.gathers.bytes_received, "left": sorted(sharded.gathers.mounted)}),
              flush=True)
primitives.leave_group()
"""


@pytest.mark.pool
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_gathers_over_gloo_in_issue_order_equal_the_whole_model(gloo_ranks, world):
    """The message path (devices that share no memory: GPUs, other machines): each block's pieces cross as
    point-to-point messages paired in issue order, as on NCCL, also with the next block's gather posted ahead."""
    for results in gloo_ranks(GATHER_SCRIPT, world):
        assert len(results) == 4
        for result in results:
            assert result["equal"] and not result["left"], result
            assert result["gathers"] == 3 * result["units"] and result["received"] > 0, result


def test_a_module_whose_code_reads_its_layers_is_one_unit():
    """wan-small's condition embedder reads its time embedder's dtype from its parameters in its own forward:
    the embedder (no ModuleList inside) is one unit, gathered whole, and the sharded model runs."""
    from parallel_backend.engine.oracle import sample_call
    from parallel_backend.models.benchmodels import build_bench_model

    model = build_bench_model("wan-small", torch.float32, 5)
    names = [name for name, _ in units_of(model.module)]
    assert "condition_embedder" in names and not any(n.startswith("condition_embedder.") for n in names)
    call = sample_call(model, 1, (64, 64))
    reference = forward_for_family(model.family)(model.module, call)
    outs, _ = run_cut([copy.deepcopy(model.module) for _ in range(2)], model.family,
                      lambda module: forward_for_family(model.family)(module, call), cut=_sharded(False))
    assert all(torch.equal(out, reference) for out in outs)


def test_a_parameter_read_in_place_is_a_view_unless_it_spans_two_pieces():
    from parallel_backend.models.weight_shards import _span

    whole = torch.arange(12.0)
    pieces = list(whole.split(4))
    inside = _span(pieces, 5, 3)
    assert torch.equal(inside, whole[5:8]) and inside.data_ptr() == pieces[1][1:].data_ptr()  # no copy
    assert torch.equal(_span(pieces, 2, 9), whole[2:11])  # across three pieces: joined
    assert _span(pieces, 4, 0).numel() == 0


def _read_as_worker(path, whole, family, cut):
    """What a worker of this machine loads of the host's file under `cut`: only the parts the host's plan names
    (engine/weights.py `reads`), the skeleton joined around them; and the bytes it read."""
    from parallel_backend.engine.weights import reads
    from parallel_backend.runtime.cache_format import join_tensors
    from parallel_backend.runtime.tensor_parts import read

    parts = reads(whole, family, cut)
    tensors, nbytes = read(path[0], parts)
    return join_tensors(path[1].read_bytes(), tensors), nbytes, parts


def _bound_and_checked(module, cut_module):
    from parallel_backend.runtime.tensor_parts import check_bound

    def cut(m, degree, index, group):
        cut_module(m, degree, index, group)
        check_bound(m)  # every weight read in part was taken by the cut
    return cut


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_rank_reads_only_its_shards_from_the_file_and_equals_the_whole_model(case, degree, tmp_path):
    """The host writes the model once (safetensors + skeleton); each rank reads its Span of every unit's
    parameters and the weights outside the units; bound, the group's output equals the whole model's bit for
    bit, and what a rank read is its share, not the whole."""
    from parallel_backend.runtime.shipping import write

    _, build, call, family = case
    whole = build()
    reference = forward_for_family(family)(whole, call)
    files = write(whole, tmp_path / "model")
    loaded = [_read_as_worker(files, whole, family, ("shard", tuple(range(degree)), i, None)) for i in range(degree)]
    outs, _ = run_cut([m for m, _, _ in loaded], family, lambda module: forward_for_family(family)(module, call),
                      cut=_bound_and_checked(whole, _sharded(False)))
    assert all(torch.equal(out, reference) for out in outs)
    blocks = sum(weights_bytes(unit) for _, unit in units_of(whole))
    outside = weights_bytes(whole) - blocks
    for _, nbytes, parts in loaded:
        assert parts  # the plan names the units' parameters
        rows = sum(2 * 4 * math.prod(p.shape[1:]) for p in parts.values())  # at most a row more each side (fp32)
        assert nbytes <= outside + blocks / degree + rows, (nbytes, weights_bytes(whole))
    # every unit's byte read by one rank (but the rows a weight's run starts and ends in)
    assert sum(nbytes for _, nbytes, _ in loaded) - degree * outside <= blocks + rows * degree


def test_a_tensor_cut_then_its_shards_read_only_their_parts_and_equal_the_whole_model(tmp_path):
    """tensor then shard over the same group, read from the file: each rank reads its columns or rows of the cut
    layers and its Span of the rest of each block; bound, the output equals the whole model's."""
    from parallel_backend.models.tensor_splits import plan_for, split_in_place
    from parallel_backend.runtime.shipping import write
    from parallel_backend.runtime.tensor_parts import Slices, Span

    family, whole, call = "diffusers_dit:flux", _built.tiny_flux(), _built.flux_call(2, 7, 3, 5)
    reference = forward_for_family(family)(whole, call)
    files = write(whole, tmp_path / "model")
    peers = (0, 1)
    loaded = [_read_as_worker(files, whole, family, (("tensor", peers, i), ("shard", peers, i, None)))
              for i in range(2)]
    for _, _, parts in loaded:
        kinds = {type(part) for part in parts.values()}
        assert kinds == {Slices, Span}

    def cut(module, degree, index, group):
        split_in_place(module, plan_for(module, family), degree, index, group)
        shard_in_place(module, degree, index, group)

    outs, _ = run_cut([m for m, _, _ in loaded], family, lambda module: forward_for_family(family)(module, call),
                      cut=_bound_and_checked(whole, cut))
    for out in outs:
        assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert all(nbytes < 0.75 * weights_bytes(whole) for _, nbytes, _ in loaded), [n for _, n, _ in loaded]


def test_a_weight_read_in_part_that_no_cut_takes_is_refused(tmp_path):
    """A plan and a cut that disagree never compute on a part as if it were the whole weight: the shard cut
    refuses a part it did not plan, and a part left untaken is named."""
    from parallel_backend.runtime.shipping import write
    from parallel_backend.runtime.tensor_parts import check_bound

    family, whole = "diffusers_dit:flux", _built.tiny_flux()
    files = write(whole, tmp_path / "model")
    module, _, _ = _read_as_worker(files, whole, family, ("shard", (0, 1), 0, None))
    with pytest.raises(RuntimeError, match="was read in part"):
        check_bound(module)  # read as rank 0's shards, not cut yet
    other, _, _ = _read_as_worker(files, whole, family, ("shard", (0, 1, 2), 0, None))

    class Alone:
        degree = 2

    with pytest.raises(RuntimeError, match="disagree"):
        shard_in_place(other, 2, 0, Alone())  # read for a group of three, cut for a group of two


def test_a_tied_weight_is_read_whole_where_the_file_holds_it_under_two_names():
    """The host plans parts only where each names one plain tensor of the payload of that shape: a state dict
    holds a tied weight under two names (a recipe loads two copies), which a shard cut of the module (one
    tensor) would not match, so such a worker reads the whole file and cuts it; without the tie, parts."""
    from parallel_backend.engine.weights import reads
    from parallel_backend.runtime.recipe import Recipe, layout
    from parallel_backend.runtime.shipping import _parts, _tensor_holders

    torch.manual_seed(0)
    tied = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(300, 300), torch.nn.Linear(300, 300)]))
    tied[0][1].weight = tied[0][0].weight
    parts = reads(tied, "test", ("shard", (0, 1), 0, None))
    assert parts and "0.1.weight" not in parts  # the second name of the tied weight is not planned
    recipe = Recipe(lambda: None, tied.state_dict(), layout(tied), "tied")
    assert _parts(*_tensor_holders(recipe), parts) is None
    untied = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(300, 300), torch.nn.Linear(300, 300)]))
    assert _parts(*_tensor_holders(Recipe(lambda: None, untied.state_dict(), layout(untied), "untied")),
                  reads(untied, "test", ("shard", (0, 1), 0, None)))


def test_a_unit_read_in_parts_is_the_same_unit_as_on_the_host():
    """units_of counts a weight read in part (tensor_parts.PART) at its whole size, as the host counted it: a
    module of SMALL parameters or more is a unit on the host and stays one on a worker that read only part of it
    (else the worker's cut would leave the host's planned parts untaken: ComfyUI's Flux with sharded weights)."""
    from parallel_backend.runtime.tensor_parts import PART, Span

    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(8, 8)]), torch.nn.Linear(256, 256))
    assert sum(p.numel() for p in model[1].parameters()) >= SMALL
    whole = [name for name, _ in units_of(model)]
    weight = model[1].weight
    part = torch.nn.Parameter(weight.detach().reshape(-1)[:100].clone(), requires_grad=False)
    setattr(part, PART, Span(tuple(weight.shape), 0, 100))
    model[1].weight = part
    assert "1" in whole and [name for name, _ in units_of(model)] == whole
