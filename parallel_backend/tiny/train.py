"""Trains the embedded digits model: `python -m parallel_backend.tiny.train [--steps N] [--out DIR]`.

Deterministic for a given seed, step count and thread count (the defaults reproduce the shipped weights).
Epsilon-prediction DDPM training on SD1.5's noise schedule, prompts drawn from `prompts.TEMPLATES`, the empty
prompt in 10% of samples so classifier-free guidance works, an EMA of the weights is what gets saved.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from .data import digits_as_pixels
from .model import WEIGHTS_DIR, TinyDigitsModel, default_config
from .prompts import TEMPLATES, prompt_for

UNCOND_PROBABILITY = 0.1


def _ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, 1.0 - decay)


def train(steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, threads: int = 2,
          ema_decay: float = 0.995, progress: bool = True) -> TinyDigitsModel:
    """Returns the trained model (EMA weights), with the training facts recorded in its config."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    pixels, labels = digits_as_pixels()
    model = TinyDigitsModel.build(default_config())
    model.codec.fit(pixels)
    latents = model.codec.encode(pixels)
    noise_schedule = DDPMScheduler(**{k: v for k, v in model.config["scheduler"].items()
                                      if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    trainable = torch.nn.ModuleDict({"unet": model.unet, "text_encoder": model.text_encoder})
    ema = copy.deepcopy(trainable).requires_grad_(False)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))

    generator = torch.Generator().manual_seed(seed)
    all_prompts = [[prompt_for(d, k) for k in range(len(TEMPLATES))] for d in range(10)]
    bar = tqdm(range(steps), desc="training", disable=not progress)
    loss_value = float("nan")
    for step in bar:
        index = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
        template = torch.randint(0, len(TEMPLATES), (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < UNCOND_PROBABILITY
        prompts = ["" if drop else all_prompts[labels[i]][k] for i, k, drop in zip(index, template, dropped)]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator)
        context = model.text_encoder(model.tokenizer.encode(prompts))
        prediction = model.unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        _ema_update(ema, trainable, ema_decay if step >= warmup else 0.0)
        loss_value = loss.item() if step == 0 else 0.98 * loss_value + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")

    trainable.load_state_dict(ema.state_dict())
    model.config["training"] = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                                "threads": threads, "ema_decay": ema_decay,
                                "smoothed_final_loss": round(loss_value, 5),
                                "seconds": round(time.perf_counter() - started, 1)}
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m parallel_backend.tiny.train", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (results depend on it)")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for the weights and config")
    args = parser.parse_args(argv)
    model = train(args.steps, args.batch_size, args.lr, args.seed, args.threads)
    folder = model.save(args.out)
    facts = model.config["training"]
    print(f"trained {facts['steps']} steps in {facts['seconds']} s (loss {facts['smoothed_final_loss']}); "
          f"saved to {folder}")


if __name__ == "__main__":
    main()
