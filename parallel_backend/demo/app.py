"""`tandem demo`: a local Gradio app that shows one device vs Tandem on the same seed, the bench, and the pool.

Served on 127.0.0.1 only, with no share link, no telemetry and nothing fetched at run time.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import inspect  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402

import gradio as gr  # noqa: E402

from .. import strategies as registry  # noqa: E402
from ..engine.config import strategy_choices  # noqa: E402
from ..models.sampling import SCHEDULERS  # noqa: E402
from .bench_view import BENCH_MODELS, bench_figure, bench_strategies, load_report, report_table  # noqa: E402
from .session import DemoSession, default_devices, generate_pair, pool_status  # noqa: E402

__all__ = ["build_app", "serve", "launch", "generate_handler", "generate_pair", "bench_figure", "pool_status",
           "readable", "DemoSession"]

IMAGE_BUTTONS = ["download", "fullscreen"]  # no share-to-hub button
COMPUTE = "compute"  # Generate and Benchmark share one queue: one job at a time on the machine


def readable(exc: BaseException) -> str:
    """The error's own message, without any traceback text."""
    message = str(exc).split("Traceback (most recent call last)")[0].strip() or type(exc).__name__
    return message if len(message) < 2000 else message[:2000] + " ..."


def _as_gr_error(exc: BaseException) -> gr.Error:
    return gr.Error(readable(exc), print_exception=False)


GENERATE_INPUTS = ("prompt", "negative_prompt", "steps", "cfg", "seed", "scheduler", "devices", "strategy")
BENCH_INPUTS = ("model", "steps", "repeats", "strategies", "devices", "resolution")


def bench_knobs() -> tuple:
    """The knobs the Benchmark tab shows: every strategy knob but the axes' degrees (each strategy picks those)."""
    return tuple(knob for knob in registry.knobs() if not knob.axis)


def _approximate() -> list[str]:
    """The registered strategies that differ from one device after their warm-up steps."""
    return [name for name in registry.names() if not registry.get(name).exact]


def knob_control(knob):
    """The gradio control of a declared knob (runtime/knobs.py)."""
    w = knob.widget()
    label = (w.label or knob.name.replace("_", " ").capitalize()) + (" (0 = auto)" if knob.unset else "")
    if w.kind == "choice":
        return gr.Radio(list(knob.choices), value=knob.default, label=label, info=w.tooltip)
    if w.kind == "bool":
        return gr.Checkbox(w.default, label=label, info=w.tooltip)
    if w.kind == "str":
        return gr.Textbox(w.default or "", label=label, info=w.tooltip)
    return gr.Number(w.default, label=label, info=w.tooltip, minimum=w.low, maximum=w.high,
                     precision=0 if w.kind == "int" else None)


def _taking_inputs(names: tuple[str, ...], knobs: tuple, run):
    """`run(values, settings, progress)` as a click function of one parameter per input, the fixed `names` then
    a value per knob of `knobs`, then progress (gradio hands a gr.Progress to that parameter by
    position). Callers may pass fewer knob values: the rest are their defaults."""
    def handler(*values, progress=None):
        count = len(names) + len(knobs)
        if progress is None and len(values) > count:
            values, progress = values[:count], values[count]
        fixed, given = values[:len(names)], values[len(names):]
        settings = {knob.name: knob.from_widget(value) for knob, value in zip(knobs, given)}
        return run(fixed, settings, progress or (lambda *a, **k: None))

    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for name in (*names, *(knob.name for knob in knobs))]
    handler.__signature__ = inspect.Signature(
        [*parameters, inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress())])
    return handler


def generate_handler(session: DemoSession):
    """The Generate button's function: images, difference and summary; bad input raises gr.Error (no traceback).
    Its inputs: GENERATE_INPUTS, then a value per strategy knob (`strategies.knobs()`)."""
    def generate(fixed, knobs, progress):
        try:
            result = generate_pair(session, *fixed, **knobs,
                                   progress=lambda fraction, message: progress(fraction, desc=message))
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            raise _as_gr_error(exc) from None
        return result.single.images[0], result.tandem.images[0], result.difference, result.summary()

    return _taking_inputs(GENERATE_INPUTS, registry.knobs(), generate)


def _bench(fixed, knobs, progress):
    from ..commands.bench import run_bench

    model, steps, repeats, strategies, devices, resolution = fixed
    if not strategies:
        raise gr.Error("choose at least one strategy")
    progress(0.0, desc=f"bench {model} on {devices}")
    try:
        report = run_bench(model, devices, tuple(strategies), steps, resolution.strip() or None, repeats,
                           progress=lambda line: progress(0.5, desc=line), knobs=knobs)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        raise _as_gr_error(exc) from None
    with tempfile.NamedTemporaryFile("w", prefix=f"tandem-bench-{model}-", suffix=".json", delete=False) as f:
        json.dump(report, f, indent=2, default=float)
    return bench_figure(report), report_table(report), f.name


def _load_bench(path):
    if not path:
        raise gr.Error("upload a bench JSON file (`tandem bench --json FILE`)")
    try:
        report = load_report(path)
    except ValueError as exc:
        raise _as_gr_error(exc) from None
    return bench_figure(report), report_table(report)


def _generate_tab(session: DemoSession, devices_default: str) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            default_prompt = "a handwritten 7" if session.model is None else "a photo of a lighthouse at dusk"
            prompt = gr.Textbox(default_prompt, label="Prompt")
            negative = gr.Textbox("", label="Negative prompt")
            with gr.Row():
                steps = gr.Slider(1, 100, 20, step=1, label="Steps")
                cfg = gr.Number(4.0 if session.model is None else 7.5, label="CFG (1 = no guidance)", minimum=0)
                seed = gr.Number(0, label="Seed", precision=0, minimum=0)
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULERS), value="euler", label="Scheduler")
                devices = gr.Textbox(devices_default, label="Devices", info="'cpu:2', 'cuda:0,cuda:1' or 'auto'")
                strategy = gr.Dropdown(list(strategy_choices()), value="auto", label="Strategy",
                                       info=f"approximate after warm-up: {', '.join(_approximate())} (the "
                                            "summary gives the PSNR against one device); the others are exact")
            with gr.Accordion("Strategy settings", open=False):
                with gr.Row():
                    knobs = [knob_control(knob) for knob in registry.knobs()]
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=2):
            with gr.Row():
                single = gr.Image(label="One device", type="pil", elem_id="single-image", format="png",
                                  buttons=IMAGE_BUTTONS)
                tandem = gr.Image(label="Tandem", type="pil", elem_id="tandem-image", format="png",
                                  buttons=IMAGE_BUTTONS)
                difference = gr.Image(label="|difference| x 10", type="pil", elem_id="difference-image", format="png",
                                  buttons=IMAGE_BUTTONS)
            summary = gr.Markdown(elem_id="generate-summary")
    button.click(generate_handler(session), [prompt, negative, steps, cfg, seed, scheduler, devices, strategy, *knobs],
                 [single, tandem, difference, summary], api_name="generate", concurrency_id=COMPUTE,
                 concurrency_limit=1)


def _bench_tab(devices_default: str) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown(list(BENCH_MODELS), value="tiny", label="Model",
                                info="random-weight UNets shaped like SD1.5 / SDXL (nothing downloaded)")
            with gr.Row():
                steps = gr.Number(8, label="Steps", precision=0, minimum=1)
                repeats = gr.Number(1, label="Repeats", precision=0, minimum=1, info="timed runs after one warm-up")
            strategies = gr.CheckboxGroup(list(bench_strategies()), value=["cfg", "batch"], label="Strategies")
            devices = gr.Textbox(devices_default, label="Devices")
            resolution = gr.Textbox("", label="Resolution", placeholder="the model's default; or 256, 1024x768")
            with gr.Accordion("Strategy settings", open=False):
                knobs = [knob_control(knob) for knob in bench_knobs()]
            run = gr.Button("Run benchmark", variant="primary")
            upload = gr.File(label="Or load a saved bench JSON", file_types=[".json"], type="filepath")
        with gr.Column(scale=2):
            plot = gr.BarPlot(x="strategy", y="speedup", tooltip=["strategy", "speedup", "ideal", "devices", "psnr"],
                              title="Speed-up per model call vs one device", y_title="speed-up (x)",
                              sort=list(bench_strategies()), y_lim=[0, None], label="Speed-up")
            table = gr.Code(label="Table", language=None, interactive=False)
            saved = gr.File(label="This run's report (JSON)", interactive=False)
    run.click(_taking_inputs(BENCH_INPUTS, bench_knobs(), _bench),
              [model, steps, repeats, strategies, devices, resolution, *knobs],
              [plot, table, saved], api_name="bench", concurrency_id=COMPUTE, concurrency_limit=1)
    upload.upload(_load_bench, [upload], [plot, table], api_name="load_bench")


def _pool_tab(session: DemoSession, devices_default: str, demo: gr.Blocks) -> None:
    devices = gr.Textbox(devices_default, label="Devices (for Restart)")
    status = gr.Markdown(pool_status(session), elem_id="pool-status")
    with gr.Row():
        refresh = gr.Button("Refresh")
        restart = gr.Button("Restart pool", variant="stop")

    def on_restart(text, progress=gr.Progress()):
        progress(0.0, desc=f"restarting on {text}")
        try:
            session.restart(text)
        except (ValueError, RuntimeError, OSError) as exc:
            raise _as_gr_error(exc) from None
        return pool_status(session)

    refresh.click(lambda: pool_status(session), None, status, api_name="pool_status")
    restart.click(on_restart, devices, status, api_name="restart_pool", concurrency_id=COMPUTE, concurrency_limit=1)
    demo.load(lambda: pool_status(session), None, status)


def build_app(session: DemoSession | None = None, model: str | None = None) -> gr.Blocks:
    """The app: Generate, Benchmark and Pool tabs around `session` (default: a new one for `model`)."""
    session = session or DemoSession(model)
    devices_default = default_devices()
    with gr.Blocks(title="Tandem demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# Tandem\nOne image, several devices: the same seed on one device and with a Tandem "
                    f"strategy, side by side. Model: **{session.model_name}**.")
        with gr.Tab("Generate"):
            _generate_tab(session, devices_default)
        with gr.Tab("Benchmark"):
            _bench_tab(devices_default)
        with gr.Tab("Pool"):
            _pool_tab(session, devices_default, demo)
    demo.tandem_session = session
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Starts serving `demo` locally (no share link); with block=False returns at once (tests)."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False,
                       prevent_thread_lock=not block, quiet=not block, show_error=True, mcp_server=False)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(host: str = "127.0.0.1", port: int = 7860, model: str | None = None) -> None:
    """`tandem demo`: loads the model, serves the app until interrupted, then stops the workers."""
    if model is not None:
        from ..hosts.model_folder import pipeline_class_name

        pipeline_class_name(model)  # a bad folder fails here, before the server starts
    session = DemoSession(model)
    print(f"tandem: loading {session.model_name} ...", flush=True)
    session.pipeline
    demo = build_app(session)
    if threading.current_thread() is threading.main_thread():  # `kill` stops it as Ctrl-C does, workers too
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        launch(demo, host, port, block=True)
    finally:
        demo.close()
        session.shutdown()
