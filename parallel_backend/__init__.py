"""Tandem's engine: multi-device diffusion sampling, independent of any host (ComfyUI, diffusers, CLI).

Importing this package is cheap: torch and diffusers load only when a submodule needs them.
"""

from .runtime.version import __version__


def __getattr__(name):
    # Lazy re-exports: `from parallel_backend import ParallelConfig, parallelize` without importing torch eagerly.
    if name == "ParallelConfig":
        from .engine.config import ParallelConfig

        return ParallelConfig
    if name in ("parallelize", "unparallelize"):
        from .hosts import diffusers

        return getattr(diffusers, name)
    if name == "WorkerPool":
        from .runtime.pool import WorkerPool

        return WorkerPool
    raise AttributeError(f"module 'parallel_backend' has no attribute {name!r}")
