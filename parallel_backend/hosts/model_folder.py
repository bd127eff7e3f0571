"""A local diffusers pipeline folder, checked before anything heavy loads: its model_index.json, each component's
folder and JSON files, and each safetensors file's header, read as bytes (no torch, no weights), so a surface
(`tandem generate --model`, the demo) refuses a wrong folder at once. hosts/diffusers.py loads what passes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..runtime import validation

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on a header


def pipeline_class_name(folder: str | Path) -> str:
    """Checks that `folder` is a supported, readable diffusers pipeline folder (its model_index.json, each
    component's folder, JSON files and safetensors headers) and returns its pipeline class name."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model not found: {folder}")
    if folder.is_file():
        raise ValueError(f"{folder} is a single file; give a diffusers pipeline folder (one with model_index.json)")
    _check_readable_folder(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    index = validation.read_json_object(index_file)
    name = index.get("_class_name", "")
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"{folder} holds a {name or 'unnamed'} pipeline; supported: {', '.join(SUPPORTED_PIPELINES)}")
    for component in _components(index):
        _check_component(folder, component)
    return name


def _components(index: dict) -> list[str]:
    """The components model_index.json names with a library and class (["diffusers", "UNet2DConditionModel"])."""
    return [name for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and all(spec)]


def _check_readable_folder(folder: Path) -> None:
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ValueError(f"model folder {folder} is not readable (check its permissions)")


def _check_component(folder: Path, component: str) -> None:
    """The component's folder exists and its JSON files and safetensors headers read (no weights loaded)."""
    part = folder / component
    if not part.is_dir():
        raise ValueError(f"{folder}: model_index.json names {component!r}, but there is no folder {part}")
    _check_readable_folder(part)
    for config in sorted(part.glob("*.json")):
        validation.read_json_object(config)
    for weights in sorted(part.glob("*.safetensors")):
        _check_safetensors(weights)


def _check_safetensors(path: Path) -> None:
    """A safetensors file's layout: an 8-byte header length, a JSON header whose tensors' data offsets end where
    the file ends. A file cut short, or bytes that are no safetensors file, are refused naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"its header length {length} does not fit its {size} bytes")
            header = json.loads(f.read(length).decode("utf-8"))
    except OSError as exc:
        raise ValueError(f"model file {path} could not be read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"model file {path} is not a readable safetensors file ({exc})") from None
    ends = [entry.get("data_offsets", [0, 0])[-1] for key, entry in (header.items() if isinstance(header, dict) else ())
            if key != "__metadata__" and isinstance(entry, dict)]
    data = size - 8 - length
    if not isinstance(header, dict) or max(ends, default=0) != data:
        raise ValueError(f"model file {path} is not a readable safetensors file (its tensors end at byte "
                         f"{max(ends, default=0)} of its {data} bytes of data: cut short or not safetensors)")


def weight_files(model, component: str | None = None) -> tuple[Path, ...]:
    """The safetensors files a diffusers model loaded with from_pretrained from a local folder came from: the
    folder its config names (`_name_or_path`: the model's own folder, or the pipeline's, whose `component` subfolder
    then holds it), where its config.json names the model's class; every `*.safetensors` there (a sharded model's
    shards, a variant's files beside the plain ones: the workers check each weight against the host's copy,
    runtime/sources.py). () where the model names no such folder (built in memory, or from a hub id)."""
    named = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not named:
        return ()
    base = Path(named)
    for folder in (base, base / component) if component else (base,):
        config = folder / "config.json"
        if not config.is_file():
            continue
        try:
            class_name = validation.read_json_object(config).get("_class_name")
        except ValueError:
            continue
        if class_name == type(model).__name__:
            return tuple(sorted(folder.glob("*.safetensors")))
    return ()
