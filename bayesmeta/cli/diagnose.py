"""``bayesmeta diagnose``: ArviZ summaries, calibration and predictive plots of a run."""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from bayesmeta import diagnostics as dg
from bayesmeta.cli._folders import FolderLock, record_files
from bayesmeta.cli.evaluate import EVAL_SEED
from bayesmeta.data import Sinusoid
from bayesmeta.inference import TaskPosterior
from bayesmeta.inference.mcmc import nuts_reference
from bayesmeta.models import LabelPredictive
from bayesmeta.nets import head_parameter_names
from bayesmeta.runs import UsageError, load_run, make_tasks

__all__ = ["add_parser", "run"]

DIAGNOSTICS_NAME = "diagnostics"
#: Everything diagnose writes into RUN_DIR/diagnostics/.
OUTPUTS = (
    "report.md",
    "summary.csv",
    "coverage.csv",
    "band.png",
    "reliability.png",
    "ppc.png",
    "svi_vs_mcmc.csv",
    "mcmc_summary.csv",
    "forest.png",
)
#: Largest network NUTS is run on (weights per task).
MCMC_MAX_WEIGHTS = 5000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="posterior diagnostics and plots of a run",
        description="Adapt the run's learner to held-out tasks and write RUN_DIR/diagnostics/: "
        "an ArviZ summary of the head weights' task posteriors (summary.csv), PSIS-LOO on the "
        "query points, a reliability diagram (classification) or predictive bands against the "
        "true function (regression), a posterior-predictive check, and with --mcmc a "
        "comparison with NUTS. report.md links them all.",
    )
    a = p.add_argument
    a("run_dir", metavar="RUN_DIR", help="folder written by bayesmeta train")
    a("--num-tasks", type=int, default=50, help="held-out tasks (default 50)")
    a(
        "--num-draws",
        type=int,
        default=100,
        help="posterior draws per pseudo-chain, 4 pseudo-chains (default 100)",
    )
    a("--plot-tasks", type=int, default=4, help="tasks drawn in the band plot (default 4)")
    a("--seed", type=int, default=EVAL_SEED, help=f"seed of the tasks (default {EVAL_SEED})")
    a("--data-root", metavar="PATH", help="omniglot folder (default: the run's)")
    a(
        "--mcmc",
        action="store_true",
        help=f"compare with NUTS (small nets only: at most {MCMC_MAX_WEIGHTS} weights)",
    )
    a("--mcmc-tasks", type=int, default=1, help="tasks sampled by NUTS (default 1)")
    a("--mcmc-samples", type=int, default=300, help="NUTS draws per chain (default 300)")
    a("--mcmc-warmup", type=int, default=300, help="NUTS warm-up steps (default 300)")
    a("--mcmc-chains", type=int, default=2, help="NUTS chains (default 2)")
    a("--threads", type=int, metavar="N", help="torch.set_num_threads(N) [torch's default]")
    a("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def _table(df, rows: int = 12, digits: int = 3) -> str:
    """A pandas DataFrame as a Markdown table (its first ``rows`` rows)."""
    head = df.head(rows)
    cols = [str(c) for c in head.columns]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for index, row in head.iterrows():
        cells = [f"{v:.{digits}g}" if isinstance(v, float) else str(v) for v in row]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    if len(df) > rows:
        lines.append(f"\n({len(df) - rows} more rows in the CSV)")
    return "\n".join(lines)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt  # the backend was chosen by bayesmeta.diagnostics

    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _slice(post: TaskPosterior, k: int) -> TaskPosterior:
    state = {f: {n: t[:k] for n, t in v.items()} for f, v in post.state.items()}
    return TaskPosterior(post.model, post.guide, state, post.particles)


def _mcmc_section(args, learner, post, batch, out: Path) -> list[str]:
    import arviz as az

    model = learner.model
    k = min(args.mcmc_tasks, post.num_tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "chains drawn sequentially"
        mcmc = nuts_reference(
            model,
            batch.support_x[:k],
            batch.support_y[:k],
            num_samples=args.mcmc_samples,
            warmup_steps=args.mcmc_warmup,
            num_chains=args.mcmc_chains,
            seed=args.seed,
        )
    sub = _slice(post, k)
    table = dg.compare_posteriors(sub, mcmc, task=0)
    table.to_csv(out / "svi_vs_mcmc.csv")
    ref = dg.from_mcmc(mcmc, model, (batch.query_x[:k], batch.query_y[:k]), max_size=10**8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(ref)
    summary.to_csv(out / "mcmc_summary.csv")
    axes = dg.forest_plot(sub, mcmc, task=0)
    forest = _save(axes[0].figure, out / "forest.png")
    ratio = (table["sd_svi"] / table["sd_mcmc"]).median()
    within = (table["z"].abs() < 2).mean()
    return [
        "## SVI against NUTS",
        "",
        f"NUTS: {args.mcmc_chains} chains x {args.mcmc_samples} draws ({args.mcmc_warmup} warm-up) "
        f"on {k} task(s), θ fixed; max R-hat {summary['r_hat'].max():.3f}, min bulk ESS "
        f"{summary['ess_bulk'].min():.0f}, {int(ref.sample_stats['diverging'].sum())} divergences "
        "([mcmc_summary.csv](mcmc_summary.csv)).",
        "",
        f"Task 0: mean |mean difference| {table['mean_diff'].abs().mean():.3g}, median "
        f"sd ratio SVI/NUTS {ratio:.3g}, {100 * within:.0f}% of weights with |z| < 2 "
        "([svi_vs_mcmc.csv](svi_vs_mcmc.csv)).",
        "",
        f"![forest plot]({forest})",
        "",
    ]


def run(args: argparse.Namespace) -> int:
    for name in (
        "num_tasks",
        "num_draws",
        "plot_tasks",
        "mcmc_tasks",
        "mcmc_samples",
        "mcmc_chains",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive int")
    run_dir, config, learner = load_run(args.run_dir)
    if args.mcmc:  # refused before any work, and before the old report is cleared
        net = learner.model.net
        size = sum(p.numel() for p in net.parameters())
        if size > MCMC_MAX_WEIGHTS:
            raise UsageError(
                f"--mcmc needs a small network (at most {MCMC_MAX_WEIGHTS} weights per task); "
                f"this run's {type(net).__name__} has {size}"
            )
    if args.data_root:
        config["data_root"] = args.data_root
    tasks = make_tasks(config, "test")
    with FolderLock(run_dir):
        return _diagnose(args, run_dir, config, learner, tasks)


def _say(args: argparse.Namespace, message: str) -> None:
    """A progress line on stderr: diagnose's steps take seconds to minutes each."""
    if not args.quiet:
        print(f"bayesmeta diagnose: {message}", file=sys.stderr, flush=True)


def _counter(args: argparse.Namespace, where: str):
    """A ``progress(done, total)`` that says how far the draws are, at most every 5 s."""
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 5:
            last[0] = now
            _say(args, f"  {done}/{total} draws {where}")

    return progress


def _calibration(pred, qy: torch.Tensor, title: str, out: Path) -> list[str]:
    """The report's calibration section, with its reliability diagram."""
    ece, mce = dg.expected_calibration_error(pred.probs, qy)
    acc = (pred.probs.argmax(-1) == qy).double().mean().item()
    entropy = dg.predictive_entropy(pred.probs).mean().item()
    ax = dg.reliability_diagram(pred.probs.cpu(), qy.cpu(), bins=15, title=f"Reliability, {title}")
    plot = _save(ax.figure, out / "reliability.png")
    return [
        "## Calibration",
        "",
        f"accuracy {100 * acc:.2f}%, ECE {ece:.4f}, MCE {mce:.4f} (15 bins), mean predictive "
        f"entropy {entropy:.3f} nats (max {math.log(pred.probs.shape[-1]):.3f}).",
        "",
        f"![reliability diagram]({plot})",
        "",
    ]


def _intervals(args, post, pred, batch, truth, g: torch.Generator, out: Path) -> list[str]:
    """The report's predictive-interval section (coverage per level), with its band plot."""
    cov = dg.coverage_table(pred, batch.query_y.to(pred.outputs.device))
    cov.to_csv(out / "coverage.csv")
    fig = dg.predictive_band_plot(
        post,
        (batch.support_x, batch.support_y),
        truth,
        (batch.query_x, batch.query_y),
        tasks=args.plot_tasks,
        generator=g,
    )
    plot = _save(fig, out / "band.png")
    return [
        "## Predictive intervals",
        "",
        _table(cov, digits=4),
        "",
        f"![predictive bands]({plot})",
        "",
    ]


def _posterior_predictive(idata, loo, summary, out: Path) -> list[str]:
    """The report's sections on the predictive of the query points (held-out density, the
    posterior predictive check), on PSIS-LOO of the support points and on the head's draws."""
    ppc = _save(dg.ppc_plot(idata).figure, out / "ppc.png")
    ll = torch.from_numpy(idata.log_likelihood["obs"].values).flatten(0, 1)
    heldout = (torch.logsumexp(ll, 0) - math.log(ll.shape[0])).sum().item()
    k = loo.pareto_k.values
    return [
        "## Posterior predictive",
        "",
        f"Held-out log predictive density of the {ll[0].numel()} query points: {heldout:.2f} "
        f"({ll.shape[0]} draws). PSIS-LOO of the {k.size} support points the task posteriors "
        f"were fit to: elpd_loo {loo.elpd_loo:.2f} ± {loo.se:.2f}, p_loo {loo.p_loo:.2f}; "
        f"Pareto k > 0.7 (PSIS unreliable) for {int((k > 0.7).sum())} of them.",
        "",
        f"![posterior predictive check]({ppc})",
        "",
        "## Posterior summary (head weights)",
        "",
        f"Max R-hat {summary['r_hat'].max():.3f}, min bulk ESS {summary['ess_bulk'].min():.0f} "
        "(independent draws: ≈ 1 and ≈ the number of draws). Full table: "
        "[summary.csv](summary.csv).",
        "",
        _table(summary),
        "",
    ]


def _diagnose(args: argparse.Namespace, run_dir: Path, config, learner, tasks) -> int:
    import arviz as az

    out = run_dir / DIAGNOSTICS_NAME
    record_files(run_dir, DIAGNOSTICS_NAME)
    out.mkdir(exist_ok=True)
    for name in OUTPUTS:  # no stale file from an earlier diagnose, e.g. one with --mcmc
        (out / name).unlink(missing_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    if isinstance(tasks, Sinusoid):  # (the true functions, where they are known)
        batch, truth = tasks.sample(args.num_tasks, g, return_params=True)
    else:
        batch, truth = tasks.sample(args.num_tasks, g), None
    _say(args, f"adapting {args.num_tasks} held-out tasks")
    post = learner.adapt(batch.support_x, batch.support_y, generator=g)
    qx, qy = batch.query_x.to(learner.device), batch.query_y.to(learner.device)
    pred = post.predict(qx, generator=g)
    heads = head_parameter_names(learner.model.net)
    draws = (args.num_draws, heads, g)
    _say(args, f"drawing {4 * args.num_draws} posterior draws for ArviZ")
    idata = dg.to_inference_data(
        post, (qx, qy), *draws, max_size=10**8, progress=_counter(args, "on the query points")
    )
    sx, sy = batch.support_x.to(learner.device), batch.support_y.to(learner.device)
    fit = dg.to_inference_data(
        post, (sx, sy), *draws, max_size=10**8, progress=_counter(args, "on the support points")
    )
    _say(args, "ArviZ summary and PSIS-LOO")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(idata, var_names=heads)
        loo = az.loo(fit, reff=1.0, pointwise=True)
    summary.to_csv(out / "summary.csv")
    report = [
        f"# Diagnostics of `{run_dir}`",
        "",
        f"{config['task']} / {config['method']}: {args.num_tasks} held-out tasks (seed "
        f"{args.seed}), {4 * args.num_draws} posterior draws in 4 pseudo-chains.",
        "",
    ]
    if isinstance(learner.model.likelihood.predictive, LabelPredictive):
        report += _calibration(pred, qy, f"{config['task']} / {config['method']}", out)
    else:
        report += _intervals(args, post, pred, batch, truth, g, out)
    _say(args, "plots")
    report += _posterior_predictive(idata, loo, summary, out)
    if args.mcmc:
        _say(
            args,
            f"NUTS on {args.mcmc_tasks} task(s), {args.mcmc_chains} chains of "
            f"{args.mcmc_warmup} + {args.mcmc_samples} steps (minutes)",
        )
        report += _mcmc_section(args, learner, post, batch, out)
    (out / "report.md").write_text("\n".join(report))
    print(f"diagnostics of {run_dir} in {out}:")
    for path in sorted(out.iterdir()):
        print(f"  {path}")
    return 0
