"""The banded VAE decode's cost (plan/vae_costs.py) and its counted figures (plan/vae_count.py): the arithmetic
against a case worked by hand; the halos, collectives and gathered inputs counted on meta against what the bands
of a real decode exchange (threads, tests/tensor_threads.py: every message each band sends, counted as
vae_bands.PeerBands counts it); the bytes held against a sequence worked by hand; the full-size VAEs' parameters
and attention FLOPs against their published size and the formula; the pool's bytes between devices against the
prediction (one CPU pool). No timing is asserted."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from parallel_backend.models.vae_bands import band_in_place, band_rows
from parallel_backend.plan import paper_models
from parallel_backend.plan.links import Link
from parallel_backend.plan.vae_costs import VaeDecode, predict_decode
from parallel_backend.plan.vae_count import LiveBytes, count_decode, plan_vae_line

_THREADS = importlib.util.spec_from_file_location("tensor_threads", Path(__file__).with_name("tensor_threads.py"))
threads = importlib.util.module_from_spec(_THREADS)
_THREADS.loader.exec_module(threads)

SLOW_LINK = Link("by-hand", 1000.0, 0.01, "a link for arithmetic by hand: 1000 B/s, 10 ms per message")


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4)
    return vae.eval().requires_grad_(False)


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    from parallel_backend.models.benchmodels_vae import seed_wan_weights

    vae = AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True])
    return seed_wan_weights(vae).eval().requires_grad_(False)


def on_meta(vae, latent):
    return copy.deepcopy(vae).to("meta"), latent.to("meta")


def test_the_cost_of_a_banded_decode_worked_by_hand():
    decode = VaeDecode(flops=1000, whole_flops=100, rows=10, halos=((1000, 2), (500, 1)), norms=(16,),
                       whole_inputs=(4000,), weight_bytes=100, activation_bytes=1000, whole_entry_bytes=200,
                       whole_working_bytes=50, latent_bytes=80, image_bytes=300)
    one = predict_decode(decode, 10.0, SLOW_LINK, 1, overhead_s=0.5)
    assert (one.seconds, one.speedup, one.peer_bytes, one.memory_bytes) == (10.0, 1.0, 0, 100 + 1000)
    three = predict_decode(decode, 10.0, SLOW_LINK, 3, overhead_s=0.5)
    # 0.01 s per FLOP; the largest band holds 4 of the 10 rows
    assert three.band_seconds == pytest.approx(900 * 0.01 * 0.4) and three.whole_seconds == pytest.approx(1.0)
    # a middle band sends its edge to both neighbours (2 messages); the halving convolution's row goes up only
    assert three.halo_seconds == pytest.approx((2 * 0.01 + 2000 / 1000) + (0.01 + 500 / 1000))
    # one all-gather to 2 others of every band's count, mean and squared deviations (3 slots x 3 x 16 bytes);
    # the attention's bands' heights (8 bytes), then its band of 4 rows of 10 (1600 bytes)
    norms = 2 * 0.01 + 2 * 144 / 1000
    gather = (2 * 0.01 + 16 / 1000) + (2 * 0.01 + 3200 / 1000)
    assert three.collective_seconds == pytest.approx(norms + gather)
    assert three.host_seconds == pytest.approx((3 * 0.01 + 0.08) + (3 * 0.01 + 0.3) + 0.5)
    assert three.seconds == pytest.approx(3.6 + 1.0 + 2.53 + norms + gather + 0.44 + 0.5)
    assert three.speedup == pytest.approx(10.0 / three.seconds)
    assert three.peer_bytes == 2 * (2 * 1000 + 500) + 3 * 2 * (144 + (8 + 1600))
    # while the attention runs: 2/5 of what was held, its own 50 bytes and the gathered 4000
    assert three.activation_bytes == max(400, 80 + 50 + 4000) and three.memory_bytes == 100 + 4130
    assert predict_decode(decode, 10.0, SLOW_LINK, 2, contention=2.0).band_seconds == pytest.approx(900 * 0.01)
    with pytest.raises(ValueError, match="a latent of 10 rows cannot be split into 11 bands"):
        predict_decode(decode, 10.0, SLOW_LINK, 11)


def test_live_bytes_count_each_storage_once_while_referenced():
    kept = torch.empty(1000, device="meta")  # 4000 bytes, not counted (a weight)
    with LiveBytes([kept]) as live:
        a = torch.ones(100, device="meta")  # 400
        b = a.view(10, 10)  # its storage: not again
        del a
        c = b * 2  # 800 live
        del b  # 400 live
        view = kept.view(10, 100)  # a weight's view: not counted
        d = view + 1  # 4400 live: the peak
        del c, d  # 0
        live.enter()  # a block run whole: what it adds, apart
        e = torch.ones(50, device="meta")  # 200 over its entry
        live.leave()
    assert (live.peak, live.live, live.block_entry, live.block_peak) == (4400, 200, 0, 200)
    del e, view


def _counting(band, log):
    """A band (tile) group that logs every message as vae_bands.PeerBands counts it: halo sends (to each neighbour
    there is: the one that sends back), each all-gather's piece once per other rank."""

    def swap(exchange, first, last):
        before, after = exchange(first, last)
        log["halo"] += sum(t.numel() * t.element_size() for t, there in ((first, before), (last, after))
                           if there is not None)
        return before, after

    class Counting:
        degree, index, columns = band.degree, band.index, getattr(band, "columns", 1)

        def halo(self, top, bottom):
            return swap(band.halo, top, bottom)

        def halo_columns(self, left, right):
            return swap(band.halo_columns, left, right)

        def gather_tiles(self, tile):
            whole, row, column = band.gather_tiles(tile)
            log["gathers"].append(whole.numel() * whole.element_size())
            return whole, row, column

        def sum(self, partial):
            log["sums"].append(partial.numel() * partial.element_size())
            return band.sum(partial)

        def gather_rows(self, rows):
            whole, first = band.gather_rows(rows)
            log["gathers"].append(whole.numel() * whole.element_size())
            return whole, first

    return Counting()


def _banded_logs(vae, latent, degree: int, part):
    bands, logs = threads.ThreadBands(degree), [{"halo": 0, "sums": [], "gathers": []} for _ in range(degree)]

    def rank(index):
        mine = copy.deepcopy(vae)
        band_in_place(part(mine), _counting(bands.rank(index), logs[index]))
        rows = band_rows(latent.shape[-2], degree, index)
        with torch.inference_mode():
            mine.decode(latent[..., rows.start:rows.stop, :])

    threads.run_threads(bands.group, rank)
    return logs


@pytest.mark.parametrize("build, shape, part, degree", [
    (tiny_vae, (1, 4, 7, 5), lambda vae: vae, 3),
    (tiny_wan_vae, (1, 4, 3, 7, 5), lambda wan: wan.decoder, 2)])
def test_counted_exchanges_equal_what_the_bands_send(build, shape, part, degree):
    vae = build()
    latent = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    decode = count_decode(*on_meta(vae, latent))
    logs = _banded_logs(vae, latent, degree, part)
    assert sum(log["halo"] for log in logs) == decode.halo_bytes(degree)
    for log in logs:
        assert log["sums"] == [3 * degree * sums for sums in decode.norms]  # every band's slot of 3 moments
        assert log["gathers"] == list(decode.whole_inputs)
    # the bytes PeerBands counts: halos, and every all-gather's piece (an attention's band padded to the largest,
    # after the heights) to every other rank
    largest = math.ceil(latent.shape[-2] / degree)
    gathered = sum(8 + size * largest // latent.shape[-2] for size in decode.whole_inputs)
    sent = sum(log["halo"] for log in logs) + degree * (degree - 1) * (sum(logs[0]["sums"]) + gathered)
    assert predict_decode(decode, 1.0, SLOW_LINK, degree).peer_bytes == sent


@pytest.mark.parametrize("build, shape, part", [(tiny_vae, (1, 4, 7, 5), lambda vae: vae),
                                                (tiny_wan_vae, (1, 4, 3, 7, 5), lambda wan: wan.decoder)])
def test_counted_grid_halos_equal_what_the_tiles_send(build, shape, part):
    """On 4 devices the 7 x 5 latent splits 2 x 2: the columns cross one cut, then the rows (with the corners)
    the other; the counted bytes are what the tiles send, and the prediction's bytes between devices theirs."""
    from parallel_backend.models.vae_grid import tile_ranges

    vae = build()
    latent = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    decode = count_decode(*on_meta(vae, latent))
    assert decode.grid(4) == (2, 2) and decode.grid(3) == (3, 1)
    tiles, logs = threads.ThreadBands(4, 2), [{"halo": 0, "sums": [], "gathers": []} for _ in range(4)]

    def rank(index):
        mine = copy.deepcopy(vae)
        band_in_place(part(mine), _counting(tiles.rank(index), logs[index]))
        rows, columns = tile_ranges(7, 5, (2, 2), index)
        with torch.inference_mode():
            mine.decode(latent[..., rows.start:rows.stop, columns.start:columns.stop])

    threads.run_threads(tiles.group, rank)
    sent = sum(log["halo"] for log in logs)
    assert sent == decode.halo_bytes(4, (2, 2)) and sent < decode.halo_bytes(4)  # fewer than bands of rows
    assert all(log["gathers"] == list(decode.whole_inputs) for log in logs)
    gathered = sum(16 + size * 4 * 3 // (7 * 5) for size in decode.whole_inputs)  # padded to the largest tile
    prediction = predict_decode(decode, 1.0, SLOW_LINK, 4)
    assert prediction.grid == (2, 2) and prediction.peer_bytes == sent + 4 * 3 * (sum(logs[0]["sums"]) + gathered)
    assert prediction.activation_bytes < predict_decode(decode, 1.0, SLOW_LINK, 2).activation_bytes


def test_the_counted_attention_is_the_formula_and_the_rest_bands():
    vae = tiny_vae()  # one attention in the mid block: 16 channels over the 7 x 5 latent; 2 upsamplings
    decode = count_decode(*on_meta(vae, torch.zeros(2, 4, 7, 5)))
    tokens, width = 7 * 5, 16
    per_image = 4 * tokens * tokens * width + 4 * 2 * tokens * width * width  # q k^T, the weighted v; 4 projections
    assert decode.whole_flops == 2 * per_image and 0 < decode.whole_flops < decode.flops
    assert decode.whole_inputs == (2 * width * tokens * 4,) and decode.rows == 7
    assert decode.norms and set(decode.norms) == {2 * 4 * 8}  # batch 2 x 4 groups, float64 sums
    assert decode.weight_bytes == sum(p.numel() * 4 for p in vae.parameters())
    assert decode.image_bytes == 2 * 3 * 28 * 20 * 4 and decode.activation_bytes > decode.image_bytes


@pytest.mark.parametrize("build, published", [("flux_vae_meta", 83.8e6), ("wan_vae_meta", 127e6)])
def test_the_full_size_vaes_build_on_meta_at_their_published_size(build, published):
    vae = getattr(paper_models, build)()
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in vae.parameters())
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(published, rel=0.02)


def test_full_size_flux_vae_counts_its_mid_block_attention_whole():
    decode = count_decode(paper_models.flux_vae_meta(), torch.empty(1, 16, 128, 128, device="meta",
                                                                    dtype=torch.bfloat16))
    tokens, width = 128 * 128, 512  # the mid block, at the latent's resolution: 1/64 of the image's pixels
    assert decode.whole_flops == 4 * tokens * tokens * width + 8 * tokens * width * width
    assert decode.whole_inputs == (tokens * width * 2,) and len(decode.norms) == 29
    assert decode.flops == pytest.approx(10.47e12, rel=0.01) and decode.image_bytes == 3 * 1024 * 1024 * 2


def test_full_size_wan_vae_counts_each_latent_frame():
    # Two latent frames of 720p (the whole 21 are counted by the doc, tests/test_plan_paper.py's slow test): the
    # first decodes to 1 frame, the second to 4, each with its own halos and its own attention.
    decode = count_decode(paper_models.wan_vae_meta(), torch.empty(1, 16, 2, 90, 160, device="meta",
                                                                   dtype=torch.bfloat16))
    assert len(decode.whole_inputs) == 2 and decode.norms == ()  # RMS norms: nothing to sum over the bands
    assert decode.whole_inputs[0] == 384 * 90 * 160 * 2
    assert decode.image_bytes == 3 * 5 * 720 * 1280 * 2 and len(decode.halos) % 2 == 0


def test_the_plan_line_says_why_a_model_without_a_vae_is_not_predicted():
    line, said = plan_vae_line("sd15-narrow", (256, 256), None, ["cpu", "cpu"], SLOW_LINK, 0.0)
    assert line.startswith("VAE decode: not predicted: --stage vae: bench model 'sd15-narrow' has no VAE")
    assert "why_not" in said


@pytest.mark.pool
def test_the_vae_bench_moves_the_bytes_the_plan_predicts(tmp_path):
    """The bench's bands on a CPU pool (at a --resolution given on the command line) exchange exactly the bytes
    the cost counts for them."""
    from parallel_backend.commands.cli import main
    from parallel_backend.models.benchmodels_vae import bench_latent, build_bench_vae

    out = tmp_path / "vae.json"
    assert main(["bench", "--stage", "vae", "--model", "tiny", "--devices", "cpu:2", "--resolution", "64x96",
                 "--repeats", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["resolution"] == [64, 96]
    decode = count_decode(*on_meta(build_bench_vae("tiny"), bench_latent("tiny", (64, 96))))
    assert report["results"][1]["bytes_between_devices"] == predict_decode(decode, 1.0, SLOW_LINK, 2).peer_bytes
