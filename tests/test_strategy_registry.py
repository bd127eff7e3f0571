"""A strategy is one registered object: registering one in a single line makes it a choice of the config,
the CLI, the bench, the demo and the Settings node, with no other module touched; and no module outside
strategies/ picks a strategy by comparing its name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from parallel_backend import strategies
from parallel_backend.commands.cli import main
from parallel_backend.engine.config import ParallelConfig, strategy_choices
from parallel_backend.strategies.base import BenchJob, RowStrategy

pytestmark = pytest.mark.pool

ROOT = Path(__file__).resolve().parents[1]


class Mirror(RowStrategy):
    """A test strategy: the rows split as batch does, but handed out in reverse device order."""

    name = "mirror"
    summary = "batch shares in reverse device order (a test strategy)."
    bench_job = BenchJob(2, False)

    def plan(self, engine, call, mesh, config, fingerprint):
        work = super().plan(engine, call, mesh, config, fingerprint)
        return {mesh.size - 1 - rank: message for rank, message in work.items()}

    def gather(self, call, mesh, replies):
        return super().gather(call, mesh, {mesh.size - 1 - rank: value for rank, value in replies.items()})


@pytest.fixture
def mirror():
    strategies.register(Mirror())  # the one line a new strategy needs (here undone after the test)
    yield
    strategies.unregister("mirror")


def test_a_registered_strategy_is_a_choice_everywhere(mirror):
    assert "mirror" in strategy_choices() and ParallelConfig("cpu:2", "mirror").strategy == "mirror"
    from parallel_backend.demo.bench_view import bench_strategies

    assert "mirror" in bench_strategies()
    # The Settings node (which needs ComfyUI to load) offers exactly strategy_choices()
    settings = (ROOT / "nodes" / "settings.py").read_text()
    assert 'io.Combo.Input("strategy", options=list(strategy_choices())' in settings


@pytest.mark.slow
def test_a_registered_strategy_runs_through_the_cli_and_equals_one_device(mirror, tmp_path, capsys):
    from parallel_backend.models.sampling import GenerationRequest
    from parallel_backend.hosts.tiny import TinyDigitsPipeline

    out = tmp_path / "two.png"
    args = ["generate", "--prompt", "a handwritten 2", "--num-images", "2", "--cfg", "1", "--steps", "4",
            "--quiet", "--devices", "cpu:2", "--strategy", "mirror", "--out", str(out)]
    assert main(args) == 0 and out.exists()
    assert "mirror on 2 devices" in capsys.readouterr().out
    pipeline = TinyDigitsPipeline()
    request = GenerationRequest("a handwritten 2", steps=4, cfg=1.0, num_images=2)
    reference = pipeline.generate(request, progress=False)
    with pipeline.parallel(ParallelConfig("cpu:2", "mirror")) as parallel:
        result = parallel.generate(request, progress=False)
        assert parallel.executor.pool.stats.calls == 4  # the pool ran every call
    torch.testing.assert_close(result.latents, reference.latents, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_registered_strategy_runs_in_the_bench(mirror, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--devices", "cpu:2", "--strategies", "mirror", "--steps", "3",
                 "--repeats", "0", "--no-plan", "--quiet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["strategy"] for r in rows] == ["serial", "mirror"]
    assert rows[1]["job"] == {"images": 2, "cfg": 1.0} and rows[1]["max_abs_diff_vs_serial"] <= 1e-4


def test_no_module_outside_strategies_compares_strategy_names():
    names = "|".join(re.escape(n) for n in strategies.names())
    compared = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)|in\s*\(["']({names})["']""")
    offenders = []
    for path in [*ROOT.joinpath("parallel_backend").rglob("*.py"), *ROOT.joinpath("nodes").rglob("*.py")]:
        if "strategies" in path.relative_to(ROOT).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if compared.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_registry_refuses_a_second_strategy_of_the_same_name():
    with pytest.raises(ValueError, match="registered already"):
        strategies.register(type("OtherCfg", (RowStrategy,), {"name": "cfg"})())
    with pytest.raises(ValueError, match="unknown strategy 'warp'; choose one of: auto, cfg, batch, asyncdiff"):
        strategies.get("warp")
