"""Rows in worker processes, and resuming a suite: finished rows are read back, a killed row
continues from its checkpoint, and the numbers are those of an uninterrupted run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bayesmeta.bench import SUITES, Execution, render_markdown, run_suite


def _scores(results):
    return [
        (r["family"], r["method"], r["evaluations"], r["training"]["final_loss"])
        for r in results["rows"]
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_rows_in_worker_processes_equal_rows_in_this_process(omniglot_root):
    suite = replace(SUITES["smoke"], speed=None)
    kw = {"methods": ["maml", "bmaml"], "data_root": omniglot_root}
    here = run_suite(suite, execution=Execution(workers=1), **kw)
    apart = run_suite(suite, execution=Execution(workers=2), **kw)
    assert apart["workers"] == 2 and here["workers"] == 1
    assert _scores(apart) == _scores(here)  # same seeds, one thread each: the same numbers
    assert [r["family"] for r in apart["rows"]] == [f.name for f in suite.families for _ in "ab"]


def test_resume_reruns_only_missing_torn_or_changed_rows(tmp_path, monkeypatch):
    import bayesmeta.bench.suite as suite_module

    suite = replace(SUITES["smoke"], families=SUITES["smoke"].families[:1], speed=None)
    methods = ["maml", "fomaml", "reptile", "anil"]
    first = run_suite(suite, methods, out=tmp_path)
    rows = tmp_path / "rows"
    assert sorted(p.name for p in rows.glob("*.json")) == sorted(
        f"sinusoid-5shot--{m}.json" for m in methods
    )
    (rows / "sinusoid-5shot--maml.json").unlink()  # never finished
    (rows / "sinusoid-5shot--fomaml.json").write_text('{"method": "fom')  # torn
    changed = json.loads((rows / "sinusoid-5shot--reptile.json").read_text())
    changed["config"]["meta_steps"] += 1  # written by another configuration
    (rows / "sinusoid-5shot--reptile.json").write_text(json.dumps(changed))
    ran = []
    run_row = suite_module.run_row

    def counted(job, **kw):
        ran.append(job.method)
        return run_row(job, **kw)

    monkeypatch.setattr(suite_module, "run_row", counted)
    again = run_suite(suite, methods, out=tmp_path, resume=True)
    assert sorted(ran) == ["fomaml", "maml", "reptile"]
    assert again["resumed_rows"] == ["sinusoid-5shot--anil.json"]
    assert _scores(again) == _scores(first)
    assert [r["config"] for r in again["rows"]] == [r["config"] for r in first["rows"]]
    row_minutes = sum(row["wall_seconds"] for row in again["rows"]) / 60.0
    assert "- resumed: 1 of 4 rows were read from an earlier run's row files" in (
        render_markdown(again)
    )
    assert f"own wall times sum to {row_minutes:.1f} min" in render_markdown(again)
    assert "- resumed:" not in render_markdown(first)
    with pytest.raises(ValueError, match="resume=True needs out"):
        run_suite(suite, methods, resume=True)
    with pytest.raises(ValueError, match="workers must be a positive int, got 0"):
        run_suite(suite, methods, execution=Execution(workers=0))


def test_a_killed_row_continues_from_its_checkpoint(tmp_path, monkeypatch):
    from bayesmeta.bench.config import Budget
    from bayesmeta.inference import MetaLearner, load_checkpoint
    from bayesmeta.runs import load_run

    family = SUITES["smoke"].families[0]
    budget = Budget(10, 2, 1, hidden="8", test_tasks=6, eval_batch=3, lr_schedule="cosine")
    suite = replace(SUITES["smoke"], families=(family,), budgets={family.name: budget}, speed=None)
    whole = run_suite(suite, ["maml"])  # no out: never checkpointed
    run_dir = tmp_path / "rows" / f"{family.name}--maml"
    meta_step = MetaLearner.meta_step

    def kill_at_step_7(self, batch, generator=None):
        if self.step == 7:
            raise KeyboardInterrupt  # as a ^C or a kill would stop it, mid-row
        return meta_step(self, batch, generator)

    def killed_run(**kw):
        with monkeypatch.context() as m:
            m.setattr(MetaLearner, "meta_step", kill_at_step_7)
            with pytest.raises(KeyboardInterrupt):
                run_suite(suite, ["maml"], out=tmp_path, **kw)
        assert (run_dir / "checkpoint.pt").is_file()
        assert not (run_dir / "learner.pt").exists()

    killed_run()
    assert json.loads(load_checkpoint(run_dir / "checkpoint.pt")["run"])["lr_schedule"] == "cosine"
    again = run_suite(suite, ["maml"], out=tmp_path, resume=True)
    assert again["rows"][0]["training"]["resumed_from_step"] == 7
    assert _scores(again) == _scores(whole)  # bit for bit, as if never killed
    report = render_markdown(again)
    assert f"- {family.name}/maml: from step 7 of 10" in report
    assert "§ Meta-training continued" not in render_markdown(whole)
    # The finished row leaves a run folder as `bayesmeta train` does, for `bayesmeta diagnose`.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.json",
        "history.json",
        "learner.pt",
    ]
    _, config, learner = load_run(run_dir)
    assert config == again["rows"][0]["config"] and learner.step == 10
    assert len(json.loads((run_dir / "history.json").read_text())) == 10

    # Without --resume, or with another configuration, a row starts again from step 0.
    killed_run()
    fresh = run_suite(suite, ["maml"], out=tmp_path)
    assert "resumed_from_step" not in fresh["rows"][0]["training"]
    killed_run()
    stored = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**stored, "inner_lr": 0.5}))
    changed = run_suite(suite, ["maml"], out=tmp_path, resume=True)
    assert "resumed_from_step" not in changed["rows"][0]["training"]
    assert _scores(fresh) == _scores(changed) == _scores(whole)
