"""The inner loop against exact answers: Pyro's ELBO, the conjugate posterior, per-task runs."""

import pyro
import pytest
import torch
import torch.nn.functional as F

from bayesmeta.inference import UPDATE_RULES, InnerConfig, inner_loop, neg_elbo
from bayesmeta.inference.inner import StepSizes, plain_step_size
from bayesmeta.models import DeltaGuide, Guide, HierarchicalBNN, Normal, NormalGuide, Prior
from bayesmeta.nets import MLP

NOISE, PRIOR = 0.5, 1.0


def _linear_model():
    return HierarchicalBNN(MLP(2, [], 1), Normal(NOISE), prior_scale=PRIOR)


def _design(T=3):
    # Columns (x1, x2, 1) are orthogonal: the posterior covariance is diagonal, so the
    # mean-field family holds the exact posterior.
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    x = x.repeat(2, 1).expand(T, 8, 2).clone()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(T, 2, generator=g)
    y = (x @ w.unsqueeze(-1)) + 0.3 + NOISE * torch.randn(T, 8, 1, generator=g)
    return x, y


@pytest.mark.parametrize("guide_cls, particles", [(NormalGuide, 4), (DeltaGuide, 1)])
def test_analytic_elbo_equals_pyro_trace_meanfield_elbo(float64, guide_cls, particles):
    model = _linear_model()
    x, y = _design()
    guide = guide_cls()
    state = guide.init(model, 3)
    state = {f: {n: t + 0.1 * torch.randn_like(t) for n, t in v.items()} for f, v in state.items()}
    pyro.set_rng_seed(7)
    pyro_loss = neg_elbo(
        model, guide, state, x, y, InnerConfig(particles=particles, backend="pyro")
    )
    pyro.set_rng_seed(7)
    analytic = neg_elbo(
        model, guide, state, x, y, InnerConfig(particles=particles, backend="analytic")
    )
    assert torch.allclose(pyro_loss, analytic, rtol=0, atol=1e-10)


def test_inner_loop_backends_agree_over_steps(float64):
    model = _linear_model()
    x, y = _design()
    runs = []
    for backend in ("pyro", "analytic"):
        pyro.set_rng_seed(3)
        config = InnerConfig(steps=4, particles=3, backend=backend)
        runs.append(inner_loop(model, NormalGuide(), x, y, config, lr=0.05))
    for field in runs[0]:
        for name in runs[0][field]:
            assert torch.allclose(runs[0][field][name], runs[1][field][name], atol=1e-10)


@pytest.mark.parametrize("flat_prior", [False, True])
@pytest.mark.parametrize("guide_cls, particles", [(NormalGuide, 3), (DeltaGuide, 1)])
def test_closed_form_step_gradients_match_autograd_to_second_order(
    float64, guide_cls, particles, flat_prior
):
    # "analytic" differentiates the sampling and the KL in closed form, "pyro" runs autograd
    # through Pyro's ELBO: same draws, so the adapted states and θ's meta-gradient must agree.
    model = HierarchicalBNN(MLP(2, [5], 1), Normal(NOISE), prior_scale=0.4)
    x, y = _design()
    results = []
    for backend in ("pyro", "analytic"):
        pyro.set_rng_seed(11)
        state = inner_loop(
            model,
            guide_cls(),
            x,
            y,
            InnerConfig(steps=3, particles=particles, flat_prior=flat_prior, backend=backend),
            lr=0.1,
        )
        loss = sum(t.square().sum() for v in state.values() for t in v.values())
        grads = torch.autograd.grad(loss, list(model.theta()), allow_unused=True)
        results.append((state, grads))
    (s0, g0), (s1, g1) = results
    for field in s0:
        for name in s0[field]:
            assert torch.allclose(s0[field][name], s1[field][name], rtol=0, atol=1e-10)
    assert any(a is not None for a in g0)
    for a, b in zip(g0, g1, strict=True):
        assert (a is None) == (b is None)  # σ does not enter a flat-prior Delta run
        assert a is None or torch.allclose(a, b, rtol=0, atol=1e-10)


def test_closed_form_loop_matches_autograd_adapting_a_subset_with_per_weight_step_sizes(float64):
    # The closed-form loop concatenates the adapted weights; a subset (as ANIL's head, here not
    # contiguous in the model's order) and Meta-SGD's step sizes by name must come out as
    # autograd through Pyro's ELBO gives them, draws included.
    model = HierarchicalBNN(MLP(2, [5], 1), Normal(NOISE), prior_scale=0.4)
    x, y = _design()
    subset = ["head.bias", "body.0.weight"]
    lr = {n: torch.nn.Parameter(torch.full(model.shapes()[n], 0.1)) for n in subset}
    lr["body.0.weight"].data[0, 1] = 0.02
    results = []
    for backend in ("pyro", "analytic"):
        pyro.set_rng_seed(5)
        state = inner_loop(
            model,
            NormalGuide(),
            x,
            y,
            InnerConfig(steps=3, particles=2, adapt=subset, backend=backend),
            lr=lr,
        )
        loss = sum(t.square().sum() for v in state.values() for t in v.values())
        grads = torch.autograd.grad(loss, [*model.theta(), *lr.values()], allow_unused=True)
        results.append((state, grads))
    (s0, g0), (s1, g1) = results
    assert list(s1["loc"]) == model.names  # every weight, in the model's order
    for field in s0:
        for name in s0[field]:
            assert torch.allclose(s0[field][name], s1[field][name], rtol=0, atol=1e-10)
            changed = not torch.equal(s1[field][name], NormalGuide().init(model, 3)[field][name])
            assert changed == (name in subset), (field, name)
    assert g0[-1] is not None and g0[-1].abs().sum() > 0
    for a, b in zip(g0, g1, strict=True):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, rtol=0, atol=1e-10)


class _AutogradNormalGuide(NormalGuide):
    """NormalGuide without its closed form: the inner loop must use autograd through the ELBO."""

    elbo_grads = Guide.elbo_grads


def test_guide_without_a_closed_form_is_differentiated_by_autograd(float64):
    assert NormalGuide.has_closed_form() and DeltaGuide.has_closed_form()
    assert not _AutogradNormalGuide.has_closed_form()
    model = HierarchicalBNN(MLP(2, [5], 1), Normal(NOISE), prior_scale=0.4)
    x, y = _design()
    runs = []
    for guide in (NormalGuide(), _AutogradNormalGuide()):
        g = torch.Generator().manual_seed(2)
        state = inner_loop(
            model, guide, x, y, InnerConfig(steps=3, particles=2), lr=0.1, generator=g
        )
        runs.append(state)
    for field in runs[0]:
        for name in runs[0][field]:
            assert torch.allclose(runs[0][field][name], runs[1][field][name], rtol=0, atol=1e-10)
            assert not torch.equal(runs[1][field][name], NormalGuide().init(model, 3)[field][name])


def test_inner_loop_recovers_the_conjugate_posterior(float64):
    model = _linear_model()
    x, y = _design()
    g = torch.Generator().manual_seed(0)
    # Plain steps are preconditioned by 1/NOISE² + 1/(PRIOR² S): this is a step of 0.05.
    lr = 0.05 * (1 / NOISE**2 + 1 / (PRIOR**2 * x.shape[1]))
    state = inner_loop(
        model, NormalGuide(), x, y, InnerConfig(steps=400, particles=256), lr=lr, generator=g
    )
    # Exact posterior of w = (w1, w2, b): prior N(μ, PRIOR²), diagonal XᵀX.
    design = torch.cat([x, torch.ones_like(x[..., :1])], -1)  # [T, 8, 3]
    mu = torch.cat([model.net.head.weight.detach()[0], model.net.head.bias.detach()])
    precision = 1 / PRIOR**2 + design.square().sum(1) / NOISE**2  # [T, 3]
    mean = (mu / PRIOR**2 + (design * y).sum(1) / NOISE**2) / precision
    loc = torch.cat([state["loc"]["head.weight"][:, 0], state["loc"]["head.bias"]], -1)
    raw = torch.cat([state["scale_raw"]["head.weight"][:, 0], state["scale_raw"]["head.bias"]], -1)
    assert torch.allclose(loc, mean, atol=0.05), (loc, mean)
    assert torch.allclose(F.softplus(raw).square(), 1 / precision, atol=0.05)
    assert torch.allclose(F.softplus(raw), precision.rsqrt(), rtol=0.1)


class _FixedNoiseGuide(NormalGuide):
    """Reads its standard-normal draws from a table [steps, P, T, ...] indexed by task."""

    def __init__(self, eps, tasks):
        self.eps, self.tasks, self.calls = eps, tasks, 0

    def noise(self, state, particles, generator=None):
        table = self.eps[self.calls]
        self.calls += 1
        return {n: table[n][:, self.tasks] for n in state["loc"]}


def test_batched_inner_loop_equals_separate_single_task_runs(float64):
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(2, [6], 1), Normal(NOISE), prior_scale=0.3)
    x, y = _design(T=4)
    steps, P = 3, 2
    eps = [{n: torch.randn(P, 4, *s) for n, s in model.shapes().items()} for _ in range(steps)]
    config = InnerConfig(steps=steps, particles=P)
    batched = inner_loop(model, _FixedNoiseGuide(eps, slice(None)), x, y, config, lr=0.1)
    for t in range(4):
        guide = _FixedNoiseGuide(eps, slice(t, t + 1))
        single = inner_loop(model, guide, x[t : t + 1], y[t : t + 1], config, lr=0.1)
        for field in single:
            for name in single[field]:
                assert torch.allclose(
                    batched[field][name][t : t + 1], single[field][name], atol=1e-8
                )


def test_delta_guide_batched_equals_per_task_and_is_isolated(float64):
    model = HierarchicalBNN(MLP(2, [6], 1), Normal(NOISE), prior_scale=0.3)
    x, y = _design(T=4)
    config = InnerConfig(steps=5, particles=1)
    batched = inner_loop(model, DeltaGuide(), x, y, config, lr=0.1)
    y2 = y.clone()
    y2[0] += 5.0  # perturb one task's data
    perturbed = inner_loop(model, DeltaGuide(), x, y2, config, lr=0.1)
    for name, loc in batched["loc"].items():
        for t in range(4):
            single = inner_loop(model, DeltaGuide(), x[t : t + 1], y[t : t + 1], config, lr=0.1)
            assert torch.allclose(loc[t], single["loc"][name][0], atol=1e-8)
        assert not torch.allclose(perturbed["loc"][name][0], loc[0])
        assert torch.equal(perturbed["loc"][name][1:], loc[1:])


def test_perturbing_one_task_leaves_other_stochastic_posteriors_unchanged(float64):
    model = HierarchicalBNN(MLP(2, [6], 1), Normal(NOISE), prior_scale=0.3)
    x, y = _design(T=4)
    y2 = y.clone()
    y2[2] -= 3.0
    runs = [
        inner_loop(
            model,
            NormalGuide(),
            x,
            yy,
            InnerConfig(steps=3, particles=4),
            lr=0.1,
            generator=torch.Generator().manual_seed(5),
        )
        for yy in (y, y2)
    ]
    for field in runs[0]:
        for name, value in runs[0][field].items():
            other = runs[1][field][name]
            assert torch.equal(value[[0, 1, 3]], other[[0, 1, 3]])
            assert not torch.equal(value[2], other[2])


def test_inner_loop_is_differentiable_in_theta(float64):
    model = _linear_model()
    x, y = _design()
    state = inner_loop(model, NormalGuide(), x, y, InnerConfig(steps=2, particles=2), lr=0.1)
    loss = sum(v.sum() for v in state["loc"].values())
    grads = torch.autograd.grad(loss, list(model.theta()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the scale θ only reaches the locations through second-order terms
    assert grads[-1].abs().sum() > 0


def test_natural_step_is_the_inverse_fisher_times_the_whole_elbo_gradient(float64):
    # The Fisher information of q in its parameters is the Hessian of KL(q_λ ‖ q_λ0) at λ0;
    # the posterior means' step is its inverse times the gradient of the whole negative ELBO
    # (the loop differentiates it per support point: scale 1/S), the scales' stays plain.
    guide = NormalGuide()
    loc, raw = torch.randn(2, 3), torch.randn(2, 3)
    state = {"loc": {"w": loc}, "scale_raw": {"w": raw}}
    grads = {"loc": {"w": torch.randn(2, 3)}, "scale_raw": {"w": torch.randn(2, 3)}}

    def kl(m):
        s0 = F.softplus(raw)
        return (((m - loc) / s0).square() / 2).sum()  # KL between equal-scale Normals

    fisher = torch.autograd.functional.hessian(kl, loc.clone()).reshape(6, 6)
    out = guide.natural_grads(state, grads, scale=0.25)
    expected = torch.linalg.solve(fisher, grads["loc"]["w"].reshape(6) / 0.25).reshape(2, 3)
    torch.testing.assert_close(out["loc"]["w"], expected, rtol=1e-12, atol=0)
    assert torch.equal(out["scale_raw"]["w"], grads["scale_raw"]["w"])
    assert DeltaGuide().natural_grads({"loc": {"w": loc}}, grads) is grads


def test_steps_stay_stable_under_a_tight_prior(float64):
    # With σ = 0.01 the prior pulls a mean back by (w − μ)/(σ²S), 1250 times its distance: a
    # plain step is preconditioned by that curvature (plain_step_size) and a natural step by
    # the posterior's variance, so neither overshoots.
    model = HierarchicalBNN(MLP(2, [5], 1), Normal(NOISE), prior_scale=0.01)
    x, y = _design()
    for update, lr in (("gradient", 1.0), ("natural", 2.0), ("von", 1.0)):
        g = torch.Generator().manual_seed(0)
        state = inner_loop(
            model,
            NormalGuide(),
            x,
            y,
            InnerConfig(steps=6, particles=4, update=update),
            lr=lr,
            generator=g,
        )
        distance = max(
            (state["loc"][n] - model.prior_loc()[n]).abs().max().item() for n in model.names
        )
        assert distance < 0.05, (update, distance)
    for update in ("natural", "von"):
        with pytest.raises(ValueError, match=f"update='{update}' needs a guide with closed-form"):
            inner_loop(
                model, _AutogradNormalGuide(), x, y, InnerConfig(steps=1, update=update), lr=0.1
            )


def test_plain_steps_are_measured_in_the_likelihoods_unit(float64):
    # Under a flat prior a plain step on a Normal likelihood is a step on half the mean squared
    # error: the same at any noise level.
    x, y = _design()
    runs = []
    for noise in (0.01, 0.3, 3.0):
        torch.manual_seed(0)
        model = HierarchicalBNN(MLP(2, [5], 1), Normal(noise), prior_scale=0.1)
        runs.append(
            inner_loop(model, DeltaGuide(), x, y, InnerConfig(steps=3, flat_prior=True), lr=0.05)
        )
    for run in runs[1:]:
        for n in run["loc"]:
            torch.testing.assert_close(run["loc"][n], runs[0]["loc"][n], rtol=1e-9, atol=1e-12)
    # Under the prior: lr / (1/σ² + 1/(σ_w² S)) per weight, σ_w θ's prior scale.
    model = HierarchicalBNN(MLP(2, [5], 1), Normal(0.5), prior_scale=0.2)
    step = plain_step_size(model, 0.3, False, list(model.names), 8)
    for n, v in step.items():
        expected = 0.3 / (1 / 0.25 + 1 / (model.prior_scale()[n].detach() ** 2 * 8))
        torch.testing.assert_close(v, expected.expand_as(v))
    assert plain_step_size(model, 0.3, True, list(model.names), 8) == pytest.approx(0.3 * 0.25)
    # Meta-SGD's learned sizes take the unit on their base, before the product: 1/30 at noise
    # 0.3 is then the float32 step of 0.003 to the bit.
    torch.set_default_dtype(torch.float32)
    model = HierarchicalBNN(MLP(2, [5], 1), Normal(0.3), prior_scale=0.2)
    rates = {n: torch.rand(p.shape).exp() for n, p in model.net.named_parameters()}
    step = plain_step_size(model, StepSizes(1 / 30, rates), True, list(model.names), 8)
    for n, rate in rates.items():
        assert torch.equal(step[n], 0.003 * rate)


@pytest.mark.parametrize("particles", [1, 3])
@pytest.mark.parametrize("natural", [True, False])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("learned_lr", [False, True])
def test_fused_normal_step_equals_the_steps_definition(
    float64, particles, natural, flat, learned_lr
):
    # NormalGuide.step writes its derivative out; Guide.step composes elbo_grads, natural_grads
    # and the update under autograd. Same values, and the same first derivatives in every input
    # the meta-gradient runs back through (the state, the draw gradients, θ and the step size).
    g = torch.Generator().manual_seed(particles + 2 * natural + 4 * flat + 8 * learned_lr)
    T, D = 3, 4

    def leaf(*shape, positive=False):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (t.abs() + 0.5 if positive else t).requires_grad_()

    loc, raw, gw, mu = leaf(T, D), leaf(T, D), leaf(particles, T, D), leaf(D)
    sigma = None if flat else leaf(D, positive=True)
    lr = leaf(D, positive=True) * 0.1 if learned_lr else 0.1
    noise = torch.randn(particles, T, D, generator=g, dtype=torch.float64)
    state = {"loc": {"w": loc}, "scale_raw": {"w": raw}}
    prior = Prior({"w": mu}, None if flat else {"w": sigma}, 0.25)
    args = (state, prior, ["w"], {"w": noise}, [gw], lr)
    guide, step = NormalGuide(), "natural_step" if natural else "step"
    fused, composed = getattr(guide, step)(*args), getattr(Guide, step)(guide, *args)
    outs = [fused["loc"]["w"], fused["scale_raw"]["w"], fused["scale"]["w"]]
    refs = [composed["loc"]["w"], composed["scale_raw"]["w"]]
    refs.append(F.softplus(refs[1]))
    for a, b in zip(outs, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (loc, raw, gw, mu, sigma, lr) if isinstance(t, torch.Tensor)]
    inputs = [t for t in inputs if t.requires_grad]
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    got = torch.autograd.grad(outs, inputs, upstream, allow_unused=True)
    want = torch.autograd.grad(refs, inputs, upstream, allow_unused=True)
    for a, b, t in zip(got, want, inputs, strict=True):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[2].abs().sum() > 0  # the draws' gradients are reached


def test_first_order_normal_steps_carry_only_the_identity_path(float64):
    model = _linear_model()
    x, y = _design()
    state = inner_loop(
        model, NormalGuide(), x, y, InnerConfig(steps=2, particles=2, first_order=True), lr=0.1
    )
    assert "scale" not in state  # (the fused step's cache stays inside the loop)
    loss = sum(v.sum() for v in state["loc"].values())
    grads = torch.autograd.grad(loss, list(model.theta()), allow_unused=True)
    # d(loss)/dμ is the identity path alone: one per task for every weight
    for g_mu in grads[: len(model.names)]:  # (θ lists μ's tensors first)
        torch.testing.assert_close(g_mu, torch.full_like(g_mu, 3.0))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("learned_lr", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_delta_step_equals_the_steps_definition(float64, flat, learned_lr, first_order):
    g = torch.Generator().manual_seed(flat + 2 * learned_lr + 4 * first_order)

    def leaf(*shape, positive=False):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (t.abs() + 0.5 if positive else t).requires_grad_()

    loc, gw, mu = leaf(3, 4), leaf(1, 3, 4), leaf(4)
    sigma = None if flat else leaf(4, positive=True)
    lr = leaf(4, positive=True) * 0.1 if learned_lr else 0.1
    prior = Prior({"w": mu}, None if flat else {"w": sigma}, 0.25)
    args = ({"loc": {"w": loc}}, prior, ["w"], None, [gw], lr, first_order)
    guide = DeltaGuide()
    a, b = guide.step(*args)["loc"]["w"], Guide.step(guide, *args)["loc"]["w"]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (loc, gw, mu, sigma, lr) if isinstance(t, torch.Tensor)]
    up = torch.randn(a.shape, generator=g, dtype=torch.float64)
    for x, y in zip(
        torch.autograd.grad(a, inputs, up, allow_unused=True),
        torch.autograd.grad(b, inputs, up, allow_unused=True),
        strict=True,
    ):
        assert (x is None) == (y is None)
        assert x is None or torch.allclose(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base", [NormalGuide, DeltaGuide])
def test_a_subclass_with_its_own_gradients_gets_them_used(float64, base):
    # The built-in guides' fused steps must not bypass a subclass's elbo_grads.
    class Doubled(base):
        def elbo_grads(self, *args):
            grads = super().elbo_grads(*args)
            return {f: {n: 2 * g for n, g in v.items()} for f, v in grads.items()}

    model = _linear_model()
    x, y = _design()
    runs = {}
    for guide, lr in ((base(), 0.2), (Doubled(), 0.1)):
        particles = 2 if base is NormalGuide else 1
        g = torch.Generator().manual_seed(4)
        runs[lr] = inner_loop(
            model, guide, x, y, InnerConfig(steps=3, particles=particles), lr=lr, generator=g
        )
    for field in runs[0.2]:
        for name in runs[0.2][field]:
            torch.testing.assert_close(runs[0.1][field][name], runs[0.2][field][name])


def test_a_custom_loss_is_used_on_the_autograd_path_too(float64):
    """A guide without closed-form gradients, or the Pyro backend, runs the loop by autograd
    through neg_elbo; a custom loss must reach it as it reaches the closed-form loop."""

    def squared(f, y):  # [P, T, S, O] -> [P, T], summed over points
        return 5.0 * (f - y).square().sum((-1, -2))

    model = _linear_model()
    x, y = _design()
    runs = [
        inner_loop(
            model, DeltaGuide(), x, y, InnerConfig(steps=3, loss=squared, backend=b), lr=0.05
        )
        for b in ("analytic", "pyro")
    ]
    plain = inner_loop(model, DeltaGuide(), x, y, InnerConfig(steps=3, backend="pyro"), lr=0.05)
    for name in model.names:
        torch.testing.assert_close(runs[1]["loc"][name], runs[0]["loc"][name])
    assert not torch.allclose(plain["loc"]["head.weight"], runs[0]["loc"]["head.weight"])


def test_inner_config_names_a_bad_setting():
    for kwargs, match in (
        (dict(steps=-1), "steps"),
        (dict(particles=0), "particles"),
        (dict(backend="numpyro"), "backend must be one of"),
        (dict(adapt="head.weight"), "adapt must be a list of weight names"),
        (dict(update="adam"), "update must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            InnerConfig(**kwargs)
    config = InnerConfig(adapt=["head.weight"], update="natural")
    assert config.adapt == ("head.weight",) and config.update is UPDATE_RULES["natural"]
    with pytest.raises(TypeError, match="config must be an InnerConfig"):
        inner_loop(_linear_model(), NormalGuide(), *_design(), {"steps": 1}, lr=0.1)
