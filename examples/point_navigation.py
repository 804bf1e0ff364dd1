"""Meta-reinforcement learning on Finn et al. (2017)'s 2D point navigation, with bayesmeta.

Each task is a goal in [-0.5, 0.5]²; an agent starts at the origin, moves by its action (clipped
to [-0.1, 0.1] per axis) for ``horizon`` steps, and is rewarded ``-‖position - goal‖`` at
every step. The policy is Gaussian, its mean a network of the state: exactly the Normal
likelihood of a ``HierarchicalBNN``, so a method's prior, guide and inner loop are bayesmeta's.

The inner step is a policy-gradient step: ``inner_loss`` reads the sampled actions and their
advantages from the support targets ``y = [action, advantage]`` and returns
``-Σ advantage · log π(action | state)``. The outer loop is the user's own, through
``MetaLearner.adapt_differentiable``: roll the adapted policy out, and follow the gradient of
its own policy-gradient loss into θ (MAML for RL with vanilla policy gradients; the Bayesian
learner explores by sampling its task posterior).

    python examples/point_navigation.py --method maml --iterations 200

prints the average return before and after one adaptation step, every 20 iterations.
"""

from __future__ import annotations

import argparse

import torch

import bayesmeta as bm

NOISE = 0.1  # the policy's action noise: the Normal likelihood's scale


def make_learner(method: str = "maml", hidden: int = 32, inner_lr: float = 10.0, seed: int = 0):
    """A policy learner: MLP 2 → hidden → hidden → 2 means, Gaussian actions. A plain inner
    step is measured in the likelihood's unit, σ² = 0.01 here: 10 is a step of 0.1 on the
    policy-gradient loss per point (the prior's pull adds under 1% to the curvature)."""
    torch.manual_seed(seed)
    net = bm.nets.MLP(2, [hidden, hidden], 2, activation="tanh")
    prior = None if method == "maml" else 0.1
    model = bm.models.HierarchicalBNN(net, bm.models.Normal(NOISE), prior_scale=prior)
    # The Bayesian learner's inner step keeps the prior's pull; its outer loss is the adapted
    # policy's gradient alone (β = 0), as MAML's: the KL of a policy-gradient step's move in
    # ~1.2k weights outweighed the returns (β = 1: -20 before and -22 after adaptation).
    extra = {"particles": 1, "update": "gradient", "kl_weight": 0.0} if method == "bayes" else {}
    return bm.MetaLearner(
        model, method, inner_steps=1, inner_lr=inner_lr, meta_lr=3e-3, inner_loss=pg_loss, **extra
    )


def pg_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-Σ advantage · log π(action | state)`` per task: outputs ``[P, T, S, 2]`` (action
    means), ``y [T, S, 3]`` (action, advantage)."""
    action, advantage = y[..., :2], y[..., 2]
    log_pi = torch.distributions.Normal(outputs, NOISE).log_prob(action).sum(-1)
    return -(advantage * log_pi).sum(-1)


def rollout(policy, goals: torch.Tensor, episodes: int, horizon: int, generator):
    """Episodes of each task's goal ``[T, 2]`` under ``policy(states [T, E, 2]) -> means``.

    Returns the states ``[T, E·H, 2]``, the support targets ``[T, E·H, 3]`` (actions and
    advantages: returns-to-go less their mean over the task's episodes at each step) and the
    average undiscounted return per episode.
    """
    T = goals.shape[0]
    position = torch.zeros(T, episodes, 2)
    states, actions, rewards = [], [], []
    with torch.no_grad():
        for _ in range(horizon):
            mean = policy(position)
            action = mean + NOISE * torch.randn(mean.shape, generator=generator)
            states.append(position)
            actions.append(action)
            position = position + action.clamp(-0.1, 0.1)
            rewards.append(-(position - goals[:, None]).norm(dim=-1))
    rewards = torch.stack(rewards, -1)  # [T, E, H]
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    advantage = to_go - to_go.mean(1, keepdim=True)
    x = torch.stack(states, 2).reshape(T, episodes * horizon, 2)
    a = torch.stack(actions, 2).reshape(T, episodes * horizon, 2)
    y = torch.cat([a, advantage.reshape(T, episodes * horizon, 1)], -1)
    return x, y, rewards.sum(-1).mean().item()


def prior_policy(learner):
    """The policy before adaptation: the network at θ's mean, for every task."""
    locs = learner.model.prior_loc()

    def policy(states):
        w = {k: v.expand(states.shape[0], *v.shape) for k, v in locs.items()}
        return bm.nets.batched_forward(learner.model.net, w, states)

    return policy


def meta_train(
    learner,
    iterations: int,
    tasks: int = 10,
    episodes: int = 10,
    horizon: int = 20,
    seed: int = 0,
    log_every: int = 0,
) -> list[tuple[float, float]]:
    """MAML-style meta-training; returns (return before, return after adaptation) per
    iteration."""
    g = torch.Generator().manual_seed(seed)
    history = []
    for i in range(iterations):
        goals = torch.rand(tasks, 2, generator=g) - 0.5
        x, y, before = rollout(prior_policy(learner), goals, episodes, horizon, g)
        post = learner.adapt_differentiable(x, y, generator=g)
        # One draw of each task's adapted policy for all its episodes (posterior sampling, for
        # the Bayesian learner), differentiable in θ for the outer loss.
        w = post.sample_weights(1, g)

        def adapted(states, w=w):
            return bm.nets.batched_forward(learner.model.net, w, states)[0]

        qx, qy, after = rollout(adapted, goals, episodes, horizon, g)
        outputs = bm.nets.batched_forward(learner.model.net, w, qx)
        loss = pg_loss(outputs, qy).mean() / qx.shape[1]
        if not learner.method.flat_prior:  # the Bayesian learner's KL, per query point
            kl = post.guide.kl(post.state, learner.model).mean()
            loss = loss + learner.kl_weight * kl / qx.shape[1]
        learner.optimizer.zero_grad()
        loss.backward()
        learner.optimizer.step()
        history.append((before, after))
        if log_every and (i + 1) % log_every == 0:
            recent = history[-log_every:]
            b = sum(r[0] for r in recent) / len(recent)
            a = sum(r[1] for r in recent) / len(recent)
            print(f"iteration {i + 1}: return before adaptation {b:.2f}, after {a:.2f}")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["maml", "bayes"], default="maml")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    learner = make_learner(args.method, seed=args.seed)
    meta_train(learner, args.iterations, seed=args.seed, log_every=20)


if __name__ == "__main__":
    main()
