"""Settings are declared once. A knob is declared by its strategy: registering a strategy with a knob (here, in
the test only) makes the knob an option of the CLI, an input of the Settings node and the demo, and a checked
field of the config, with no other file changed. Every TANDEM_* variable is read in runtime/environment.py,
listed in the README with its default, and nothing writes one to pass a setting on."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from parallel_backend import strategies
from parallel_backend.commands.cli import UsageError, build_parser, main, parallel_config
from parallel_backend.engine.config import ParallelConfig, form_knobs
from parallel_backend.runtime.knobs import Knob
from parallel_backend.strategies.base import RowStrategy

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = Knob("echo_rounds", int, 1, "echo: how often each share is sent (a test knob)", low=1, high=4)


class Echo(RowStrategy):
    """A test strategy: batch's split, with one knob of its own."""

    name = "echo"
    summary = "batch's split with a knob of its own (a test strategy)."
    knobs = (ROUNDS,)


@pytest.fixture
def echo():
    strategies.register(Echo())
    yield
    strategies.unregister("echo")


def test_the_cli_offers_the_knob_and_passes_it_to_the_config(echo):
    args = build_parser().parse_args(["generate", "--devices", "cpu:2", "--strategy", "echo", "--echo-rounds", "3"])
    assert args.echo_rounds == 3 and parallel_config(args).echo_rounds == 3
    bench = build_parser().parse_args(["bench", "--strategies", "echo", "--echo-rounds", "2"])
    assert bench.echo_rounds == 2
    unset = build_parser().parse_args(["generate", "--devices", "cpu:2", "--strategy", "echo"])
    assert parallel_config(unset).echo_rounds == 1  # the declared default


def test_the_cli_refuses_an_out_of_range_value_in_one_line_before_any_work(echo, tmp_path, capsys):
    out = tmp_path / "never.png"
    assert main(["generate", "--devices", "cpu:2", "--strategy", "echo", "--echo-rounds", "9", "--steps", "2",
                 "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert error == "tandem: error: echo_rounds must be a whole number from 1 to 4; got 9" and not out.exists()


def test_validation_accepts_a_valid_value_and_refuses_others(echo):
    assert ParallelConfig("cpu:2", "echo", echo_rounds=4).echo_rounds == 4
    assert ParallelConfig("cpu:2", "echo") == ParallelConfig("cpu:2", "echo", echo_rounds=1)
    with pytest.raises(ValueError, match=r"^echo_rounds must be a whole number from 1 to 4; got 0$"):
        ParallelConfig("cpu:2", "echo", echo_rounds=0)
    with pytest.raises(TypeError, match=r"^echo_rounds must be a whole number; got 'two' \(str\)$"):
        ParallelConfig("cpu:2", "echo", echo_rounds="two")


def test_without_the_strategy_the_knob_is_unknown():
    with pytest.raises(TypeError, match="unknown setting 'echo_rounds'"):
        ParallelConfig("cpu:2", "batch", echo_rounds=2)
    with pytest.raises(UsageError, match="unrecognized arguments: --echo-rounds 2"):
        build_parser().parse_args(["generate", "--devices", "cpu:2", "--echo-rounds", "2"])
    assert ROUNDS not in form_knobs()


def test_the_settings_form_offers_the_knob_last(echo):
    knobs = form_knobs()
    assert knobs[-1] is ROUNDS  # saved workflows keep widget values in input order: new inputs go last
    widget = ROUNDS.widget()
    assert (widget.kind, widget.default, widget.low, widget.high) == ("int", 1, 1, 4)
    assert widget.tooltip == ROUNDS.help


def test_the_demo_offers_the_knob_in_both_tabs(echo):
    pytest.importorskip("gradio", reason="the demo needs gradio")
    from parallel_backend.demo.app import build_app
    from parallel_backend.demo.session import DemoSession

    demo = build_app(DemoSession())  # builds the controls; loads and starts nothing
    for endpoint in ("generate", "bench"):
        inputs = next(fn for fn in demo.fns.values() if fn.api_name == endpoint).inputs
        assert inputs[-1].label == "Echo rounds" and inputs[-1].value == 1


def _comfy_io():
    """ComfyUI's node API where this interpreter can import it (COMFYUI_PATH), else None."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None
    sys.path.insert(0, path)
    try:
        from comfy_api.latest import io
    except ImportError:
        return None
    finally:
        sys.path.remove(path)
    return io


def test_the_settings_node_schema_offers_the_knob(echo):
    if _comfy_io() is None:
        pytest.skip("ComfyUI's comfy_api is not importable here (set COMFYUI_PATH and use ComfyUI's venv)")
    spec = importlib.util.spec_from_file_location("tandem_settings_node", ROOT / "nodes" / "settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = {i.id: i for i in module.TandemSettings.define_schema().inputs}
    assert list(inputs)[-1] == "echo_rounds"
    assert (inputs["echo_rounds"].default, inputs["echo_rounds"].min, inputs["echo_rounds"].max) == (1, 1, 4)
    assert "echo" in inputs["strategy"].options


def test_the_readme_lists_every_environment_variable_with_its_default():
    from parallel_backend.runtime.environment import VARIABLES

    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(TANDEM_\w+)` \| ([^|]+) \|", readme, re.M))
    assert rows == {v.name: f"`{v.default}`" if v.default else "unset" for v in VARIABLES.values()}


def test_only_the_environment_module_reads_tandem_variables_and_nothing_writes_them():
    sources = [*(ROOT / "parallel_backend").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]
    reads, writes = [], []
    for path in sources:
        text = path.read_text()
        where = path.relative_to(ROOT).as_posix()
        reader = re.search(r"environ\.(get|pop)\(\s*[\"']TANDEM_", text)
        if reader and where != "parallel_backend/runtime/environment.py":
            reads.append(where)
        if re.search(r"environ\[[^\]]+\]\s*=(?!=)|environ\.(setdefault|update)\(|putenv\(", text.replace(
                'os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"', "")):
            writes.append(where)
    # The launcher's forked child takes the whole environment the pool gives a worker, as an exec would: it
    # passes no setting of its own.
    assert reads == [] and writes == ["parallel_backend/runtime/launcher.py"]


def test_the_pool_settings_travel_in_the_config_and_default_to_the_environment(monkeypatch):
    from parallel_backend.runtime.pool import WorkerPool

    config = ParallelConfig("cpu:2", "batch", max_models=3, hang_floor_s=5)
    options = config.pool_options()
    assert (options["max_models"], options["hang_floor_s"], options["secret_file"]) == (3, 5.0, None)
    assert WorkerPool(config.devices, **options).max_models == 3  # nothing starts until start()
    with pytest.raises(ValueError, match=r"^max_models must be a whole number >= 1; got 0$"):
        ParallelConfig("cpu:2", max_models=0)
    monkeypatch.setenv("TANDEM_MAX_MODELS", "4")
    assert WorkerPool("cpu:2").max_models == 4 and WorkerPool("cpu:2", max_models=1).max_models == 1
    monkeypatch.setenv("TANDEM_MAX_MODELS", "0")
    with pytest.raises(ValueError, match=r"^TANDEM_MAX_MODELS='0': max_models must be a whole number >= 1; got 0$"):
        WorkerPool("cpu:2")
