"""The embedded digits model: shipped weights, codec, tokenizer, quality (classifier oracle), determinism."""

from __future__ import annotations

import torch

from parallel_backend.models.sampling import GenerationRequest
from parallel_backend.tiny.classifier import classify_digits, digit_accuracy
from parallel_backend.tiny.codec import PatchCodec
from parallel_backend.tiny.data import digits_as_pixels
from parallel_backend.tiny.model import WEIGHTS_DIR, TinyDigitsModel
from parallel_backend.tiny.prompts import prompt_for
from parallel_backend.tiny.text import WordTokenizer
from parallel_backend.tiny.train import train


def _generate_digits(pipeline, digits, scheduler="euler", steps=25, cfg=None, seed=0):
    """One image per entry of `digits`, each from its own seed; returns pixels (N, 1, 32, 32)."""
    cfg = pipeline.default_cfg if cfg is None else cfg
    pixels = [pipeline.generate(GenerationRequest(prompt_for(d), steps=steps, cfg=cfg, seed=seed + i,
                                                  scheduler=scheduler), progress=False).extras["pixels"]
              for i, d in enumerate(digits)]
    return torch.cat(pixels)


def test_shipped_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir())
    assert 0 < total <= 20 * 2**20, f"weights take {total / 2**20:.1f} MiB"
    model = TinyDigitsModel.load()
    assert model.config["latent_shape"] == [4, 8, 8] and model.config["pixel_size"] == 32
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_codec_round_trip_keeps_the_digits():
    pixels, labels = digits_as_pixels()
    codec = TinyDigitsModel.load().codec
    latents = codec.encode(pixels)
    assert latents.shape == (len(pixels), 4, 8, 8)
    assert torch.allclose(latents.std(dim=(0, 2, 3)), torch.ones(4), atol=0.05)
    decoded = codec.decode(latents)
    assert (decoded - pixels).pow(2).mean().sqrt() < 0.06
    assert digit_accuracy(decoded, labels) >= 0.98  # the codec loses nothing the classifier needs


def test_codec_fit_is_deterministic():
    pixels, _ = digits_as_pixels()
    a, b = PatchCodec().fit(pixels), PatchCodec().fit(pixels[torch.randperm(len(pixels))])
    assert torch.allclose(a.basis, b.basis, atol=1e-5) and torch.allclose(a.scale, b.scale, atol=1e-5)


def test_tokenizer_words_digits_unknowns_and_truncation():
    tok = WordTokenizer(max_length=8)
    ids = tok.encode(["a handwritten 7", "", "a purple 42", "one two three four five six seven"])
    vocab = {w: i for i, w in enumerate(tok.vocab)}
    assert ids.shape == (4, 8)
    assert ids[0, :5].tolist() == [vocab["<bos>"], vocab["a"], vocab["handwritten"], vocab["7"], vocab["<eos>"]]
    assert ids[1, :3].tolist() == [vocab["<bos>"], vocab["<eos>"], vocab["<pad>"]]
    assert ids[2, 2].item() == vocab["<unk>"] and ids[2, 3:5].tolist() == [vocab["4"], vocab["2"]]
    assert ids[3, -1].item() == vocab["<eos>"]  # truncated to fit, still closed


def test_fifty_samples_are_recognised_as_the_asked_digit(digits_pipeline):
    digits = [d for d in range(10) for _ in range(5)]
    # five images per request, one request (and seed) per digit: the sampler's batch, one fifth of the calls
    cfg = digits_pipeline.default_cfg
    requests = [GenerationRequest(prompt_for(d), steps=25, cfg=cfg, seed=d, num_images=5) for d in range(10)]
    pixels = torch.cat([digits_pipeline.generate(r, progress=False).extras["pixels"] for r in requests])
    accuracy = digit_accuracy(pixels, torch.tensor(digits))
    print(f"digit accuracy, 50 samples, euler 25 steps, cfg {digits_pipeline.default_cfg}: {accuracy:.0%}")
    assert accuracy >= 0.90


def test_other_schedulers_also_give_the_asked_digit(digits_pipeline):
    digits = list(range(10))
    for scheduler in ("ddim", "dpmpp_2m", "euler_a"):
        accuracy = digit_accuracy(_generate_digits(digits_pipeline, digits, scheduler, seed=100), torch.tensor(digits))
        assert accuracy >= 0.8, f"{scheduler}: {accuracy:.0%}"


def test_negative_prompt_reaches_the_uncond_branch(digits_pipeline):
    # With the prompt as its own negative, eps_uncond == eps_cond, so guidance cancels at any cfg:
    # the result must equal the unguided (cfg=1) run; with an empty negative it must not.
    def run(negative, cfg):
        request = GenerationRequest("a handwritten 8", negative_prompt=negative, steps=8, cfg=cfg, seed=3)
        return digits_pipeline.generate(request, progress=False).latents

    unguided = run("", 1.0)
    assert torch.allclose(run("a handwritten 8", 6.0), unguided, atol=1e-4)
    assert not torch.allclose(run("", 6.0), unguided, atol=1e-2)


def test_same_seed_same_image_other_seed_other_image(digits_pipeline):
    request = GenerationRequest("a handwritten 3", steps=10, seed=5)
    a = digits_pipeline.generate(request, progress=False).latents
    b = digits_pipeline.generate(request, progress=False).latents
    c = digits_pipeline.generate(GenerationRequest("a handwritten 3", steps=10, seed=6), progress=False).latents
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_cfg_one_makes_one_call_per_step_without_uncond(digits_pipeline):
    result = digits_pipeline.generate(GenerationRequest("a handwritten 1", steps=7, cfg=1.0), progress=False)
    assert result.model_calls == 7 and torch.isfinite(result.latents).all()


def test_training_is_deterministic_and_saves_what_it_trained(tmp_path):
    a = train(steps=2, batch_size=8, progress=False)
    b = train(steps=2, batch_size=8, progress=False)
    for (name, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), name
    loaded = TinyDigitsModel.load(a.save(tmp_path))
    ids = a.tokenizer.encode(["a handwritten 2"])
    assert torch.equal(loaded.text_encoder(ids), a.text_encoder(ids))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = a.text_encoder(ids)
    assert torch.equal(loaded.unet(x, t, encoder_hidden_states=ctx).sample, a.unet(x, t, encoder_hidden_states=ctx).sample)


def test_every_scheduler_runs(digits_pipeline):
    from parallel_backend.models.sampling import SCHEDULERS

    for name in SCHEDULERS:
        result = digits_pipeline.generate(GenerationRequest("a handwritten 6", steps=4, scheduler=name), progress=False)
        assert torch.isfinite(result.latents).all(), name
