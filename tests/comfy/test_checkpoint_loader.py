"""A model file loaded by ComfyUI's own loader (UNETLoader: fp16 on disk, detected as SD1.5, cast by ComfyUI),
with and without a LoRA file applied by LoraLoaderModelOnly: the Multi-GPU KSampler equals the stock one."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("strategy, batch, settings", [("cfg", 1, None), ("batch", 2, None),
                                                       ("asyncdiff", 1, {"warmup": 6})])
def test_a_loaded_checkpoint_on_workers_equals_stock(comfy_server, comfy, strategy, batch, settings):
    stock, tandem = comfy.run_pair(comfy_server, f"loaded_{strategy}", strategy, kind="checkpoint", batch=batch,
                                   settings=settings)
    assert stock.shape == (batch, 4, 8, 8)
    comfy.assert_same_latents(tandem, stock)


def test_a_lora_file_on_a_loaded_checkpoint_reaches_the_workers(comfy_server, comfy):
    stock, tandem = comfy.run_pair(comfy_server, "loaded_lora", "cfg", kind="checkpoint", lora=True)
    plain = comfy.run_pair(comfy_server, "loaded_plain", "cfg", kind="checkpoint")[0]
    assert (stock - plain).abs().max() > 100 * comfy.RTOL_OF_SCALE * stock.abs().max()  # the LoRA changes the result
    comfy.assert_same_latents(tandem, stock)
