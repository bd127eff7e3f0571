"""The GPU predictions on paper (plan/paper.py, plan/paper_doc.py): FLOPs counted on the meta device equal an
independent count on tiny configs, the throughput arithmetic, the generated doc's figures are model.candidates'
for the same inputs, and bad input is refused. The scenarios' builders are swapped for narrow models of the same
classes, so nothing here builds a full-size model; no timing is asserted."""

from __future__ import annotations

import re

import pytest
import torch

from parallel_backend.models import forward_for_family
from parallel_backend.engine.oracle import sample_call
from parallel_backend.plan import paper, paper_doc
from parallel_backend.plan.choose import choose
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
    module = (paper.on_meta(FluxTransformer2DModel, TINY_FLUX, torch.float32) if meta
              else FluxTransformer2DModel(**TINY_FLUX).eval().requires_grad_(False))

    class Guided(FluxBenchModel):
        def extras(self, rows, resolution=None):
            return {**super().extras(rows, resolution), "guidance": torch.full((rows,), 3.5)}

    return Guided("tiny-flux", module, (8, 32), latent_factor=8, default_resolution=64, family="diffusers_dit:flux",
                  patch=2)


def tiny_wan():
    from diffusers import WanTransformer3DModel

    from parallel_backend.models.benchmodels_dit import WanBenchModel

    return WanBenchModel("tiny-wan", paper.on_meta(WanTransformer3DModel, TINY_WAN, torch.bfloat16), (16, 32),
                         latent_factor=8, default_resolution="720x1280", family="diffusers_dit:wan", patch=2, frames=81)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    from parallel_backend.models.benchmodels import UNETS
    from parallel_backend.models.benchmodels_base import BenchModel

    config, context, _, extras = UNETS["sdxl-narrow"]
    return BenchModel("tiny-unet", paper.on_meta(UNet2DConditionModel, dict(sample_size=128, **config), torch.float16),
                      context, 8, 1024, extras)


@pytest.fixture
def tiny_scenarios(monkeypatch):
    """Every scenario built from a narrow model of its class (its resolution, frames and branches kept)."""
    monkeypatch.setattr(paper, "sdxl_meta", tiny_unet)
    monkeypatch.setattr(paper, "flux_dev_meta", tiny_flux)
    monkeypatch.setattr(paper, "wan14b_meta", tiny_wan)
    paper.count.cache_clear()
    yield
    paper.count.cache_clear()


def test_a_linear_layer_counts_2_m_n_k_on_meta():
    layer = paper.on_meta(torch.nn.Linear, dict(in_features=48, out_features=80), torch.bfloat16)
    x = torch.empty(3, 7, 48, device="meta", dtype=torch.bfloat16)
    assert paper.count_flops(lambda: layer(x))[0] == 2 * (3 * 7) * 80 * 48


def test_meta_count_equals_a_cpu_run_plus_the_attention_formula():
    # On CPU torch's counter does not see the fused attention kernel; on meta attention runs as two matmuls.
    # The difference is exactly the joint attention of every block, 4 L^2 W per row (L: 16 image + 8 text).
    cpu, meta = tiny_flux(meta=False), tiny_flux()
    with torch.inference_mode():
        on_cpu, _ = paper.count_flops(lambda: forward_for_family(cpu.family)(cpu.module, sample_call(cpu, 1, (64, 64))))
    on_meta, ops = paper._call_flops(meta, 1, (64, 64))
    blocks = TINY_FLUX["num_layers"] + TINY_FLUX["num_single_layers"]
    assert on_meta - on_cpu == blocks * paper.attention_flops(16 + 8, 8 * 16) == ops["aten.bmm"]


def test_unet_layers_add_up_to_the_call_less_the_shared_embeddings(tiny_scenarios):
    model = tiny_unet()
    layers, handover, weights = paper.count_layers(model, (1024, 1024))
    whole, _ = paper._call_flops(model, 1, (1024, 1024))
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
                found = candidates(paper.paper_inputs(name, gpu, link), n)
                best = choose(found).best
                row = f"| {gpu} | {link} | {n} | {best.label()} | {best.predicted_speedup:.2f}x |"
                assert row in text
                for c in found[:paper_doc.TOP]:
                    assert paper_doc._row(c, "**chosen:** " if c is best else "") in text
    assert len(re.findall(r"\| \d \| \d\.\d\dx \| \d\.\d\dx \| (?:exact|stale) \|", text)) > 0


def test_bad_input_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="unknown scenario 'sd3'"):
        paper.paper_inputs("sd3", "H100 SXM", "nvlink-h100")
    with pytest.raises(ValueError, match="unknown GPU"):
        paper.paper_inputs("sdxl-1024", "B200", "nvlink-h100")
    with pytest.raises(ValueError, match="unknown link"):
        paper.paper_inputs("sdxl-1024", "H100 SXM", "nvlink-9")
    for bad in (0, -0.1, 1.01, float("nan"), "0.5", None):
        with pytest.raises(ValueError, match="efficiency"):
            paper.check_efficiency(bad)
    assert paper.check_efficiency(1) == 1.0
