"""Faults injected into the command line: the user's files stay intact, every bad input gets one
line on stderr with exit status 2, and nothing runs on a folder another process is writing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import bayesmeta as bm
from bayesmeta.cli import _folders, main
from bayesmeta.cli._folders import LOCK_NAME, MARKER_NAME, FolderLock
from bayesmeta.inference import load_checkpoint, save_checkpoint
from tests.fakes import png_bytes

TINY = (
    "--task sinusoid --hidden 6 --meta-batch 2 --inner-steps 1 --shots 4 --queries 5 "
    "--val-every 0 --quiet"
).split()


def _train(out: Path, *extra: str, steps: int = 1) -> int:
    return main(["train", *TINY, "--meta-steps", str(steps), "--out", str(out), *extra])


def _error(argv: list[str], capsys) -> str:
    """The one line a refused command prints (exit status 2, no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# 1. run folders are marked; --force deletes only what the marker lists ----------------------
def test_force_refuses_another_tools_folder_and_deletes_nothing(tmp_path, capsys):
    other = tmp_path / "other-tool"
    (other / "diagnostics").mkdir(parents=True)
    for name in ("config.json", "eval.json", "history.json"):
        (other / name).write_text('{"mine": true}')
    (other / "diagnostics" / "figure.png").write_bytes(b"the user's own figure")
    before = _snapshot(other)
    err = _error(["train", *TINY, "--out", str(other), "--force"], capsys)
    assert f"--force: {other} is not a bayesmeta run folder" in err
    assert MARKER_NAME in err and "refusing to delete anything" in err
    assert _snapshot(other) == before  # no lock file, no marker, nothing gone


def test_force_deletes_only_the_files_the_marker_lists(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    first = json.loads((out / MARKER_NAME).read_text())
    assert first["files"] == sorted(["config.json", "checkpoint.pt", "history.json", "learner.pt"])
    assert main(["eval", str(out), "--num-tasks", "2", "--meta-batch", "2"]) == 0
    assert "eval.json" in json.loads((out / MARKER_NAME).read_text())["files"]
    (out / "notes.txt").write_text("keep me")
    (out / "my-plots").mkdir()
    (out / "my-plots" / "a.png").write_bytes(b"keep me too")
    assert _train(out, "--force") == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "my-plots" / "a.png").read_bytes() == b"keep me too"
    assert not (out / "eval.json").exists()  # the old run's score, listed in its marker
    second = json.loads((out / MARKER_NAME).read_text())
    assert second["run_id"] != first["run_id"]
    assert not (out / LOCK_NAME).exists()  # the lock goes with the process that held it


def test_force_keeps_the_users_own_file_inside_diagnostics(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    (out / "diagnostics").mkdir()
    (out / "diagnostics" / "report.md").write_text("# bayesmeta's report")
    (out / "diagnostics" / "my-figure.png").write_bytes(b"the user's own figure")
    _folders.record_files(out, "diagnostics")  # (as bayesmeta diagnose does)
    assert _train(out, "--force") == 0
    assert (out / "diagnostics" / "my-figure.png").read_bytes() == b"the user's own figure"


def test_clear_run_deletes_only_the_listed_files_of_a_listed_folder(tmp_path):
    _folders.write_marker(tmp_path, ["diagnostics", "eval.json"])
    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "diagnostics").mkdir()
    for name in ("report.md", ".report.md.x1.tmp", "mine.png"):
        (tmp_path / "diagnostics" / name).write_text(name)
    allowed = ["eval.json", "diagnostics", "diagnostics/report.md", "diagnostics/band.png"]
    deleted = _folders.clear_run(tmp_path, allowed)
    assert sorted(deleted) == [
        "diagnostics/.report.md.x1.tmp",
        "diagnostics/report.md",
        "eval.json",
    ]
    assert _snapshot(tmp_path) == {"diagnostics/mine.png": b"mine.png"}
    (tmp_path / "diagnostics" / "mine.png").unlink()  # once only bayesmeta's files are left
    _folders.write_marker(tmp_path, ["diagnostics"])
    (tmp_path / "diagnostics" / "report.md").write_text("again")
    assert sorted(_folders.clear_run(tmp_path, allowed)) == ["diagnostics", "diagnostics/report.md"]
    assert not any(tmp_path.iterdir())


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    _error(["train", *TINY, "--out", str(out), "--noise", "-1"], capsys)
    assert not (tmp_path / "new").exists()


@pytest.fixture
def fake_suite(monkeypatch):
    """``run_suite`` replaced by one that writes its results at once, one row failed."""
    from bayesmeta.bench import suite as suite_module

    def run_suite(suite, methods, *, out, **kwargs):
        rows = [
            {"family": "sinusoid", "method": "maml", "error": None},
            {"family": "omniglot-5w1s", "method": "bayes", "error": "training failed: nan"},
        ]
        results = {"rows": rows, "speed": [], "wall_seconds": 1.0}
        (Path(out) / "results.json").write_text(json.dumps(results))
        (Path(out) / "results.md").write_text("# new\n")
        return results

    monkeypatch.setattr(suite_module, "run_suite", run_suite)


def test_bench_refuses_to_overwrite_results_and_exits_1_when_a_row_failed(
    tmp_path, capsys, fake_suite, omniglot_root
):
    out = tmp_path / "bench"
    argv = ["bench", "--suite", "smoke", "--out", str(out), "--data-root", str(omniglot_root)]
    assert main([*argv, "--no-speed", "--quiet"]) == 1  # an earlier run (one row failed)
    (out / "results.json").write_text('{"earlier": "results"}')
    (out / "results.md").write_text("# earlier\n")
    err = _error([*argv, "--no-speed", "--quiet"], capsys)
    assert "holds the results of an earlier run (results.json, results.md)" in err
    assert "--resume" in err and "--force" in err
    assert (out / "results.json").read_text() == '{"earlier": "results"}'
    # 10. --force overwrites them; a failed row makes the exit status 1, and says which.
    assert main([*argv, "--no-speed", "--quiet", "--force"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 rows failed (omniglot-5w1s/bayes)" in err
    assert (out / "results.md").read_text() == "# new\n"
    assert main([*argv, "--force", "--resume"]) == 2  # argparse's usage, then its error
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["--force", "--resume"])
def test_bench_refuses_to_overwrite_a_results_md_it_did_not_write(
    tmp_path, capsys, fake_suite, omniglot_root, mode
):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.md").write_text("# my own notes\n")
    argv = ["bench", "--suite", "smoke", "--out", str(out), "--data-root", str(omniglot_root)]
    err = _error([*argv, "--no-speed", "--quiet", mode], capsys)
    assert f"{mode}: bench output folder {out} holds results.md, which bayesmeta bench" in err
    assert MARKER_NAME in err and "refusing to overwrite" in err
    assert _snapshot(out) == {"results.md": b"# my own notes\n"}  # no marker, no lock


# 2. one writer per folder --------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bayesmeta.cli._folders import FolderLock
    with FolderLock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(300)
    """
)


@pytest.mark.slow
@pytest.mark.integration
def test_a_second_process_gets_one_error_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    before = _snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(Path(bm.__file__).parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (
            ["train", *TINY, "--out", str(out), "--force", "--meta-steps", "1"],
            ["train", "--out", str(out), "--resume", "--meta-steps", "2", "--quiet"],
            ["eval", str(out), "--num-tasks", "2", "--meta-batch", "2"],
            ["diagnose", str(out), "--num-tasks", "2", "--num-draws", "5"],
        ):
            err = _error(argv, capsys)
            assert f"run folder {out} is in use by another bayesmeta process" in err, argv
            assert f"pid {holder.pid} on " in err and "started " in err
        after = _snapshot(out)
        del after[LOCK_NAME]
        assert after == before  # nothing written, nothing deleted
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock
        holder.wait()
    assert main(["train", "--out", str(out), "--resume", "--meta-steps", "2", "--quiet"]) == 0


def test_bench_output_folder_is_locked(tmp_path, capsys, fake_suite, omniglot_root):
    out = tmp_path / "bench"
    out.mkdir()
    argv = ["bench", "--suite", "smoke", "--out", str(out), "--data-root", str(omniglot_root)]
    with FolderLock(out, "bench output folder"):
        err = _error([*argv, "--no-speed"], capsys)
    assert f"bench output folder {out} is in use by another bayesmeta process (pid" in err
    assert not (out / "results.json").exists()


# 3. resume continues only the run that wrote the checkpoint ---------------------------------
def test_resume_into_a_checkpoint_of_another_method_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--method", "bayes") == 0
    config = json.loads((out / "config.json").read_text())
    config["method"] = "maml"  # as a second process left it (the two-runs race)
    (out / "config.json").write_text(json.dumps(config))
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    err = _error(["train", "--out", str(out), "--resume", "--meta-steps", "3", "--quiet"], capsys)
    assert "method: 'bayes' in the checkpoint, 'maml' here" in err
    assert "guide: 'normal-antithetic' in the checkpoint, 'delta' here" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step


# 5. and 7. bad options and data: one line, exit status 2, before any work -----------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--noise", "-1"], "--noise must be a positive finite number, got -1.0"),
        (["--noise", "nan"], "--noise must be a positive finite number, got nan"),
        (["--inner-lr", "inf"], "--inner-lr must be a positive finite number, got inf"),
        (
            ["--ways", "20", "--image-size", "84", "--data-root", "/nonexistent"],
            "--ways, --image-size, --data-root apply to --task omniglot only; this run's task "
            "is sinusoid",
        ),
        (["--device", "tpu9"], "--device 'tpu9' is not a torch device"),
        (  # (SVGD's kernel of 10^5 particles: 80 GB for its pairs' indices alone)
            ["--method", "bmaml", "--particles", "100000"],
            "particles=100000 would take about 224 GiB for the ParticleGuide's draws in one "
            "inner step on one task (19 weights per task, 1 × 100000 × 19 draws at least), over "
            "the limit of 4 GiB",
        ),
    ],
)
def test_train_refuses_bad_options_in_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert message in _error(["train", *TINY, "--out", str(out), *extra], capsys)
    assert not out.exists()  # nothing was written, not even config.json


def test_train_refuses_sinusoid_options_with_omniglot(tmp_path, capsys, omniglot_root):
    out = tmp_path / "run"
    argv = ["train", "--task", "omniglot", "--data-root", str(omniglot_root), "--out", str(out)]
    err = _error([*argv, "--noise", "5"], capsys)
    assert "--noise applies to --task sinusoid only; this run's task is omniglot" in err
    err = _error([*argv, "--image-size", "3"], capsys)
    assert "image_size must be an int >= 16, got 3" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_refuses_cuda_without_a_gpu(tmp_path, capsys):
    err = _error(["train", *TINY, "--out", str(tmp_path / "run"), "--device", "cuda"], capsys)
    assert "--device 'cuda' is not available on this machine" in err


def test_options_of_the_other_task_are_not_saved(tmp_path):
    assert _train(tmp_path / "run") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == "sinusoid"
    assert all(config[k] is None for k in ("ways", "image_size", "norm", "augment", "data_root"))


def test_unwritable_out_and_eval_folders_fail_up_front(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("a file")
    err = _error(["train", *TINY, "--out", str(tmp_path / "file" / "run")], capsys)
    assert f"cannot create run folder {tmp_path / 'file' / 'run'}: Not a directory" in err

    out = tmp_path / "run"
    assert _train(out) == 0
    real_open = os.open

    def read_only(path, flags, *args):  # as a read-only folder answers (root ignores modes)
        if Path(path).parent == out and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(_folders.os, "open", read_only)
    calls = []
    monkeypatch.setattr(bm, "evaluate", lambda *a, **k: calls.append(a))
    err = _error(["eval", str(out), "--num-tasks", "2", "--meta-batch", "2"], capsys)
    assert f"cannot write to run folder {out}: Permission denied" in err
    assert calls == [] and not (out / "eval.json").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert _train(out, "--method", "maml") == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    to.mkdir()
    for path in run.iterdir():
        if path.is_file():
            (to / path.name).write_bytes(path.read_bytes())
    return to


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(shots="five"), "config.json: 'shots' must be an int, found 'five'"),
        (lambda c: c.update(noise=[0.3]), "config.json: 'noise' must be a number, found [0.3]"),
        (lambda c: c.pop("queries"), "config.json: the settings ['queries'] are missing"),
        (
            lambda c: c.update(transductive=1),
            "config.json: 'transductive' must be true or false, found 1",
        ),
    ],
)
def test_eval_refuses_a_config_with_a_wrong_typed_or_missing_key(
    trained, tmp_path, capsys, edit, message
):
    run = _copy(trained, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))
    err = _error(["eval", str(run), "--num-tasks", "2", "--meta-batch", "2"], capsys)
    assert f"corrupt run folder {run}: {message}" in err


def _edit_learner(run: Path, edit) -> None:
    payload = load_checkpoint(run / "learner.pt")
    config = json.loads(payload["config"])
    edit(config)
    payload["config"] = json.dumps(config)
    save_checkpoint(run / "learner.pt", payload)


def test_eval_refuses_a_saved_model_description_with_an_unknown_keyword(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    _edit_learner(run, lambda c: c["model"]["net"].update(dropout=0.1))
    err = _error(["eval", str(run), "--num-tasks", "2", "--meta-batch", "2"], capsys)
    assert f"corrupt run folder {run}: cannot load learner.pt" in err
    assert "MLP backbone has unknown keys ['dropout']" in err


def test_eval_refuses_a_learner_with_a_flipped_bit(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    raw = bytearray((run / "learner.pt").read_bytes())
    weight = next(t for t in load_checkpoint(run / "learner.pt")["model"].values() if t.numel() > 4)
    at = bytes(raw).find(weight.numpy().tobytes())
    raw[at + 1] ^= 0x01
    (run / "learner.pt").write_bytes(bytes(raw))
    err = _error(["eval", str(run), "--num-tasks", "2", "--meta-batch", "2"], capsys)
    assert "cannot load learner.pt" in err and "is damaged" in err


def test_eval_of_a_learner_whose_adaptation_diverges(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    _edit_learner(run, lambda c: c.update(inner_lr=1e30, test_inner_steps=3))
    err = _error(["eval", str(run), "--num-tasks", "4", "--meta-batch", "2"], capsys)
    assert f"cannot evaluate {run}: adaptation diverged: non-finite predictions" in err
    assert not (run / "eval.json").exists()


def _damaged_omniglot(root: Path) -> Path:
    """Lake's layout with one zip whose first PNG has corrupt deflate data."""
    root.mkdir()
    path = root / "images_background_small1.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for c in range(3):
            for k in range(2):
                name = f"images_background_small1/Alphabet/character{c:02d}/{c}_{k}.png"
                archive.writestr(name, png_bytes(2 * c + k) * 4)  # (compressible)
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    raw = bytearray(path.read_bytes())
    header = 30 + len(info.filename.encode()) + len(info.extra)
    # BFINAL=1, BTYPE=11: a reserved block type, which zlib refuses ("invalid block type").
    raw[info.header_offset + header] = 0xFF
    path.write_bytes(bytes(raw))
    return root


def test_a_zip_member_with_corrupt_deflate_data_is_one_line(tmp_path, capsys):
    root = _damaged_omniglot(tmp_path / "omniglot")
    argv = ["train", "--task", "omniglot", "--data-root", str(root), "--ways", "2", "--shots"]
    err = _error([*argv, "1", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert f"cannot read Omniglot from data root {root}" in err
    assert "character00/0_0.png' is damaged (error: " in err
    assert not (tmp_path / "run").exists()


# 8. leftovers of killed writes ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["--resume", "--force"])
def test_resume_and_force_remove_the_temporary_files_of_killed_writes(tmp_path, mode):
    out = tmp_path / "run"
    assert _train(out) == 0
    leftovers = [".checkpoint.pt.k1ll3d.tmp", ".history.json.a8c.tmp", ".config.json.x.tmp"]
    for name in leftovers:
        (out / name).write_bytes(b"half a file")
    (out / ".my-notes.tmp").write_text("not bayesmeta's")
    assert _train(out, mode, steps=2) == 0
    assert not any((out / name).exists() for name in leftovers)
    assert (out / ".my-notes.tmp").read_text() == "not bayesmeta's"


# 9. a full disk: one line, exit status 1, the run left resumable -----------------------------
def _no_space(*args, **kwargs):
    """A ``torch.save`` on a full disk: part of the file, then torch's own wrapping of the
    ``OSError`` (a ``RuntimeError`` from ``inline_container.cc``)."""
    args[1].write(b"PK half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None


def _full_disk_line(capsys, command: str, path: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"bayesmeta {command}: error: cannot write {path}: No space left"), err
    return err


def test_a_full_disk_during_train_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _train(out, "--checkpoint-every", "1") == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(torch, "save", _no_space)
        assert _train(out, "--resume", "--checkpoint-every", "1", steps=2) == 1
    assert "continue the run with --resume" in _full_disk_line(
        capsys, "train", out / "checkpoint.pt"
    )
    assert (out / "checkpoint.pt").read_bytes() == before  # the old checkpoint, whole
    assert not list(out.glob(".checkpoint.pt.*.tmp"))
    assert _train(out, "--resume", steps=2) == 0
    assert len(json.loads((out / "history.json").read_text())) == 2


def test_a_full_disk_during_eval_is_one_line_and_keeps_the_last_score(
    tmp_path, capsys, monkeypatch
):
    from bayesmeta.cli import evaluate

    out = tmp_path / "run"
    assert _train(out) == 0
    argv = ["eval", str(out), "--num-tasks", "2", "--meta-batch", "2"]
    assert main(argv) == 0
    before = (out / "eval.json").read_bytes()
    capsys.readouterr()

    def write_half(path, obj):
        bm.runs.settings.atomic_write(path, lambda fh: _no_space(None, fh))

    with monkeypatch.context() as m:
        m.setattr(evaluate, "write_json", write_half)
        assert main(argv) == 1
    assert "run it again" in _full_disk_line(capsys, "eval", out / "eval.json")
    assert (out / "eval.json").read_bytes() == before
    assert not list(out.glob(".eval.json.*.tmp"))


FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, sys
    from bayesmeta.cli import main
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # (Python ignores SIGXFSZ)
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
@pytest.mark.integration
def test_a_file_size_limit_during_train_is_one_line_in_a_real_process(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--checkpoint-every", "1") == 0
    before = (out / "checkpoint.pt").read_bytes()
    limit = max(p.stat().st_size for p in out.iterdir() if p.suffix == ".json") + 1024
    assert limit < len(before)  # the JSON files fit, a checkpoint does not
    argv = ["train", "--out", str(out), "--resume", "--meta-steps", "2", "--quiet"]
    run = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(limit), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    err = run.stderr.strip()
    assert len(err.splitlines()) == 1 and "File too large" in err, err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob(".*.tmp"))
    assert _train(out, "--resume", steps=2) == 0
