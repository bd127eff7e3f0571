"""A VAE decoder split into bands of rows (models/vae_bands.py) against the same decoder whole. Oracle: the
whole decode in this process; the bands run as threads (tests/tensor_threads.py) or as two gloo processes
(point-to-point messages paired in issue order, as on NCCL), and their rows, joined, must equal it."""

from __future__ import annotations

import json

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from parallel_backend.models.vae_bands import band_in_place, band_rows, check_bands, row_scale

_THREADS = importlib.util.spec_from_file_location("tensor_threads", Path(__file__).with_name("tensor_threads.py"))
threads = importlib.util.module_from_spec(_THREADS)
_THREADS.loader.exec_module(threads)


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=32)
    return vae.eval().requires_grad_(False)


def tiny_wan_vae():
    """diffusers' Wan 2.1 video VAE (causal 3D convolutions, a cache of the chunk before, attention per frame),
    narrow, its weights seeded at a scale that keeps the output inside the clamp of [-1, 1]."""
    from diffusers import AutoencoderKLWan

    from parallel_backend.models.benchmodels_vae import seed_wan_weights

    vae = AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True])
    return seed_wan_weights(vae).eval().requires_grad_(False)


def _close(out, reference):
    assert out.shape == reference.shape
    assert (out - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())


def banded(vae, x, degree: int, run, unit: int = 1):
    """run(vae, rows) on each band of `x` (bands of `unit` rows), as `degree` threads, joined along the rows."""
    bands, outs = threads.ThreadBands(degree), [None] * degree

    def rank(index):
        mine = copy.deepcopy(vae)
        band_in_place(mine, bands.rank(index))
        rows = band_rows(x.shape[-2] // unit, degree, index)
        with torch.inference_mode():
            outs[index] = run(mine, x[..., rows.start * unit:rows.stop * unit, :])

    threads.run_threads(bands.group, rank)
    return torch.cat(outs, dim=-2)


def _decode(vae, z):
    with torch.inference_mode():
        return vae.decode(z).sample


def _encode(vae, image):
    with torch.inference_mode():
        return vae.encode(image).latent_dist.parameters


def banded_decode(vae, z, degree: int):
    return banded(vae, z, degree, _decode)


@pytest.mark.parametrize("degree, rows, columns", [(2, 8, 8), (3, 7, 5), (4, 9, 6)])
def test_banded_decode_equals_the_whole(degree, rows, columns):
    vae = tiny_vae()
    z = torch.randn(2, 4, rows, columns, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = vae.decode(z).sample
    _close(banded_decode(vae, z, degree), reference)


@pytest.mark.parametrize("degree, rows, columns", [(2, 4, 3), (3, 5, 2)])
def test_banded_encode_equals_the_whole(degree, rows, columns):
    """Bands of whole latent rows (8 image rows each: three padded downsamples halve them exactly)."""
    vae = tiny_vae()
    image = torch.randn(2, 3, 8 * rows, 8 * columns, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference = _encode(vae, image)
    _close(banded(vae, image, degree, _encode, unit=8), reference)


@pytest.mark.parametrize("degree", [2, 3])
def test_a_video_vae_decodes_and_encodes_in_bands_equal_to_the_whole(degree):
    """Wan's VAE decodes frame by frame (encodes 1, then 4 frames at a time), each causal convolution joining the
    cached frames before it: every band keeps its own cache; its downsamples pad through a ZeroPad2d."""
    vae = tiny_wan_vae()
    z = torch.randn(1, 4, 3, 7, 5, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        reference = _decode(vae, z)
        alone = torch.cat([_decode(vae, z[..., :4, :]), _decode(vae, z[..., 4:, :])], dim=-2)
    assert reference.shape == (1, 3, 5, 28, 20) and (reference.abs() < 0.99).float().mean() > 0.99  # no clamp
    assert (alone - reference).abs().max() > 1e-2  # bands without halos differ
    _close(banded(vae, z, degree, _decode), reference)
    clip = torch.randn(1, 3, 5, 8 * 7, 40, generator=torch.Generator().manual_seed(11))  # 1 + 4 frames
    _close(banded(vae, clip, degree, _encode, unit=8), _encode(vae, clip))


def _qwen_image_vae():
    from diffusers import AutoencoderKLQwenImage

    from parallel_backend.models.benchmodels_vae import seed_wan_weights

    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True])
    return seed_wan_weights(vae).eval().requires_grad_(False)


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4)
    return vae.eval().requires_grad_(False)


@pytest.mark.parametrize("build, latent, image", [
    (_qwen_image_vae, (1, 4, 2, 6, 5), (1, 3, 5, 24, 40)),
    (_flux2_vae, (1, 4, 6, 5), (1, 3, 24, 40)),
], ids=["qwen-image", "flux2"])
def test_qwen_image_and_flux2_vaes_split_equal_to_the_whole(build, latent, image):
    from parallel_backend.models.vae_bands import row_scale
    from parallel_backend.models.vae_families import family_of

    vae = build()
    assert family_of(vae) is not None and row_scale(vae) == 4  # two halvings in these narrow ones
    z = torch.randn(latent, generator=torch.Generator().manual_seed(12))
    x = torch.randn(image, generator=torch.Generator().manual_seed(13))
    _close(banded(vae, z, 2, _decode), _decode(vae, z))
    _close(banded(vae, x, 2, _encode, unit=4), _encode(vae, x))


def test_a_band_that_skipped_the_halo_would_differ():
    """The oracle can fail: the same bands decoded alone (no halo, no shared statistics) do not equal it."""
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = vae.decode(z).sample
        alone = torch.cat([vae.decode(z[..., :4, :]).sample, vae.decode(z[..., 4:, :]).sample], dim=-2)
    assert (alone - reference).abs().max() > 1e-2


def test_layers_that_cannot_band_exactly_are_refused_before_work():
    vae = tiny_vae()
    dilated = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=2, dilation=2))
    with pytest.raises(ValueError, match=r"^layer '0' dilates its rows"):
        band_in_place(dilated, threads.ThreadBands(2).rank(0))
    with pytest.raises(ValueError, match="cannot be split into 3 bands of at least one row: use at most 2 devices"):
        check_bands(2, 3)
    banded = band_in_place(copy.deepcopy(vae.decoder), threads.ThreadBands(2).rank(0))
    with pytest.raises(ValueError, match="already split into bands"):
        band_in_place(banded, threads.ThreadBands(2).rank(0))


class CarriedConv3d(torch.nn.Module):
    """ComfyUI's class name for a 3D convolution without padding whose caller pads its input (vae_bands matches it by
    name); a stand-in, so that the fast tier needs no ComfyUI (tests/comfy/test_vae.py runs ComfyUI's own)."""

    def __init__(self, channels: int, out: int, stride=1):
        super().__init__()
        self.conv = torch.nn.Conv3d(channels, out, 3, stride=stride)

    def forward(self, x):
        return self.conv(x)


class CallerPadded(torch.nn.Module):
    """Chunks of 2 frames through two such convolutions (the second halves the rows), each input padded by its
    caller: one replicated row and column on each side, and before it the last 2 padded frames of the chunk
    before (2 replicated frames before the first chunk); a GroupNorm between them."""

    def __init__(self):
        super().__init__()
        self.first, self.norm, self.down = CarriedConv3d(2, 4), torch.nn.GroupNorm(2, 4), CarriedConv3d(4, 4, (1, 2, 2))

    @staticmethod
    def _padded(x, carried: list, index: int):
        x = torch.nn.functional.pad(x, (1, 1, 1, 1, 2 if carried[index] is None else 0, 0), mode="replicate")
        x = x if carried[index] is None else torch.cat([carried[index], x], dim=2)
        carried[index] = x[:, :, -2:].clone()
        return x

    def forward(self, x, pad: bool = True):
        carried, out = [None, None], []
        for chunk in x.split(2, dim=2):
            h = self.norm(self.first(self._padded(chunk, carried, 0) if pad else chunk))
            out.append(self.down(self._padded(h, carried, 1)))
        return torch.cat(out, dim=2)


@pytest.mark.parametrize("degree, rows", [(2, 10), (3, 14)])
def test_convolutions_their_caller_pads_band_equal_to_the_whole(degree, rows):
    """ComfyUI's CarriedConv3d (HunyuanVideo's): the caller's replicated rows at a band's inner edges become the
    neighbours' rows, in the frames carried from the chunk before too; bands hold whole pairs of rows (the second
    convolution halves them), unequal: 3 and 2 pairs, or 3, 2 and 2."""
    torch.manual_seed(0)
    net = CallerPadded().eval().requires_grad_(False)
    x = torch.randn(1, 2, 5, rows, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = net(x)
    assert row_scale(net) == 2
    out = banded(net, x, degree, lambda module, rows_in: module(rows_in), unit=2)
    _close(out, reference)
    alone = banded(net, x, degree, lambda module, rows_in: CallerPadded.forward(copy.deepcopy(net), rows_in), unit=2)
    assert (alone - reference).abs().max() > 1e-3  # the oracle can tell: bands run alone (padded at their own
    # edges, their own statistics) differ


def test_a_convolution_its_caller_did_not_pad_is_refused():
    net = band_in_place(CallerPadded().eval(), threads.ThreadBands(1).rank(0))
    with pytest.raises(RuntimeError, match=r"^a CarriedConv3d's input is not padded by 1 replicated row above and "
                                           r"below, as ComfyUI's conv_carry_causal_3d pads it"):
        net(torch.randn(1, 2, 2, 6, 6), pad=False)


def test_convolutions_their_caller_pads_that_cannot_take_their_neighbours_lines_are_refused_by_name():
    """The caller's one replicated line on each side fits a 3-line kernel, undilated, that pads nothing itself and
    would pad in zeros: a 5-column kernel, a dilation, or padding of its own (any mode) is refused, naming the
    lines it cannot take."""
    def refusal(dimension: str, conv: torch.nn.Conv3d) -> str:
        return (f"layer 'first' (CarriedConv3d, kernel {conv.kernel_size}, stride {conv.stride}, padding "
                f"{conv.padding} after its caller's 1 line) cannot take its {dimension} from its neighbours' "
                f"{'bands' if dimension == 'rows' else 'tiles'} exactly: splitting it into "
                f"{'bands' if dimension == 'rows' else 'tiles'} is not supported yet")

    for dimension, conv in (("columns", torch.nn.Conv3d(2, 4, (3, 3, 5))),
                            ("rows", torch.nn.Conv3d(2, 4, 3, dilation=(1, 2, 1))),
                            ("rows", torch.nn.Conv3d(2, 4, 3, padding=(0, 1, 0))),
                            ("rows", torch.nn.Conv3d(2, 4, 3, padding=(1, 0, 0), padding_mode="replicate"))):
        net = CallerPadded()
        net.first.conv = conv
        with pytest.raises(ValueError) as refused:
            band_in_place(net, threads.ThreadBands(2).rank(0))
        assert str(refused.value) == refusal(dimension, conv)


BAND_SCRIPT = '''
import sys
sys.path.insert(0, sys.argv[4])
import torch
from gloo_rank import join
from test_vae_bands import tiny_vae
from parallel_backend.models.vae_bands import PeerBands, band_in_place, band_rows

rank, world = join()
vae = tiny_vae()
z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(3))
group = PeerBands(tuple(range(world)), rank, "cpu")
band_in_place(vae, group)
rows = band_rows(9, world, rank)
with torch.inference_mode():
    out = vae.decode(z[..., rows.start:rows.stop, :]).sample
torch.save({"out": out, "bytes": group.bytes}, sys.argv[5] + f"/band{rank}.pt")
'''


@pytest.mark.pool
def test_bands_over_gloo_processes_equal_the_whole(gloo_ranks, tmp_path):
    gloo_ranks(BAND_SCRIPT, 2, str(tmp_path))
    parts = [torch.load(tmp_path / f"band{r}.pt") for r in range(2)]
    vae = tiny_vae()
    z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference = vae.decode(z).sample
    _close(torch.cat([p["out"] for p in parts], dim=-2), reference)
    assert all(p["bytes"] > 0 for p in parts)  # the halos and statistics really crossed between the processes


@pytest.mark.pool
def test_a_pool_decodes_in_bands_equal_to_one_device(cpu_pool):
    from parallel_backend.engine.pool_engine import engine_for
    from parallel_backend.engine.vae import decode, encode

    vae = tiny_vae()
    z = torch.randn(2, 4, 7, 6, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        reference = vae.decode(z).sample
    done = decode(engine_for(cpu_pool), vae, z)
    _close(done.out, reference)
    assert done.extra["bands"] == 2 and set(done.extra["compute_s"]) == {0, 1} and done.bytes_sent > 0
    one = decode(engine_for(cpu_pool), vae, z, devices=1)  # one band: the same worker alone, no exchange
    _close(one.out, reference)
    assert one.extra["bands"] == 1 and one.bytes_sent == 0
    image = torch.randn(1, 3, 40, 24, generator=torch.Generator().manual_seed(6))
    _on_two_bands(encode(engine_for(cpu_pool), vae, image), _encode(vae, image))
    with pytest.raises(ValueError, match="does not divide into the VAE.s 4-pixel latent rows"):  # two halvings
        encode(engine_for(cpu_pool), vae, image[..., :34, :])
    wan = tiny_wan_vae()
    video = torch.randn(1, 4, 3, 6, 5, generator=torch.Generator().manual_seed(9))
    _on_two_bands(decode(engine_for(cpu_pool), wan, video), _decode(wan, video))
    clip = torch.randn(1, 3, 5, 48, 40, generator=torch.Generator().manual_seed(10))
    _on_two_bands(encode(engine_for(cpu_pool), wan, clip), _encode(wan, clip))


def _on_two_bands(done, reference):
    _close(done.out, reference)
    assert done.extra["bands"] == 2 and done.bytes_sent > 0


def test_a_vae_without_a_band_split_is_left_to_its_host():
    from parallel_backend.engine.vae import decode
    from parallel_backend.runtime.carry import CannotCarry

    with pytest.raises(CannotCarry, match="no band split for a Linear VAE"):
        decode(None, torch.nn.Linear(2, 2), torch.zeros(1, 4, 2, 2))


@pytest.mark.pool
def test_the_vae_bench_decodes_in_bands_and_reports_one_run():
    from parallel_backend.commands.bench_vae import format_vae_table, run_vae_bench

    report = run_vae_bench("tiny", "cpu:2", repeats=0, progress=lambda _: None)
    serial, bands = report["results"]
    assert (serial["strategy"], bands["strategy"], bands["devices"]) == ("serial", "bands", 2)
    assert bands["max_abs_diff_vs_serial"] <= 1e-4 * max(1.0, bands["output_scale"])
    assert len(bands["activation_bytes_per_device"]) == 2 and len(bands["peak_memory_bytes_per_device"]) == 2
    assert bands["bytes_between_devices"] > 0 and bands["speedup_vs_serial"] > 0
    assert "VAE decode, tiny at 64x64 px" in format_vae_table(report)


@pytest.mark.pool
def test_the_encode_bench_encodes_in_bands_equal_to_one_device(tmp_path):
    """`--stage encode`: the seeded image's encode in bands on the pool, against the whole encode here."""
    from parallel_backend.commands.cli import main

    out = tmp_path / "encode.json"
    assert main(["bench", "--stage", "encode", "--model", "tiny", "--devices", "cpu:2", "--repeats", "0",
                 "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    serial, bands = report["results"]
    assert report["stage"] == "encode" and bands["devices"] == 2
    assert bands["max_abs_diff_vs_serial"] <= 1e-4 * max(1.0, bands["output_scale"])
    assert bands["bytes_between_devices"] > 0 and len(bands["activation_bytes_per_device"]) == 2


@pytest.mark.parametrize("argv, said", [
    (["--model", "sd15-narrow"], "--stage vae: bench model 'sd15-narrow' has no VAE to split yet"),
    (["--model", "sd15", "--resolution", "260"], "a VAE's resolution must be a multiple of 8 pixels; got 260x260"),
    (["--model", "sd15", "--repeats", "-1"], "repeats"),
    (["--stage", "encode", "--model", "sd15-narrow"], "--stage encode: bench model 'sd15-narrow' has no VAE"),
])
def test_the_vae_bench_refuses_bad_input_before_work(capsys, argv, said):
    from parallel_backend.commands.cli import main

    assert main(["bench", "--stage", "vae", *argv]) == 1
    assert said in capsys.readouterr().err
