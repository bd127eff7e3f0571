"""The Multi-GPU settings node: devices and strategy, fed to the Multi-GPU samplers and the model node."""

from __future__ import annotations

from comfy_api.latest import io

from parallel_backend.engine.config import ParallelConfig, strategy_choices

Settings = io.Custom("TANDEM_SETTINGS")


def settings_input():
    """The optional settings socket of the samplers and the model node."""
    return Settings.Input("settings", optional=True,
                          tooltip="A Multi-GPU Settings node: which devices, and how they split each step; "
                                  "unconnected: strategy auto on the pack's devices (TANDEM_DEVICES; default: "
                                  "every GPU)")


def default_config() -> ParallelConfig:
    from .runtime import RUNTIME

    return ParallelConfig(RUNTIME.devices, "auto")


class TandemSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TandemSettings",
            display_name="Multi-GPU Settings (Tandem)",
            category="sampling/multi-gpu",
            description="Which devices share each sampling step, and how.",
            inputs=[
                io.String.Input("devices", default="auto",
                                tooltip="'auto', 'cuda:0,cuda:1', or 'cpu:2' for two CPU workers"),
                io.Combo.Input("strategy", options=list(strategy_choices()), default="auto",
                               tooltip="auto: for each model and call shape, the first two calls run on one device "
                                       "and the second is timed; the calls after them run on the split that "
                                       "Tandem's cost model predicts fastest from that time and the devices' "
                                       "measured link (any exact mix of cfg, batch, ulysses, ring and usp: e.g. a "
                                       "sequence split for a guided DiT), or stay on one device when no split is "
                                       "predicted to reach 1.05x; the log says what it chose and why. cfg: cond "
                                       "and uncond on different devices; batch: images split over devices "
                                       "(all exact); asyncdiff: the UNet cut into stages run on one-step-stale "
                                       "inputs (approximate after warm-up, faster, works at cfg 1); ulysses, "
                                       "ring, usp: each device takes a share of a DiT's tokens, exact, for one "
                                       "image at cfg 1 too (ulysses: attention by heads after an all-to-all, "
                                       "the heads must divide by its degree; ring: keys and values passed "
                                       "around the devices, any head count; usp: both, ulysses inside "
                                       "subgroups, ring between them)"),
                io.Int.Input("cfg_degree", default=0, min=0, max=2, tooltip="0 = from the strategy"),
                io.Int.Input("batch_degree", default=0, min=0, max=64, tooltip="0 = from the strategy"),
                io.Int.Input("stages", default=0, min=0, max=64, optional=True,
                             tooltip="asyncdiff: UNet stages, one per device (0 = the devices left after cfg and "
                                     "batch degrees)"),
                io.Int.Input("warmup", default=1, min=0, max=10000, optional=True,
                             tooltip="asyncdiff: exact sampler steps at the start (all stages in sequence)"),
                io.Combo.Input("stride", options=["1", "2"], default="1", optional=True,
                               tooltip="asyncdiff: 2 exchanges activations every second call only (less traffic, "
                                       "staler inputs)"),
                io.Boolean.Input("time_shift", default=False, optional=True,
                                 tooltip="asyncdiff: each stage embeds the timestep its input came from"),
                # new inputs go last: saved workflows keep their widget values in input order
                io.Int.Input("ulysses", default=0, min=0, max=64, optional=True,
                             tooltip="ulysses and usp: devices that split a DiT's attention heads after an "
                                     "all-to-all; it must divide the model's heads (0 = ulysses: the devices "
                                     "left after cfg and batch; usp: the largest number that divides the model's "
                                     "heads and fits the devices left over ring, or with ring 0 too the largest "
                                     "that divides both the devices left and the heads)"),
                io.Int.Input("ring", default=0, min=0, max=64, optional=True,
                             tooltip="ring: devices passing keys and values around a ring; usp: ulysses "
                                     "subgroups around the ring (0 = ring: the devices left after cfg and batch; "
                                     "usp: the devices left after cfg and batch over ulysses, rounded down). usp "
                                     "keeps a degree you set and refuses, before any work, degrees that do not "
                                     "fit the devices or the model's heads"),
            ],
            outputs=[Settings.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, devices, strategy, cfg_degree, batch_degree, stages=0, warmup=1, stride="1",
                time_shift=False, ulysses=0, ring=0) -> io.NodeOutput:
        from .runtime import RUNTIME

        RUNTIME.check_devices(devices)  # before the degrees: "cuda:7 does not exist" says more than "got 1"
        return io.NodeOutput(ParallelConfig(devices, strategy, cfg_degree or None, batch_degree or None,
                                            stages=stages or None, ulysses=ulysses or None, ring=ring or None,
                                            warmup=warmup, stride=int(stride),
                                            time_shift=time_shift))
