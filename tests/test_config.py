"""config.py and cli.py: strict configs, overrides, one-line errors with exit code 2."""

from __future__ import annotations

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
    from attnswap.bench import BenchConfig
    from attnswap.bench_kernel import KernelBenchConfig
    from attnswap.distill import DistillConfig
    from attnswap.pipeline import RunConfig

    if path.name.startswith("bench_kernel_"):
        return KernelBenchConfig
    if path.name.startswith("bench_"):
        return BenchConfig
    import yaml

    return RunConfig if "variants" in (yaml.safe_load(path.read_text()) or {}) else DistillConfig


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_real_variants(path):
    """A config that names a removed parameter (bench_kernel_64k.yaml kept `fold` specs after `fold` was gone) fails
    here, not on a GPU."""
    from attnswap.distill import DistillConfig
    from attnswap.pipeline import RunConfig
    from attnswap.variants import get_variant

    config = load_config(_config_class(path), path)
    specs = getattr(config, "variants", None) or [config.variant]
    for spec in specs:
        get_variant(spec)
    if isinstance(config, RunConfig) and config.distill.get("steps", 1) > 0:  # steps 0: evaluation only
        load_config(DistillConfig, None, {**config.distill, "variant": specs[0]})
