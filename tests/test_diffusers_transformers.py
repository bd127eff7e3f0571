"""parallelize() on diffusers' transformer pipelines (Flux, SD3, Wan t2v / i2v, Qwen-Image) equals the plain pipeline.

Each pipeline is built from diffusers' own classes with tiny seeded weights (one or two blocks, head dim 8-16,
a few latent tokens); text encoders are absent, the prompt embeddings are given. cfg: true CFG / guidance > 1
with negative embeddings; batch: two images per prompt, no negative. fp32 on CPU, 3 steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.diffusers import ParallelTransformer, parallelize, unparallelize

pytestmark = pytest.mark.pool

STEPS = 3


@dataclass
class Case:
    pipe: object
    inputs: dict  # sizes and the cond embeddings
    guided: dict  # what turns guidance on: the negative embeddings and the scale
    batch: dict  # what asks for two images per prompt with no guidance
    pairs: bool = True  # the pipeline calls the transformer once per branch (SD3 batches [uncond; cond] itself)
    images: str = "images"  # the output's field (Wan's are frames)


def _embeds(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kl_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=1, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",))


def flux() -> Case:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), _kl_vae(1), None, None, None, None, transformer)
    return Case(pipe, dict(height=8, width=8, prompt_embeds=_embeds(1, 6, 32, seed=1),
                           pooled_prompt_embeds=_embeds(1, 32, seed=2)),
                guided=dict(negative_prompt_embeds=_embeds(1, 6, 32, seed=3),
                            negative_pooled_prompt_embeds=_embeds(1, 32, seed=4), true_cfg_scale=4.0),
                batch=dict(num_images_per_prompt=2))


def sd3() -> Case:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4)
    pipe = StableDiffusion3Pipeline(transformer, FlowMatchEulerDiscreteScheduler(), _kl_vae(4), *[None] * 6)
    return Case(pipe, dict(height=8, width=8, prompt_embeds=_embeds(1, 6, 32, seed=1),
                           pooled_prompt_embeds=_embeds(1, 16, seed=2)),
                guided=dict(negative_prompt_embeds=_embeds(1, 6, 32, seed=3),
                            negative_pooled_prompt_embeds=_embeds(1, 16, seed=4), guidance_scale=4.0),
                batch=dict(num_images_per_prompt=2, guidance_scale=1.0), pairs=False)


def wan(i2v: bool = False) -> Case:
    """Wan 2.1 text-to-video, or image-to-video with a tiny CLIP image encoder (its image tokens join the call)."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline,
                           WanTransformer3DModel)

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=36 if i2v else 16, out_channels=16, text_dim=32, freq_dim=16,
                                        ffn_dim=32, num_layers=1, rope_max_seq_len=32, image_dim=8 if i2v else None)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    parts = dict(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                 transformer=transformer)
    inputs = dict(height=16, width=16, num_frames=5, prompt_embeds=_embeds(1, 6, 32, seed=1))
    if i2v:
        import PIL.Image
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        parts.update(image_processor=CLIPImageProcessor(crop_size=16, size={"shortest_edge": 16}),
                     image_encoder=CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16,
                                                                    num_hidden_layers=2, num_attention_heads=2,
                                                                    image_size=16, patch_size=8)))
        inputs["image"] = PIL.Image.new("RGB", (16, 16), (120, 30, 200))
    pipe = (WanImageToVideoPipeline if i2v else WanPipeline)(**parts)
    return Case(pipe, inputs, guided=dict(negative_prompt_embeds=_embeds(1, 6, 32, seed=3), guidance_scale=4.0),
                batch=dict(num_videos_per_prompt=2, guidance_scale=1.0), images="frames")


def qwen_image(negative_tokens: int = 6, padded: bool = False) -> Case:
    """padded: text masks with padding (the cond text's last 2 tokens, a hole in the negative text's)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, transformer)
    inputs = dict(height=32, width=32, prompt_embeds=_embeds(1, 6, 16, seed=1))
    guided = dict(negative_prompt_embeds=_embeds(1, negative_tokens, 16, seed=3), true_cfg_scale=4.0)
    if padded:
        inputs["prompt_embeds_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0]])
        guided["negative_prompt_embeds_mask"] = torch.ones(1, negative_tokens, dtype=torch.long)
        guided["negative_prompt_embeds_mask"][0, 1] = 0
    return Case(pipe, inputs, guided=guided, batch=dict(num_images_per_prompt=2, true_cfg_scale=1.0))


PIPELINES = {"flux": flux, "sd3": sd3, "wan": wan, "wan_i2v": lambda: wan(i2v=True), "qwen_image": qwen_image}


def _generate(case: Case, strategy: str) -> torch.Tensor:
    wanted = case.guided if strategy == "cfg" else case.batch
    out = case.pipe(**case.inputs, **wanted, num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    return getattr(out, case.images)


def _assert_matches(result: torch.Tensor, reference: torch.Tensor) -> None:
    assert result.shape == reference.shape
    error, scale = (result - reference).abs().max().item(), max(1.0, reference.abs().max().item())
    assert error <= 1e-4 * scale, f"max |a-b| = {error:.3g} (reference up to {scale:.3g})"


@pytest.mark.parametrize("strategy", ["cfg", "batch"])
@pytest.mark.parametrize("name", list(PIPELINES))
def test_parallelized_transformer_pipeline_equals_plain(cpu_pool, monkeypatch, name, strategy):
    from parallel_backend.hosts.executor import ParallelExecutor

    branches, run = [], ParallelExecutor.run

    def run_counting_branches(self, module, family, call, *rest):
        branches.append(call.branches)
        return run(self, module, family, call, *rest)

    monkeypatch.setattr(ParallelExecutor, "run", run_counting_branches)
    case = PIPELINES[name]()
    case.pipe.set_progress_bar_config(disable=True)
    original, cls = case.pipe.transformer, type(case.pipe)
    reference = _generate(case, strategy)
    parallelize(case.pipe, ParallelConfig("cpu:2", strategy), pool=cpu_pool)
    wrapper = case.pipe.transformer
    assert isinstance(wrapper, ParallelTransformer) and parallelize(case.pipe).transformer is wrapper  # idempotent
    calls = cpu_pool.stats.calls
    result = _generate(case, strategy)
    paired = strategy == "cfg" and case.pairs
    # a paired job's first step runs its two calls one at a time (learning the pair), then one call per step
    assert cpu_pool.stats.calls - calls == STEPS + (1 if paired else 0)
    both = [2] * STEPS if strategy == "cfg" else [1] * STEPS
    assert branches == ([1, 1] + both[1:] if paired else both)
    if paired:
        assert (wrapper.pairing.hits, wrapper.pairing.misses) == (STEPS - 1, 0)
    _assert_matches(result, reference)
    unparallelize(case.pipe)
    assert case.pipe.transformer is original and type(case.pipe) is cls


def test_branches_of_different_text_lengths_run_one_after_the_other(cpu_pool, caplog):
    case = qwen_image(negative_tokens=4)
    case.pipe.set_progress_bar_config(disable=True)
    reference = _generate(case, "cfg")
    parallelize(case.pipe, ParallelConfig("cpu:2", "cfg"), pool=cpu_pool)
    try:
        calls = cpu_pool.stats.calls
        with caplog.at_level(logging.INFO, logger="tandem"):
            result = _generate(case, "cfg")
        assert cpu_pool.stats.calls - calls == 2 * STEPS
        assert case.pipe.transformer.pairing.hits == 0
        lines = [r.getMessage() for r in caplog.records if "one after the other" in r.getMessage()]
        assert len(lines) == 1 and "QwenImagePipeline" in lines[0] and "encoder_hidden_states" in lines[0]
        _assert_matches(result, reference)
    finally:
        unparallelize(case.pipe)


def test_a_pipeline_without_a_supported_denoiser_is_refused_before_any_process_starts():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match=r"cannot run a DDPMPipeline: .*StableDiffusionPipeline.*QwenImagePipeline"):
        parallelize(pipe, ParallelConfig("cpu:2", "cfg"))
    assert pipe.unet is unet and type(pipe) is DDPMPipeline


SEQUENCE_PIPELINES = {"flux": flux, "wan": wan, "sd3": sd3, "qwen_image padded": lambda: qwen_image(padded=True)}


SPLITS = [(name, strategy) for name in SEQUENCE_PIPELINES for strategy in ("ulysses", "ring")] + [
    ("flux", "tensor"), ("wan", "tensor")]


@pytest.mark.parametrize("name, strategy", SPLITS)
def test_a_sequence_or_tensor_split_pipeline_equals_plain(cpu_pool, monkeypatch, name, strategy):
    """parallelize with ulysses / ring: each transformer call (here the guided pair, joined; SD3's own [uncond;
    cond] rows) split by its token sequence over both workers; Qwen-Image's text padding as a key mask. With
    tensor: each block cut over both workers by heads and MLP units."""
    from parallel_backend.hosts.executor import ParallelExecutor

    split, run = [], ParallelExecutor.run

    def run_recording_the_split(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        split.append((result.mesh.strategy, result.mesh.inner, result.bytes_sent > 0))
        return result

    monkeypatch.setattr(ParallelExecutor, "run", run_recording_the_split)
    case = SEQUENCE_PIPELINES[name]()
    case.pipe.set_progress_bar_config(disable=True)
    reference = _generate(case, "cfg")
    parallelize(case.pipe, ParallelConfig("cpu:2", strategy), pool=cpu_pool)
    try:
        result = _generate(case, "cfg")
    finally:
        unparallelize(case.pipe)
    _assert_matches(result, reference)
    assert split and set(split) == {(strategy, 2, True)}  # every call went through the group, tokens crossed
