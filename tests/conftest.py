"""Shared fixtures: the embedded digits pipeline and a tiny random diffusers SD pipeline saved to disk; the check
that keeps the fast tier's unit tests free of processes."""

from __future__ import annotations

import json
import multiprocessing.process
import os
import subprocess

import pytest
import torch

# Point-to-point messages pair in issue order only, as on NCCL (primitives' strict mode): the workers of every
# pool a test starts inherit it, so a receive posted out of order fails here as it would on a GPU.
os.environ["TANDEM_STRICT_P2P"] = "1"

# The tiers (pyproject's markers): a test marked neither `pool` nor `slow` is a unit test and starts no process
# (no worker, daemon, browser or command); one that does fails, naming what it started, until it is marked.
_started: list[str] = []  # what the running test has started (its setup, call and teardown)
_popen_init = subprocess.Popen.__init__


def _noted_popen_init(self, args, *more, **kwargs):
    _started.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
    _popen_init(self, args, *more, **kwargs)


subprocess.Popen.__init__ = _noted_popen_init
_process_start = multiprocessing.process.BaseProcess.start


def _noted_process_start(self):
    _started.append(f"a multiprocessing process ({self.name})")
    _process_start(self)


multiprocessing.process.BaseProcess.start = _noted_process_start

from parallel_backend.runtime import launcher  # noqa: E402 - workers forked by the launcher count as started too

_launcher_spawn = launcher.Launcher.spawn


def _noted_launcher_spawn(self, argv, *more, **kwargs):
    _started.append("a forked worker: " + " ".join(argv))
    return _launcher_spawn(self, argv, *more, **kwargs)


launcher.Launcher.spawn = _noted_launcher_spawn


# Every test in these folders is slow: a ComfyUI server, other machines (network namespaces), a CUDA device.
SLOW_FOLDERS = ("comfy", "multimachine", "gpu")


def pytest_collection_modifyitems(items):
    tests = os.path.dirname(__file__)
    for item in items:
        folder = os.path.relpath(str(item.path), tests).split(os.sep)[0]
        if folder in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _started.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    unit = not any(item.iter_markers("pool")) and not any(item.iter_markers("slow"))
    if call.when == "teardown" and unit and _started and report.passed:
        report.outcome = "failed"
        report.longrepr = (f"a unit test (neither pool nor slow) started {len(_started)} process(es), the first: "
                           f"{_started[0][:300]}; mark it pool (fast tier) or slow")


@pytest.fixture(scope="session")
def digits_pipeline():
    from parallel_backend.hosts.tiny import TinyDigitsPipeline

    return TinyDigitsPipeline()


def _tiny_clip_tokenizer(folder):
    """A CLIP tokenizer with no merges: every printable ASCII character is a token. Written here, no download.

    Printable ASCII maps to itself in CLIP's byte-to-unicode table, so ASCII prompts need nothing else.
    """
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def build_tiny_sd_pipeline(folder, seed: int = 0):
    """A StableDiffusionPipeline of tiny random components (16x16 pixels, 4x8x8 latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_clip_tokenizer(folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=16))
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def build_tiny_sdxl_pipeline(folder, seed: int = 0):
    """A StableDiffusionXLPipeline of tiny random components (two text encoders, SDXL's added embeddings)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_clip_tokenizer(folder)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=8 * 6 + 32)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture
def gloo_ranks(tmp_path):
    """`run(script, world, *extra, wait_for=None)`: `script` (python -c) in `world` processes; argv: rank, world,
    a gloo rendezvous, the tests folder, then `extra`. Returns the stdout of each rank in `wait_for` (default:
    all) as JSON lines; such a rank that fails fails the test, and the others are killed at the end."""
    import itertools
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    calls = itertools.count()

    def run(script: str, world: int, *extra: str, wait_for=None) -> list[list[dict]]:
        arguments = [str(world), f"file://{tmp_path}/rdzv-{next(calls)}", str(repo / "tests"), *extra]
        ranks = [subprocess.Popen([sys.executable, "-c", script, str(r), *arguments], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for r in range(world)]
        try:
            outputs = []
            for r in range(world) if wait_for is None else wait_for:
                out, err = ranks[r].communicate(timeout=120)
                assert ranks[r].returncode == 0, f"rank {r}:\n{out}\n{err}"
                outputs.append([json.loads(line) for line in out.splitlines()])
            return outputs
        finally:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=10)

    return run


@pytest.fixture(scope="module")
def cpu_pool():
    """Two CPU workers, started once per test module and shut down after it."""
    from parallel_backend.runtime.pool import WorkerPool

    pool = WorkerPool("cpu:2", timeout_s=120).start()
    yield pool
    pool.shutdown()
