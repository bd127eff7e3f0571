"""A real ComfyUI server (COMFYUI_PATH) with the Tandem pack and the test fixture nodes installed.

Skipped when COMFYUI_PATH is unset. The server runs on loopback with --cpu, in a temporary base directory
whose custom_nodes/ links this repository and tests/comfy/fixture_nodes; the pool uses two CPU workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SMALL_SD15_FILE, SMALL_SD15_LORA = "small_sd15.safetensors", "small_sd15_lora.safetensors"  # write_checkpoint.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_lora(path: Path, rank: int = 4, seed: int = 3) -> None:
    """A LoRA on the tiny model's first time-embedding layer (32 -> 128), in ComfyUI's lora_unet_ key format."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_time_embed_0.lora_up.weight": torch.randn(128, rank, generator=generator) * 0.5,
               "lora_unet_time_embed_0.lora_down.weight": torch.randn(rank, 32, generator=generator) * 0.5},
              str(path))


class ComfyServer:
    def __init__(self, url: str, base: Path, process: subprocess.Popen, log_name: str = "comfy.log"):
        self.url, self.base, self.process, self.log_name = url, base, process, log_name

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, payload: dict):
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def run(self, workflow: dict, timeout: float = 300) -> dict:
        """Queues an API-format workflow and waits for it; returns its history entry."""
        prompt_id = self.post("/prompt", {"prompt": workflow, "client_id": str(uuid.uuid4())})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError("ComfyUI exited")
            time.sleep(0.3)
        raise TimeoutError(f"workflow {prompt_id} did not finish in {timeout} s")

    def log_size(self) -> int:
        return (self.base / self.log_name).stat().st_size

    def log_since(self, offset: int) -> str:
        """What the server logged after the log had `offset` bytes."""
        with open(self.base / self.log_name, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    @contextlib.contextmanager
    def on_the_pool(self, runs: int = 1):
        """Checks that what runs inside made `runs` sampling runs on the pool and that no model call of theirs
        took the stock path (Tandem logs each fallback with its reason)."""
        runs_before, log_before = self.get("/tandem/status")["runs"], self.log_size()
        yield
        runs_after = self.get("/tandem/status")["runs"]
        fallbacks = [line for line in self.log_since(log_before).splitlines() if "using the stock sampling path" in line]
        assert not fallbacks, f"Multi-GPU calls took the stock path: {fallbacks}"
        assert runs_after == runs_before + runs, f"{runs_after - runs_before} runs on the pool, expected {runs}" + (
            " (and no stock-path line: the model's calls never reached Tandem's DIFFUSION_MODEL wrapper)"
            if runs_after == runs_before else "")

    def latent(self, prefix: str) -> torch.Tensor:
        from safetensors.torch import load_file

        files = sorted((self.base / "output").rglob(f"{prefix}*.latent"))
        assert files, f"no latent saved with prefix {prefix}"
        return load_file(str(files[-1]))["latent_tensor"]


def prepare_base(base: Path) -> Path:
    """A ComfyUI base directory with the pack, the fixture nodes, a LoRA, a small SD1.5-detected model file and
    tiny Flux, SD3 and Wan 2.1 files (write_families.py: FAMILY_FILES, or FILE.skip where this host cannot
    detect a tiny one)."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "tandem").symlink_to(REPO)
    (base / "custom_nodes" / "tandem_test_fixtures").symlink_to(REPO / "tests" / "comfy" / "fixture_nodes")
    write_tiny_lora(base / "models" / "loras" / "tiny_lora.safetensors")
    (base / "models" / "diffusion_models").mkdir(parents=True)
    subprocess.run([sys.executable, str(REPO / "tests" / "comfy" / "write_checkpoint.py"),
                    str(base / "models" / "diffusion_models" / SMALL_SD15_FILE),
                    str(base / "models" / "loras" / SMALL_SD15_LORA)],
                   cwd=COMFYUI_PATH, env=dict(os.environ, PYTHONPATH=COMFYUI_PATH), check=True, timeout=300)
    subprocess.run([sys.executable, str(REPO / "tests" / "comfy" / "write_families.py"),
                    str(base / "models" / "diffusion_models")],
                   cwd=COMFYUI_PATH, env=dict(os.environ, PYTHONPATH=COMFYUI_PATH), check=True, timeout=300)
    write_quantized_files(base)
    link_third_party_packs(base)
    return base


def write_quantized_files(base: Path) -> None:
    """Tiny fp8_scaled and GGUF Flux / Wan 2.1 files and their dequantized float32 references in the base's
    diffusion_models/ (write_quantized.py; FILE.skip where this host cannot load one)."""
    subprocess.run([sys.executable, str(REPO / "tests" / "comfy" / "write_quantized.py"),
                    str(base / "models" / "diffusion_models")],
                   cwd=COMFYUI_PATH, env=dict(os.environ, PYTHONPATH=COMFYUI_PATH), check=True, timeout=300)


# Third-party packs some tests load: checkouts of these repositories, each in a folder named as the repository,
# in the folder TANDEM_TEST_PACKS names (README: "Testing against a real ComfyUI"). Never committed here.
THIRD_PARTY_PACKS = {"ComfyUI-GGUF": "https://github.com/city96/ComfyUI-GGUF",
                     "ComfyUI-TeaCache": "https://github.com/welltop-cn/ComfyUI-TeaCache",
                     "ComfyUI-MagCache": "https://github.com/Zehong-Ma/ComfyUI-MagCache",
                     "Comfy-WaveSpeed": "https://github.com/chengzeyi/Comfy-WaveSpeed"}


def missing_pack(name: str) -> str | None:
    """Why the third-party pack `name` is not in the test base, or None when it is."""
    folder = os.environ.get("TANDEM_TEST_PACKS")
    if not folder:
        return (f"TANDEM_TEST_PACKS is not set: this test needs the third-party pack {name} "
                f"(git clone {THIRD_PARTY_PACKS[name]} into the folder it names)")
    if not (Path(folder) / name / "__init__.py").is_file():
        return (f"the third-party pack {name} is not in TANDEM_TEST_PACKS={folder} "
                f"(git clone {THIRD_PARTY_PACKS[name]} {Path(folder) / name})")
    return None


# TeaCache's and MagCache's main branches import comfy.ldm.lightricks.model.precompute_freqs_cis, which ComfyUI
# made a method of LTXBaseModel before v0.8 (their issues #178 and #43, open): neither imports in any host we
# test. Users patch that line; the test base instead gives the module a stand-in that raises if called (only
# the packs' LTX-Video paths call it) before the pack's own __init__ runs, its files untouched.
NEEDS_STAND_IN = ("ComfyUI-TeaCache", "ComfyUI-MagCache")
STAND_IN = """import comfy.ldm.lightricks.model as _ltx

if not hasattr(_ltx, "precompute_freqs_cis"):
    def precompute_freqs_cis(*args, **kwargs):
        raise RuntimeError("the test ComfyUI's stand-in for precompute_freqs_cis (removed before v0.8) was called")

    _ltx.precompute_freqs_cis = precompute_freqs_cis
__path__[:] = [{folder!r}]  # the pack's own modules, from its checkout
with open({init!r}) as _init:
    exec(compile(_init.read(), {init!r}, "exec"))
"""


def link_third_party_packs(base: Path) -> None:
    """Links each third-party pack found in TANDEM_TEST_PACKS into the base's custom_nodes/ (NEEDS_STAND_IN: a
    folder whose __init__ gives ComfyUI the stand-in, then runs the pack's own __init__ from its checkout)."""
    for name in THIRD_PARTY_PACKS:
        if missing_pack(name) is not None:
            continue
        checkout = Path(os.environ["TANDEM_TEST_PACKS"], name).resolve()
        if name in NEEDS_STAND_IN:
            (base / "custom_nodes" / name).mkdir()
            (base / "custom_nodes" / name / "__init__.py").write_text(
                STAND_IN.format(folder=str(checkout), init=str(checkout / "__init__.py")))
        else:
            (base / "custom_nodes" / name).symlink_to(checkout)


def pack_import_error(server: ComfyServer, name: str) -> str | None:
    """The line in which ComfyUI says it could not import the third-party pack `name`, or None."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", server.log_since(0)).splitlines()  # without the log's colours
    return next((line.strip() for line in lines if "Cannot import" in line and f"custom_nodes/{name} " in line),
                None)


@pytest.fixture(scope="session")
def need_pack():
    """need_pack(name, server=None): skips the test, saying why, unless the third-party pack `name` is in the test
    base (and, given the server, unless ComfyUI could not import it: its error line is the reason)."""
    def need(name: str, server: ComfyServer | None = None) -> None:
        reason = missing_pack(name) or (pack_import_error(server, name) if server is not None else None)
        if reason:
            pytest.skip(reason)
    return need


def start_server(base: Path, log_name: str = "comfy.log", devices: str | None = "cpu:2", **variables) -> ComfyServer:
    """ComfyUI on a free loopback port with --cpu and a pool on TANDEM_DEVICES=`devices` (None: unset, the
    pack's default), with the environment `variables` (e.g. TANDEM_POOL_START="off"); returns once it answers."""
    port = _free_port()
    env = {**os.environ, "TANDEM_DEVICES": devices or "", "TANDEM_POOL_START": "on_load", **variables}
    if devices is None:
        del env["TANDEM_DEVICES"]
    with open(base / log_name, "wb") as log:
        process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                    "--base-directory", str(base), "--disable-auto-launch"],
                                   cwd=COMFYUI_PATH, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, process, log_name)
    deadline = time.monotonic() + 180
    while True:
        try:
            server.get("/object_info/KSampler")
            return server
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("ComfyUI did not start: " + (base / log_name).read_text()[-3000:])
            time.sleep(0.5)


def stop_server(server: ComfyServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory):
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set: the ComfyUI tests need a local ComfyUI checkout")
    return prepare_base(tmp_path_factory.mktemp("comfy_base"))


# LoRA files for the tiny Flux and Wan 2.1 files (FAMILY_FILES), written by the `loras` fixture
LORA_FILES = {"flux": "tiny_flux_lora.safetensors", "wan21_t2v": "tiny_wan_lora.safetensors"}


@pytest.fixture(scope="session")
def loras(comfy_base):
    """{family: LoRA file name} for the tiny Flux and Wan 2.1 files: rank-4 LoRAs on four of their Linear
    weights, seeded, in ComfyUI's diffusion_model.* key format, written into the base's models/loras/."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    for family, name in LORA_FILES.items():
        model_file = comfy_base / "models" / "diffusion_models" / FAMILY_FILES[family]
        if not model_file.exists():
            continue
        with safe_open(str(model_file), "pt") as weights:
            linear = [k for k in weights.keys() if k.endswith(".weight") and len(weights.get_slice(k).get_shape()) == 2]
            shapes = {k: weights.get_slice(k).get_shape() for k in linear[:4]}
        lora = {}
        for key, (rows, columns) in shapes.items():
            base = "diffusion_model." + key[:-len(".weight")]
            lora[base + ".lora_up.weight"] = torch.randn(rows, 4, generator=generator) * 0.5
            lora[base + ".lora_down.weight"] = torch.randn(4, columns, generator=generator) * 0.5
        save_file(lora, str(comfy_base / "models" / "loras" / name))
    return LORA_FILES


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    server = start_server(comfy_base)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def host_families(comfy_server):
    """The DiT and video families the test server's ComfyUI has (fixture_nodes/families.py `available`)."""
    return comfy_server.get("/object_info/TandemTestTinyDiT")["TandemTestTinyDiT"]["input"]["required"]["family"][0]


# fp32 on CPU, relative to the latent's scale: the tiny random model's latents reach ~360 after guided sampling,
# where ComfyUI itself differs by 1.0e-3 between cond and uncond run as one batch and run apart (measured:
# 2.9e-6 of the scale). Splitting a batch over devices rounds the same way, so the bound is 1e-4 of the scale.
RTOL_OF_SCALE = 1e-4


def assert_same_latents(tandem: torch.Tensor, stock: torch.Tensor) -> None:
    assert tandem.shape == stock.shape
    bound = RTOL_OF_SCALE * max(1.0, stock.abs().max().item())
    difference = (tandem - stock).abs().max().item()
    assert difference <= bound, f"max |tandem - stock| = {difference:.3g} > {bound:.3g}"



def sampler_workflow(sampler: str, prefix: str, strategy: str | None, cfg: float = 6.0, batch: int = 1,
                     sampler_name: str = "euler", lora: bool = False, family: str = "sd1",
                     settings: dict | None = None, area: bool = False, size: int = 64,
                     control: bool = False, mask: str | None = None, scheduler: str = "normal",
                     denoise: float = 1.0, steps: int = 6) -> dict:
    """Tiny model -> (LoRA) -> sampler -> SaveLatent, as API-format JSON. area: the positive prompt is
    combined with a second prompt restricted to the top-left 3/4 (ConditioningSetAreaPercentage); mask: the
    same with a mask on the left half instead (ConditioningSetMask, its set_cond_area = `mask`)."""
    def prompt(seed: int) -> dict:  # a seeded random text conditioning of the family's shape
        return {"class_type": "TandemTestConditioning", "inputs": {"seed": seed, "tokens": 77, "pooled": family == "sdxl"}}

    workflow = {
        "1": {"class_type": "TandemTestTinySD1Model", "inputs": {"seed": 5, "family": family}},
        "2": prompt(1),
        "3": prompt(2),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    model = ["1", 0]
    if lora:
        workflow["7"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": model, "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}}
        model = ["7", 0]
    positive = ["2", 0]
    if area:
        workflow["9"] = prompt(9)
        workflow["10"] = {"class_type": "ConditioningSetAreaPercentage",
                          "inputs": {"conditioning": ["9", 0], "width": 0.75, "height": 0.75, "x": 0, "y": 0, "strength": 1.0}}
        workflow["11"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": positive,
                                                                          "conditioning_2": ["10", 0]}}
        positive = ["11", 0]
    if mask:
        workflow["15"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size * 8, "height": size * 8}}
        workflow["16"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size * 4, "height": size * 8}}
        workflow["17"] = {"class_type": "MaskComposite", "inputs": {"destination": ["15", 0], "source": ["16", 0],
                                                                    "x": 0, "y": 0, "operation": "add"}}
        workflow["18"] = prompt(8)
        workflow["19"] = {"class_type": "ConditioningSetMask", "inputs": {"conditioning": ["18", 0], "mask": ["17", 0],
                                                                          "strength": 1.0, "set_cond_area": mask}}
        workflow["20"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": positive,
                                                                          "conditioning_2": ["19", 0]}}
        positive = ["20", 0]
    negative = ["3", 0]
    if control:  # a ControlNet on both prompts, with a seeded noise image as its hint
        workflow["12"] = {"class_type": "TandemTestTinyControlNet", "inputs": {"seed": 4}}
        workflow["13"] = {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                                 "color": 0x8040C0}}
        workflow["14"] = {"class_type": "ControlNetApplyAdvanced",
                          "inputs": {"positive": positive, "negative": negative, "control_net": ["12", 0],
                                     "image": ["13", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        positive, negative = ["14", 0], ["14", 1]
    inputs = {"model": model, "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
              "scheduler": scheduler, "positive": positive, "negative": negative, "latent_image": ["4", 0],
              "denoise": denoise}
    if strategy is not None:
        workflow["8"] = {"class_type": "TandemSettings",
                         "inputs": {"devices": "cpu:2", "strategy": strategy, "cfg_degree": 0, "batch_degree": 0,
                                    **(settings or {})}}
        inputs["settings"] = ["8", 0]
    workflow["5"] = {"class_type": sampler, "inputs": inputs}
    return workflow


def advanced_workflow(sampler: str, prefix: str, strategy: str | None, split: int = 3, **kw) -> dict:
    """Two chained KSampler (Advanced) passes, as people split a run between models: steps [0, split) return
    their leftover noise, steps [split, end) add none."""
    workflow = sampler_workflow(sampler, prefix, strategy, **kw)
    inputs = workflow["5"]["inputs"]
    common = {key: value for key, value in inputs.items() if key not in ("seed", "denoise", "latent_image")}
    common["noise_seed"] = inputs["seed"]
    workflow["5"]["inputs"] = {**common, "latent_image": inputs["latent_image"], "add_noise": "enable",
                               "start_at_step": 0, "end_at_step": split, "return_with_leftover_noise": "enable"}
    workflow["21"] = {"class_type": sampler, "inputs": {**common, "latent_image": ["5", 0], "add_noise": "disable",
                                                        "start_at_step": split, "end_at_step": 10000,
                                                        "return_with_leftover_noise": "disable"}}
    workflow["6"]["inputs"]["samples"] = ["21", 0]
    return workflow


def custom_workflow(sampler: str, prefix: str, strategy: str | None, **kw) -> dict:
    """SamplerCustomAdvanced with a CFGGuider; with a strategy its model goes through the Multi-GPU Model node.
    (`sampler` is the stock node's class either way: the Model node is what differs.)"""
    workflow = sampler_workflow("KSampler", prefix, strategy, **kw)
    inputs = workflow["5"]["inputs"]
    model = inputs["model"]
    if strategy is not None:
        workflow["22"] = {"class_type": "TandemModel", "inputs": {"model": model, "settings": inputs["settings"]}}
        model = ["22", 0]
    workflow.update({
        "23": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": inputs["positive"],
                                                     "negative": inputs["negative"], "cfg": inputs["cfg"]}},
        "24": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": inputs["sampler_name"]}},
        "25": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": inputs["scheduler"],
                                                          "steps": inputs["steps"], "denoise": inputs["denoise"]}},
        "26": {"class_type": "RandomNoise", "inputs": {"noise_seed": inputs["seed"]}},
        "5": {"class_type": sampler, "inputs": {"noise": ["26", 0], "guider": ["23", 0], "sampler": ["24", 0],
                                                "sigmas": ["25", 0], "latent_image": inputs["latent_image"]}},
    })
    return workflow


def checkpoint_workflow(sampler: str, prefix: str, strategy: str | None, lora: bool = False, **kw) -> dict:
    """The KSampler graph on a model file loaded by ComfyUI's own UNETLoader (fp16, detected as SD1.5), with
    768-wide text conditioning; lora: through LoraLoaderModelOnly with a LoRA file for that model."""
    workflow = sampler_workflow(sampler, prefix, strategy, **kw)
    workflow["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": SMALL_SD15_FILE, "weight_dtype": "default"}}
    for node in ("2", "3"):
        workflow[node]["inputs"]["width"] = 768
    if lora:
        workflow["7"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": ["1", 0], "lora_name": SMALL_SD15_LORA, "strength_model": 1.0}}
        workflow["5"]["inputs"]["model"] = ["7", 0]
    return workflow


FAMILY_FILES = {"flux": "tiny_flux.safetensors", "sd3": "tiny_sd3.safetensors",  # write_families.py
                "wan21_t2v": "tiny_wan21_t2v.safetensors"}


def family_workflow(sampler: str, prefix: str, strategy: str | None, family: str = "flux", cfg: float = 4.0,
                    batch: int = 1, sampler_name: str = "euler", scheduler: str = "normal", steps: int = 3,
                    from_file: bool = False, noise_mask: bool = False, reference: bool = False,
                    grow: int = 0, devices: str = "cpu:2", degrees: dict | None = None) -> dict:
    """A tiny DiT or video model of `family` (fixture_nodes/families.py; from_file: its file loaded by ComfyUI's
    UNETLoader) -> sampler -> SaveLatent, with the family's seeded prompts and empty latent (noise_mask: the
    first frame kept, as image-to-video latents mark it; reference: both prompts carry a seeded reference latent
    through the stock ReferenceLatent node, as edit models (Flux Kontext, Flux.2) take one; grow: more latent
    rows and columns, for odd sizes; devices and degrees (e.g. {"ulysses": 2, "ring": 2}): the Settings node's)."""
    def prompt(seed: int) -> dict:
        return {"class_type": "TandemTestFamilyConditioning", "inputs": {"seed": seed, "family": family}}

    model = ({"class_type": "UNETLoader", "inputs": {"unet_name": FAMILY_FILES[family], "weight_dtype": "default"}}
             if from_file else {"class_type": "TandemTestTinyDiT", "inputs": {"seed": 5, "family": family}})
    inputs = {"model": ["1", 0], "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
              "scheduler": scheduler, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
              "denoise": 1.0}
    workflow = {
        "1": model, "2": prompt(1), "3": prompt(2),
        "4": {"class_type": "TandemTestFamilyLatent", "inputs": {"family": family, "batch_size": batch,
                                                                 "noise_mask": noise_mask, "grow": grow}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if reference:
        workflow["9"] = {"class_type": "TandemTestFamilyLatent", "inputs": {"family": family, "batch_size": 1,
                                                                            "noise_mask": True}}
        for prompt_node, node in (("2", "10"), ("3", "11")):
            workflow[node] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [prompt_node, 0],
                                                                          "latent": ["9", 0]}}
        inputs["positive"], inputs["negative"] = ["10", 0], ["11", 0]
    if strategy is not None:
        workflow["8"] = {"class_type": "TandemSettings",
                         "inputs": {"devices": devices, "strategy": strategy, "cfg_degree": 0, "batch_degree": 0,
                                    **(degrees or {})}}
        inputs["settings"] = ["8", 0]
    workflow["5"] = {"class_type": sampler, "inputs": inputs}
    return workflow


def with_model_patch(workflow: dict, class_type: str, **inputs) -> dict:
    """Puts a model-patching node (`class_type`, its inputs besides the model) between the model and sampler 5."""
    workflow["30"] = {"class_type": class_type, "inputs": {"model": ["1", 0], **inputs}}
    workflow["5"]["inputs"]["model"] = ["30", 0]
    return workflow


KINDS = {  # how a test graph is built, and its stock and Multi-GPU sampler classes
    "ksampler": (sampler_workflow, "KSampler", "TandemKSampler"),
    "checkpoint": (checkpoint_workflow, "KSampler", "TandemKSampler"),
    "advanced": (advanced_workflow, "KSamplerAdvanced", "TandemKSamplerAdvanced"),
    "custom": (custom_workflow, "SamplerCustomAdvanced", "SamplerCustomAdvanced"),
    "family": (family_workflow, "KSampler", "TandemKSampler"),
}


def run_checked(server, workflow: dict) -> dict:
    """Runs a workflow that must succeed; the failure's message and traceback tail otherwise."""
    result = server.run(workflow)
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    assert result["status"]["status_str"] == "success", (
        [(e.get("exception_type"), e.get("exception_message")[-1500:], e.get("traceback", [])[-3:]) for e in errors]
        or result["status"])
    return result


def run_pair(server, name: str, strategy: str, kind: str = "ksampler", runs: int = 1,
             **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock sampler and its Multi-GPU counterpart on the same inputs; checks the pool did the work
    (`runs` sampling runs, each of at least two calls)."""
    build, stock, tandem = KINDS[kind]
    run_checked(server, build(stock, f"{name}_stock", None, **kw))
    with server.on_the_pool(runs):
        run_checked(server, build(tandem, f"{name}_tandem", strategy, **kw))
    status = server.get("/tandem/status")
    last_pass_steps = kw.get("steps", 6) - (kw.get("split", 3) if kind == "advanced" else 0)
    workers = int(kw.get("devices", "cpu:2").split(":")[1])
    assert status["last_run"]["devices"] == ["cpu"] * workers and status["last_run"]["calls"] >= last_pass_steps
    assert len(status["peak_memory_bytes"]) == workers and all(b > 0 for b in status["peak_memory_bytes"])
    return server.latent(f"{name}_stock"), server.latent(f"{name}_tandem")


class Helpers:
    """Shared by the ComfyUI test modules (which cannot import each other): workflows and the oracle."""

    sampler_workflow = staticmethod(sampler_workflow)
    checkpoint_workflow = staticmethod(checkpoint_workflow)
    pack_import_error = staticmethod(pack_import_error)
    family_workflow = staticmethod(family_workflow)
    FAMILY_FILES = FAMILY_FILES
    run_pair = staticmethod(run_pair)
    run_checked = staticmethod(run_checked)
    with_model_patch = staticmethod(with_model_patch)
    start_server = staticmethod(start_server)
    stop_server = staticmethod(stop_server)
    assert_same_latents = staticmethod(assert_same_latents)
    RTOL_OF_SCALE = RTOL_OF_SCALE


@pytest.fixture(scope="session")
def comfy():
    return Helpers
