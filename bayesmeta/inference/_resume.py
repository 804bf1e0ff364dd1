"""What a checkpoint must share with a learner for ``fit(resume=True)`` to continue it.

A checkpoint continues only the run that wrote it: the same method, the same model (its
architecture, likelihood, prior and hyperprior) and the same settings. Comparing the seed and
the meta-batch alone let one method's θ and optimizer state continue as another's (bayes into
maml), or fail deep inside :func:`~bayesmeta.inference.serialization.restore` (Meta-SGD's step
sizes, which other methods lack).
"""

from __future__ import annotations

from typing import Any

__all__ = ["resume_differences"]

#: Settings that may change on resume: they cut the same work differently (the meta-gradient of
#: a meta-step does not depend on how many tasks backpropagate at once, nor on the threads).
MAY_CHANGE = frozenset({"task_chunk", "threads"})


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _learned(flat: dict[str, Any]) -> set[str]:
    """Entries of a model description that are values of θ (they move in training), not
    settings: the prior scale when it is learned, the likelihood's noise when it is."""
    learned = set()
    if flat.get("model.learn_prior_scale"):
        learned.add("model.prior_scale")
    if flat.get("model.likelihood.learn_noise"):
        learned.add("model.likelihood.noise")
    return learned


def resume_differences(
    saved_config: dict[str, Any],
    config: dict[str, Any],
    saved_run: dict[str, Any],
    run: dict[str, Any],
) -> list[str]:
    """Every difference between a checkpoint and the learner that would continue it.

    Parameters
    ----------
    saved_config, config : :meth:`MetaLearner.config` of the checkpoint and of the learner
    saved_run, run : the fit settings (seed, meta-batch, schedule) of the checkpoint and now

    Returns
    -------
    list of str, one ``"name: A in the checkpoint, B here"`` per difference (empty: resumable).
    A setting only one side has (a checkpoint of another version) is not compared.
    """
    saved, now = _flatten(saved_config), _flatten(config)
    skip = MAY_CHANGE | _learned(saved) | _learned(now)
    diffs = [
        f"{key}: {saved[key]!r} in the checkpoint, {now[key]!r} here"
        for key in saved
        if key in now and key not in skip and saved[key] != now[key]
    ]
    for key in sorted(saved_run.keys() | run.keys()):
        if saved_run.get(key) != run.get(key):
            diffs.append(f"{key}: {saved_run.get(key)!r} in the checkpoint, {run.get(key)!r} here")
    return diffs
