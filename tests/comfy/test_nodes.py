"""The pack in a real ComfyUI: it loads, and the Multi-GPU KSampler gives the stock KSampler's latents."""

from __future__ import annotations

import pytest
import torch

# fp32 on CPU, relative to the latent's scale: the tiny random model's latents reach ~360 after guided sampling,
# where ComfyUI itself differs by 1.0e-3 between cond and uncond run as one batch and run apart (measured:
# 2.9e-6 of the scale). Splitting a batch over devices rounds the same way, so the bound is 1e-4 of the scale.
RTOL_OF_SCALE = 1e-4


def assert_same_latents(tandem: torch.Tensor, stock: torch.Tensor) -> None:
    assert tandem.shape == stock.shape
    bound = RTOL_OF_SCALE * max(1.0, stock.abs().max().item())
    difference = (tandem - stock).abs().max().item()
    assert difference <= bound, f"max |tandem - stock| = {difference:.3g} > {bound:.3g}"


def test_the_pack_loads_and_lists_its_nodes(comfy_server):
    info = comfy_server.get("/object_info")
    for node in ("TandemKSampler", "TandemKSamplerAdvanced", "TandemSettings", "TandemModel"):
        assert node in info, f"{node} missing from /object_info"
    assert "Multi-GPU" in info["TandemKSampler"]["display_name"]


def sampler_workflow(sampler: str, prefix: str, strategy: str | None, cfg: float = 6.0, batch: int = 1,
                     sampler_name: str = "euler", lora: bool = False) -> dict:
    """Tiny model -> (LoRA) -> sampler -> SaveLatent, as API-format JSON."""
    workflow = {
        "1": {"class_type": "TandemTestTinySD1Model", "inputs": {"seed": 5}},
        "2": {"class_type": "TandemTestConditioning", "inputs": {"seed": 1, "tokens": 77}},
        "3": {"class_type": "TandemTestConditioning", "inputs": {"seed": 2, "tokens": 77}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    model = ["1", 0]
    if lora:
        workflow["7"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": model, "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}}
        model = ["7", 0]
    inputs = {"model": model, "seed": 42, "steps": 6, "cfg": cfg, "sampler_name": sampler_name, "scheduler": "normal",
              "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}
    if strategy is not None:
        workflow["8"] = {"class_type": "TandemSettings",
                         "inputs": {"devices": "cpu:2", "strategy": strategy, "cfg_degree": 0, "batch_degree": 0}}
        inputs["settings"] = ["8", 0]
    workflow["5"] = {"class_type": sampler, "inputs": inputs}
    return workflow


def _run_pair(server, name: str, strategy: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock KSampler and the Multi-GPU KSampler on the same inputs; checks the pool did the work."""
    for sampler, prefix, chosen in (("KSampler", f"{name}_stock", None), ("TandemKSampler", f"{name}_tandem", strategy)):
        runs_before = server.get("/tandem/status")["runs"]
        result = server.run(sampler_workflow(sampler, prefix, chosen, **kw))
        assert result["status"]["status_str"] == "success", result["status"]
    status = server.get("/tandem/status")
    assert status["runs"] == runs_before + 1, f"the Multi-GPU KSampler did not run on the pool: {status}"
    assert status["last_run"]["devices"] == ["cpu", "cpu"] and status["last_run"]["calls"] >= 6
    return server.latent(f"{name}_stock"), server.latent(f"{name}_tandem")


@pytest.mark.parametrize("strategy, cfg, batch", [("cfg", 6.0, 1), ("batch", 1.0, 2), ("batch", 6.0, 2)])
def test_multi_gpu_ksampler_equals_stock_ksampler(comfy_server, strategy, cfg, batch):
    stock, tandem = _run_pair(comfy_server, f"{strategy}_{batch}_{int(cfg)}", strategy, cfg=cfg, batch=batch)
    assert stock.shape == (batch, 4, 8, 8)
    assert_same_latents(tandem, stock)


def test_lora_patched_model_on_workers_equals_stock(comfy_server):
    stock, tandem = _run_pair(comfy_server, "lora", "cfg", lora=True)
    plain = _run_pair(comfy_server, "plain_for_lora", "cfg")[0]
    assert (stock - plain).abs().max() > 100 * RTOL_OF_SCALE * stock.abs().max()  # the LoRA changes the result...
    assert_same_latents(tandem, stock)  # ...and the workers have it baked in


def test_samplers_that_call_the_model_twice_per_step(comfy_server):
    stock, tandem = _run_pair(comfy_server, "heun", "cfg", sampler_name="heun")
    assert_same_latents(tandem, stock)
