"""The Multi-GPU settings node: devices and strategy, fed to the Multi-GPU samplers and the model node."""

from __future__ import annotations

from comfy_api.latest import io

from parallel_backend.engine.config import DEVICES, MESH_KNOBS, ParallelConfig, form_knobs, strategy_choices

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


AUTO_TOOLTIP = ("auto: for each model and call shape, the first two calls run on one device and the second is "
                "timed; the calls after them run on the split that Tandem's cost model predicts fastest from that "
                "time and the devices' measured link (any exact mix of the strategies below), or stay on one device "
                "when no split is predicted to reach 1.05x; the log says what it chose and why.")


def _strategy_tooltip() -> str:
    from parallel_backend import strategies

    return " ".join([AUTO_TOOLTIP, *(f"{name}: {strategies.get(name).summary}" for name in strategies.names())])


def knob_input(knob, optional: bool):
    """The node input of a declared knob (runtime/knobs.py)."""
    w = knob.widget()
    if w.kind == "choice":
        return io.Combo.Input(w.name, options=list(w.options), default=w.default, optional=optional, tooltip=w.tooltip)
    if w.kind == "bool":
        return io.Boolean.Input(w.name, default=w.default, optional=optional, tooltip=w.tooltip)
    if w.kind == "str":
        return io.String.Input(w.name, default=w.default or "", optional=optional, tooltip=w.tooltip)
    number = io.Int if w.kind == "int" else io.Float
    return number.Input(w.name, display_name=w.label or None, default=w.default, min=w.low, max=w.high,
                        optional=optional, tooltip=w.tooltip)


class TandemSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        """Devices and strategy, then the outer degrees, then every registered strategy's knobs (`form_knobs()`),
        in registration order: a new strategy's inputs come last, as saved workflows keep widget values in input
        order."""
        return io.Schema(
            node_id="TandemSettings",
            display_name="Multi-GPU Settings (Tandem)",
            category="sampling/multi-gpu",
            description="Which devices share each sampling step, and how.",
            inputs=[
                io.String.Input("devices", default=DEVICES.default, tooltip=DEVICES.help),
                io.Combo.Input("strategy", options=list(strategy_choices()), default="auto",
                               tooltip=_strategy_tooltip()),
                *(knob_input(knob, optional=knob not in MESH_KNOBS) for knob in form_knobs()),
            ],
            outputs=[Settings.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, devices, strategy, **knobs) -> io.NodeOutput:
        from .runtime import RUNTIME

        RUNTIME.check_devices(devices)  # before the degrees: "cuda:7 does not exist" says more than "got 1"
        declared = {knob.name: knob for knob in form_knobs()}
        values = {name: declared[name].from_widget(value) for name, value in knobs.items() if name in declared}
        return io.NodeOutput(ParallelConfig(devices, strategy, **values))
