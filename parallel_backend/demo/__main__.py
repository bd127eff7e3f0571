"""`python -m parallel_backend.demo [--host H] [--port P] [--model FOLDER]`: the same as `tandem demo`."""

import argparse

from .app import serve

parser = argparse.ArgumentParser(prog="python -m parallel_backend.demo", description="Tandem's Gradio demo.")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=7860)
parser.add_argument("--model", default=None, help="a local diffusers SD/SDXL folder (default: the digits model)")
args = parser.parse_args()
serve(args.host, args.port, args.model)
