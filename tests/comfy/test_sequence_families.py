"""ulysses and ring in ComfyUI: the Multi-GPU KSampler with the token sequence split over two CPU workers gives
the stock KSampler's latents, on every DiT family Tandem has a sequence split for (tiny models of ComfyUI's own
classes, fixture_nodes/families.py), at cfg 1 (the case it exists for) and cfg > 1, at odd sizes (token counts
the degree does not divide) and on several video frames.

Equality here proves the split ran: each worker computes only its shard of the tokens, and a split module that
issued no group attention raises (models/attention_route.py), so a worker that skipped the exchange could not
produce the stock latents.
"""

from __future__ import annotations

import pytest

STEPS = 3
SEQUENCE_FAMILIES = {  # family: the comfy.supported_models class it needs (for the skip reason)
    "flux": "Flux", "flux_schnell": "FluxSchnell", "flux2": "Flux2", "chroma": "Chroma",
    "wan21_t2v": "WAN21_T2V", "wan21_i2v": "WAN21_I2V", "wan22_i2v": "WAN21_T2V", "wan22_5b": "WAN22_T2V",
    "qwen_image": "QwenImage", "zimage": "ZImage", "hunyuan_video": "HunyuanVideo",
    "hunyuan_video15": "HunyuanVideo15", "sd3": "SD3", "sd35": "SD3", "ltxv": "LTXV",
}


def _check(server, comfy, host_families, name: str, family: str, strategy: str, **kw) -> None:
    if family not in host_families:
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{SEQUENCE_FAMILIES[family]} ({family})")
    stock, tandem = comfy.run_pair(server, name, strategy, kind="family", family=family, steps=STEPS, **kw)
    comfy.assert_same_latents(tandem, stock)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
@pytest.mark.parametrize("family", list(SEQUENCE_FAMILIES))
def test_sequence_split_equals_stock(comfy_server, comfy, host_families, family, strategy, cfg):
    _check(comfy_server, comfy, host_families, f"seq_{family}_{strategy}_{cfg:g}", family, strategy, cfg=cfg)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
@pytest.mark.parametrize("family", ["flux", "flux2", "chroma", "wan21_t2v", "wan22_5b", "qwen_image", "zimage"])
def test_odd_sizes_split_unevenly_and_equal_stock(comfy_server, comfy, host_families, family, strategy):
    """One more latent row and column: odd token counts (Flux 25 image + 8 text tokens; Wan 3 frames of 25),
    uneven shards. (HunyuanVideo's own model takes no odd sizes: it does not pad to its patch.)"""
    _check(comfy_server, comfy, host_families, f"seq_odd_{family}_{strategy}", family, strategy, cfg=1.0, grow=1)


def test_wan22_per_frame_timesteps_under_a_noise_mask(comfy_server, comfy, host_families):
    """Wan 2.2 5B's image-to-video latent (first frame kept): one timestep per latent frame, so each token's
    modulation follows its frame; the shards cut it with the tokens."""
    _check(comfy_server, comfy, host_families, "seq_wan22_5b_i2v", "wan22_5b", "ulysses", cfg=1.0,
           noise_mask=True)


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_reference_latents_join_the_split_sequence(comfy_server, comfy, host_families, family):
    """Edit models append reference-latent tokens to the image tokens: they are split and gathered with them."""
    _check(comfy_server, comfy, host_families, f"seq_ref_{family}", family, "ring", cfg=1.0, reference=True)


@pytest.mark.parametrize("family", ["flux", "wan21_t2v"])
def test_auto_measures_one_image_at_cfg_1_through_comfys_attention_and_says_its_choice(comfy_server, comfy,
                                                                                       host_families, family):
    """auto with one image at cfg 1 on two workers: its first two calls run on one worker, the second timed with
    every attention ComfyUI's attention makes (its override), and the plan chooses: the tiny models' calls take
    a few ms, near what the pool costs per call, so a sequence split or one device (tests/test_auto_plan.py
    checks choices with wide margins). The latents equal stock either way; the log says what was measured and
    why, and the panel's last run shows the mesh chosen."""
    offset = (comfy_server.base / comfy_server.log_name).stat().st_size
    _check(comfy_server, comfy, host_families, f"seq_auto_{family}", family, "auto", cfg=1.0)
    said = comfy_server.log_since(offset)
    assert "auto ran the first two calls of this model and shape on one device" in said, said[-2000:]
    assert "token-mixing attention" in said, said[-2000:]  # ComfyUI's attention was timed on the worker
    mesh = comfy_server.get("/tandem/status")["last_run"]["mesh"]  # the run's last call's
    if "auto chose" in said:  # a few ms per call: the prediction is near the floor, either way is right
        assert f"auto chose {mesh} for this model and shape" in said and mesh.startswith(("ulysses", "ring")), mesh
    else:
        assert "auto runs this call on one device: no split is predicted to reach 1.05x" in said, said[-2000:]
        assert mesh.startswith("batch (cfg 1 x batch 1)"), mesh


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_usp_and_cfg_times_ulysses_on_four_workers(comfy_server, comfy, host_families, cfg):
    """Four CPU workers: usp (ring 2 x ulysses 2) at cfg 1, and cfg 2 x ulysses 2 at cfg 3.5 (the mesh of
    4 GPUs on a guided Flux call). Speed on this 2-core machine means nothing; the latents must equal stock."""
    strategy, degrees = (("usp", {"ulysses": 2, "ring": 2}) if cfg == 1.0
                         else ("ulysses", {"cfg_degree": 2, "ulysses": 2}))
    _check(comfy_server, comfy, host_families, f"seq_four_{strategy}", "flux", strategy, cfg=cfg,
           devices="cpu:4", degrees=degrees)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_usp_left_at_its_default_degrees_takes_both_workers(comfy_server, comfy, host_families, cfg):
    """usp with the Settings node's ulysses and ring left at 0 on two CPU workers: the tiny Flux's 2 attention
    heads divide by 2, so ulysses takes both workers (ring 1); the latents equal stock."""
    _check(comfy_server, comfy, host_families, f"seq_usp_default_{cfg:g}", "flux", "usp", cfg=cfg)
    assert comfy_server.get("/tandem/status")["last_run"]["mesh"] == "usp (cfg 1 x batch 1 x ring 1 x ulysses 2)"


def test_ulysses_that_does_not_divide_the_heads_is_refused_naming_ring(comfy_server, comfy, host_families):
    """The tiny Flux has 2 attention heads: ulysses over 3 workers cannot split them. The run fails before any
    step, with the sentence that names ring (auto would pick ring there)."""
    if "flux" not in host_families:
        pytest.skip("this ComfyUI has no comfy.supported_models.Flux (flux)")
    workflow = comfy.family_workflow("TandemKSampler", "seq_heads_refused", "ulysses", family="flux", cfg=1.0,
                                     steps=STEPS, devices="cpu:3", degrees={"ulysses": 3})
    result = comfy_server.run(workflow)
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert result["status"]["status_str"] == "error" and errors, result["status"]
    message = errors[0]["exception_message"]
    assert "ulysses degree 3 does not divide the model's 2 attention heads: use ring" in message, message


def test_a_call_a_split_cannot_take_stays_on_whole_rows_under_auto_and_is_refused_by_name(comfy_server, comfy,
                                                                                        host_families):
    """Qwen-Image with a text padding mask: auto keeps the call to whole rows (here one worker: one row cannot go
    round two) and says why; ring named in the Settings node refuses it before any step, naming the mask."""
    if "qwen_image_masked" not in host_families:
        pytest.skip("this ComfyUI has no comfy.supported_models.QwenImage (qwen_image)")
    stock, tandem = comfy.run_pair(comfy_server, "seq_masked_auto", "auto", kind="family",
                                   family="qwen_image_masked", steps=STEPS, cfg=1.0)
    comfy.assert_same_latents(tandem, stock)
    if "it has a text attention mask" not in comfy_server.log_since(0):
        pytest.skip("this ComfyUI's Qwen-Image does not hand the text attention mask to its model (v0.8's "
                    "extra_conds ignores it), so the call has none to refuse")
    assert comfy_server.get("/tandem/status")["last_run"]["mesh"].startswith("batch")
    assert "auto keeps this call to whole rows (cfg, batch): it has a text attention mask" in comfy_server.log_since(0)
    result = comfy_server.run(comfy.family_workflow("TandemKSampler", "seq_masked_ring", "ring",
                                                    family="qwen_image_masked", cfg=1.0, steps=STEPS))
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "cannot split this call by tokens: it has a text attention mask" in errors[0]["exception_message"]
