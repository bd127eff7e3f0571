"""The `tandem` command line: `tandem generate ...` (more subcommands arrive with the pool)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .sampling import SCHEDULERS, GenerationRequest, Timer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + traceback-like noise
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _check_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {path}: use an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    folder = out.parent.resolve()
    if not folder.is_dir():
        raise UsageError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"--out {path}: not writable")
    return out


def load_pipeline(model: str | None, device: str | None):
    """The embedded digits model (model None) or a local diffusers SD/SDXL folder."""
    if model is None:
        from .tiny.pipeline import TinyDigitsPipeline

        return TinyDigitsPipeline(device=device or "cpu")
    from .hosts.diffusers import DiffusersPipeline

    return DiffusersPipeline.load(model, device)


def grid(images: list):
    """Images side by side in one picture."""
    from PIL import Image

    canvas = Image.new(images[0].mode, (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def cmd_generate(args) -> int:
    out = _check_output(args.out)
    if args.model is not None:
        from .hosts.diffusers import pipeline_class_name

        pipeline_class_name(args.model)  # fail on a bad folder before anything heavy loads
    request_fields = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                          seed=args.seed, scheduler=args.scheduler, num_images=args.num_images)
    GenerationRequest(**request_fields, cfg=args.cfg if args.cfg is not None else 1.0)  # validate before loading
    with Timer() as load_timer:
        pipeline = load_pipeline(args.model, args.device)
    request = GenerationRequest(**request_fields, cfg=args.cfg if args.cfg is not None else pipeline.default_cfg)
    result = pipeline.generate(request, progress=not args.quiet)
    image = result.images[0] if len(result.images) == 1 else grid(result.images)
    try:
        image.save(out)
    except OSError as exc:
        raise OSError(f"could not write {out}: {exc}") from None
    per_call = 1000 * result.seconds / max(result.model_calls, 1)
    print(f"tandem: {len(result.images)} image(s), {request.steps} steps ({request.scheduler}, cfg {request.cfg:g}) "
          f"in {result.seconds:.2f} s on {pipeline.device} ({per_call:.1f} ms per model call, "
          f"{result.model_calls} calls; model loaded in {load_timer.seconds:.2f} s) -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tandem", description="Tandem: multi-device diffusion sampling.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = commands.add_parser("generate", help="text to image with the embedded digits model or a diffusers folder")
    gen.add_argument("--prompt", default="a handwritten 7")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's; 1 disables)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--scheduler", default="euler", help=f"one of: {', '.join(SCHEDULERS)}")
    gen.add_argument("--num-images", type=int, default=1, help="images of the prompt, saved side by side")
    gen.add_argument("--out", default="tandem.png", help="image file to write")
    gen.add_argument("--model", default=None,
                     help="a local diffusers Stable Diffusion / SDXL folder (default: the embedded digits model)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(run=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
