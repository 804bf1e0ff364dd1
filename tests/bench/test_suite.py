"""The benchmark suite: a smoke run in-process, its JSON schema and report, and rendering it."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bayesmeta.bench import SUITES, Execution, render_markdown, run_suite
from bayesmeta.bench.config import IMAGE_FAMILIES, SUITE_METHODS, Budget
from bayesmeta.bench.suite import JSON_NAME, MARKDOWN_NAME, learner_config, speed_section
from bayesmeta.cli import main
from bayesmeta.runs import default_inner_lr
from tests.fakes import fake_omniglot_download, write_folder

TOP_LEVEL = {
    "schema": int,
    "suite": str,
    "suite_config": dict,
    "methods": list,
    "seed": int,
    "command": str,
    "started_utc": str,
    "versions": dict,
    "machine": dict,
    "rows": list,
    "not_run": list,
    "speed": list,
    "speed_baselines": dict,
    "memory_method": str,
    "process_max_rss_mb": float,
    "wall_seconds": float,
}
ROW = {
    "method": str,
    "family": str,
    "task": str,
    "kind": str,
    "seed": int,
    "config": dict,
    "headline": str,
    "ood": dict,
    "conditions": dict,
    "evaluations": dict,
    "training": dict,
    "memory": dict,
    "wall_seconds": float,
}
_UNCERTAINTY = {"entropy", "mutual_information", "aurc"}
SCORES = {
    "classification": {"accuracy", "accuracy_ci", "nll", "ece", "mce", "brier", "num_tasks"}
    | _UNCERTAINTY,
    "regression": {
        "mse",
        "mse_ci",
        "function_mse",
        "function_mse_ci",
        "nll",
        "coverage_50",
        "coverage_90",
        "crps",
        "num_tasks",
    }
    | _UNCERTAINTY,
}


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, omniglot_root):
    out = tmp_path_factory.mktemp("bench")
    results = run_suite("smoke", out=out, data_root=omniglot_root, command="pytest smoke")
    return out, results


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_json_schema(smoke):
    out, results = smoke
    assert json.loads((out / JSON_NAME).read_text()) == results  # what is returned is written
    for key, kind in TOP_LEVEL.items():
        assert isinstance(results[key], kind), key
    assert results["suite"] == "smoke" and results["methods"] == list(SUITE_METHODS)
    assert {"python", "torch", "pyro", "bayesmeta"} <= set(results["versions"])
    assert {"platform", "cpu_count", "device", "torch_threads"} <= set(results["machine"])
    families = SUITES["smoke"].families
    pairs = [(r["family"], r["method"]) for r in results["rows"]]
    # A classifier's head does not run on sinusoids (NOT_ON), and the results say so.
    skipped = {("bayes-proto", "sinusoid"), ("protomaml", "sinusoid")}
    assert pairs == [
        (f.name, m) for f in families for m in SUITE_METHODS if (m, f.task) not in skipped
    ]
    assert sorted((r["method"], r["family"]) for r in results["not_run"]) == [
        ("bayes-proto", "sinusoid-5shot"),
        ("protomaml", "sinusoid-5shot"),
    ]
    for row in results["rows"]:  # every classifier is tested on out-of-episode queries too
        if row["kind"] == "classification":
            ooe = row["out_of_episode"]
            assert "error" not in ooe and 0 <= ooe["auroc_energy"] <= 1, row["method"]
    for row in results["rows"]:
        for key, kind in ROW.items():
            assert isinstance(row[key], kind), (key, row["family"], row["method"])
        assert row["error"] is None, row["error"]
        assert set(row["evaluations"]) == set(row["conditions"])
        # Omniglot adds tasks drawn within one unseen alphabet.
        assert len(row["conditions"]) == (3 if row["task"] == "omniglot" else 2)
        assert row["headline"] in row["conditions"]
        for scores in row["evaluations"].values():
            assert SCORES[row["kind"]] <= set(scores)
            assert scores["num_tasks"] == row["config"]["test_tasks"]
        assert {"gap", "reference", "shifted", "gap_definition"} <= set(row["ood"])
        assert 0 <= row["ood"]["auroc_entropy"] <= 1
        assert 0 <= row["ood"]["auroc_mutual_information"] <= 1
        assert row["training"]["meta_steps"] == row["config"]["meta_steps"]
        assert row["training"]["tasks_per_second"] > 0 and row["memory"]["peak_rss_mb"] > 0
        numbers = _numbers({k: row[k] for k in ("evaluations", "training", "memory", "ood")})
        assert numbers and all(math.isfinite(x) for x in numbers), row
    grid = SUITES["smoke"].speed
    assert _cells(results["speed"]) == _grid_cells(grid)
    # Omniglot is timed on the suite's own 5-way 1-shot tasks; the smoke suite has no 10-shot
    # sinusoid family, so the sinusoid is timed on Finn et al.'s 10 shots and 10 queries.
    omniglot = next(f for f in SUITES["smoke"].families if f.task == "omniglot")
    shapes = {"sinusoid": (None, 10, 10), "omniglot": (5, 1, omniglot.queries)}
    for row in results["speed"]:
        shape = row["shape"]
        assert (shape["ways"], shape["shots"], shape["queries"]) == shapes[row["task"]]
        assert all(math.isfinite(x) and x > 0 for x in _numbers(row))
        if row.get("kind") == "method_cost":  # at T = cost_tasks: every method against maml
            timed = {m for m in grid.cost_methods if not SUITES["smoke"].not_run(m, row["task"])}
            assert set(row["ms_per_step"]) == timed and row["T"] == 2
            assert ("bayes-proto" in timed) == (row["task"] == "omniglot")
            assert row["vs_maml"]["maml"] == 1.0
        else:
            assert {"batched", "per_task"} <= set(row["ms_per_step"])
    assert sum(r.get("kind") == "method_cost" for r in results["speed"]) == len(grid.tasks)


def _cells(speed_rows):
    loops = [r for r in speed_rows if r.get("kind") != "method_cost"]
    return [(r["task"], r["T"], r["inner_steps"], r["order"]) for r in loops]


def _grid_cells(grid):
    return [
        (task, T, steps, "first" if first else "second")
        for task in grid.tasks
        for T in grid.num_tasks
        for steps in grid.inner_steps
        for first in grid.first_order
    ]


def _head_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, text=True,
                         capture_output=True, check=True)  # fmt: skip
    return run.stdout.strip()


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_markdown_table(smoke):
    out, results = smoke
    text = (out / MARKDOWN_NAME).read_text()
    assert text == render_markdown(results)
    assert text.startswith("# bayesmeta benchmark: `smoke` suite")
    # Which host and which code produced the numbers (a commit, +changes if edited).
    assert f"- machine: host {results['machine']['host']}, " in text
    assert results["versions"]["code"].split("+")[0] == _head_commit()
    assert f", code {results['versions']['code']}" in text
    assert "| family | method | accuracy % ± 95% CI | NLL | ECE | Brier | AURC |" in text
    assert "| MSE ± 95% CI | curve MSE | NLL | CRPS | 90% coverage | OOD MSE |" in text
    assert "| within-alphabet % | accuracy % seen | OOD AUROC H / MI |" in text
    assert "(non-transductive), except in rows marked ᵀ" in text
    assert "| task | backbone | T | inner steps | order |" in text
    body = [line.split("|")[1:3] for line in text.splitlines() if line.startswith("| ")]
    rows = [(f.strip().rstrip("†"), m.strip()) for f, m in body if f.strip() not in ("family",)]
    assert not any(m.endswith("ᵀ") for _, m in rows)  # the suites predict non-transductively
    rows = [r for r in rows if r[0] in {row["family"] for row in results["rows"]}]
    assert sorted(rows) == sorted((r["family"], r["method"]) for r in results["rows"])
    assert "† fewer than 600 test tasks" in text  # smoke budgets are marked


def test_learner_config_is_the_cli_default_plus_the_budget(omniglot_root):
    suite = SUITES["quick"]
    family = suite.families[2]
    config = learner_config(family, suite.budgets[family.name], "maml", data_root=omniglot_root)
    assert config["inner_lr"] == default_inner_lr("omniglot", "maml")
    assert config["ways"] == family.ways and config["hidden"] == "32"
    budget = suite.budgets[family.name]
    assert config["meta_lr"] == budget.meta_lr and config["augment"] is True
    assert config["lr_schedule"] == budget.lr_schedule == "cosine"
    # The method's options (bayes on sinusoids: the local guide) over the CLI's; a budget's
    # particles over those; a point estimate has none.
    sine = SUITES["quick"].families[0]
    sine_budget = suite.budgets[sine.name]
    bayes = learner_config(sine, sine_budget, "bayes")
    assert bayes["guide"] == "normal-local" and bayes["inner_lr"] == 0.03
    two = replace(sine_budget, particles=2)
    assert learner_config(sine, two, "bayes")["particles"] == 2
    assert learner_config(sine, two, "maml")["particles"] is None
    longer = SUITES["standard"].budgets[family.name]
    # Reptile anneals its ε on images whatever the budget's schedule.
    annealed = learner_config(family, longer, "reptile", data_root=omniglot_root)
    assert longer.lr_schedule == "constant" and annealed["lr_schedule"] == "cosine"
    # One inner step would make Reptile joint training; the method's options override it.
    reptile = learner_config(family, suite.budgets[family.name], "reptile", data_root=omniglot_root)
    assert budget.inner_steps == 1 and reptile["inner_steps"] == reptile["test_inner_steps"] == 3
    sine = SUITES["quick"].families[0]
    config = learner_config(sine, suite.budgets[sine.name], "reptile")
    assert config["noise"] == 0.3 and config["data_root"] is None and config["shots"] == 5
    assert config["meta_lr"] is None  # Reptile's outer step is its own ε, not the budget's
    assert config["lr_schedule"] == "constant"


def test_a_seed_gives_the_same_numbers_and_another_seed_others():
    suite = replace(SUITES["smoke"], families=SUITES["smoke"].families[:1], speed=None)
    torch.rand(3)  # the global RNG's state must not matter

    def scores(seed):
        results = run_suite(suite, ["maml", "bayes"], seed=seed)
        assert results["speed"] == []
        return [
            (r["method"], r["evaluations"], r["training"]["final_loss"]) for r in results["rows"]
        ]

    first = scores(0)
    assert [m for m, _, _ in first] == ["maml", "bayes"]
    assert scores(0) == first
    assert scores(1) != first


@pytest.mark.slow
@pytest.mark.integration
def test_render_the_finished_rows_of_an_unfinished_run(smoke, tmp_path, capsys):
    out, results = smoke
    killed = tmp_path / "killed"
    (killed / "rows").mkdir(parents=True)
    for path in sorted((out / "rows").glob("*.json"))[:3]:  # three rows done, then killed
        (killed / "rows" / path.name).write_text(path.read_text())
    (killed / "rows" / "omniglot-5w1s--torn.json").write_text('{"method": "ma')
    assert main(["bench", "--render", str(killed), "--heading-level", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("## bayesmeta benchmark: the finished rows of an unfinished run\n")
    assert "- 3 rows (" in text and "| task | backbone |" not in text  # no speed section yet
    done = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))[:3]]
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    labels = sorted(line.split("|")[1:3] for line in table if "family" not in line)
    assert [[f.strip(" †"), m.strip()] for f, m in labels] == sorted(
        [r["family"], r["method"]] for r in done
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bench", "--render", str(empty)]) == 2
    assert "neither results.json nor row files in rows/" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_cli_render_into_a_markdown_file(smoke, tmp_path, capsys):
    out, _ = smoke
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\n<!-- bench:begin -->\n<!-- bench:end -->\n\nmore\n")
    argv = ["bench", "--render", str(out), "--heading-level", "2", "--into", str(readme)]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"wrote the report into {readme}\n"
    text = readme.read_text()
    assert main(["bench", "--render", str(out), "--heading-level", "2"]) == 0
    report = capsys.readouterr().out
    assert text.startswith(f"# Results\n\n<!-- bench:begin {out} generated by `bayesmeta bench")
    assert f"\n\n{report}\n<!-- bench:end -->\n\nmore\n" in text
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left
    assert "--into needs --render" in _error(["bench", "--into", str(readme)], capsys)
    plain = tmp_path / "plain.md"
    plain.write_text("nothing to replace\n")
    err = _error(["bench", "--render", str(out), "--into", str(plain)], capsys)
    assert "--into:" in err and "found 0; blocks for: none" in err
    assert plain.read_text() == "nothing to replace\n"
    err = _error(["bench", "--render", str(out), "--into", str(tmp_path / "none.md")], capsys)
    assert "--into: cannot read" in err


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err
    return err.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.integration
def test_full_suite_downloads_omniglot_into_the_data_root_and_splits_its_50_alphabets(
    tmp_path, monkeypatch
):
    # torchvision's download, faked: both halves as torchvision lays them out (30 background
    # alphabets, 20 evaluation ones, 4 characters each, 6 drawings: enough for 20-way 5-shot).
    calls = fake_omniglot_download(
        monkeypatch,
        {f"Alphabet{a:02d}": 4 for a in range(30)},
        {f"Alphabet{a:02d}": 4 for a in range(30, 50)},
        drawings=6,
    )
    full = SUITES["full"]
    # The full suite's Omniglot families with one query per class, at a tiny budget.
    families = tuple(replace(f, queries=1) for f in full.families if f.task == "omniglot")
    tiny = Budget(1, 1, 1, hidden="4", test_tasks=2, eval_batch=2)
    suite = replace(full, families=families, budgets={f.name: tiny for f in families})
    root = tmp_path / "omniglot"
    results = run_suite(replace(suite, speed=None), ["maml"], data_root=root)

    assert results["suite_config"]["omniglot"] == "full"
    # Downloaded once, before any row ran (rows in parallel processes must not race).
    assert calls == [(root, True, True), (root, False, True)]
    rows = {r["family"]: r for r in results["rows"]}
    assert list(rows) == ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s"]
    for row in rows.values():
        assert row["error"] is None
        # 30/8/12 of the 50 alphabets; 24 of the train split's 120 characters held out.
        unseen = row["conditions"]["unseen_alphabets"]
        assert unseen == "12 alphabets never meta-trained (test split)"
        assert row["notes"][0] == (
            "meta-trained on 96 characters (x4 rotations) of 30 alphabets; "
            "24 of their characters held out"
        )
        # The fake alphabets hold 4 characters: 20-way tasks within one cannot be drawn.
        if row["family"].startswith("omniglot-20w"):
            assert row["notes"][1:] == [
                "no within-alphabet test: no unseen alphabet has 20 characters"
            ]
            assert "unseen_within_alphabet" not in row["conditions"]
        for scores in row["evaluations"].values():
            assert scores["num_tasks"] == 2 and 0.0 <= scores["accuracy"] <= 1.0


def test_image_folder_adds_its_families_on_rgb_images_tested_on_unseen_classes(
    tmp_path, monkeypatch
):
    import bayesmeta.bench.config as config_module

    # 30 classes split 19/5/6 (miniImageNet's fractions); 6 images each, enough for 5-shot.
    tree = write_folder(tmp_path / "images", classes=30, per_class=6)
    families = tuple(replace(f, queries=1) for f in IMAGE_FAMILIES)
    tiny = Budget(1, 1, 1, hidden="4", test_tasks=2, eval_batch=2)
    monkeypatch.setattr(config_module, "IMAGE_FAMILIES", families)
    monkeypatch.setattr(config_module, "IMAGE_BUDGET", tiny)
    no_omniglot = replace(SUITES["smoke"], families=(), budgets={})
    results = run_suite(replace(no_omniglot, speed=None).with_image_folder(tree), ["maml"])

    rows = {r["family"]: r for r in results["rows"]}
    assert list(rows) == ["images-5w1s", "images-5w5s"]
    assert results["suite_config"]["budgets"]["images-5w5s"]["meta_steps"] == 1
    for family, row in rows.items():
        assert row["error"] is None
        assert row["config"]["data_root"] == str(tree)
        assert (row["config"]["in_channels"], row["config"]["image_size"]) == (3, 84)
        assert row["config"]["shots"] == (5 if family.endswith("5s") else 1)
        assert row["conditions"]["unseen_classes"] == "classes never meta-trained (test split)"
        for scores in row["evaluations"].values():
            assert scores["num_tasks"] == 2 and 0.0 <= scores["accuracy"] <= 1.0


def test_a_diverged_test_condition_is_reported_not_raised(monkeypatch):
    import bayesmeta.bench.suite as suite_module

    evaluate = suite_module.bm.evaluate

    def flaky(learner, tasks, **kw):
        if tasks.amplitude[0] >= 5.0:  # the out-of-range condition
            raise ValueError("Expected parameter loc ... found invalid values\n" + "x" * 1000)
        return evaluate(learner, tasks, **kw)

    monkeypatch.setattr(suite_module.bm, "evaluate", flaky)
    suite = replace(SUITES["smoke"], families=SUITES["smoke"].families[:1], speed=None)
    results = run_suite(
        suite, ["maml"], execution=Execution(workers=1)
    )  # in this process, where the patch is
    (row,) = results["rows"]
    assert row["evaluations"]["out_of_range"] is None and row["ood"]["gap"] is None
    assert row["evaluations"]["in_range"]["mse"] > 0
    assert row["error"].startswith("testing on out_of_range failed: Expected parameter loc")
    assert len(row["error"]) < 200
    text = render_markdown(results)
    assert "failed ‡" in text and "‡ What went wrong" in text


@pytest.mark.slow
@pytest.mark.integration
def test_speed_grid_runs_among_the_rows_in_worker_processes(omniglot_root, tmp_path):
    # Two rows and four speed parts (2 tasks x 2 T) share two workers; the grid comes back in
    # its own order whatever order the parts finished in, and none of it is written as a row.
    grid = replace(SUITES["smoke"].speed, inner_steps=(1, 2), first_order=(False, True))
    suite = replace(SUITES["smoke"], speed=grid)
    results = run_suite(
        suite, ["maml"], data_root=omniglot_root, execution=Execution(workers=2), out=tmp_path
    )
    assert _cells(results["speed"]) == _grid_cells(grid)
    assert [r["family"] for r in results["rows"]] == [f.name for f in suite.families]
    assert sorted(p.name for p in (tmp_path / "rows").glob("*.json")) == sorted(
        f"{f.name}--maml.json" for f in suite.families
    )
    for row in results["speed"]:
        if row.get("kind") != "method_cost":
            assert row["speedup_vs_per_task"] > 0 and math.isfinite(row["speedup_vs_per_task"])
    again = run_suite(suite, ["maml"], data_root=omniglot_root, out=tmp_path, resume=True)
    assert len(again["resumed_rows"]) == 2 and _cells(again["speed"]) == _grid_cells(grid)
    lines = []
    alone = speed_section(suite, data_root=omniglot_root, log=lines.append)  # in this process
    assert _cells(alone) == _grid_cells(grid) and len(lines) == len(alone)


def test_a_row_s_progress_line_shows_accuracy_as_a_percentage_and_mse_as_is():
    from bayesmeta.bench.suite import _row_line

    row = {
        "family": "omniglot-5w1s", "method": "maml", "task": "omniglot", "kind": "classification",
        "headline": "test", "evaluations": {"test": {"accuracy": 0.8934, "num_tasks": 600}},
        "error": None, "wall_seconds": 12.4, "training": {"tasks_per_second": 250.0},
    }  # fmt: skip
    assert _row_line(row) == "omniglot-5w1s    maml     accuracy 89.3%  (12s, 250 tasks/s)"
    row.update(task="sinusoid", evaluations={"test": {"mse": 0.01234, "num_tasks": 600}})
    assert "mse 0.01234  (" in _row_line(row)
