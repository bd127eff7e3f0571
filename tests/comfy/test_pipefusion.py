"""pipefusion (PipeFusion) in ComfyUI: the Multi-GPU KSampler on the tiny DiTs of ComfyUI's own classes (Flux.1 /
Flux.2, Wan, Qwen-Image, Chroma, HunyuanVideo, SD3 / SD3.5, LTX-Video, Lumina 2 / Z-Image: fixture_nodes/families.py),
their blocks cut into two stages over two CPU workers, each holding only its blocks' weights, the tokens in patches
pipelined through them. With warm-up covering every step it gives the stock KSampler's latents; after one exact
step the other patches' keys and values are one step stale: close to stock (a PSNR floor), not equal. A call a
split by tokens cannot take is refused by name; a call with a model patch runs on whole rows and says so."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

STEPS = 4
PSNR_FLOOR_DB = 30.0
FAMILIES = {"flux": "Flux", "flux2": "Flux2", "wan21_t2v": "WAN21_T2V", "wan21_i2v": "WAN21_I2V",
            "qwen_image": "QwenImage", "chroma": "Chroma", "hunyuan_video": "HunyuanVideo",
            "hunyuan_video15": "HunyuanVideo15", "sd3": "SD3", "sd35": "SD3", "ltxv": "LTXV", "zimage": "ZImage",
            "lumina2": "Lumina2"}  # family: the comfy.supported_models class it needs


@pytest.fixture(scope="module")
def fixture_families(comfy_server):
    """fixture_nodes/families.py, imported in this process (ComfyUI on sys.path), to build the tiny models here."""
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(Path(__file__).parent)]
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: this test process has no GPU to look for
    import fixture_nodes

    return fixture_nodes


def _tiny(fixture_nodes, family: str, **extra):
    """The tiny model of `family` as the fixture node builds it (seeded), and a call of it (`extra`: more inputs):
    two rows, odd latent sides where the model pads them to the patch, the guidance and pooled vector of the Flux-
    like models, Wan i2v's image channels and CLIP tokens, HunyuanVideo 1.5's image and mask channels."""
    import torch

    from parallel_backend.runtime.calls import ModelCall

    families = fixture_nodes.families
    model = families.fill_buffers(fixture_nodes._seeded(families.model_config(family).get_model({}), 5), 5)
    (channels, frames, height, width), (text_width, pooled, _) = families.FAMILIES[family][3], families.FAMILIES[family][2]
    generator = torch.Generator().manual_seed(0)
    extras = {"transformer_options": {}}
    if family.startswith(("flux", "chroma", "hunyuan")):
        extras["guidance"] = torch.tensor([3.5, 3.5])
    if pooled:
        extras["y"] = torch.randn(2, pooled, generator=generator)
    if family == "wan21_i2v":
        channels, extras["clip_fea"] = 36, torch.randn(2, 257, 1280, generator=generator)
    if family == "hunyuan_video15":
        channels = model.diffusion_model.in_channels  # the latent, the image's and a mask, joined
    if family == "ltxv":  # the text encoder's mask: the last two tokens padding
        extras["attention_mask"] = torch.tensor([[1] * (families.TOKENS - 2) + [0, 0]] * 2)
    if family in ("zimage", "lumina2"):
        extras["num_tokens"] = families.TOKENS
    frames = frames or (1 if family == "qwen_image" else None)  # Qwen-Image's model takes (B, C, 1, H, W)
    odd = 0 if family.startswith("hunyuan") else 1  # HunyuanVideo does not pad to its patch
    x = torch.randn(2, channels, *((frames,) if frames else ()), height + odd, width + odd, generator=generator)
    extras.update(extra)
    call = ModelCall(x, torch.tensor([0.7, 0.7]), torch.randn(2, families.TOKENS, text_width, generator=generator),
                     extras, job=1, stream=("s",))
    return model.diffusion_model, call


def _pair(server, comfy, host_families, name: str, family: str = "flux", warmup: int = STEPS, cfg: float = 1.0,
          **kw):
    if family not in host_families:
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{FAMILIES[family]} ({family})")
    stock, tandem = comfy.run_pair(server, name, "pipefusion", kind="family", family=family, steps=STEPS, cfg=cfg,
                                   degrees={"warmup": warmup, "patches": 4, **kw.pop("degrees", {})}, **kw)
    return stock, tandem


def _ran_two_stages(server) -> None:
    """The last run was pipefusion's on both workers, each holding part of the weights (its stage's)."""
    status = server.get("/tandem/status")
    assert status["last_run"]["strategy"] == "pipefusion" and status["last_run"]["devices_used"] == 2, status["last_run"]
    held = status["model_weights_bytes"]
    assert len(held) == 2 and all(b > 0 for b in held), held


def _each_stage_held_only_its_blocks(server, fixture_nodes, family: str) -> None:
    """The last run's two workers held, one its first block and the other its second (every tiny model has two),
    each with what every stage holds, the first stage the embedders, the last the output layers, and a block's
    modulation projections where the cut spread them to the other stage (Flux.1, Qwen-Image): nothing more."""
    from parallel_backend.models.comfy_dit import recognise
    from parallel_backend.models.stages import weights_of
    from parallel_backend.strategies.pipefusion.cut import spread
    from parallel_backend.strategies.pipefusion.runner import FAMILIES as CUTS

    model = _tiny(fixture_nodes, family)[0]
    cut = CUTS[recognise(model).wire]
    layers, shared = cut.layers(model), weights_of(cut.shared(model))
    assert len(layers) == 2, [layer.name for layer in layers]
    held = [shared + weights_of(cut.first(model)), shared + weights_of(cut.last(model))]
    sizes = [weights_of(layer.modules) for layer in layers]
    movable = [weights_of([m for _, m in cut.modulations(layer)]) for layer in layers]
    _, expected = spread(sizes, movable, held, [1])  # a block's modulation may sit on the other stage
    measured = server.get("/tandem/status")["model_weights_bytes"]
    assert sum(measured) == sum(held) + sum(sizes)  # every block's weight held once, the shared ones by both
    assert measured == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_patched_call_on_unchanged_inputs_equals_the_models_forward(fixture_families, host_families, family,
                                                                      monkeypatch):
    """One stage holding every block, in this process: when the inputs do not change, the keys and values the call
    before left are this call's own, so a patched call must equal the model's own forward. That checks each
    patch's tokens, its rows of the rotary table, the text riding with patch 0 and the double blocks' stand-in
    for it after patch 0, whatever the patches."""
    from dataclasses import replace

    import torch

    from parallel_backend.models import comfy_forward
    from parallel_backend.models.comfy_dit import forward, recognise
    from parallel_backend.strategies.asyncdiff.messages import StagePlan
    from parallel_backend.strategies.pipefusion.messages import PipeCall, PlaceBlocks
    from parallel_backend.strategies.pipefusion.runner import PipeRunner

    if family not in host_families:
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{FAMILIES[family]} ({family})")
    model, call = _tiny(fixture_families, family)
    with torch.inference_mode():
        reference = forward(model, call)
    runner = PipeRunner(model, recognise(model).wire, torch.device("cpu"))
    runner.setup(PlaceBlocks("tiny", StagePlan(0, 1, (), None, None, 0, 1, False, ())))
    reached, init = [], comfy_forward._Reached.__init__

    def counted(self, named):
        reached.append(1)
        init(self, named)

    monkeypatch.setattr(comfy_forward._Reached, "__init__", counted)
    for patches in (1, 3, 5, 25, 2):  # 25: one token of a 5 x 5 Flux image, or of 3 x 5 x 5 Wan video tokens
        reached.clear()
        out = runner.call(PipeCall("tiny", call, patches)).out
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5, msg=f"{patches} patches")
        # the forward's preparation ran once for the call's tokens, context and counts (Lumina 2: twice, its
        # tokens refined, the context and counts without the refiners)
        assert len(reached) == (2 if recognise(model).wire == "comfy_dit:lumina" else 1), f"{patches} patches"
    changed = replace(call, x=0.9 * call.x)  # stale keys and values now: close, not equal
    out = runner.call(PipeCall("tiny", changed, 4)).out
    with torch.inference_mode():
        assert (out - forward(model, changed)).abs().max() > 1e-4


def _hunyuan_mask(torch) -> dict:
    return {"attention_mask": torch.tensor([[1] * 6 + [0, 0]] * 2)}


@pytest.mark.parametrize("family, change, refused", [
    ("hunyuan_video", _hunyuan_mask, "pipefusion does not run HunyuanVideo with a text attention mask"),
    ("hunyuan_video", lambda torch: {"guiding_frame_index": torch.tensor([0.0, 0.0])},
     "pipefusion does not run HunyuanVideo with a guiding frame"),
    ("chroma", lambda torch: {"control": {"input": [torch.zeros(2, 25, 256)]}},
     "pipefusion does not run Chroma with ControlNet residuals"),
    ("chroma", "skip_mmdit", r"pipefusion does not run Chroma with blocks skipped \(skip_mmdit, skip_dit\)"),
])
def test_what_a_patched_call_cannot_take_is_refused_by_name_before_any_block(fixture_families, host_families,
                                                                             family, change, refused):
    """Inputs the layers do not take (a text mask, guiding frames, ControlNet residuals) and a model whose forward
    skips blocks: the stage refuses the call, naming them, before any block runs."""
    import torch

    from parallel_backend.models.comfy_dit import recognise
    from parallel_backend.strategies.asyncdiff.messages import StagePlan
    from parallel_backend.strategies.pipefusion.messages import PipeCall, PlaceBlocks
    from parallel_backend.strategies.pipefusion.runner import PipeRunner

    if family not in host_families:
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{FAMILIES[family]} ({family})")
    model, call = _tiny(fixture_families, family, **(change(torch) if callable(change) else {}))
    if change == "skip_mmdit":
        model.skip_mmdit = [0]
    ran = []
    for block in (*model.double_blocks, *model.single_blocks):
        block.register_forward_pre_hook(lambda *_: ran.append(1))
    runner = PipeRunner(model, recognise(model).wire, torch.device("cpu"))
    runner.setup(PlaceBlocks("tiny", StagePlan(0, 1, (), None, None, 0, 1, False, ())))
    with pytest.raises(ValueError, match=refused):
        runner.call(PipeCall("tiny", call, 3))
    assert not ran


def test_ltxv_per_token_timesteps_follow_each_patch(fixture_families, host_families):
    """LTX-Video under a noise mask gets a timestep per token (B, L, 1): each patch's blocks take its tokens' rows.
    Unchanged inputs give the model's own forward; a patched call on other timesteps uses stale keys and values."""
    from dataclasses import replace

    import torch

    from parallel_backend.models.comfy_dit import forward, recognise
    from parallel_backend.strategies.asyncdiff.messages import StagePlan
    from parallel_backend.strategies.pipefusion.messages import PipeCall, PlaceBlocks
    from parallel_backend.strategies.pipefusion.runner import PipeRunner

    if "ltxv" not in host_families:
        pytest.skip("this ComfyUI has no comfy.supported_models.LTXV (ltxv)")
    model, call = _tiny(fixture_families, "ltxv")
    tokens = call.x[0, 0].numel()  # LTX-Video patchifies 1 x 1 x 1
    t = torch.linspace(0.1, 0.9, tokens).repeat(2, 1).unsqueeze(-1)  # (B, L, 1), as LTXV.process_timestep gives
    call = replace(call, t=t)
    with torch.inference_mode():
        reference = forward(model, call)
    runner = PipeRunner(model, recognise(model).wire, torch.device("cpu"))
    runner.setup(PlaceBlocks("tiny", StagePlan(0, 1, (), None, None, 0, 1, False, ())))
    for patches in (1, 4, 7):
        out = runner.call(PipeCall("tiny", call, patches)).out
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5, msg=f"{patches} patches")
    later = replace(call, t=0.5 * t)
    out = runner.call(PipeCall("tiny", later, 4)).out
    with torch.inference_mode():
        assert (out - forward(model, later)).abs().max() > 1e-4


def test_ltxv_with_a_guides_self_attention_mask_is_refused_by_name(fixture_families, host_families):
    """A keyframe guide of strength 0.5 attenuates attention between the guide's tokens and the rest (a mask over
    the whole sequence, not a patch's): refused in one sentence, before a block runs."""
    from dataclasses import replace

    import torch

    from parallel_backend.models.comfy_dit import recognise
    from parallel_backend.strategies.asyncdiff.messages import StagePlan
    from parallel_backend.strategies.pipefusion.messages import PipeCall, PlaceBlocks
    from parallel_backend.strategies.pipefusion.runner import PipeRunner

    if "ltxv" not in host_families:
        pytest.skip("this ComfyUI has no comfy.supported_models.LTXV (ltxv)")
    model, call = _tiny(fixture_families, "ltxv")
    if not hasattr(model, "_build_guide_self_attention_mask"):
        pytest.skip("this ComfyUI's LTX-Video has no guide self-attention mask")
    guide = 5  # the last 5 tokens are a keyframe guide's
    extras = {**call.extras, "denoise_mask": torch.ones(2, 1, *call.x.shape[2:]),
              "keyframe_idxs": torch.zeros(2, 3, guide, 2), "guide_attention_entries": [
                  {"pre_filter_count": guide, "strength": 0.5}]}
    runner = PipeRunner(model, recognise(model).wire, torch.device("cpu"))
    runner.setup(PlaceBlocks("tiny", StagePlan(0, 1, (), None, None, 0, 1, False, ())))
    with pytest.raises(ValueError, match="pipefusion does not run LTX-Video with a guide's self-attention mask"):
        tokens = call.x[0, 0].numel()  # under a noise mask the timestep is per token, as LTXV.process_timestep gives
        runner.call(PipeCall("tiny", replace(call, extras=extras, t=call.t.view(2, 1, 1).expand(2, tokens, 1)), 1))


def test_the_settings_node_offers_pipefusion_and_its_patches(comfy_server):
    inputs = comfy_server.get("/object_info/TandemSettings")["TandemSettings"]["input"]
    kind, *details = inputs["required"]["strategy"]  # ["COMBO", {"options": [...]}], or [[...], {...}] before
    options = details[0]["options"] if kind == "COMBO" else kind
    assert "pipefusion" in options
    assert {"pipefusion", "patches"} <= set({**inputs.get("optional", {}), **inputs["required"]})


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_warm_up_covering_every_step_equals_stock(comfy_server, comfy, fixture_families, host_families, family, cfg):
    stock, tandem = _pair(comfy_server, comfy, host_families, f"pipefusion_exact_{family}_{cfg:g}", family, cfg=cfg)
    comfy.assert_same_latents(tandem, stock)
    _ran_two_stages(comfy_server)
    _each_stage_held_only_its_blocks(comfy_server, fixture_families, family)


def test_cfg_times_pipefusion_on_four_workers_equals_stock(comfy_server, comfy, host_families):
    """cfg 2 x pipefusion 2: each branch's rows run through a chain of two stages of their own."""
    stock, tandem = _pair(comfy_server, comfy, host_families, "pipefusion_cfg", cfg=4.0, devices="cpu:4",
                          degrees={"cfg_degree": 2, "pipefusion": 2})
    comfy.assert_same_latents(tandem, stock)
    run = comfy_server.get("/tandem/status")["last_run"]
    assert run["strategy"] == "pipefusion" and run["devices_used"] == 4 and "cfg 2" in run["mesh"], run


@pytest.mark.parametrize("family", ["flux", "sd35", "ltxv", "zimage"])
def test_each_stage_holds_only_its_blocks_weights(comfy_server, comfy, host_families, fixture_families, family):
    from parallel_backend.runtime.recipe import weights_bytes

    _pair(comfy_server, comfy, host_families, f"pipefusion_weights_{family}", family)
    held, whole = comfy_server.get("/tandem/status")["model_weights_bytes"], weights_bytes(_tiny(fixture_families, family)[0])
    assert max(held) < 0.8 * whole, (held, whole)
    assert sum(held) >= whole  # every block is held by one stage (the shared embedders by both)


# Measured on v0.24 (one exact step of 4): Flux 38.3 dB, Qwen-Image 43.6, SD3.5 60.5, LTX-Video 50.4, Lumina 2 38.1;
# the tiny Z-Image 24.6 (25.5 with two exact steps), below the floor, also in one process on the same schedule
# (35 dB there, Flux 50): its latent moves more per step; its cut is not the cause (the caption riding whole with
# patch 0, as Flux's text does, measured no better). Its 64 tokens are 3/4 padding to multiples of 32.
@pytest.mark.parametrize("family", ["flux", "wan21_t2v", "qwen_image", "chroma", "hunyuan_video", "sd35", "ltxv", "lumina2", pytest.param(
    "zimage", marks=pytest.mark.xfail(strict=True, reason="the tiny Z-Image is 24.6 dB after warm-up: below the floor"))])
def test_after_warm_up_the_patches_are_stale_within_the_psnr_floor(comfy_server, comfy, host_families, family):
    from parallel_backend.engine.oracle import psnr

    stock, tandem = _pair(comfy_server, comfy, host_families, f"pipefusion_stale_{family}", family, warmup=1)
    assert (tandem - stock).abs().max() > comfy.RTOL_OF_SCALE * stock.abs().max()  # stale values were used
    assert psnr(stock, tandem) >= PSNR_FLOOR_DB, psnr(stock, tandem)
    _ran_two_stages(comfy_server)


def test_reference_latents_join_the_patched_sequence(comfy_server, comfy, host_families):
    """Flux Kontext's reference latents (stock ReferenceLatent node) add image tokens to every call: they are cut
    into patches with the rest, and with warm-up covering every step the result is stock's."""
    stock, tandem = _pair(comfy_server, comfy, host_families, "pipefusion_reference", reference=True)
    comfy.assert_same_latents(tandem, stock)
    _ran_two_stages(comfy_server)


def test_a_call_with_a_block_replaced_runs_on_whole_rows_and_says_so(comfy_server, comfy, host_families):
    """SkipLayerGuidanceDiT adds a call per step whose options replace a double and a single block: that call runs
    on whole rows (cfg, batch), the others in stages; with warm-up covering every step the result is stock's."""
    if "flux" not in host_families:
        pytest.skip("this ComfyUI has no comfy.supported_models.Flux (flux)")
    skip = {"double_layers": "0", "single_layers": "0", "scale": 3.0, "start_percent": 0.0, "end_percent": 1.0,
            "rescaling_scale": 0.0}
    name, before = "pipefusion_slg", comfy_server.log_size()
    stock = comfy.with_model_patch(comfy.family_workflow("KSampler", f"{name}_stock", None, family="flux", cfg=4.0,
                                                         steps=STEPS), "SkipLayerGuidanceDiT", **skip)
    tandem = comfy.with_model_patch(comfy.family_workflow("TandemKSampler", f"{name}_tandem", "pipefusion",
                                                          family="flux", cfg=4.0, steps=STEPS,
                                                          degrees={"warmup": STEPS, "patches": 4}),
                                    "SkipLayerGuidanceDiT", **skip)
    comfy.run_checked(comfy_server, stock)
    with comfy_server.on_the_pool():
        comfy.run_checked(comfy_server, tandem)
    comfy.assert_same_latents(comfy_server.latent(f"{name}_tandem"), comfy_server.latent(f"{name}_stock"))
    log = comfy_server.log_since(before)
    assert "strategy 'pipefusion' runs this call on whole rows (cfg, batch): it has a model patch" in log, log[-3000:]


def test_a_call_a_split_by_tokens_cannot_take_is_refused_by_name(comfy_server, comfy, host_families):
    """Reference latents on a zero timestep (Flux.2's edit method) change the modulation per token: the run fails
    before any step, naming them."""
    if "flux2" not in host_families:
        pytest.skip("this ComfyUI has no comfy.supported_models.Flux2 (flux2)")
    workflow = comfy.family_workflow("TandemKSampler", "pipefusion_zero_refused", "pipefusion", family="flux2",
                                     cfg=1.0, steps=STEPS, reference=True)
    for node, source in (("12", "10"), ("13", "11")):
        workflow[node] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
                          "inputs": {"conditioning": [source, 0], "reference_latents_method": "index_timestep_zero"}}
    workflow["5"]["inputs"]["positive"], workflow["5"]["inputs"]["negative"] = ["12", 0], ["13", 0]
    result = comfy_server.run(workflow)
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert result["status"]["status_str"] == "error" and errors, result["status"]
    message = errors[0]["exception_message"]
    assert ("strategy 'pipefusion' cannot split this call by tokens: it has reference latents on a zero timestep"
            in message), message


def test_a_model_pipefusion_does_not_cut_is_refused_before_any_work(comfy_server, comfy):
    """An SD1.x UNet has no blocks of a DiT to cut: the run fails naming what pipefusion cuts."""
    result = comfy_server.run(comfy.sampler_workflow("TandemKSampler", "pipefusion_unet_refused", "pipefusion",
                                                     cfg=1.0, steps=STEPS))
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert result["status"]["status_str"] == "error" and errors, result["status"]
    assert "strategy 'pipefusion' cuts diffusers' Flux.1" in errors[0]["exception_message"], errors[0]


def test_ltxv_under_a_noise_mask_equals_stock(comfy_server, comfy, host_families):
    """LTX-Video image to video (the first latent frame kept): a timestep per token, its rows cut with each patch;
    with warm-up covering every step the result is stock's."""
    stock, tandem = _pair(comfy_server, comfy, host_families, "pipefusion_ltxv_mask", "ltxv", noise_mask=True)
    comfy.assert_same_latents(tandem, stock)
    _ran_two_stages(comfy_server)


def test_wan22_per_frame_timesteps_are_refused_by_name(comfy_server, comfy, host_families):
    """Wan 2.2 5B under a noise mask (image to video) modulates each frame's tokens with its own timestep, which a
    patch of the tokens cannot take: the run fails on its first call, naming them."""
    if "wan22_5b" not in host_families:
        pytest.skip("this ComfyUI has no comfy.supported_models.WAN22_T2V (wan22_5b)")
    result = comfy_server.run(comfy.family_workflow("TandemKSampler", "pipefusion_wan22_refused", "pipefusion",
                                                    family="wan22_5b", cfg=1.0, steps=STEPS, noise_mask=True))
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert result["status"]["status_str"] == "error" and errors, result["status"]
    assert "pipefusion does not run Wan 2.2's per-frame timesteps" in errors[0]["exception_message"], errors[0]


def test_a_text_attention_mask_is_refused_by_name(comfy_server, comfy, host_families):
    """Qwen-Image with a text padding mask: a patched call cannot take it; the run fails before any step."""
    if "qwen_image_masked" not in host_families:
        pytest.skip("this ComfyUI has no comfy.supported_models.QwenImage (qwen_image)")
    before = comfy_server.log_size()
    result = comfy_server.run(comfy.family_workflow("TandemKSampler", "pipefusion_masked_refused", "pipefusion",
                                                    family="qwen_image_masked", cfg=1.0, steps=STEPS))
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    if not errors and "attention_mask" not in comfy_server.log_since(before):
        pytest.skip("this ComfyUI's Qwen-Image does not hand the text attention mask to its model (v0.8's "
                    "extra_conds ignores it), so the call has none to refuse")
    assert result["status"]["status_str"] == "error" and errors, result["status"]
    assert ("strategy 'pipefusion' cannot split this call by tokens: it has a text attention mask"
            in errors[0]["exception_message"]), errors[0]
