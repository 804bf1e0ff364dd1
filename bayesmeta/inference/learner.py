"""``MetaLearner``, the algorithm: adapt to tasks (differentiably or not) and take meta-steps.

Its training loop is :func:`bayesmeta.inference.training.fit` and its file format
:mod:`bayesmeta.inference.serialization`; ``fit``, ``config``, ``save`` and ``load`` are thin
methods that call them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayesmeta.data import TaskBatch, TaskDistribution
from bayesmeta.inference import posterior
from bayesmeta.inference._checks import (
    check_device,
    check_inputs,
    check_int,
    check_memory,
    check_nonnegative_float,
    check_positive_float,
    check_targets,
)
from bayesmeta.inference.distributed import (
    all_reduce_sum,
    any_rank,
    broadcast_,
    chunk_generator,
    gather_objects,
    shard,
    world,
)
from bayesmeta.inference.inner import ELBO_BACKENDS, StepSizes
from bayesmeta.inference.methods import (
    METHODS,
    adapted_names,
    check_method,
    default_inner_lr,
    resolve_head_init,
    resolve_method,
)
from bayesmeta.inference.outer import (
    InnerConfig,
    adapt_state,
    initial_state,
    meta_objective,
)
from bayesmeta.inference.posterior import TaskPosterior
from bayesmeta.models import GUIDES, Guide, HierarchicalBNN, guide_name
from bayesmeta.nets import (
    intra_op_threads,
    keep_freed_memory,
    preferred_task_chunk,
    takes_context,
    threads_for,
)
from bayesmeta.nets.memory import activation_bytes

__all__ = ["MetaLearner", "NonFiniteLossError"]


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


class _FiniteWatch:
    """A user's ``inner_loss`` that also notes which of the ``T`` tasks it gave a non-finite
    value: one ``isfinite`` on its ``[P, T]`` or ``[T]`` output per inner step, read once
    after the adaptation (:meth:`check`). An output of another shape is left to the inner
    loop's own error."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], T: int):
        self.loss, self.num_tasks, self.bad = loss, T, None

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = self.loss(outputs, y)
        if isinstance(value, torch.Tensor) and value.dim() in (1, 2):
            if value.shape[-1] == self.num_tasks:
                bad = ~torch.isfinite(value.detach()).reshape(-1, self.num_tasks).all(0)
                self.bad = bad if self.bad is None else self.bad | bad
        return value

    def check(self) -> None:
        """``ValueError`` naming the tasks whose inner loss was not finite at some step."""
        if self.bad is None or not bool(self.bad.any()):
            return
        tasks = self.bad.nonzero().flatten().tolist()
        raise ValueError(
            f"inner_loss {_name(self.loss)!r} was not finite (NaN or inf) for tasks {tasks} of "
            f"{self.num_tasks} while adapting to their support sets, so their posteriors and "
            "predictions would be NaN; make inner_loss(outputs, y) finite there (e.g. a log "
            "of 0 or a division by 0 in it)"
        )


class NonFiniteLossError(FloatingPointError):
    """A meta-step produced a non-finite loss or gradient; θ and the optimizer were untouched."""


def _check_network(net: nn.Module, transductive: bool) -> None:
    """Refuse, at construction, a network whose normalisation would break the inner loop or
    make a query's prediction depend on the other queries."""
    for name, module in net.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.track_running_stats:
            raise ValueError(
                f"net.{name} is a {type(module).__name__} with running statistics, which are one "
                "set for the network while a meta-step adapts many tasks at once; build it with "
                "track_running_stats=False and give the network's forward a 'context' argument "
                "(the support inputs) to normalise with, as bayesmeta.nets.Conv4 does, or use "
                "nn.GroupNorm / nn.LayerNorm"
            )
        if not transductive and not takes_context(net):
            raise ValueError(
                f"net.{name} normalises every batch with its own statistics, so a query's "
                "prediction would depend on the other queries in its batch; give the network's "
                "forward a 'context' argument (the support inputs) and normalise with its "
                "statistics, as bayesmeta.nets.Conv4 does, or pass transductive=True to compare "
                "with papers that do this"
            )


def _own_guide(guide: object) -> Guide | type[Guide] | None:
    """A guide the user built or named by class (``None`` for a name or no choice)."""
    if guide is None or isinstance(guide, str):
        return None
    if (isinstance(guide, type) and issubclass(guide, Guide)) or isinstance(guide, Guide):
        return guide
    raise TypeError(
        f"guide must be a name of {sorted([*GUIDES, 'auto'])}, a Guide subclass or a Guide "
        f"instance, got {guide!r}"
    )


def _build_guide(guide: Guide | type[Guide], particles: int | None) -> tuple[Guide, int | None]:
    """The guide to use, and the particles setting it implies: a class is built by
    :meth:`Guide.build`; a guide with draws of its own (:attr:`Guide.own_particles`, e.g.
    particles) sets ``particles``, and refuses another number."""
    if isinstance(guide, type):
        if particles is not None:
            check_int("particles", particles)
        guide = guide.build(particles)
    own = guide.own_particles
    if own is None:
        return guide, particles
    if particles is not None and particles != own:
        raise ValueError(
            f"particles={particles} disagrees with the guide's {own} particles; leave "
            "particles out, or build the guide with them"
        )
    return guide, own


def _saved_guide_name(guide: Guide) -> str:
    """The name a learner saves for a user's guide: its registered name when that rebuilds it
    (:meth:`Guide.saved_name` says when it does not), else its class name, which a load asks
    to be given again."""
    return guide.saved_name() or guide_name(type(guide))


def _auto_guide(model: HierarchicalBNN, adapt: str | tuple[str, ...]) -> str:
    """The first of :data:`_AUTO_GUIDES` that can fit ``model``'s adapted weights, else
    ``"normal"``."""
    names = adapted_names(adapt, model.net) or model.names
    for name in _AUTO_GUIDES:
        try:
            GUIDES[name].check(model, names)
        except ValueError:
            continue
        return name
    return "normal"


#: What ``guide="auto"`` tries, in order: a classifier's Laplace head centred on its class
#: prototypes, then the Gaussian head of any linear head.
_AUTO_GUIDES = ("prototype-laplace", "gaussian-head")


class MetaLearner:
    """A meta-learner: one of the methods of :mod:`bayesmeta.inference.methods` on a model.

    Parameters
    ----------
    model : HierarchicalBNN
    method : a name of :data:`~bayesmeta.inference.METHODS` (default ``"bayes"``); the table
        of :mod:`bayesmeta.inference.methods` says what each one is
    inner_steps : K, SVI steps of the inner loop (0 predicts from the prior)
    inner_lr : inner step size (Meta-SGD: the initial per-weight step size). A plain step is
        measured in the likelihood's and the prior's curvature
        (:func:`~bayesmeta.inference.inner.plain_step_size`: under a flat prior and a Normal
        likelihood, a step on half the mean squared error at any noise level). Default
        :data:`~bayesmeta.inference.methods.DEFAULT_INNER_LR`: 0.03 for plain and natural
        steps, 1.0 (full Newton steps, capped there) for a guide that fits itself
    particles : P, posterior draws per inner step (default 4 for a Normal guide, 1 for Delta)
    meta_lr : outer step size (default 1e-3 with Adam; Reptile's ε, default 0.5, with SGD)
    optimizer : ``"adam"`` or ``"sgd"`` (default: SGD for Reptile, Adam otherwise)
    kl_weight : β, weight of ``KL(q_t ‖ p(w|θ))/Q`` in the meta-objective (1: the ELBO)
    hyperprior_weight : weight of ``−log p(θ)`` in the meta-objective (with a hyperprior)
    eval_particles : draws used by predictions (default 16 for a Normal guide, 1 for Delta)
    test_inner_steps : inner steps when adapting at test time (default ``inner_steps``)
    elbo : ``"analytic"`` (fast, default) or ``"pyro"`` (Pyro's ``TraceMeanField_ELBO``)
    guide, first_order, adapt, natural, flat_prior : override the method's choices
        (``guide``: a name of :data:`~bayesmeta.inference.GUIDES` or ``"auto"``, or a
        :class:`~bayesmeta.models.Guide` subclass or instance of your own, saved by its
        registered name, see :func:`~bayesmeta.inference.register_guide`; ``adapt="all"``,
        ``"head"`` or a list of weight names, e.g. a head that is not the net's last layer;
        ``natural``: natural-gradient inner steps, see :func:`bayesmeta.inference.inner_loop`;
        an override that makes the method another one is refused: a DeltaGuide under
        ``bayes-head``, ``adapt="all"`` under a head-only method)
    head_init : ``"prototypes"``: each task's head starts at its support set's class
        prototypes in the body's features (Proto-MAML's head; classifiers with a linear
        head), and under a prior (``bayes``, ``map``) the head's prior is centred there too,
        so that a posterior that starts at the prior starts at the prototype classifier;
        ``"auto"``: prototypes for a classifier with a linear head, else ``"theta"``; ``"theta"``:
        θ's head. Default: the method's (``"prototypes"`` for ``protomaml``, ``"auto"`` for
        ``bayes`` and ``map``, else ``"theta"``)
    device : where θ lives and tasks are moved to (default: the model's device); one this
        machine cannot allocate on (``cuda`` without a GPU, ``cuda:7`` on a one-GPU machine)
        is refused up front
    task_chunk : tasks per backward pass of a meta-step (``None``: the whole meta-batch at
        once; ``"auto"``: :func:`bayesmeta.nets.preferred_task_chunk` for the net and device,
        and at most what fits :data:`bayesmeta.nets.memory.TASK_MEMORY_BUDGET_MB` of
        activations, see :meth:`chunk_size`). The meta-gradient is the same; smaller chunks
        keep less of the graph alive. Off CUDA, ``"auto"`` also asks glibc's allocator to keep
        freed memory for reuse, process-wide (:func:`bayesmeta.nets.keep_freed_memory`), so
        that a Conv4 backpropagates one task at a time at no loss of speed; an int or ``None``
        leaves the allocator alone.
    inner_loss : ``inner_loss(outputs, y)``, the inner loop's objective in place of the support
        set's negative log likelihood: network outputs ``[P, T, S, O]`` and the support
        targets as given to each task's loss ``[P, T]`` or ``[T]`` (e.g. a policy-gradient
        loss, with actions and advantages in ``y``); see :func:`bayesmeta.inference.inner_loop`.
        Not saved: pass it again to :meth:`load`
    threads : intra-op threads of its meta-steps, adaptations and predictions: ``"auto"`` (the
        default) runs work whose activations are small (the sinusoid MLP's) on one thread and
        the rest on torch's setting (:func:`bayesmeta.nets.threads_for`); an int always uses
        that many; ``None`` leaves torch's setting alone. Restored after each call.
    transductive : normalise query batches with their own statistics, in meta-training and in
        predictions, instead of with the support set's (the default, ``False``: a query's
        prediction is then the same alone as in any batch). For comparison with papers that
        use transductive batch normalisation; it changes nothing for a network without one.
    """

    def __init__(
        self,
        model: HierarchicalBNN,
        method: str = "bayes",
        inner_steps: int = 5,
        inner_lr: float | None = None,
        particles: int | None = None,
        *,
        meta_lr: float | None = None,
        optimizer: str | None = None,
        kl_weight: float = 1.0,
        hyperprior_weight: float = 1e-3,
        eval_particles: int | None = None,
        test_inner_steps: int | None = None,
        elbo: str = "analytic",
        guide: str | Guide | type[Guide] | None = None,
        first_order: bool | None = None,
        adapt: str | None = None,
        device: str | torch.device | None = None,
        task_chunk: int | str | None = "auto",
        transductive: bool = False,
        natural: bool | None = None,
        flat_prior: bool | None = None,
        head_init: str | None = None,
        inner_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        threads: int | str | None = "auto",
    ):
        if not isinstance(model, HierarchicalBNN):
            raise TypeError(f"model must be a HierarchicalBNN, got {type(model).__name__}")
        own_guide = _own_guide(guide)  # a Guide instance or class of the user's, or None
        self.method = resolve_method(
            method,
            guide=guide if own_guide is None else None,
            first_order=first_order,
            adapt=adapt,
            natural=natural,
            flat_prior=flat_prior,
            head_init=head_init,
        )
        self.method = resolve_head_init(self.method, model)
        if own_guide is None and self.method.guide == "auto":
            self.method = replace(self.method, guide=_auto_guide(model, self.method.adapt))
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be a non-negative int, got {inner_steps!r}")
        if test_inner_steps is not None and (
            not isinstance(test_inner_steps, int) or test_inner_steps < 0
        ):
            raise ValueError(
                f"test_inner_steps must be a non-negative int, got {test_inner_steps!r}"
            )
        if elbo not in ELBO_BACKENDS:
            raise ValueError(f"elbo must be one of {ELBO_BACKENDS}, got {elbo!r}")
        self.guide, particles = _build_guide(own_guide or GUIDES[self.method.guide], particles)
        if METHODS[self.method.name].guide == "auto" and self.guide.point_estimate:
            raise ValueError(
                f"guide={_saved_guide_name(self.guide)!r} contradicts method "
                f"{self.method.name!r}: the method fits a Bayesian posterior over the head (its "
                "guide is 'auto'), and this guide is a point estimate; for a point-estimate "
                "head use method='anil', or pass a Bayesian guide"
            )
        if own_guide is not None:
            self.method = replace(self.method, guide=_saved_guide_name(self.guide))
        if inner_lr is None:
            inner_lr = default_inner_lr(self.method, self.guide)
        check_positive_float("inner_lr", inner_lr)
        if self.guide.needs_prior and model.flat:
            raise ValueError(
                f"method {self.method.name!r} uses a guide that starts at the prior (or draws "
                "from it); the model's prior is flat (prior_scale=None). Give the model a "
                "prior_scale"
            )
        adapt_names = adapted_names(self.method.adapt, model.net)
        check_method(self.method, model)
        self.guide.check(model, adapt_names or model.names)
        if self.method.outer.points_only and not self.guide.point_estimate:
            raise ValueError(
                f"{self.method.name} moves point estimates: the guide must be a point estimate "
                f"(a DeltaGuide), got {type(self.guide).__name__}"
            )
        # Point guides draw one value; an exact Gaussian predictive needs no draws at all.
        closed = self.guide.closed_form_predictive(model)
        default_p = 1 if self.guide.max_particles == 1 or closed else 4
        particles = default_p if particles is None else check_int("particles", particles)
        if self.guide.max_particles is not None and particles > self.guide.max_particles:
            raise ValueError(
                f"particles must be at most {self.guide.max_particles} with a "
                f"{type(self.guide).__name__} (its draws are all it has), got {particles}"
            )
        eval_p = eval_particles if eval_particles is not None else (16 if default_p > 1 else 1)
        check_int("eval_particles", eval_p)
        if self.guide.own_particles is not None:
            eval_p = particles  # predictions average the guide's draws, however many are asked
        optimizer = optimizer or self.method.outer.optimizer
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if meta_lr is None:
            meta_lr = self.method.outer.meta_lr
        check_positive_float("meta_lr", meta_lr)
        check_nonnegative_float("kl_weight", kl_weight)
        check_nonnegative_float("hyperprior_weight", hyperprior_weight)
        if not isinstance(transductive, bool):
            raise ValueError(f"transductive must be a bool, got {transductive!r}")
        _check_network(model.net, transductive)
        if threads not in ("auto", None):
            check_int("threads", threads, alternatives=", 'auto' or None")
        self.threads = threads
        if inner_loss is not None and not callable(inner_loss):
            raise TypeError(f"inner_loss must be callable(outputs, y), got {type(inner_loss)}")

        self.device = (
            check_device("device", device)
            if device is not None
            else model.prior_loc()[model.names[0]].device
        )
        self.model = model.to(self.device)
        self.model.add_guide_params(self.guide.hyperparameters(self.model))
        # "auto" is re-decided per meta-batch too, against the memory budget (chunk_size).
        self._auto_chunk = task_chunk == "auto"
        if task_chunk == "auto":
            if self.device.type != "cuda":  # (then one task per pass is as fast as any chunk)
                keep_freed_memory()
            task_chunk = preferred_task_chunk(model.net, self.device)
        elif task_chunk is not None:
            check_int("task_chunk", task_chunk, alternatives=", 'auto' or None")
        self.task_chunk = task_chunk
        self.inner = InnerConfig(
            steps=inner_steps,
            particles=particles,
            adapt=adapt_names,
            backend=elbo,
            transductive=transductive,
            natural=self.method.natural,
            loss=inner_loss,
            first_order=self.method.first_order,
            flat_prior=self.method.flat_prior,
            head_init=self.method.head_init,
        )
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.eval_particles = eval_p
        self.kl_weight = float(kl_weight)
        self.hyperprior_weight = float(hyperprior_weight)
        self.inner_lr = float(inner_lr)
        self.meta_lr = float(meta_lr)
        self.optimizer_name = optimizer
        # Meta-SGD: one learned step size per adapted weight, inner_lr · exp(ρ) with ρ = 0 at
        # the start. Learned directly, a step size of 0.003 moved by Adam's ~meta_lr = 1e-3 a
        # step grew until the inner loop diverged (sinusoid); in log space it moves by ~0.1%.
        names = list(adapt_names) if adapt_names is not None else model.names
        # (An exact guide takes no steps, so it has no step sizes to learn.)
        learned = self.method.learn_inner_lr and not self.guide.exact
        self.lr_params = nn.ParameterList(
            nn.Parameter(torch.zeros_like(model.prior_loc()[n].detach()))
            for n in (names if learned else [])
        ).to(self.device)
        self._lr_names = names if learned else []
        params = list(self.model.theta()) + list(self.lr_params)
        cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        self.optimizer = cls(params, lr=self.meta_lr)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.skipped_steps = 0
        self._check_step_memory(1)  # (no chunk of tasks can be smaller)

    # configuration -------------------------------------------------------------------
    @property
    def lr(self) -> float | dict[str, torch.Tensor]:
        """The inner step size: a float, or name → per-weight tensor (Meta-SGD)."""
        if self._lr_names:
            pairs = zip(self._lr_names, self.lr_params, strict=True)
            return StepSizes(self.inner_lr, {n: p.exp() for n, p in pairs})
        return self.inner_lr

    def config(self) -> dict[str, Any]:
        """JSON-able description that, with the state, rebuilds this learner
        (:func:`bayesmeta.inference.serialization.config`)."""
        from bayesmeta.inference import serialization

        return serialization.config(self)

    # adaptation ----------------------------------------------------------------------
    def _support(self, support_x: Any, support_y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Support sets checked up front (finite, ``T, S >= 1``, agreeing shapes, and targets
        the likelihood can score unless an ``inner_loss`` reads them instead), as the model's
        dtype on its device: the one check of :meth:`adapt` and :meth:`adapt_differentiable`."""
        dtype = self.model.prior_loc()[self.model.names[0]].dtype
        support_x = check_inputs("support_x", support_x, dtype)
        support_y = check_targets("support_y", support_y, dtype)
        if support_y.dim() < 2 or support_x.shape[:2] != support_y.shape[:2]:
            raise ValueError(
                f"support_x [T, S, ...] and support_y [T, S, ...] must agree on T and S, got "
                f"{tuple(support_x.shape)} and {tuple(support_y.shape)}"
            )
        x, y = support_x.to(self.device), support_y.to(self.device)
        if self.inner.loss is None:
            self.model.likelihood.check_targets(y, self.model.out_features(x), "support_y")
        self._check_step_memory(x.shape[0])
        return x, y

    def _check_step_memory(self, num_tasks: int, points: int = 0) -> None:
        """Refuse an inner step on ``num_tasks`` tasks at once whose posterior draws
        (:meth:`~bayesmeta.models.Guide.step_bytes`), with the activations that one task's
        ``points`` inputs per particle keep for backward (a meta-step's), would take more than
        :data:`~bayesmeta.inference.posterior.MEMORY_LIMIT` bytes, before drawing any."""
        P, limit = self.inner.particles, posterior.MEMORY_LIMIT

        def need(particles: int) -> int:
            draws = self.guide.step_bytes(self.model, num_tasks, particles, self.inner.adapt)
            kept = activation_bytes(self.model.net, particles * points) if points else None
            return draws + (kept or 0)

        if need(P) <= limit:
            return
        lo, hi = 0, P  # the most particles that fit: need(lo) fits, need(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if need(mid) <= limit else (lo, mid)
        tasks = "one task" if num_tasks == 1 else f"{num_tasks} tasks at once"
        adapt = self.inner.adapt
        weights = sum(
            w.numel() for n, w in self.model.prior_loc().items() if adapt is None or n in adapt
        )
        fix = f"use at most {lo} particles" if lo else "use a smaller network"
        if num_tasks > 1:
            fix += ", or fewer tasks per backward pass (task_chunk) or per call"
        check_memory(
            need(P),
            limit,
            f"particles={P}",
            f"for the {type(self.guide).__name__}'s draws in one inner step on {tasks} "
            f"({weights} weights per task, {num_tasks} × {P} × {weights} draws at least)"
            + (f" and one task's activations ({P} × {points} inputs)" if points else ""),
            fix,
        )

    def adapt_differentiable(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> TaskPosterior:
        """Adapt to ``T`` tasks as in meta-training: the posteriors stay differentiable in θ
        (and in Meta-SGD's step sizes), through the method's inner steps (first order where the
        method is). For an outer loop of your own: take ``post.outputs(x)``, build a loss,
        ``loss.backward()``, ``learner.optimizer.step()`` (what learn2learn's
        ``clone()`` / ``adapt(loss)`` do).

        Parameters
        ----------
        support_x : Tensor ``[T, S, ...]``;  support_y : the targets ``[T, S, ...]`` that the
            likelihood (or ``inner_loss``) reads
        """
        x, y = self._support(support_x, support_y)
        state = adapt_state(self.model, self.guide, self.inner, x, y, self.lr, generator)
        context = self.inner.context(x)
        return TaskPosterior(self.model, self.guide, state, self.eval_particles, context)

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> TaskPosterior:
        """Fit the posteriors of ``T`` new tasks from their support sets.

        Parameters
        ----------
        support_x : Tensor ``[T, S, ...]``, floating point and finite, ``T, S >= 1`` (another
            floating dtype than the model's, e.g. float64, is converted to the model's)
        support_y : Tensor ``[T, S]`` (labels) or ``[T, S, D]`` (targets, finite)
        steps : inner steps, an int >= 0 (default ``test_inner_steps``)

        Returns
        -------
        TaskPosterior, cut from θ; ``.predict(query_x)`` gives the predictive.

        Raises
        ------
        ValueError
            If ``inner_loss`` was not finite for some task at some step; names the tasks.
        """
        steps = self.test_inner_steps if steps is None else check_int("steps", steps, minimum=0)
        x, y = self._support(support_x, support_y)
        with self.threads_context(x.shape[0] * (steps + 1) * x.shape[1] * self.inner.particles):
            return self._adapt(x, y, steps, generator)

    def _adapt(self, x, y, steps: int, generator: torch.Generator | None) -> TaskPosterior:
        lr = self.lr
        if isinstance(lr, dict):
            lr = {k: v.detach() for k, v in lr.items()}
        watch = None if self.inner.loss is None else _FiniteWatch(self.inner.loss, x.shape[0])
        inner = self.inner if watch is None else replace(self.inner, loss=watch)
        with torch.enable_grad():
            state = initial_state(self.model, self.guide, inner, x, y, generator)
            state = {f: {n: t.detach() for n, t in v.items()} for f, v in state.items()}
            state = adapt_state(
                self.model,
                self.guide,
                inner,
                x,
                y,
                lr,
                generator,
                steps=steps,
                first_order=True,
                state=state,
            )
        if watch is not None:
            watch.check()
        state = {f: {n: t.detach() for n, t in v.items()} for f, v in state.items()}
        context = self.inner.context(x)
        return TaskPosterior(self.model, self.guide, state, self.eval_particles, context)

    # meta-training -------------------------------------------------------------------
    def chunk_size(self, batch: TaskBatch) -> int:
        """Tasks per backward pass of a meta-step on ``batch``: ``task_chunk``; with ``"auto"``
        also at most what fits the activation-memory budget of
        :func:`bayesmeta.nets.preferred_task_chunk` (the ceiling of the default settings)."""
        T = batch.num_tasks
        if not self._auto_chunk:
            return min(T, self.task_chunk or T)
        S, Q = batch.support_x.shape[1], batch.query_x.shape[1]
        points = self.inner.particles * (Q + (self.inner.steps + 1) * S)
        return min(T, preferred_task_chunk(self.model.net, self.device, points) or T)

    def meta_step(self, batch: TaskBatch, generator: torch.Generator | None = None) -> float:
        """One outer update on a meta-batch; returns the mean meta-loss.

        The tasks backpropagate in chunks of :meth:`chunk_size` (the same meta-gradient, one
        chunk's graph alive at a time). Each chunk draws its randomness from a generator keyed
        by one draw of ``generator`` and the chunk's first task, so chunks that begin at the
        same tasks draw the same numbers whichever process runs them. Inside a
        ``torch.distributed`` process group every rank takes its share of ``batch`` (the same
        whole meta-batch on every rank, :func:`~bayesmeta.inference.distributed.shard`) and the
        ranks sum their gradients: N processes give θ of one process whose chunks begin at the
        same tasks (e.g. ``task_chunk = T / N``), and for methods without random draws (e.g.
        maml, fomaml, metasgd, anil) of one process with any chunks.

        Raises :class:`NonFiniteLossError` (naming the tasks, on every rank) before touching θ
        or the optimizer when the loss or a gradient is not finite.
        """
        S, Q = batch.support_x.shape[1], batch.query_x.shape[1]
        points = self.inner.particles * (Q + (self.inner.steps + 1) * S)
        chunk = self.chunk_size(batch)
        self._check_step_memory(chunk, Q + (self.inner.steps + 1) * S)
        with self.threads_context(chunk * points):
            return self._meta_step(batch, generator, chunk)

    def _divergence_hint(self) -> str:
        """What usually makes an inner loop diverge, with this learner's settings."""
        hint = f"If the inner loop diverged, a smaller inner_lr (now {self.inner_lr:g}) helps"
        if self.guide.max_particles is None and not self.guide.exact and self.inner.particles == 1:
            # One draw's scale gradient is noisy; natural steps on the means then overshoot
            # (docs/performance.md, "Guides' arithmetic").
            hint += ", as do more posterior draws per step (now particles=1)"
        return hint + "."

    def threads_context(self, points: int):
        """A context that runs its block on the intra-op threads that ``threads`` chooses for
        work on ``points`` network inputs whose graph is kept."""
        return intra_op_threads(threads_for(self.model.net, points, self.threads))

    def _meta_step(self, batch: TaskBatch, generator: torch.Generator | None, chunk: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        rank, size = world()
        T = batch.num_tasks
        if T < size:
            raise ValueError(
                f"the meta-batch has {T} tasks for {size} processes; give every process at "
                f"least one task (meta_batch >= {size})"
            )
        lo, hi = shard(T, rank, size)
        chunk = min(chunk, hi - lo)
        key, device = _step_key(generator), generator.device if generator is not None else "cpu"
        losses, bad, direction = [], [], {}
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            part = batch if stop - start == T else batch[start:stop]
            loss_t, state = meta_objective(
                self.model,
                self.method.outer,
                self.guide,
                part,
                self.inner,
                self.lr,
                self.kl_weight,
                chunk_generator(key, start, device),
            )
            loss_t = loss_t.reshape(-1)  # [T] (a net without a task axis in its loss gives [])
            bad += ((~torch.isfinite(loss_t)).nonzero().flatten() + start).tolist()
            losses.append(loss_t.detach())
            if not bad:  # (a chunk after a bad one is scored, for the message, not learned)
                self.method.outer.accumulate(
                    self.model, loss_t, state, part.num_tasks / T, direction
                )
        if any_rank(bool(bad), self.device):
            self.optimizer.zero_grad(set_to_none=True)
            bad = sorted(i for b in gather_objects(bad) for i in b)
            raise NonFiniteLossError(
                f"meta-step {self.step}: the meta-loss is not finite for tasks {bad}; "
                f"parameters and optimizer state were left untouched. {self._divergence_hint()}"
            )
        losses = torch.cat(losses)
        loss, count = losses.sum(), torch.tensor(float(losses.numel()), device=losses.device)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        # The ranks' shares each carry 1/T per task: their sum is the whole meta-gradient.
        all_reduce_sum([loss, count, *grads, *direction.values()])
        loss = loss / count
        if self.method.outer.finish(self.model, direction) and self.model.hyperprior is not None:
            (-self.hyperprior_weight * self.model.hyperprior_log_prob()).backward()
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"meta-step {self.step}: a gradient is not finite (loss {loss.item():.4g}); "
                "parameters and optimizer state were left untouched"
            )
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def fit(
        self, tasks: TaskDistribution, meta_steps: int, *args: Any, **kwargs: Any
    ) -> list[dict[str, float]]:
        """Meta-train θ for ``meta_steps`` outer steps: :func:`bayesmeta.inference.training.fit`
        with this learner, which takes the same arguments and returns the history."""
        from bayesmeta.inference.training import fit

        return fit(self, tasks, meta_steps, *args, **kwargs)

    # persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write θ, the optimizer and the configuration to ``path`` atomically
        (:func:`bayesmeta.inference.serialization.save`)."""
        from bayesmeta.inference import serialization

        return serialization.save(self, path)

    @classmethod
    def load(cls, path: str | Path, model: HierarchicalBNN | None = None, **kwargs) -> MetaLearner:
        """Rebuild a saved learner (never unpickles code).

        ``model`` is needed only when the backbone is not one of bayesmeta's own; it must have
        the saved architecture. ``kwargs`` (e.g. ``device``) override the saved configuration.
        See :func:`bayesmeta.inference.serialization.load`.
        """
        from bayesmeta.inference import serialization

        return serialization.load(cls, path, model, **kwargs)


def _step_key(generator: torch.Generator | None) -> int:
    """One draw of ``generator`` that keys a meta-step's randomness (the same on every rank:
    the ranks' generators are in step; without one, rank 0's draw is shared)."""
    device = generator.device if generator is not None else "cpu"
    key = torch.randint(2**62, (1,), generator=generator, device=device)
    if generator is None:
        broadcast_([key], "sharing the meta-step's random key")
    return int(key)
