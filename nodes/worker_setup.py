"""Run inside each Tandem worker of a ComfyUI host (loaded by file path), before any model arrives.

Gives the worker's ComfyUI the host's command-line settings (--cpu, precision, attention), so that ComfyUI's
model classes behave in the worker as they do in the host.
"""


def configure(host_args: dict) -> None:
    from comfy.cli_args import args

    for name, value in host_args.items():
        setattr(args, name, value)
    import comfy.model_management  # noqa: F401  (reads the settings above once, at import)
