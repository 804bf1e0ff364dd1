"""Comparisons: a task posterior against its NUTS reference, and meta-learners against each
other by (PSIS-)LOO on the same tasks."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from bayesmeta.diagnostics._mpl import pyplot
from bayesmeta.diagnostics.arviz_io import from_mcmc, to_inference_data
from bayesmeta.inference.mcmc import mcmc_weights
from bayesmeta.nets import head_parameter_names

__all__ = ["compare_posteriors", "forest_plot", "compare_learners"]


def _moments(post, task: int, num_draws: int, generator) -> dict[str, tuple]:
    """Exact mean and sd of ``q_task`` per weight for the known guides, else from draws."""
    state = post.state
    if set(state) == {"loc", "scale_raw"}:
        return {
            n: (v[task], F.softplus(state["scale_raw"][n][task])) for n, v in state["loc"].items()
        }
    if set(state) == {"loc"}:
        return {n: (v[task], torch.zeros_like(v[task])) for n, v in state["loc"].items()}
    w = post.sample_weights(num_draws, generator)
    return {n: (v[:, task].mean(0), v[:, task].std(0)) for n, v in w.items()}


def compare_posteriors(
    post,
    mcmc,
    task: int = 0,
    var_names: Sequence[str] | None = None,
    num_draws: int = 1000,
    generator: torch.Generator | None = None,
):
    """Per-weight mean and standard deviation of a task posterior against NUTS.

    Parameters
    ----------
    post : TaskPosterior adapted on the same support sets (and θ) that ``mcmc`` sampled
    mcmc : finished ``pyro.infer.MCMC`` from :func:`~bayesmeta.inference.mcmc.nuts_reference`
    task : which task (index into both)
    var_names : sites to compare (default all)
    num_draws : draws for a guide whose moments are not known in closed form
        (the mean-field Normal and Delta guides use their exact moments)

    Returns
    -------
    pandas.DataFrame indexed by weight (``"head.weight[0, 3]"``) with columns ``mean_svi``,
    ``mean_mcmc``, ``mean_diff`` (SVI − MCMC), ``sd_svi``, ``sd_mcmc``, ``sd_diff`` and
    ``z`` (``mean_diff / sd_mcmc``).
    """
    import pandas as pd

    ref = mcmc_weights(mcmc)  # name -> [N, T, *shape]
    T = post.num_tasks
    T_ref = next(iter(ref.values())).shape[1]
    if T != T_ref:
        raise ValueError(f"post has {T} tasks but mcmc sampled {T_ref}; adapt on the same tasks")
    if not 0 <= task < T:
        raise ValueError(f"task must be in [0, {T}), got {task}")
    names = list(var_names) if var_names is not None else list(post.model.names)
    unknown = [n for n in names if n not in ref]
    if unknown:
        raise ValueError(f"var_names {unknown} are not sites of the model {list(ref)}")
    moments = _moments(post, task, num_draws, generator)
    rows = []
    for name in names:
        m_svi, s_svi = (t.detach().double().cpu() for t in moments[name])
        draws = ref[name][:, task].double().cpu()
        m_ref, s_ref = draws.mean(0), draws.std(0)
        for idx in itertools.product(*(range(k) for k in m_svi.shape)):
            label = f"{name}[{', '.join(map(str, idx))}]" if idx else name
            a, b, c, d = (float(t[idx]) for t in (m_svi, m_ref, s_svi, s_ref))
            rows.append(
                {
                    "weight": label,
                    "mean_svi": a,
                    "mean_mcmc": b,
                    "mean_diff": a - b,
                    "sd_svi": c,
                    "sd_mcmc": d,
                    "sd_diff": c - d,
                    "z": (a - b) / d if d > 0 else math.nan,
                }
            )
    return pd.DataFrame(rows).set_index("weight")


def forest_plot(
    post,
    mcmc,
    task: int = 0,
    var_names: Sequence[str] | None = None,
    num_draws: int = 100,
    generator: torch.Generator | None = None,
    **kwargs,
):
    """``az.plot_forest`` of one task's weights under SVI and NUTS, side by side.

    ``var_names`` defaults to the network's head (a forest of every weight is unreadable).
    Extra keyword arguments go to ``az.plot_forest``. Returns its array of Axes.
    """
    import arviz as az

    pyplot()
    model = post.model
    names = list(var_names) if var_names is not None else head_parameter_names(model.net)
    svi = to_inference_data(post, num_draws=num_draws, var_names=names, generator=generator)
    ref = from_mcmc(mcmc, model, var_names=names)
    rows = sum(math.prod(model.shapes()[n]) for n in names)
    kwargs.setdefault("figsize", (6, 1.2 + 0.28 * rows))
    kwargs.setdefault("combined", True)
    kwargs.setdefault("hdi_prob", 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ArviZ 0.23 on matplotlib 3.11
        axes = az.plot_forest(
            [svi, ref],
            model_names=["SVI", "NUTS"],
            var_names=names,
            coords={"task": [task]},
            **kwargs,
        )
    axes[0].set_title(f"task {task}: SVI vs NUTS, 90% intervals")
    axes[0].set_xlabel("weight value")
    return axes


def compare_learners(
    learners: Mapping[str, object],
    tasks,
    num_tasks: int = 20,
    num_draws: int = 100,
    seed: int = 0,
    chains: int = 4,
):
    """Rank meta-learners by ``az.compare`` (PSIS-LOO) on the query points of the same tasks.

    Every learner adapts to the same ``num_tasks`` tasks (one batch drawn with ``seed``) and is
    scored on their query points. Draws of a variational posterior are independent, so the
    relative efficiency is 1 (``reff=1``); a point estimate (MAML and friends) has ``p_loo = 0``.
    Query points were not in the posterior, so PSIS-LOO's estimate is conservative (see
    :func:`to_inference_data`); the exact held-out score is in the added column
    ``elpd_heldout`` (``Σ log (1/P) Σ_p p(y | w_p)`` over query points).

    Parameters
    ----------
    learners : name → MetaLearner (same kind of task)
    tasks : TaskDistribution
    num_tasks, num_draws, chains : tasks scored; posterior draws per chain, and chains

    Returns
    -------
    pandas.DataFrame of ``az.compare``, best first, plus ``elpd_heldout``.
    """
    import arviz as az

    if not learners:
        raise ValueError("learners must name at least one MetaLearner, got none")
    batch = tasks.sample(num_tasks, generator=torch.Generator().manual_seed(seed))
    loos, heldout = {}, {}
    for name, learner in learners.items():
        generator = torch.Generator().manual_seed(seed + 1)
        post = learner.adapt(batch.support_x, batch.support_y, generator=generator)
        smallest = min(learner.model.names, key=lambda n: math.prod(learner.model.shapes()[n]))
        idata = to_inference_data(
            post, batch.query_x, batch.query_y, num_draws, [smallest], generator, chains=chains
        )
        ll = torch.from_numpy(idata.log_likelihood["obs"].values).flatten(0, 1)
        heldout[name] = (torch.logsumexp(ll, 0) - math.log(ll.shape[0])).sum().item()
        with warnings.catch_warnings():
            # A point estimate's Pareto k is infinite; its LOO is then its log-likelihood.
            warnings.simplefilter("ignore", UserWarning)
            loos[name] = az.loo(idata, pointwise=True, reff=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Pareto k warnings again, and pandas deprecations
        table = az.compare(loos, ic="loo")
    table["elpd_heldout"] = [heldout[n] for n in table.index]
    return table
