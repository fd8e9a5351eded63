"""config.py and cli.py: strict configs, overrides, one-line errors with exit code 2."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from attnswap.cli import main
from attnswap.config import load_config
from attnswap.errors import AttnswapError


@dataclass
class Example:
    lr: float = 1e-3
    steps: int = 10
    variants: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    layers: list[int] | None = None
    name: str = "x"


def test_overrides_are_typed_and_yaml_is_applied_first(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nsteps: 5\nname: from-file\n")
    config = load_config(Example, path, {"steps": "7", "variants": "window:w=64,sinks=4;full", "lengths": "512,1024"})
    assert config == Example(lr=3e-4, steps=7, variants=["window:w=64,sinks=4", "full"], lengths=[512, 1024],
                             name="from-file")


@pytest.mark.parametrize("overrides, message", [
    ({"stepz": "3"}, "unknown config key 'stepz'"),
    ({"steps": "many"}, "'steps' = 'many' has the wrong type"),
    ({"steps": "true"}, "wrong type"),
])
def test_bad_overrides_are_refused(overrides, message):
    with pytest.raises(AttnswapError, match=message):
        load_config(Example, None, overrides)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(AttnswapError, match="config file not found: .*nope.yaml"):
        load_config(Example, tmp_path / "nope.yaml")


@pytest.mark.parametrize("argv", [
    ["swap", "--variant", "slidng_window"],
    ["swap", "--variant", "window:w=0"],
    ["swap", "--variant", "window:w=4", "--layers", "0,99"],
    ["distill", "--data", "/nonexistent/file.txt", "--steps", "1"],
    ["frobnicate"],
])
def test_cli_user_errors_print_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_cli_lists_variants(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "window", "longformer", "mixture", "performer", "hedgehog", "nsa"):
        assert f"\n{name} " in f"\n{out}"


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _config_class(path):
    """The command a shipped config is for, by its name: bench-kernel, bench, distill or run."""
    from attnswap.measure.bench import BenchConfig
    from attnswap.measure.bench_kernel import KernelBenchConfig
    from attnswap.train.distill import DistillConfig
    from attnswap.pipeline import RunConfig

    if path.name.startswith("bench_kernel"):
        return KernelBenchConfig
    if path.name.startswith("bench_"):
        return BenchConfig
    import yaml

    return RunConfig if "variants" in (yaml.safe_load(path.read_text()) or {}) else DistillConfig


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_real_variants(path):
    """A config that names a removed parameter (bench_kernel_64k.yaml kept `fold` specs after `fold` was gone) fails
    here, not on a GPU."""
    from attnswap.train.distill import DistillConfig
    from attnswap.pipeline import RunConfig
    from attnswap.variants import get_variant

    from attnswap.config import load_runs

    for config in load_runs(_config_class(path), path):
        specs = getattr(config, "variants", None) or [config.variant]
        for spec in specs:
            get_variant(spec)
        if isinstance(config, RunConfig) and config.distill.get("steps", 1) > 0:  # steps 0: evaluation only
            load_config(DistillConfig, None, {**config.distill, "variant": specs[0]})


# ---- runs: one file per question, one entry per setting


@dataclass
class Staged:
    name: str = "q"
    variants: list[str] = field(default_factory=lambda: ["full"])
    distill: dict = field(default_factory=dict)
    steps: int = 1
    out: str = "runs/q"


def _runs_file(tmp_path, text):
    path = tmp_path / "question.yaml"
    path.write_text(text)
    return path


def test_runs_share_the_file_keys_and_each_writes_to_its_own_folder(tmp_path):
    from attnswap.config import load_runs

    path = _runs_file(tmp_path, "name: style\nout: runs/style\ndistill: {steps: 5, data_style: plain}\nruns:\n"
                                "  - {run: plain}\n  - {run: wikitext, distill: {data_style: wikitext}, steps: 3}\n")
    plain, wikitext = load_runs(Staged, path)
    assert (plain.name, plain.out, plain.distill, plain.steps) == ("style_plain", "runs/style/plain",
                                                                 {"steps": 5, "data_style": "plain"}, 1)
    assert (wikitext.name, wikitext.out, wikitext.steps) == ("style_wikitext", "runs/style/wikitext", 3)
    assert wikitext.distill == {"steps": 5, "data_style": "wikitext"}, "a run's mapping updates the shared one"


def test_command_line_overrides_apply_to_every_run_last_and_runs_picks_by_name(tmp_path):
    from attnswap.config import load_runs

    path = _runs_file(tmp_path, "runs:\n  - {run: a, steps: 3}\n  - {run: b}\n  - {run: c}\n")
    assert [(c.out, c.steps) for c in load_runs(Staged, path, {"steps": "7", "out": "/tmp/x"})] == [
        ("/tmp/x/a", 7), ("/tmp/x/b", 7), ("/tmp/x/c", 7)]
    assert [c.out for c in load_runs(Staged, path, {"runs": "c,a"})] == ["runs/q/a", "runs/q/c"]


def test_a_file_without_runs_loads_as_one_config(tmp_path):
    from attnswap.config import load_runs

    path = _runs_file(tmp_path, "steps: 4\n")
    assert load_runs(Staged, path) == [load_config(Staged, path)]
    assert load_runs(Staged, None, {"steps": "2"}) == [Staged(steps=2)]


@pytest.mark.parametrize("text, overrides, message", [
    ("runs: {run: a}\n", {}, "config key 'runs' = {'run': 'a'} has the wrong type; expected list"),
    ("runs: [{steps: 2}]\n", {}, "runs[0] must be a mapping with run: NAME"),
    ("runs: [{run: a/b}]\n", {}, "a run's name is a plain folder name"),
    ("runs: [{run: a}, {run: a}]\n", {}, "run names repeat"),
    ("runs: [{run: a, out: elsewhere}]\n", {}, "run 'a' sets out"),
    ("runs: [{run: a, stepz: 2}]\n", {}, "unknown config key 'stepz'"),
    ("runs: [{run: a, steps: many}]\n", {}, "config key 'steps' = 'many' has the wrong type"),
    ("runs: [{run: a}]\n", {"runs": "b"}, "no run named 'b'"),
    ("steps: 2\n", {"runs": "a"}, "has no runs: list"),
], ids=["not-a-list", "no-name", "path-name", "repeated", "sets-out", "unknown-key", "wrong-type", "unknown-pick",
        "pick-without-runs"])
def test_bad_runs_are_refused_in_one_line(tmp_path, text, overrides, message):
    from attnswap.config import load_runs

    with pytest.raises(AttnswapError, match=re.escape(message)):
        load_runs(Staged, _runs_file(tmp_path, text), overrides)


def test_cli_runs_each_entry_of_a_runs_file_in_turn(tmp_path, monkeypatch):
    import attnswap.pipeline

    seen = []
    monkeypatch.setattr(attnswap.pipeline, "run", seen.append)
    path = _runs_file(tmp_path, f"out: {tmp_path / 'q'}\nvariants: [full]\nruns:\n  - {{run: a}}\n"
                                "  - {run: b, variants: ['window:w=4']}\n")
    assert main(["run", str(path), "--seed", "3"]) == 0
    assert [(c.out, c.variants, c.seed) for c in seen] == [(str(tmp_path / "q" / "a"), ["full"], 3),
                                                           (str(tmp_path / "q" / "b"), ["window:w=4"], 3)]
    assert main(["run", str(path), "--runs", "zzz"]) == 2
