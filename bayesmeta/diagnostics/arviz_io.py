"""ArviZ ``InferenceData`` from task posteriors (variational) and from NUTS reference runs.

Every array carries named dims: ``chain``, ``draw``, ``task``, then ``query`` for pointwise
quantities, ``class`` (classification) or ``output`` (regression), and ``{site}_dim_{i}`` for the
axes of a weight (ArviZ's own default names, made explicit). Coordinates are integer indices.

Groups
------
``posterior``
    Draws of the task weights ``w_t`` (all sample sites, or ``var_names``).
``posterior_predictive``
    ``obs``: one draw of ``y`` per posterior draw; plus the per-draw predictive parameters,
    ``probs`` (class probabilities) or ``f`` (network outputs, the regression mean).
``observed_data``, ``log_likelihood``
    ``obs`` at the query points; ``log p(y_q | w)`` per draw and per query point, so that
    ``az.loo`` / ``az.waic`` work unchanged.
``constant_data``
    ``x``, the query inputs, when they are vectors (``[T, Q, D_in]``).
``sample_stats``
    MCMC only: ``diverging``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bayesmeta.inference.mcmc import mcmc_weights
from bayesmeta.models import HierarchicalBNN
from bayesmeta.nets import batched_forward

__all__ = ["to_inference_data", "from_mcmc", "MAX_POSTERIOR_SIZE"]

#: Largest number of numbers the ``posterior`` group may hold unless ``max_size`` says otherwise.
MAX_POSTERIOR_SIZE = 1_000_000

_CHUNK = 64  # posterior draws pushed through the network at once


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _select(model: HierarchicalBNN, var_names: Sequence[str] | None) -> list[str]:
    if var_names is None:
        return list(model.names)
    if isinstance(var_names, str):
        var_names = [var_names]
    unknown = [n for n in var_names if n not in model.names]
    if unknown or not var_names:
        raise ValueError(
            f"var_names must be a non-empty list of the model's sample sites {model.names}, "
            f"got {list(var_names)}"
        )
    return list(var_names)


def _check_size(model: HierarchicalBNN, names: list[str], draws: int, tasks: int, cap: int):
    per_draw = sum(math.prod(model.shapes()[n]) for n in names)
    size = draws * tasks * per_draw
    if size > cap:
        head = [n for n in model.names if n.startswith("head")] or model.names[-1:]
        raise ValueError(
            f"the posterior group would hold {size:,} numbers ({draws} draws x {tasks} tasks x "
            f"{per_draw:,} weights), more than max_size={cap:,}; pass var_names (e.g. {head}), "
            "fewer draws or fewer tasks, or raise max_size"
        )


def _points(points) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``points`` (``None``, inputs ``x``, or ``(x, y)``) as ``(x, y)``."""
    if points is None or isinstance(points, torch.Tensor):
        return points, None
    if isinstance(points, (tuple, list)) and len(points) == 2 and points[0] is not None:
        return points[0], points[1]
    size = f" of {len(points)}" if isinstance(points, (tuple, list)) else ""
    raise ValueError(
        f"points must be inputs x [T, Q, ...], a pair (x, y) or None, got "
        f"{type(points).__name__}{size}"
    )


def _check_query(
    model: HierarchicalBNN, T: int, query_x: torch.Tensor | None, query_y: torch.Tensor | None
) -> None:
    if query_x is None:
        return
    if not isinstance(query_x, torch.Tensor) or query_x.dim() < 2 or query_x.shape[0] != T:
        shape = tuple(query_x.shape) if isinstance(query_x, torch.Tensor) else type(query_x)
        raise ValueError(f"points' x must be a Tensor [T={T}, Q, ...], got {shape}")
    if query_y is not None:
        if not isinstance(query_y, torch.Tensor) or query_y.shape[:2] != query_x.shape[:2]:
            shape = tuple(query_y.shape) if isinstance(query_y, torch.Tensor) else type(query_y)
            raise ValueError(
                f"points' y must be a Tensor [T, Q, ...] = {tuple(query_x.shape[:2])} + ..., "
                f"got {shape}"
            )
        out = model.out_features(query_x.to(next(model.parameters()).device))
        model.likelihood.check_targets(query_y, out, "points' y")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _predictive_groups(
    model: HierarchicalBNN,
    f: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor | None,
    shape: tuple[int, int],
    generator: torch.Generator | None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[str]], dict[str, Any]]:
    """Groups built from network outputs ``f [C·D, T, Q, O]`` (``shape = (C, D)``)."""
    lik = model.likelihood
    Q = f.shape[2]
    lead = lambda t: _numpy(t).reshape(*shape, *t.shape[1:])  # noqa: E731
    coords: dict[str, Any] = {"query": np.arange(Q)}
    draws, axes, sizes = lik.predictive.posterior_predictive(lik, f, generator)
    groups = {"posterior_predictive": {name: lead(v) for name, v in draws.items()}}
    dims = {name: ["task", "query", *names] for name, names in axes.items()}
    coords.update({name: np.arange(size) for name, size in sizes.items()})
    if query_y is not None:
        y = query_y.to(f.device)
        loglik = lik.log_prob(f.double(), y if not y.is_floating_point() else y.double())
        groups["log_likelihood"] = {"obs": lead(loglik)}
        groups["observed_data"] = {"obs": _numpy(query_y)}
    if query_x.dim() == 3:
        groups["constant_data"] = {"x": _numpy(query_x)}
        dims["x"] = ["task", "query", "input"]
        coords["input"] = np.arange(query_x.shape[-1])
    return groups, dims, coords


def _build(
    posterior: dict[str, np.ndarray],
    groups: dict[str, dict[str, np.ndarray]],
    dims: dict[str, list[str]],
    coords: dict[str, Any],
    T: int,
    attrs: dict[str, Any],
):
    import arviz as az

    for name, value in posterior.items():
        dims[name] = ["task"] + [f"{name}_dim_{i}" for i in range(value.ndim - 3)]
    coords = {"task": np.arange(T), **coords}
    return az.from_dict(posterior=posterior, **groups, coords=coords, dims=dims, attrs=attrs)


def to_inference_data(
    post,
    points: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | None = None,
    num_draws: int = 100,
    var_names: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    *,
    chains: int = 4,
    max_size: int = MAX_POSTERIOR_SIZE,
    progress: Callable[[int, int], None] | None = None,
):
    """Draws of adapted task posteriors as an ``arviz.InferenceData``.

    Parameters
    ----------
    post : TaskPosterior
        From ``MetaLearner.adapt``, ``T`` tasks.
    points : ``x`` or ``(x, y)``, optional
        Inputs ``x`` ``[T, Q, ...]`` of the predictive groups (without them only ``posterior``
        is made), and targets ``y`` ``[T, Q]`` (labels) or ``[T, Q, D]`` for
        ``observed_data`` and ``log_likelihood``.
    num_draws : draws per chain.
    var_names : sample sites kept in ``posterior`` (default: all); the predictive always uses
        every weight.
    generator : source of the posterior and predictive draws.
    chains : the ``chains · num_draws`` independent draws are split into this many
        pseudo-chains, so that R-hat and ESS can be computed; for draws that are independent
        by construction they should read ≈ 1 and ≈ ``chains · num_draws`` (a check of the
        plumbing, not of convergence). A point-estimate (Delta) posterior repeats its one draw;
        a particle posterior (``bmaml``) is its ``M`` particles, as one chain of ``M`` draws
        (``num_draws`` and ``chains`` do not apply).
    max_size : refuse (``ValueError``) a ``posterior`` group of more numbers than this.
    progress : called as ``progress(done, total)`` after each chunk of draws (with a network's
        forward on every query, a few hundred draws of a Conv4 take minutes on a CPU).

    Notes
    -----
    ``az.loo`` / ``az.waic`` score the points passed here. Pass the support set for the
    textbook leave-one-out of the data each task posterior was fit to. Held-out query points
    were never in the posterior: PSIS then estimates ``−log E_q[1/p(y|w)]``, a lower bound on
    the held-out log predictive ``log E_q[p(y|w)]`` (:meth:`Prediction.log_prob`) that is
    usually far below it, with Pareto k flagging it; score held-out points with the latter.
    """
    model = post.model
    T = post.num_tasks
    query_x, query_y = _points(points)
    _positive_int("num_draws", num_draws)
    _positive_int("chains", chains)
    fixed = getattr(post.guide, "num_particles", None)  # a set of particles, not a density
    if fixed is not None:
        chains, num_draws = 1, fixed
    names = _select(model, var_names)
    _check_size(model, names, chains * num_draws, T, max_size)
    _check_query(model, T, query_x, query_y)
    device = next(model.parameters()).device
    total = chains * num_draws
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    outputs: list[torch.Tensor] = []
    done = 0
    with torch.no_grad():
        while done < total:
            w = post.sample_weights(min(_CHUNK, total - done), generator)
            n = next(iter(w.values())).shape[0]
            if n == 1 and total - done > 1:  # a point estimate: every draw is the same
                w = {k: v.expand(total - done, *v.shape[1:]) for k, v in w.items()}
                n = total - done
            for name in names:
                kept[name].append(w[name].cpu())
            if query_x is not None:
                outputs.append(
                    batched_forward(model.net, w, query_x.to(device), context=post.context)
                )
            done += n
            if progress is not None:
                progress(done, total)
    shape = (chains, num_draws)
    posterior = {n: _numpy(torch.cat(v)).reshape(*shape, *v[0].shape[1:]) for n, v in kept.items()}
    groups, dims, coords = {}, {}, {}
    if query_x is not None:
        f = torch.cat(outputs)
        groups, dims, coords = _predictive_groups(model, f, query_x, query_y, shape, generator)
    attrs = {
        "inference_library": "bayesmeta",
        "posterior": f"{type(post.guide).__name__} task posteriors, independent draws "
        f"split into {chains} pseudo-chains",
    }
    return _build(posterior, groups, dims, coords, T, attrs)


def from_mcmc(
    mcmc,
    model: HierarchicalBNN,
    points: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | None = None,
    var_names: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    *,
    max_size: int = MAX_POSTERIOR_SIZE,
):
    """A NUTS reference run (:func:`bayesmeta.inference.mcmc.nuts_reference`) as InferenceData.

    Same groups, dims and coords as :func:`to_inference_data`, with real chains, plus
    ``sample_stats.diverging`` ``[chain, draw]``, so ``az.rhat`` / ``az.ess`` / ``az.summary``
    diagnose the sampler.

    Parameters
    ----------
    mcmc : pyro.infer.MCMC, finished, run on ``model.model``
    model : HierarchicalBNN, the one the chains sampled (θ as during the run)
    points, var_names, generator, max_size : as in :func:`to_inference_data`
    """
    if not hasattr(mcmc, "get_samples"):
        raise TypeError(f"mcmc must be a finished pyro.infer.MCMC, got {type(mcmc).__name__}")
    weights = mcmc_weights(mcmc, group_by_chain=True)  # name -> [C, N, T, *shape]
    missing = [n for n in model.names if n not in weights]
    if missing:
        raise ValueError(f"mcmc has no draws of the model's sites {missing}; was it run on it?")
    names = _select(model, var_names)
    query_x, query_y = _points(points)
    C, N, T = next(iter(weights.values())).shape[:3]
    _check_size(model, names, C * N, T, max_size)
    _check_query(model, T, query_x, query_y)
    posterior = {n: _numpy(weights[n]) for n in names}
    groups, dims, coords = {}, {}, {}
    if query_x is not None:
        device = next(model.parameters()).device
        flat = {k: v.reshape(C * N, *v.shape[2:]).to(device) for k, v in weights.items()}
        with torch.no_grad():
            f = torch.cat(
                [
                    batched_forward(
                        model.net,
                        {k: v[i : i + _CHUNK] for k, v in flat.items()},
                        query_x.to(device),
                    )
                    for i in range(0, C * N, _CHUNK)
                ]
            )
        groups, dims, coords = _predictive_groups(model, f, query_x, query_y, (C, N), generator)
    diverging = np.zeros((C, N), dtype=bool)
    divergences = mcmc.diagnostics().get("divergences", {})
    for c in range(C):
        index = np.asarray(divergences.get(f"chain {c}", []), dtype=int)
        diverging[c, index[index < N]] = True
    groups["sample_stats"] = {"diverging": diverging}
    attrs = {"inference_library": "bayesmeta", "posterior": "NUTS (pyro.infer.MCMC)"}
    return _build(posterior, groups, dims, coords, T, attrs)
