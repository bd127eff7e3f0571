"""Tandem's engine: multi-device diffusion sampling, independent of any host (ComfyUI, diffusers, CLI).

Importing this package is cheap: torch and diffusers load only when a submodule needs them.
"""

__version__ = "0.1.0"
