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


def _heldout_elpd(lppd_i: torch.Tensor, num_draws: int):
    """An ``az.ELPDData`` (in LOO's slots) of exact held-out pointwise scores ``[T, Q]``.

    No importance sampling is involved, so Pareto k is 0 and ``p_loo`` is undefined (NaN);
    ``az.compare`` then ranks, weighs and differences learners by held-out elpd.
    """
    import arviz as az
    import xarray as xr

    values = lppd_i.double().cpu().numpy()
    n = values.size
    pointwise = xr.DataArray(values, dims=("task", "query"), name="loo_i")
    data = [
        values.sum(),
        math.sqrt(n * values.var()),
        math.nan,
        num_draws,
        n,
        False,
        pointwise,
        xr.zeros_like(pointwise).rename("pareto_k"),
        "log",
        0.7,
    ]
    index = [
        "elpd_loo",
        "se",
        "p_loo",
        "n_samples",
        "n_data_points",
        "warning",
        "loo_i",
        "pareto_k",
        "scale",
        "good_k",
    ]
    return az.ELPDData(data=data, index=index)


def compare_learners(
    learners: Mapping[str, object],
    tasks,
    num_tasks: int = 20,
    num_draws: int = 100,
    seed: int = 0,
    chains: int = 4,
    score: str = "heldout",
):
    """Rank meta-learners with ``az.compare`` on the same tasks.

    Every learner adapts to the same ``num_tasks`` tasks (one batch drawn with ``seed``).

    ``score="heldout"`` (default) ranks by the exact held-out log predictive density of the
    query points, ``Σ_q log (1/D) Σ_d p(y_q | w_d)`` over ``D = chains · num_draws`` posterior
    draws: what LOO estimates, here computed directly, as the query points are new data.
    ``score="loo"`` ranks by PSIS-LOO of the support points, the data each task posterior was
    fit to (draws are independent: ``reff=1``). Beware: a point estimate (MAML and friends) has
    ``p_loo = 0`` and a LOO equal to its in-sample fit, and for a wide posterior whose single
    draws fit badly PSIS fails (Pareto k > 0.7, see ``pareto_k_bad``) and is far too low. Both
    scores are in the table either way.

    Parameters
    ----------
    learners : name → MetaLearner (same kind of task)
    tasks : TaskDistribution
    num_tasks, num_draws, chains : tasks scored; posterior draws per chain, and chains
    score : ``"heldout"`` or ``"loo"``, what ``az.compare`` ranks by

    Returns
    -------
    pandas.DataFrame of ``az.compare`` (``rank``, ``weight``, ``dse``, …), best first, with
    ``elpd_heldout``, ``elpd_loo_support``, ``p_loo_support`` and ``pareto_k_bad`` (the
    fraction of support points with Pareto k > 0.7). With ``score="heldout"`` the ranked
    column is ``elpd_heldout`` and ``se``/``dse`` refer to it.
    """
    import arviz as az

    if score not in ("heldout", "loo"):
        raise ValueError(f"score must be 'heldout' or 'loo', got {score!r}")
    if not learners:
        raise ValueError("learners must name at least one MetaLearner, got none")
    batch = tasks.sample(num_tasks, generator=torch.Generator().manual_seed(seed))
    ranked, extra = {}, {}
    for name, learner in learners.items():
        generator = torch.Generator().manual_seed(seed + 1)
        post = learner.adapt(batch.support_x, batch.support_y, generator=generator)
        smallest = min(learner.model.names, key=lambda n: math.prod(learner.model.shapes()[n]))
        args = (num_draws, [smallest], generator)
        fit = to_inference_data(post, (batch.support_x, batch.support_y), *args, chains=chains)
        test = to_inference_data(post, (batch.query_x, batch.query_y), *args, chains=chains)
        ll = torch.from_numpy(test.log_likelihood["obs"].values).flatten(0, 1)
        lppd_i = torch.logsumexp(ll, 0) - math.log(ll.shape[0])
        with warnings.catch_warnings():
            # A point estimate's Pareto k is infinite; its LOO is then its log-likelihood.
            warnings.simplefilter("ignore", UserWarning)
            loo = az.loo(fit, pointwise=True, reff=1.0)
        ranked[name] = _heldout_elpd(lppd_i, ll.shape[0]) if score == "heldout" else loo
        extra[name] = {
            "elpd_heldout": lppd_i.sum().item(),
            "elpd_loo_support": float(loo.elpd_loo),
            "p_loo_support": float(loo.p_loo),
            "pareto_k_bad": float((loo.pareto_k.values > 0.7).mean()),
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Pareto k warnings again, and pandas deprecations
        table = az.compare(ranked, ic="loo")
    if score == "heldout":
        table = table.drop(columns=["elpd_loo", "p_loo", "warning"])
    for column in next(iter(extra.values())):
        table[column] = [extra[n][column] for n in table.index]
    return table
