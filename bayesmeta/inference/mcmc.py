"""NUTS reference posteriors for small models, to check SVI task posteriors against MCMC."""

from __future__ import annotations

import pyro
import torch
from pyro.infer import MCMC, NUTS

from bayesmeta.inference._checks import check_int
from bayesmeta.models import HierarchicalBNN

__all__ = ["nuts_reference", "mcmc_weights"]


def nuts_reference(
    model: HierarchicalBNN,
    x: torch.Tensor,
    y: torch.Tensor,
    num_samples: int = 500,
    warmup_steps: int = 300,
    num_chains: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> MCMC:
    """Sample ``p(w_t | support_t, θ)`` of every task with NUTS, θ held fixed, under the
    model's prior (a flat prior over a network's weights has no proper posterior).

    Parameters
    ----------
    x : Tensor ``[T, S, ...]``;  y : Tensor ``[T, S]`` or ``[T, S, D]``
    num_chains : chains; Pyro runs them in worker processes when there are spare cores

    Returns
    -------
    The finished ``pyro.infer.MCMC``; ``mcmc_weights(mcmc)`` gives draws ``name → [C·N, T, *shape]``
    and ``bayesmeta.diagnostics.from_mcmc`` an ArviZ ``InferenceData``.
    """
    check_int("num_samples", num_samples)
    check_int("num_chains", num_chains)
    check_int("warmup_steps", warmup_steps, minimum=0)
    pyro.set_rng_seed(seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # θ is data here; keep NUTS's gradients to the task weights
    try:
        kernel = NUTS(model.model, max_plate_nesting=2)
        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            num_chains=num_chains,
            disable_progbar=not progress,
            # Pyro forks its chain workers; once a CUDA backward has run here, autograd's device
            # threads exist and torch refuses to fork. Spawned workers cost an import each.
            mp_context="spawn" if num_chains > 1 and torch.cuda.is_initialized() else None,
        )
        mcmc.run(x, y, False)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return mcmc


def mcmc_weights(mcmc: MCMC, group_by_chain: bool = False) -> dict[str, torch.Tensor]:
    """Draws of the task weights, ``name → [N, T, *shape]`` (``[C, N, T, *shape]`` by chain)."""
    samples = mcmc.get_samples(group_by_chain=group_by_chain)
    lead = 2 if group_by_chain else 1
    out = {}
    for name, value in samples.items():
        # Sites carry the model's plate layout [.., T, 1, *shape]; drop the data-plate 1.
        out[name] = value.squeeze(lead + 1)
    return out
