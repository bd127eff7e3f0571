"""The GPU predictions on paper (plan/paper.py, plan/paper_models.py, plan/paper_doc.py): FLOPs counted on the
meta device equal an independent count on tiny configs, the throughput arithmetic, the generated doc's figures
are model.candidates' and choose.choose's for the same inputs, and bad input is refused. The scenarios' builders
are swapped for narrow models of the same classes, except where a test says it builds a full-size one (on meta:
no memory); no timing is asserted."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from parallel_backend.models import forward_for_family
from parallel_backend.engine.oracle import sample_call
from parallel_backend.commands import cli
from parallel_backend.plan import paper, paper_decode, paper_doc, paper_models
from parallel_backend.plan.fitted import FITTED, job_inputs
from parallel_backend.plan.links import link_named
from parallel_backend.plan.choose import NothingFits, choose
from parallel_backend.plan.model import candidates

TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=8, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
TINY_WAN = dict(num_layers=2, num_attention_heads=8, attention_head_dim=8, in_channels=16, out_channels=16,
                text_dim=32, ffn_dim=128, patch_size=(1, 2, 2))


def tiny_flux(meta: bool = True):
    from diffusers import FluxTransformer2DModel

    from parallel_backend.models.benchmodels_dit import FluxBenchModel

    torch.manual_seed(0)
    module = (paper_models.on_meta(FluxTransformer2DModel, TINY_FLUX, torch.float32) if meta
              else FluxTransformer2DModel(**TINY_FLUX).eval().requires_grad_(False))

    class Guided(FluxBenchModel):
        def extras(self, rows, resolution=None):
            return {**super().extras(rows, resolution), "guidance": torch.full((rows,), 3.5)}

    return Guided("tiny-flux", module, (8, 32), latent_factor=8, default_resolution=64, family="diffusers_dit:flux",
                  patch=2)


def tiny_wan():
    from diffusers import WanTransformer3DModel

    from parallel_backend.models.benchmodels_dit import WanBenchModel

    return WanBenchModel("tiny-wan", paper_models.on_meta(WanTransformer3DModel, TINY_WAN, torch.bfloat16), (16, 32),
                         latent_factor=8, default_resolution="720x1280", family="diffusers_dit:wan", patch=2, frames=81)


TINY_QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
TINY_FLUX2 = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=32, timestep_guidance_channels=32,
                  axes_dims_rope=(4, 4, 4, 4))
TINY_HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=16, num_layers=1,
                    num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
                    pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))


TINY_LTX = dict(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64,
                num_layers=2, caption_channels=32)


def _module(cls, config: dict, meta: bool):
    torch.manual_seed(0)
    return (paper_models.on_meta(cls, config, torch.bfloat16) if meta
            else cls(**config).to(torch.bfloat16).eval().requires_grad_(False))


def tiny_qwen(meta: bool = True):
    from diffusers import QwenImageTransformer2DModel

    return paper_models.QwenImageModel("tiny-qwen", _module(QwenImageTransformer2DModel, TINY_QWEN, meta), (8, 32),
                                       latent_factor=8, default_resolution=1328, family="diffusers_dit:qwen_image",
                                       patch=2)


def tiny_flux2(meta: bool = True):
    from diffusers import Flux2Transformer2DModel

    return paper_models.Flux2Model("tiny-flux2", _module(Flux2Transformer2DModel, TINY_FLUX2, meta), (8, 32),
                                   latent_factor=8, default_resolution=1024, family="diffusers_dit", patch=2)


def tiny_hunyuan(meta: bool = True, frames: int = paper_models.HUNYUAN_FRAMES):
    from diffusers import HunyuanVideoTransformer3DModel

    return paper_models.HunyuanVideoModel("tiny-hunyuan", _module(HunyuanVideoTransformer3DModel, TINY_HUNYUAN, meta),
                                          (8, 32), latent_factor=8, default_resolution="720x1280",
                                          family="diffusers_dit", patch=2, frames=frames)


def tiny_ltx(meta: bool = True, frames: int = paper_models.LTX_FRAMES):
    from diffusers import LTXVideoTransformer3DModel

    return paper_models.LTXVideoModel("tiny-ltx", _module(LTXVideoTransformer3DModel, TINY_LTX, meta), (8, 32),
                                      latent_factor=paper_models.LTX_SCALE, default_resolution="512x704",
                                      family="diffusers_dit", patch=1, frames=frames)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    from parallel_backend.models.benchmodels import UNETS
    from parallel_backend.models.benchmodels_base import BenchModel

    config, context, _, extras = UNETS["sdxl-narrow"]
    unet = paper_models.on_meta(UNet2DConditionModel, dict(sample_size=128, **config), torch.float16)
    return BenchModel("tiny-unet", unet, context, 8, 1024, extras)


def tiny_flux_vae():
    from diffusers import AutoencoderKL

    return paper_models.on_meta(AutoencoderKL, dict(paper_models.FLUX_VAE, block_out_channels=(8, 16, 16, 16),
                                                    layers_per_block=1, norm_num_groups=4), torch.bfloat16)


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    return paper_models.on_meta(AutoencoderKLWan, dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
                                torch.bfloat16)


def tiny_vae(cls_name: str, config: dict):
    """A narrow VAE of diffusers class `cls_name` on meta (`config`: what narrows it), for a model's own VAE."""
    import diffusers

    return lambda: paper_models.on_meta(getattr(diffusers, cls_name), config, torch.bfloat16)


NARROW_KL = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_MODEL_VAES = {
    "sdxl_vae_meta": tiny_vae("AutoencoderKL", {**paper_models.SDXL_VAE, **NARROW_KL}),
    "flux2_vae_meta": tiny_vae("AutoencoderKLFlux2", NARROW_KL),
    "qwen_image_vae_meta": tiny_vae("AutoencoderKLQwenImage", dict(base_dim=8, dim_mult=[1, 2, 2, 2],
                                                                   num_res_blocks=1)),
    "hunyuan_video_vae_meta": tiny_vae("AutoencoderKLHunyuanVideo", NARROW_KL),
    "ltx_video_vae_meta": tiny_vae("AutoencoderKLLTXVideo", dict(block_out_channels=(8, 16, 16, 16),
                                                                 decoder_block_out_channels=(8, 16, 16, 16),
                                                                 layers_per_block=(1, 1, 1, 1, 1),
                                                                 decoder_layers_per_block=(1, 1, 1, 1, 1))),
}


@pytest.fixture
def tiny_scenarios(monkeypatch):
    """Every scenario built from a narrow model of its class (its resolution, frames and branches kept; the VAE
    clip's frames cut to 5: 2 latent frames, as each further one repeats the second's layers)."""
    tiny = {"sdxl_meta": tiny_unet, "flux_dev_meta": tiny_flux, "wan14b_meta": tiny_wan, "qwen_image_meta": tiny_qwen,
            "flux2_dev_meta": tiny_flux2, "hunyuan_video_meta": tiny_hunyuan, "ltx_video_meta": tiny_ltx}
    assert set(tiny) == {s.build for s in paper.SCENARIOS.values()}  # a new scenario gets its narrow model here
    vaes = {"flux_vae_meta": tiny_flux_vae, "wan_vae_meta": tiny_wan_vae, **TINY_MODEL_VAES}
    assert set(vaes) == ({s.build for s in paper.VAE_SCENARIOS.values()}
                         | {v.build for v in paper_decode.MODEL_VAES.values()})
    for build, narrow in {**tiny, **vaes}.items():
        monkeypatch.setattr(paper_models, build, narrow)
    for name, scenario in paper.VAE_SCENARIOS.items():
        if scenario.frames:
            monkeypatch.setitem(paper.VAE_SCENARIOS, name, replace(scenario, frames=5))
    paper.count.cache_clear()
    paper.count_vae.cache_clear()
    paper_decode.count_vae_of.cache_clear()
    yield
    paper.count.cache_clear()
    paper.count_vae.cache_clear()
    paper_decode.count_vae_of.cache_clear()


def test_a_linear_layer_counts_2_m_n_k_on_meta():
    layer = paper_models.on_meta(torch.nn.Linear, dict(in_features=48, out_features=80), torch.bfloat16)
    x = torch.empty(3, 7, 48, device="meta", dtype=torch.bfloat16)
    assert paper.count_flops(lambda: layer(x))[0] == 2 * (3 * 7) * 80 * 48


def test_launches_count_the_ops_that_make_a_tensor_not_views_nor_a_no_op():
    layer = paper_models.on_meta(torch.nn.Linear, dict(in_features=48, out_features=80), torch.bfloat16)
    x = torch.empty(3, 7, 48, device="meta", dtype=torch.bfloat16)
    drop = torch.nn.Dropout(0.1).eval()
    with torch.inference_mode():
        assert paper.count_launches(lambda: layer(x)) == 1  # one GEMM
        assert paper.count_launches(lambda: x.view(21, 48).transpose(0, 1)[:4]) == 0  # views launch nothing
        assert paper.count_launches(lambda: drop(x)) == 0  # dropout in eval hands back its input
        assert paper.count_launches(lambda: torch.nn.functional.gelu(layer(x)) + 1) == 3


def test_a_call_launches_the_same_kernels_at_any_size():
    """The launches are the model's, not the work's: the same for a call at 64 and 128 px and for two rows, some per
    block (norms, projections, modulation, attention)."""
    meta = tiny_flux()
    small, big, two = (paper._call_flops(meta, rows, size) for rows, size in ((1, (64, 64)), (1, (128, 128)),
                                                                            (2, (64, 64))))
    assert small[2] == big[2] == two[2] > 10 * (TINY_FLUX["num_layers"] + TINY_FLUX["num_single_layers"])
    assert big[0] > small[0]


def test_meta_count_equals_a_cpu_run_plus_the_attention_formula():
    # On CPU torch's counter does not see the fused attention kernel; on meta attention runs as two matmuls.
    # The difference is exactly the joint attention of every block, 4 L^2 W per row (L: 16 image + 8 text).
    cpu, meta = tiny_flux(meta=False), tiny_flux()
    with torch.inference_mode():
        on_cpu, _ = paper.count_flops(lambda: forward_for_family(cpu.family)(cpu.module, sample_call(cpu, 1, (64, 64))))
    on_meta, ops, _ = paper._call_flops(meta, 1, (64, 64))
    blocks = TINY_FLUX["num_layers"] + TINY_FLUX["num_single_layers"]
    assert on_meta - on_cpu == blocks * paper.attention_flops(16 + 8, 8 * 16) == ops["aten.bmm"]


def test_unet_layers_add_up_to_the_call_less_the_shared_embeddings(tiny_scenarios):
    model = tiny_unet()
    layers, handover, weights = paper.count_layers(model, (1024, 1024))
    whole, _, _ = paper._call_flops(model, 1, (1024, 1024))
    from parallel_backend.models import diffusers_unet

    call = paper._meta_call(model, 1, (1024, 1024))
    with torch.inference_mode():
        shared, _ = paper.count_flops(lambda: diffusers_unet.prepare(model.module, call, call.t))
    assert sum(f for _, f in layers) + shared == whole
    assert handover[0] == 4 * 128 * 128 * 2  # the fp16 latents enter the first layer
    assert len(layers) == len(handover) == len(weights) and all(h > 0 for h in handover)


def test_seconds_are_flops_over_peak_times_efficiency(tiny_scenarios):
    rtx = paper.gpu_named("RTX 4090")
    assert paper.seconds(165.2e12, rtx, 0.5) == pytest.approx(2.0)
    inp = paper.paper_inputs("flux-dev-1024", "H100 SXM", "nvlink-h100", efficiency=0.25)
    counted = paper.count("flux-dev-1024")
    assert inp.call_seconds == {1: pytest.approx(counted.flops[1] / (989e12 * 0.25))}
    assert inp.attention_seconds == pytest.approx(counted.attention_flops / (989e12 * 0.25))
    assert counted.shape.tokens == 4096 + 8 and counted.shape.attentions == 3  # 1024 px: 64 x 64 tokens + text
    wan = paper.count("wan14b-720p")
    assert wan.shape.tokens == 21 * 45 * 80 and sorted(wan.flops) == [1, 2]  # 81 frames at 720p: 75,600 tokens


def test_the_doc_shows_what_model_candidates_predict(tiny_scenarios):
    text = paper_doc.render()
    assert "predictions of Tandem's cost model" in text and paper_doc.COMMAND in text
    for name, scenario in paper.SCENARIOS.items():
        for gpu, link in scenario.hardware:
            for n in paper_doc.DEVICES:
                found = candidates(paper.paper_inputs(name, gpu, link, devices=n), n)
                best = choose(found).best
                row = f"| {gpu} | {link} | {n} | {best.label()} | {best.predicted_speedup:.2f}x |"
                assert row in text
                for c in found[:paper_doc.TOP]:
                    assert paper_doc._row(c, "**chosen:** " if c is best else "") in text
    assert len(re.findall(r"\| \d \| \d\.\d\dx \| \d\.\d\dx \| (?:exact|stale) \|", text)) > 0
    for name, scenario in paper.SCENARIOS.items():  # each scenario's decode, whole and on the pool
        for gpu, link in scenario.hardware:
            two = paper.paper_inputs(name, gpu, link, devices=2)
            assert (f"| {name} | {paper_decode.MODEL_VAES[scenario.build].build} | {gpu} | {link} | "
                    f"{two.serial_seconds:,.2f} | {two.decode_seconds:,.2f} | {two.decode_split_seconds:,.2f} |") in text


def test_the_doc_shows_each_vae_decode_as_vae_costs_predicts_it(tiny_scenarios):
    text = "\n".join(paper_doc.vae_section())
    assert "**Predictions, not measurements.**" in text and "1/64 of the image's pixels" in text
    for name, scenario in paper.VAE_SCENARIOS.items():
        decode, _ = paper.count_vae(name)
        assert f"of which the attention blocks every rank runs whole {decode.whole_flops / 1e12:,.3f} TFLOP" in text
        for gpu, link in scenario.hardware:
            one = paper.vae_prediction(name, gpu, link, 1)
            assert one.seconds == pytest.approx(decode.flops / (paper.gpu_named(gpu).peak_flops * 0.15))
            for n in paper_doc.VAE_DEVICES:
                assert paper_doc._vae_row(gpu, link, paper.vae_prediction(name, gpu, link, n)) in text
    wan, _ = paper.count_vae("wan-vae-720p")
    assert wan.norms == () and len(wan.whole_inputs) == 2  # RMS norms; one attention per latent frame
    with pytest.raises(ValueError, match="unknown VAE scenario 'sd-vae'"):
        paper.vae_prediction("sd-vae", "H100 SXM", "nvlink-h100", 2)


def _fitted_inputs(gpus: int):
    """Flux.1-dev's inputs as the published rows get them (fitted.job_inputs: the serial part whole, no decode)."""
    card = paper.gpu_for("h100")
    counted = paper.count_job("flux_dev_meta", (1024, 1024), 1)
    return job_inputs(counted, card.peak_flops, link_named(card.link), 1, 28, 1024 * 1024, FITTED, gpus,
                      sharded=True)


FULL_FLUX_VAE = paper_models.flux_vae_meta  # a tiny VAE's bands lose to the host's transfers of a 1024 px image


def test_the_gpu_end_to_end_counts_the_decode_in_bands_on_two_gpus_and_whole_on_one(tiny_scenarios, monkeypatch):
    monkeypatch.setattr(paper_models, "flux_vae_meta", FULL_FLUX_VAE)
    fitted = _fitted_inputs(2)
    decode, _ = paper_decode.count_vae_of("flux_vae_meta", (1, 16, 128, 128))  # Flux.1's VAE: 1024 px, 16 channels
    whole = decode.flops / (989e12 * paper.EFFICIENCY["vae"])
    inp, found, _, run = paper.gpu_plan("flux-dev", "h100", 2, None, steps=28, branches=1)
    assert run.serial_seconds == pytest.approx(fitted.serial_seconds) and run.whole.seconds == pytest.approx(whole)
    assert run.split.devices == 2 and run.split.grid == (2, 1) and 0 < run.split.seconds < whole
    rest = fitted.serial_seconds - whole
    assert rest > 0 and inp.serial_seconds == pytest.approx(rest)
    assert (inp.decode_seconds, inp.decode_split_seconds) == (run.whole.seconds, run.split.seconds)
    alone = next(c for c in found if not c.mesh)
    assert alone.decode_seconds == alone.decode_seconds_whole == run.whole.seconds  # one device decodes whole
    before = {c.label(): c for c in candidates(fitted, 2)}
    for c in (c for c in found if c.mesh):
        assert c.decode_seconds == run.split.seconds and c.decode_seconds_whole == run.whole.seconds
        # the same steps; the end to end: the rest + the decode whole against the rest + the decode in bands
        assert c.seconds_per_call == pytest.approx(before[c.label()].seconds_per_call)
        warm = 28 * c.seconds_per_call if c.exact else None
        if warm is not None:
            assert c.predicted_speedup_end_to_end == pytest.approx(
                (fitted.serial_seconds + 28 * alone.seconds_per_call) / (rest + run.split.seconds + warm))
            assert c.predicted_speedup_end_to_end > before[c.label()].predicted_speedup_end_to_end
    assert run.line() == (f"end to end: {rest:.2f} s text encoders and the rest + {run.split.seconds:.2f} s decode in "
                          f"bands of rows on 2 GPUs ({whole:.2f} s whole; {run.split.memory_bytes / 2**30:.2f} GiB "
                          "per device while it decodes)")
    inp1, found1, _, one = paper.gpu_plan("flux-dev", "h100", 1, None, steps=28, branches=1)
    assert one.split.seconds == one.whole.seconds == pytest.approx(whole) and "whole on one GPU" in one.line()
    assert [c.predicted_speedup_end_to_end for c in found1] == [1.0]
    assert inp1.serial_seconds + inp1.decode_seconds == pytest.approx(_fitted_inputs(1).serial_seconds)


def test_a_model_without_a_known_vae_keeps_the_fitted_serial_part_and_says_so(tiny_scenarios, monkeypatch):
    monkeypatch.delitem(paper_decode.MODEL_VAES, "flux_dev_meta")
    inp, found, _, run = paper.gpu_plan("flux-dev", "h100", 2, None, steps=28, branches=1)
    fitted = _fitted_inputs(2)
    assert inp.serial_seconds == fitted.serial_seconds and inp.decode_seconds == 0.0
    assert [c.predicted_speedup_end_to_end for c in found] == [c.predicted_speedup_end_to_end
                                                               for c in candidates(fitted, 2)]
    assert run.line().endswith("the fitted serial part whole (the decode not split: no VAE is known for "
                               "flux_dev_meta)")
    assert run.as_json() == {"serial_seconds_fitted": fitted.serial_seconds,
                             "why_not": "no VAE is known for flux_dev_meta"}


def test_the_decode_takes_as_many_gpus_as_its_latent_has_tiles_for_and_the_rest_floors_at_0(tiny_scenarios):
    inp, _, _, run = paper.gpu_plan("ltx-video", "h100", 8, None, resolution=(64, 64), frames=9)
    assert run.split.devices == 4 and run.split.grid == (2, 2)  # a latent of 2 x 2: engine/vae.py's grid
    assert inp.decode_split_seconds == run.split.seconds and run.as_json()["decode_devices"] == 4
    assert "; 4 of the 8 GPUs decode: the latent has too few rows and columns for more tiles" in run.line()
    short = replace(run, serial_seconds=run.whole.seconds / 2)  # a fitted serial part shorter than the decode
    assert short.rest_seconds == 0 and short.apply(inp).serial_seconds == 0
    assert short.line().endswith("is less than the decode: the rest floored at 0")


def test_every_paper_models_vae_decodes_its_latent_to_the_models_image(tiny_scenarios):
    for name, job in paper.PAPER_MODELS.items():
        vae = paper_decode.MODEL_VAES[job.build]
        decode, _ = paper_decode.count_vae_of(vae.build, vae.latent_shape(job.resolution, job.frames))
        frames = job.frames or 1
        assert decode.image_bytes == 3 * frames * job.resolution[0] * job.resolution[1] * 2, name  # bf16 RGB


def test_tandem_plan_gpu_states_the_decode_split_and_writes_it_in_json(tiny_scenarios, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(paper_models, "flux_vae_meta", FULL_FLUX_VAE)
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "flux-dev", "--gpu", "h100", "--gpus", "2", "--cfg", "1", "--steps", "28",
                     "--json", str(out)]) == 0
    _, found, _, run = paper.gpu_plan("flux-dev", "h100", 2, None, steps=28, branches=1)
    assert run.line() in capsys.readouterr().out.splitlines()
    report = json.loads(out.read_text())
    assert report["end_to_end"] == pytest.approx(run.as_json())
    assert report["end_to_end"]["decode_seconds"] < report["end_to_end"]["decode_seconds_whole"]
    by_label = {c.label(): c for c in found}
    assert len(report["candidates"]) == len(found)
    for row in report["candidates"]:
        whole = run.whole.seconds
        assert row["decode_seconds_whole"] == pytest.approx(whole)
        assert row["decode_seconds"] == pytest.approx(whole if not row["mesh"] else run.split.seconds)
    assert {c.decode_seconds for c in by_label.values()} == {run.whole.seconds, run.split.seconds}


def test_bad_input_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="unknown scenario 'sd3'"):
        paper.paper_inputs("sd3", "H100 SXM", "nvlink-h100")
    with pytest.raises(ValueError, match="unknown GPU"):
        paper.paper_inputs("sdxl-1024", "GTX 480", "nvlink-h100")
    with pytest.raises(ValueError, match="unknown link"):
        paper.paper_inputs("sdxl-1024", "H100 SXM", "nvlink-9")
    for bad in (0, -0.1, 1.01, float("nan"), "0.5", None):
        with pytest.raises(ValueError, match="efficiency"):
            paper.check_efficiency(bad)
    assert paper.check_efficiency(1) == 1.0


@pytest.mark.parametrize("build, published", [("wan14b_meta", 14e9), ("qwen_image_meta", 20e9),
                                              ("flux2_dev_meta", 32e9), ("hunyuan_video_meta", 13e9),
                                              ("ltx_video_meta", 1.9e9)])  # LTX-Video 2B: 1.9 B (its paper)
def test_the_large_models_build_on_meta_at_their_published_size(build, published):
    module = getattr(paper_models, build)().module
    assert all(p.is_meta for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) == pytest.approx(published, rel=0.03)


@pytest.mark.parametrize("tiny, resolution, extra", [
    (tiny_qwen, (64, 64), 0),
    (tiny_flux2, (64, 64), 0),
    # HunyuanVideo's text refiner attends over the prompt alone first, in each of its layers.
    (lambda meta: tiny_hunyuan(meta, frames=5), (32, 48),
     TINY_HUNYUAN["num_refiner_layers"] * paper.attention_flops(8, 4 * 16))])
def test_the_new_models_inputs_run_their_class_and_count_their_attention(tiny, resolution, extra):
    # With values on CPU (meta checks no value or dtype): the inputs made as the pipeline makes them are what
    # the class takes, and it predicts the latents' shape. On meta every joint attention counts 4 L^2 W.
    model = tiny(meta=False)
    call = sample_call(model, 2, resolution)
    with torch.inference_mode():
        out = forward_for_family(model.family)(model.module, call)
    assert out.shape == call.x.shape and torch.isfinite(out).all()
    meta = tiny(meta=True)
    tokens, attentions = meta.sequence_sizes(resolution)
    _, ops, _ = paper._call_flops(meta, 1, resolution)
    assert ops["aten.bmm"] == attentions * paper.attention_flops(tokens, 4 * 16) + extra


def test_ltx_videos_inputs_run_its_class_and_count_its_self_and_cross_attention():
    # LTXPipeline's inputs: packed latents one token per latent pixel (32x smaller per side, 8x in time), the
    # prompt's mask, the latent's frames, rows and columns; every block attends over the video tokens (4 L^2 W)
    # and then from them to the text (4 L T W).
    model = tiny_ltx(meta=False, frames=9)
    call = sample_call(model, 2, (64, 96))
    with torch.inference_mode():
        out = forward_for_family(model.family)(model.module, call)
    assert out.shape == call.x.shape == (2, 2 * 2 * 3, 8) and torch.isfinite(out).all()
    meta = tiny_ltx(meta=True, frames=9)
    tokens, attentions = meta.sequence_sizes((64, 96))
    assert (tokens, attentions) == (12, 2)
    _, ops, _ = paper._call_flops(meta, 1, (64, 96))
    width = 4 * 16
    assert ops["aten.bmm"] == attentions * (paper.attention_flops(tokens, width) + 4 * tokens * 8 * width)


def test_the_new_scenarios_count_their_shapes_and_run_as_tandem_runs_them(tiny_scenarios):
    qwen, flux2, hunyuan = (paper.count(n) for n in ("qwen-image-1328", "flux2-dev-1024", "hunyuan-video-720p"))
    assert qwen.shape.tokens == 83 * 83 + 8 and sorted(qwen.flops) == [1, 2]  # 1328 px: 83 x 83 tokens, cfg
    assert flux2.shape.tokens == 64 * 64 + 8 and sorted(flux2.flops) == [1]
    assert hunyuan.shape.tokens == 33 * 45 * 80 + 8 and sorted(hunyuan.flops) == [1]  # 129 frames: 33 latent
    assert (qwen.shape.heads, flux2.shape.heads, hunyuan.shape.heads) == (4, 4, 4)
    assert (qwen.shape.attentions, flux2.shape.attentions, hunyuan.shape.attentions) == (2, 3, 3)
    assert (qwen.family, flux2.family, hunyuan.family) == ("diffusers_dit:qwen_image", "comfy_dit:flux",
                                                           "comfy_dit:hunyuan_video")
    assert all(c.unit_bytes and sum(c.unit_bytes) <= c.weight_bytes for c in (qwen, flux2, hunyuan))
    listed = candidates(paper.paper_inputs("flux2-dev-1024", "L40S", "pcie4x16", sharded=True), 2)
    kept = paper.rig_candidates("flux2-dev-1024", "L40S", "pcie4x16", 2)
    assert "tensor" in {c.strategy for c in listed} and "tensor" not in {c.strategy for c in kept}
    assert {c.weights for c in kept} == {"replicated", "sharded"} and len(kept) == len(listed) - 1


def _flux2_plan(gpu: str, link: str, devices: int):
    """model.candidates and choose.choose for full-size Flux.2-dev, tensor left out by hand (Tandem refuses it)."""
    found = [c for c in candidates(paper.paper_inputs("flux2-dev-1024", gpu, link, sharded=True, devices=devices),
                                   devices,
                                   paper.gpu_named(gpu).memory_bytes) if c.strategy != "tensor"]
    return found, choose(found)


def test_the_rig_rows_agree_with_choose_for_full_size_flux2(monkeypatch):
    # Full-size Flux.2-dev (on meta: a few seconds): 2 x 24 GB hold it nowhere, 2 x 48 GB only cut over both,
    # one 80 GB device on its own.
    monkeypatch.setattr(paper_doc, "BIG_MODELS", ("flux2-dev-1024",))
    text = "\n".join(paper_doc.big_models_section())
    for n in (1, 2):
        with pytest.raises(NothingFits) as refused:
            _flux2_plan("RTX 4090", "pcie4-nop2p", n)
    need = refused.value.least.memory_bytes_per_device / 2**30
    assert f"| 2 x 24 GB (RTX 4090, pcie4-nop2p) | does not fit: needs {need:.1f} GiB per device" in text
    with pytest.raises(NothingFits):
        _flux2_plan("L40S", "pcie4x16", 1)
    found, two = _flux2_plan("L40S", "pcie4x16", 2)
    assert two.best.fits and (two.best.weights == "sharded" or two.best.strategy == "pipefusion")  # each stage
    # holds its own blocks: pipefusion cuts Flux.2 (ComfyUI's) without sharding
    assert f"| 2 device(s): {two.best.label()}, {two.best.seconds_per_call:,.2f} s | {two.best.label()} |" in text
    assert all(c.fits == (c.memory_bytes_per_device <= 48e9) for c in found)
    assert sum(c.fits for c in found) < len(found)
    _, one = _flux2_plan("H100 SXM", "nvlink-h100", 1)
    _, pair = _flux2_plan("H100 SXM", "nvlink-h100", 2)
    assert not one.best.mesh
    assert (f"| 1 device(s): one device, {one.best.seconds_per_call:,.2f} s | {pair.best.label()} |" in text
            and f"| {one.best.seconds_per_call / pair.best.seconds_per_call:.2f}x |" in text)
    assert "tensor (" not in text and "Left out: tensor" in text


@pytest.mark.slow
def test_the_committed_doc_is_the_generators_output():
    # Counts every full-size model on meta (a minute on a busy 2-core machine).
    import diffusers

    committed = (Path(__file__).resolve().parents[1] / "docs" / "gpu-predictions.md").read_text()
    versions = f"(torch {torch.__version__.split('+')[0]}, diffusers {diffusers.__version__})"
    if versions not in committed:
        pytest.skip(f"docs/gpu-predictions.md was generated with other versions than {versions}")
    paper.count.cache_clear()
    assert paper_doc.render() == committed
