"""What people sample with, Multi-GPU against stock: every built-in sampler and scheduler, denoise < 1, masked
conditioning, KSampler (Advanced) in two passes, SamplerCustomAdvanced through the Multi-GPU Model node, and
the previews ComfyUI streams while sampling."""

from __future__ import annotations

import json
import uuid

import pytest

ASYNC_EXACT = {"warmup": 6}  # asyncdiff whose warm-up covers every step: synchronous, so it must equal stock
# dpm_adaptive's step-size controller makes 72 model calls here (4 requested steps) and feeds each call's
# rounding back into its error estimate: a worker's batch-of-one convolutions round differently from the host's
# batch of two, and this grows to 1.5e-4 of the latent's scale (measured; the cfg and batch splits give
# bit-identical latents, and a rerun is bit-identical). Every other sampler stays within the usual 1e-4.
LOOSER = {"dpm_adaptive": 1e-3}


def _compare_all(server, comfy, key: str, names: list[str], **kw) -> None:
    """run_pair with input `key` set to each of `names`, then one assertion listing every mismatch."""
    mismatches = {}
    for name in names:
        stock, tandem = comfy.run_pair(server, f"every_{name}", "cfg", **{key: name}, **kw)
        bound = LOOSER.get(name, comfy.RTOL_OF_SCALE) * max(1.0, stock.abs().max().item())
        difference = (tandem - stock).abs().max().item()
        if not difference <= bound:
            mismatches[name] = f"{difference:.3g} > {bound:.3g}"
    assert not mismatches, f"Multi-GPU differs from stock for: {mismatches}"


def test_every_built_in_sampler_equals_stock(comfy_server, comfy):
    samplers = comfy_server.get("/object_info/KSampler")["KSampler"]["input"]["required"]["sampler_name"][0]
    assert len(samplers) > 20 and "dpmpp_2m" in samplers and "uni_pc" in samplers
    _compare_all(comfy_server, comfy, "sampler_name", samplers, scheduler="karras", steps=4)


def test_every_built_in_scheduler_equals_stock(comfy_server, comfy):
    schedulers = comfy_server.get("/object_info/KSampler")["KSampler"]["input"]["required"]["scheduler"][0]
    assert len(schedulers) > 5 and "karras" in schedulers
    _compare_all(comfy_server, comfy, "scheduler", schedulers, sampler_name="dpmpp_2m", steps=4)


@pytest.mark.parametrize("strategy, settings", [("cfg", None), ("asyncdiff", ASYNC_EXACT)])
def test_denoise_below_one_equals_stock(comfy_server, comfy, strategy, settings):
    stock, tandem = comfy.run_pair(comfy_server, f"denoise_{strategy}", strategy, denoise=0.55, settings=settings)
    full = comfy.run_pair(comfy_server, f"denoise_full_{strategy}", strategy, settings=settings)[0]
    assert (stock - full).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max()  # denoise matters
    comfy.assert_same_latents(tandem, stock)


@pytest.mark.parametrize("set_cond_area", ["default", "mask bounds"])
@pytest.mark.parametrize("strategy, settings", [("cfg", None), ("batch", None), ("asyncdiff", ASYNC_EXACT)])
def test_masked_conditioning_equals_stock(comfy_server, comfy, strategy, settings, set_cond_area):
    """A prompt on the left half: its mask weighs the output ('default') or crops the call to the mask's
    bounds ('mask bounds': calls of another shape). 128 px for the tiny UNet's norm groups, as for areas."""
    name = f"mask_{strategy}_{set_cond_area.replace(' ', '_')}"
    stock, tandem = comfy.run_pair(comfy_server, name, strategy, mask=set_cond_area, settings=settings, size=128)
    plain = comfy.run_pair(comfy_server, f"no_{name}", strategy, settings=settings, size=128)[0]
    assert (stock - plain).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max()  # the mask matters
    comfy.assert_same_latents(tandem, stock)


@pytest.mark.parametrize("strategy, settings", [("cfg", None), ("batch", None), ("asyncdiff", ASYNC_EXACT)])
def test_ksampler_advanced_in_two_passes_equals_stock(comfy_server, comfy, strategy, settings):
    stock, tandem = comfy.run_pair(comfy_server, f"advanced_{strategy}", strategy, kind="advanced", runs=2,
                                   settings=settings, batch=2)
    comfy.assert_same_latents(tandem, stock)


def test_asyncdiff_restarts_its_warm_up_for_the_second_pass(comfy_server, comfy):
    """Two passes are two sampling runs: the second starts synchronous again, with nothing held over from the
    first (its streams are new). Close to stock, like one pass after warm-up."""
    stock, tandem = comfy.run_pair(comfy_server, "advanced_async", "asyncdiff", kind="advanced", runs=2,
                                   settings={"warmup": 1}, steps=8, split=4)
    assert tandem.isfinite().all()
    relative = ((tandem - stock).norm() / stock.norm()).item()
    assert 0 < relative < 0.25, relative


@pytest.mark.parametrize("strategy, cfg, batch", [("cfg", 6.0, 1), ("batch", 1.0, 2), ("asyncdiff", 6.0, 1)])
def test_sampler_custom_advanced_through_the_model_node_equals_stock(comfy_server, comfy, strategy, cfg, batch):
    settings = ASYNC_EXACT if strategy == "asyncdiff" else None
    stock, tandem = comfy.run_pair(comfy_server, f"custom_{strategy}_{batch}", strategy, kind="custom", cfg=cfg,
                                   batch=batch, settings=settings)
    assert stock.shape == (batch, 4, 8, 8)
    comfy.assert_same_latents(tandem, stock)


def _previews(server, workflow: dict) -> int:
    """Runs `workflow` with latent2rgb previews requested; the number of preview images the websocket brought."""
    import websocket

    client = str(uuid.uuid4())
    socket = websocket.create_connection(server.url.replace("http", "ws", 1) + f"/ws?clientId={client}", timeout=120)
    try:
        prompt_id = server.post("/prompt", {"prompt": workflow, "client_id": client,
                                            "extra_data": {"preview_method": "latent2rgb"}})["prompt_id"]
        images = 0
        while True:
            message = socket.recv()
            if isinstance(message, bytes):
                images += 1  # binary frames: preview images
                continue
            event = json.loads(message)
            data = event.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            assert event["type"] != "execution_error", data.get("exception_message")
            if event["type"] == "executing" and data.get("node") is None:
                return images
    finally:
        socket.close()


def test_previews_arrive_like_the_stock_samplers(comfy_server, comfy):
    stock = _previews(comfy_server, comfy.sampler_workflow("KSampler", "preview_stock", None))
    with comfy_server.on_the_pool():
        tandem = _previews(comfy_server, comfy.sampler_workflow("TandemKSampler", "preview_tandem", "cfg"))
    assert stock == 6 and tandem == stock, (stock, tandem)
