"""The video VAEs beyond Wan 2.1 split into bands of rows (models/vae_bands.py) against the same VAE whole: Wan 2.2's
(patchify, residual down- and up-blocks), HunyuanVideo's (replicate-padded causal 3D convolutions, strided
downsamples, its mid block whole) and LTX-Video's (strided or pixel-unshuffle downsamples, pixel-shuffle upsamples),
all tiny seeded configurations of diffusers' own classes. Oracle: the whole decode or encode in this process;
the bands run as threads (tests/tensor_threads.py) or on a pool of two CPU workers, and their rows, joined, must
equal it."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from parallel_backend.models.vae_bands import band_in_place, check_layers, check_noise, row_scale
from parallel_backend.models.vae_families import family_of


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bands_test = _load("test_vae_bands")
threads = bands_test.threads
banded, _decode, _encode = bands_test.banded, bands_test._decode, bands_test._encode


def _close(out, reference):
    """Equal within 1e-4 of the output's scale; returns the largest difference (the exactness figure)."""
    assert out.shape == reference.shape
    diff = (out - reference).abs().max().item()
    assert diff <= 1e-4 * max(1.0, reference.abs().max().item())
    return diff


def wan22_vae():
    """Wan 2.2's configuration (is_residual, patch_size 2: 12 channels in and out), narrow."""
    from diffusers import AutoencoderKLWan

    from parallel_backend.models.benchmodels_vae import seed_wan_weights

    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True], is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, scale_factor_spatial=8)
    return seed_wan_weights(vae).eval().requires_grad_(False)


def hunyuan_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, norm_num_groups=4,
                                    spatial_compression_ratio=4, temporal_compression_ratio=4)
    return vae.eval().requires_grad_(False)


def ltx_vae(**config):
    """LTX-Video 0.9.0's shape (strided 'conv' downsamples), narrow; `config` overrides."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(**{"latent_channels": 4, "block_out_channels": (8, 16, 16, 16),
                                   "decoder_block_out_channels": (8, 16, 16, 16), "layers_per_block": (1,) * 5,
                                   "decoder_layers_per_block": (1,) * 5, "patch_size": 2, **config})
    return vae.eval().requires_grad_(False)


def ltx095_vae(**config):
    """LTX-Video 0.9.5's shape: downsamples that fold rows into channels after a convolution of stride 1
    ('spatial', 'temporal', 'spatiotemporal'), residual upsamples; `config` overrides."""
    return ltx_vae(**config, block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32),
                   decoder_layers_per_block=(1,) * 4, down_block_types=("LTXVideo095DownBlock3D",) * 4,
                   downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                   decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
                   upsample_residual=(True,) * 3, upsample_factor=(2,) * 3)


# (builder, latent frames, image rows per latent row: the encoder's bands start at multiples of it)
VAES = {"wan2.2": (wan22_vae, 3, 8), "hunyuan": (hunyuan_vae, 3, 4), "ltx": (ltx_vae, 3, 16),
        "ltx-0.9.5": (ltx095_vae, 2, 8)}


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("kind", list(VAES))
def test_a_video_vae_decodes_in_bands_equal_to_the_whole(kind, degree):
    """7 latent rows (bands of 3, 2, 2 or 4, 3) and 5 columns; without halos the bands differ."""
    build, frames, _ = VAES[kind]
    vae = build()
    assert family_of(vae) is not None
    z = torch.randn(1, 4, frames, 7, 5, generator=torch.Generator().manual_seed(8))
    reference = _decode(vae, z)
    assert reference.shape[2] > frames  # a video of several frames
    alone = torch.cat([_decode(vae, z[..., :4, :]), _decode(vae, z[..., 4:, :])], dim=-2)
    assert (alone - reference).abs().max() > 1e-2
    _close(banded(vae, z, degree, _decode), reference)


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("kind", list(VAES))
def test_a_video_vae_encodes_in_bands_equal_to_the_whole(kind, degree):
    """Bands of whole latent rows: the family's scale counts the strided convolutions and the reshapes."""
    build, _, scale = VAES[kind]
    vae = build()
    assert family_of(vae).scale(vae) == scale
    clip = torch.randn(1, 3, 9, scale * 5, scale * 2, generator=torch.Generator().manual_seed(11))
    _close(banded(vae, clip, degree, _encode, unit=scale), _encode(vae, clip))


@pytest.mark.parametrize("kind", ["wan2.2", "hunyuan", "ltx"])
def test_one_frame_decodes_and_encodes_in_bands(kind):
    build, _, scale = VAES[kind]
    vae = build()
    z = torch.randn(1, 4, 1, 5, 3, generator=torch.Generator().manual_seed(3))
    _close(banded(vae, z, 2, _decode), _decode(vae, z))
    image = torch.randn(1, 3, 1, scale * 3, scale * 2, generator=torch.Generator().manual_seed(4))
    _close(banded(vae, image, 2, _encode, unit=scale), _encode(vae, image))


def test_hunyuans_frame_tiles_band_as_the_whole_does():
    """HunyuanVideo decodes more than 4 latent frames (encodes more than 16) in overlapping tiles of frames,
    blended: each band tiles its frames as the whole does."""
    vae = hunyuan_vae()
    assert vae.use_framewise_decoding and vae.use_framewise_encoding
    # the mid blocks run whole (their attention flattens frames and rows into one sequence), not also their Attention
    assert [type(block).__name__ for block in check_layers(vae)[2]] == ["HunyuanVideoMidBlock3D"] * 2
    z = torch.randn(1, 4, 6, 5, 3, generator=torch.Generator().manual_seed(5))
    _close(banded(vae, z, 2, _decode), _decode(vae, z))
    clip = torch.randn(1, 3, 21, 12, 8, generator=torch.Generator().manual_seed(6))
    _close(banded(vae, clip, 2, _encode, unit=4), _encode(vae, clip))


@pytest.mark.parametrize("mode", ["zeros", "replicate", "reflect"])
def test_a_strided_or_edge_padded_convolution_bands_exactly(mode):
    """A 3x3 convolution of stride 2 and padding 1 (LTX-Video's downsample): one row from the band above, none
    from below, on bands of even rows (15 rows: the bottom band's 7 keep the whole's last output row); padding
    other than zeros made only at the image's edge."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode=mode),
                              torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode))
    x = torch.randn(1, 3, 15, 6)
    with torch.no_grad():
        reference = net(x)
    outs = [None, None]
    group = threads.ThreadBands(2)

    def rank(index):
        mine = band_in_place(copy.deepcopy(net), group.rank(index))
        with torch.no_grad():
            outs[index] = mine(x[..., :8, :] if index == 0 else x[..., 8:, :])

    threads.run_threads(group.group, rank)
    _close(torch.cat(outs, dim=-2), reference)
    assert row_scale(net) == 2


def test_a_band_that_does_not_hold_whole_strides_is_refused():
    vae = ltx_vae()
    clip = torch.randn(1, 3, 1, 16 * 3, 32, generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="cannot be divided by a stride of 2 exactly: bands must start at rows"):
        banded(vae, clip, 2, _encode, unit=8)  # bands of 8-pixel rows where the encoder needs 16


@pytest.mark.parametrize("degree", [2, 3])
def test_ltx_videos_timestep_conditioned_decoder_bands_with_the_timestep(degree):
    """LTX-Video 0.9.1 and later condition the decoder on the timestep (per sample): every band takes it whole."""
    vae = ltx095_vae(timestep_conditioning=True)
    family = family_of(vae)
    z = torch.randn(2, 4, 2, 7, 4, generator=torch.Generator().manual_seed(14))
    timestep = torch.tensor([0.05, 0.4])
    with torch.inference_mode():
        reference = vae.decode(z, timestep).sample
        unconditioned = vae.decode(z, torch.zeros(2)).sample
    assert (unconditioned - reference).abs().max() > 1e-3  # the timestep counts
    _close(banded(vae, z, degree, lambda v, rows: family.decode(v, rows, timestep=timestep)), reference)


class _Statistics(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        generator = torch.Generator().manual_seed(15)
        self.register_buffer("std", 0.5 + torch.rand(1, channels, 1, 1, 1, generator=generator))
        self.register_buffer("mean", 0.1 * torch.randn(1, channels, 1, 1, 1, generator=generator))

    def un_normalize(self, x):
        return x * self.std + self.mean


class _TimestepDecoder(torch.nn.Module):
    """diffusers' LTX-Video decoder called as ComfyUI's is: decoder(x, timestep=a number)."""

    def __init__(self, ltx):
        super().__init__()
        self.ltx = ltx

    def forward(self, x, timestep):
        return self.ltx(x, torch.full((x.shape[0],), timestep))


class VideoVAE(torch.nn.Module):
    """A stand-in for ComfyUI's LTX-Video VAE (its module and class name: its family finds it) around diffusers'
    timestep-conditioned decoder: its decode mixes noise drawn over the whole latent by the global generator into
    the latent, then decodes at `decode_timestep`, as ComfyUI's does."""

    def __init__(self):
        super().__init__()
        self.decoder = _TimestepDecoder(ltx095_vae(timestep_conditioning=True).decoder)
        self.per_channel_statistics = _Statistics(4)
        self.timestep_conditioning, self.decode_noise_scale, self.decode_timestep = True, 0.025, 0.05

    def decode(self, x):
        x = torch.randn_like(x) * self.decode_noise_scale + (1.0 - self.decode_noise_scale) * x
        return self.decoder(self.per_channel_statistics.un_normalize(x), timestep=self.decode_timestep)


VideoVAE.__module__ = "comfy.ldm.lightricks.vae.causal_video_autoencoder"


@pytest.mark.parametrize("degree", [2, 3])
def test_ltx_videos_noise_mixing_decoder_bands_with_the_hosts_noise(degree):
    """ComfyUI's timestep-conditioned LTX-Video decode draws noise over the whole latent: the family's `prepare`
    draws it on the host by the same call (the same generator: seeded alike, the same noise, and the generator
    left where the whole decode leaves it), the bands decode the mixed latent without drawing."""
    vae = VideoVAE().eval().requires_grad_(False)
    family = family_of(vae)
    assert family.name == "vae:comfy_ltx_video" and family.decode_refusal(vae) is None
    z = torch.randn(1, 4, 2, 7, 4, generator=torch.Generator().manual_seed(16))
    torch.manual_seed(17)
    with torch.inference_mode():
        reference = vae.decode(z)
    after_whole = torch.randn(4)
    torch.manual_seed(17)
    mixed = family.prepare(vae, z)
    after_prepare = torch.randn(4)
    assert torch.equal(after_prepare, after_whole)
    _close(banded(vae, mixed, degree, family.decode), reference)
    torch.manual_seed(18)
    assert (banded(vae, family.prepare(vae, z), degree, family.decode) - reference).abs().max() > 1e-3


def test_ltx_videos_noise_injection_is_refused_before_work():
    """A decoder that injects noise drawn over its input's shape cannot band: refused by name (`parallelize`
    keeps its own decode), its encoder splits; and a timestep given for a VAE that takes none is refused in one sentence."""
    from parallel_backend.engine.vae import decode
    from parallel_backend.hosts.diffusers_vae import splits

    noisy = ltx_vae(decoder_inject_noise=(True, False, False, False, False))
    assert not splits(noisy) and splits(ltx_vae())
    with pytest.raises(ValueError, match=r"^layer 'decoder\.up_blocks\.3\.conv_in' \(LTXVideoResnetBlock3d\) adds "
                                         r"noise drawn over its input's shape \(per_channel_scale1\)"):
        check_noise(noisy)
    with pytest.raises(ValueError, match=r"^layer 'decoder\.up_blocks\.3\.conv_in' .* adds noise"):
        decode(None, noisy, torch.zeros(1, 4, 2, 4, 3))  # no engine: refused before any work
    check_layers(noisy)  # its layers band: an encode, which never runs the noise, splits
    clip = torch.randn(1, 3, 9, 16 * 4, 32, generator=torch.Generator().manual_seed(19))
    _close(banded(noisy, clip, 2, _encode, unit=16), _encode(noisy, clip))
    with pytest.raises(ValueError, match="^this AutoencoderKLHunyuanVideo VAE decodes without a timestep; pass none$"):
        decode(None, hunyuan_vae(), torch.zeros(1, 4, 1, 2, 2), timestep=torch.zeros(1))


def test_layers_that_still_cannot_band_are_refused_by_name():
    dilated = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=2, dilation=2))
    with pytest.raises(ValueError, match=r"^layer '0' dilates its rows \(Conv2d dilation \(2, 2\)\)"):
        check_layers(dilated)
    shrinking = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=0))
    with pytest.raises(ValueError, match=r"^layer '0' changes the number of rows in a way bands cannot share"):
        check_layers(shrinking)
    circular = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match=r"^layer '0' pads with 'circular' \(padding \(1, 1\)\): only numeric zero"):
        check_layers(circular)
    hunyuan = hunyuan_vae()
    hunyuan.decoder.conv_in.pad_mode = "circular"
    with pytest.raises(ValueError, match=r"^layer 'decoder\.conv_in' \(HunyuanVideoCausalConv3d\) pads with "
                                         "'circular'"):
        check_layers(hunyuan)
    for padding, dimension in (((1, 1, 2, 0, 2, 0), "rows"), ((2, 0, 1, 1, 2, 0), "columns")):
        hunyuan = hunyuan_vae()
        hunyuan.decoder.conv_in.time_causal_padding = padding  # lines on one side only: no exact halo
        parts = "bands" if dimension == "rows" else "tiles"
        with pytest.raises(ValueError) as refused:
            check_layers(hunyuan)
        assert str(refused.value) == (f"layer 'decoder.conv_in' (HunyuanVideoCausalConv3d, kernel (3, 3, 3), stride "
                                      f"(1, 1, 1), padding {padding} then (0, 0, 0)) cannot take its {dimension} from "
                                      f"its neighbours' {parts} exactly: splitting it into {parts} is not supported "
                                      f"yet")


@pytest.mark.pool
def test_a_pool_decodes_and_encodes_the_video_families_equal_to_one_device(cpu_pool):
    """Over gloo: the halos of a strided convolution (one row up, an empty message down) and of replicate
    padding cross between the processes; the diffusers stand-in reads LTX-Video's decode(z, temb, return_dict)
    and passes the timestep on."""
    from parallel_backend.engine.pool_engine import engine_for
    from parallel_backend.engine.vae import decode, encode
    from parallel_backend.hosts.diffusers_vae import ParallelVAE

    figures = {}
    for kind in ("wan2.2", "hunyuan", "ltx"):
        build, frames, scale = VAES[kind]
        vae = build()
        z = torch.randn(1, 4, frames, 5, 4, generator=torch.Generator().manual_seed(9))
        done = decode(engine_for(cpu_pool), vae, z)
        figures[kind, "decode"] = _close(done.out, _decode(vae, z))
        assert done.extra["bands"] == 2 and done.bytes_sent > 0
        clip = torch.randn(1, 3, 5, scale * 4, scale * 2, generator=torch.Generator().manual_seed(10))
        done = encode(engine_for(cpu_pool), vae, clip)
        figures[kind, "encode"] = _close(done.out, _encode(vae, clip))
        assert done.extra["bands"] == 2 and done.bytes_sent > 0
    print("max |diff| vs whole:", {f"{k} {w}": f"{d:.1e}" for (k, w), d in figures.items()})

    class Executor:
        engine = engine_for(cpu_pool)

    vae, (_, frames, _) = ltx095_vae(timestep_conditioning=True), VAES["ltx-0.9.5"]
    stand_in = ParallelVAE(vae, Executor(), torch.nn.Module())
    z = torch.randn(1, 4, frames, 4, 3, generator=torch.Generator().manual_seed(12))
    timestep = torch.tensor([0.05])
    with torch.inference_mode():
        reference = vae.decode(z, timestep).sample
    _close(stand_in.decode(z, timestep, return_dict=False)[0], reference)  # as pipeline_ltx.py calls it
    assert stand_in.calls == 1
