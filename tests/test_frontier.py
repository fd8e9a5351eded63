"""The quality-versus-cost frontier: frontier.json points in report.py, their plot, and scripts/results_doc.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from attnswap import plots
from attnswap.errors import AttnswapError
from attnswap.plots import frontier_plot
from attnswap.report.build import FRONTIER_KEYS, ReportConfig, read_frontier, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_doc.py"


def _point(label: str, cost: float, ppl: float, group: str | None = None) -> dict:
    point = {"label": label, "teacher": "models/teacher-gpt2-19m", "ppl": ppl, "teacher_ppl": 84.5, "kl": 0.1,
             "top1": 0.8, "attn_cost": cost, "tokens": 1_000_000, "gpu_seconds": 120.0,
             "command": f"attnswap eval --swapped runs/{label}/model"}
    return point if group is None else {**point, "group": group}


@pytest.fixture
def results(tmp_path) -> Path:
    """Synthetic results: one single-point file and one file of a routing group's budgets."""
    root = tmp_path / "results"
    (root / "window256").mkdir(parents=True)
    (root / "window256" / "frontier.json").write_text(json.dumps(_point("window256_sinks4", 0.44, 101.6)))
    (root / "routing").mkdir()
    budgets = [_point(f"routing_b{b}", b, ppl, group="routing window256") for b, ppl in ((0.5, 90.1), (0.75, 86.0))]
    (root / "routing" / "frontier.json").write_text(json.dumps({"points": budgets}))
    return root


def test_read_frontier_adds_the_ratio_and_sorts_by_cost(results):
    points = read_frontier(sorted(results.rglob("frontier.json")))
    assert [p["label"] for p in points] == ["window256_sinks4", "routing_b0.5", "routing_b0.75"]
    assert points[0]["ratio"] == pytest.approx(101.6 / 84.5)
    assert points[1]["source"].endswith("routing/frontier.json")


def test_a_point_missing_a_key_is_one_line_error_naming_it(tmp_path):
    broken = {k: v for k, v in _point("x", 0.5, 90.0).items() if k not in ("kl", "command")}
    (tmp_path / "frontier.json").write_text(json.dumps(broken))
    with pytest.raises(AttnswapError, match=r"lacks kl, command; each point needs: label") as caught:
        read_frontier([tmp_path / "frontier.json"])
    assert "\n" not in str(caught.value) and all(k in str(caught.value) for k in FRONTIER_KEYS)


def test_frontier_plot_is_a_png(results, tmp_path):
    path = frontier_plot(read_frontier(results.rglob("frontier.json")), tmp_path / "f.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_report_shows_the_frontier_as_plot_and_table(results, tmp_path):
    html_path = report(ReportConfig(run_dirs=[str(results)], out=str(tmp_path / "report")))
    page = html_path.read_text()
    section = page.split('<section id="quality-against-cost">')[1].split("</section>")[0]
    assert "data:image/png;base64," in section
    assert all(label in section for label in ("window256_sinks4", "routing_b0.5", "routing_b0.75"))
    assert "1.202" in section, "ratio 101.6 / 84.5 in the table"
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "![perplexity ratio against attention cost" in markdown and "| routing_b0.75 |" in markdown
    assert (tmp_path / "report" / "figures" / "frontier.png").read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def results_doc(monkeypatch):
    spec = importlib.util.spec_from_file_location("results_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # write_results points results_table at the folder it reads: restore it for the other tests
    monkeypatch.setattr(sys.modules["results_table"], "RESULTS", sys.modules["results_table"].RESULTS)
    return module


def test_results_doc_writes_the_frontier_and_says_which_tables_are_not_committed(results, results_doc, tmp_path):
    out = results_doc.write_results(results, tmp_path / "docs" / "results.md")
    text = out.read_text()
    assert "| window256_sinks4 | – | 0.44 | 101.6 | 84.5 | 1.202 |" in text
    assert text.index("routing_b0.5") < text.index("routing_b0.75")
    assert "![perplexity ratio against attention cost](frontier.png)" in text
    assert (tmp_path / "docs" / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    assert "_Not committed: results/anchor_h100_bf16/eval.json._" in text
    assert text.count("_Not committed:") == 6, "every README table names the file it misses"
    assert "_No plan.json under the results yet._" in text


def test_results_doc_tables_each_layer_plan_with_the_plan_of_every_size(results, results_doc, tmp_path):
    plan = {"variant": "window:w=4", "model": "models/tiny", "command": "attnswap plan --variant window:w=4",
            "tokens": 96, "cheap_cost": 0.25, "config": {"measure": "flops", "context": 32},
            "sensitivity": [{"layer": 0, "kl": 0.3, "top1": 0.9}, {"layer": 1, "kl": 0.1, "top1": 0.95}]}
    (results / "plan_tiny").mkdir()
    (results / "plan_tiny" / "plan.json").write_text(json.dumps(plan))
    text = results_doc.write_results(results, tmp_path / "results.md").read_text()
    assert "/plan_tiny: window:w=4 in tiny\n" in text
    assert "| 1 | 0.1 | 0.95 |" in text
    assert "| none | 1 | 0 |" in text and "| 1 | 0.625 | 0.1 |" in text and "| 0, 1 | 0.25 | 0.4 |" in text


def test_frontier_plot_draws_a_groups_best_run_at_each_cost(monkeypatch, tmp_path):
    drawn = {}
    monkeypatch.setattr(plots, "line_plot", lambda panel, path, title="": drawn.setdefault("panel", panel) and path)
    points = [_point("old recipe", 0.25, 250.0, "hedgehog"), _point("new recipe", 0.25, 113.0, "hedgehog"),
              _point("wider", 0.5, 100.0, "hedgehog")]
    frontier_plot(points, tmp_path / "f.png")
    hedgehog = next(s for s in drawn["panel"].series if s.label == "hedgehog")
    assert list(hedgehog.xs) == [0.25, 0.5]
    assert list(hedgehog.ys) == pytest.approx([113.0 / 84.5, 100.0 / 84.5])
