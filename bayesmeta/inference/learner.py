"""``MetaLearner``, the algorithm: adapt to tasks (differentiably or not) and take meta-steps.

What its constructor resolves lives in :mod:`bayesmeta.inference._setup`; how its work is split
into chunks, ranks and threads in :mod:`bayesmeta.inference.execution`; its training loop is
:func:`bayesmeta.inference.training.fit` and its file format
:mod:`bayesmeta.inference.serialization`, which ``fit``, ``config``, ``save`` and ``load`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bayesmeta.data import TaskBatch, TaskDistribution
from bayesmeta.inference import serialization, training
from bayesmeta.inference._checks import (
    FiniteWatch,
    NonFiniteLossError,
    check_device,
    check_int,
    check_positive_float,
    check_support,
)
from bayesmeta.inference._setup import (
    check_guide_fits,
    check_network,
    check_options,
    inner_config,
    make_optimizer,
    resolve_guide,
    resolve_outer,
    resolve_particles,
    step_sizes,
)
from bayesmeta.inference.execution import (
    check_step_memory,
    check_threads,
    chunk_size,
    initial_task_chunk,
    meta_gradient,
    points_per_task,
    reduce_meta_gradient,
    threads_context,
)
from bayesmeta.inference.inner import StepSizes
from bayesmeta.inference.methods import default_inner_lr
from bayesmeta.inference.outer import adapt_state, initial_state
from bayesmeta.inference.posterior import TaskPosterior
from bayesmeta.inference.rules import UpdateRule
from bayesmeta.models import Guide, HierarchicalBNN

__all__ = ["MetaLearner", "NonFiniteLossError"]


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
        the update rule's :attr:`~bayesmeta.inference.rules.UpdateRule.default_lr` (0.03 for
        each shipped rule), 1.0 (full Newton steps, capped there) for a guide that fits itself
    particles : P, posterior draws per inner step (default the guide's
        :attr:`~bayesmeta.models.Guide.default_particles`: 2 for ``bayes``'s antithetic Normal,
        1 for a point guide or a closed-form predictive)
    meta_lr : outer step size (default 1e-3 with Adam, bayes's 1e-2 with its natural steps;
        Reptile's ε, default 0.5, with SGD)
    optimizer : ``"adam"`` or ``"sgd"`` (default: SGD for Reptile, Adam otherwise)
    kl_weight : β, weight of ``KL(q_t ‖ p(w|θ))/Q`` in the meta-objective (1: the ELBO)
    hyperprior_weight : weight of ``−log p(θ)`` in the meta-objective (with a hyperprior)
    eval_particles : draws used by predictions (default 16 for a Normal guide, 1 for Delta)
    test_inner_steps : inner steps when adapting at test time (default ``inner_steps``)
    elbo : ``"analytic"`` (fast, default) or ``"pyro"`` (Pyro's ``TraceMeanField_ELBO``)
    guide, first_order, adapt, update, flat_prior : override the method's choices
        (``guide``: a name of :data:`~bayesmeta.inference.GUIDES` or ``"auto"``, or a
        :class:`~bayesmeta.models.Guide` subclass or instance of your own, saved by its
        registered name, see :func:`~bayesmeta.inference.register_guide`; ``adapt="all"``,
        ``"head"`` or a list of weight names, e.g. a head that is not the net's last layer;
        ``update``: the inner steps' rule, ``"gradient"``, ``"natural"``, ``"von"`` or an
        :class:`~bayesmeta.inference.rules.UpdateRule`, see :mod:`bayesmeta.inference.rules`;
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
        keep less of the graph alive. The learner changes no process-wide state: off CUDA, a
        script that calls :func:`bayesmeta.nets.keep_freed_memory` first (as the command line
        and the suites do) lets ``"auto"`` backpropagate a Conv4 one task at a time at no loss
        of speed.
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
        update: str | UpdateRule | None = None,
        flat_prior: bool | None = None,
        head_init: str | None = None,
        inner_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        threads: int | str | None = "auto",
    ):
        if not isinstance(model, HierarchicalBNN):
            raise TypeError(f"model must be a HierarchicalBNN, got {type(model).__name__}")
        given = dict(first_order=first_order, adapt=adapt, update=update)
        given.update(flat_prior=flat_prior, head_init=head_init)
        self.method, self.guide, particles = resolve_guide(model, method, guide, particles, given)
        weights = dict(kl_weight=kl_weight, hyperprior_weight=hyperprior_weight)
        check_options(inner_steps, test_inner_steps, elbo, weights, transductive, inner_loss)
        inner_lr = default_inner_lr(self.method, self.guide) if inner_lr is None else inner_lr
        self.inner_lr = check_positive_float("inner_lr", inner_lr)
        adapt_names = check_guide_fits(model, self.method, self.guide, elbo)
        draws = resolve_particles(model, self.guide, particles, eval_particles)
        particles, self.eval_particles = draws
        self.optimizer_name, self.meta_lr = resolve_outer(self.method, optimizer, meta_lr)
        check_network(model.net, transductive)
        self.threads = check_threads(threads)
        self.kl_weight, self.hyperprior_weight = float(kl_weight), float(hyperprior_weight)
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        loc = model.prior_loc()[model.names[0]]
        self.device = loc.device if device is None else check_device("device", device)
        self.model = model.to(self.device)
        self.model.add_guide_params(self.guide.hyperparameters(self.model))
        self.auto_chunk = task_chunk == "auto"  # (then re-decided per meta-batch: chunk_size)
        self.task_chunk = initial_task_chunk(task_chunk, model.net, self.device)
        self.inner = inner_config(
            self.method, inner_steps, particles, adapt_names, elbo, transductive, inner_loss
        )
        self.lr_params, self._lr_names = step_sizes(self.method, self.guide, model, adapt_names)
        self.lr_params.to(self.device)
        params = [*self.model.theta(), *self.lr_params]
        self.optimizer = make_optimizer(self.optimizer_name, params, self.meta_lr)
        self.step, self.skipped_steps = 0, 0
        self.history: list[dict[str, float]] = []
        check_step_memory(model, self.guide, self.inner, 1)  # (no chunk can be smaller)

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
        return serialization.config(self)

    def chunk_size(self, batch: TaskBatch) -> int:
        """Tasks per backward pass of a meta-step on ``batch``
        (:func:`bayesmeta.inference.execution.chunk_size`)."""
        return chunk_size(self, batch)

    def threads_context(self, points: int):
        """A context that runs its block on the intra-op threads that ``threads`` chooses for
        work on ``points`` network inputs whose graph is kept."""
        return threads_context(self.model.net, points, self.threads)

    # adaptation ----------------------------------------------------------------------
    def _support(self, support_x: Any, support_y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The support sets checked (:func:`~bayesmeta.inference._checks.check_support`),
        and the draws of one inner step on all of them at once checked against memory."""
        scored = self.inner.loss is None  # (an inner_loss reads the targets instead)
        x, y = check_support(self.model, support_x, support_y, self.device, scored)
        check_step_memory(self.model, self.guide, self.inner, x.shape[0])
        return x, y

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
        watch = None if self.inner.loss is None else FiniteWatch(self.inner.loss, x.shape[0])
        inner = self.inner if watch is None else replace(self.inner, loss=watch)
        with torch.enable_grad():
            state = _detached(initial_state(self.model, self.guide, inner, x, y, generator))
            inner = replace(inner, steps=steps, first_order=True)  # (test time cuts the graph)
            state = adapt_state(self.model, self.guide, inner, x, y, lr, generator, state)
        if watch is not None:
            watch.check()
        context = self.inner.context(x)
        return TaskPosterior(self.model, self.guide, _detached(state), self.eval_particles, context)

    # meta-training -------------------------------------------------------------------
    def meta_step(self, batch: TaskBatch, generator: torch.Generator | None = None) -> float:
        """One outer update on a meta-batch; returns the mean meta-loss.

        The tasks backpropagate in chunks of :meth:`chunk_size`, and inside a
        ``torch.distributed`` process group each rank takes its share
        (:func:`~bayesmeta.inference.execution.meta_gradient` says what stays the same).
        Raises :class:`NonFiniteLossError` (naming the tasks, on every rank) before touching θ
        or the optimizer when the loss or a gradient is not finite.
        """
        points, chunk = points_per_task(batch, self.inner), self.chunk_size(batch)
        check_step_memory(self.model, self.guide, self.inner, chunk, points)
        with self.threads_context(chunk * self.inner.particles * points):
            self.optimizer.zero_grad(set_to_none=True)
            losses, direction = meta_gradient(self, batch, chunk, generator)
            loss = reduce_meta_gradient(self, losses, direction)
            self.optimizer.step()
        self.step += 1
        return loss

    def fit(
        self, tasks: TaskDistribution, meta_steps: int, *args: Any, **kwargs: Any
    ) -> list[dict[str, float]]:
        """Meta-train θ for ``meta_steps`` outer steps: :func:`bayesmeta.inference.training.fit`
        with this learner, which takes the same arguments and returns the history."""
        return training.fit(self, tasks, meta_steps, *args, **kwargs)

    # persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write θ, the optimizer and the configuration to ``path`` atomically
        (:func:`bayesmeta.inference.serialization.save`)."""
        return serialization.save(self, path)

    @classmethod
    def load(cls, path: str | Path, model: HierarchicalBNN | None = None, **kwargs) -> MetaLearner:
        """Rebuild a saved learner (never unpickles code).

        ``model`` is needed only when the backbone is not one of bayesmeta's own; it must have
        the saved architecture. ``kwargs`` (e.g. ``device``) override the saved configuration.
        See :func:`bayesmeta.inference.serialization.load`.
        """
        return serialization.load(cls, path, model, **kwargs)


def _detached(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {field: {n: t.detach() for n, t in v.items()} for field, v in state.items()}
