"""Predictive band and PPC plots, and the import rules of the diagnostics package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from PIL import Image

import bayesmeta as bm
import bayesmeta.diagnostics as dg
from bayesmeta.data import Sinusoid

LAZY = {"arviz", "matplotlib", "pandas"}


@pytest.fixture(scope="module")
def adapted():
    torch.manual_seed(0)
    model = bm.models.HierarchicalBNN(bm.nets.MLP(1, [8], 1), bm.models.Normal(noise=0.3))
    learner = bm.MetaLearner(model, method="bayes", inner_steps=2, inner_lr=0.003, particles=2)
    batch, params = Sinusoid(5, 6, noise=0.3).sample(
        5, torch.Generator().manual_seed(0), return_params=True
    )
    return batch, params, learner.adapt(batch.support_x, batch.support_y)


def test_predictive_band_plot(adapted, tmp_path):
    batch, params, post = adapted
    fig = dg.predictive_band_plot(
        post,
        (batch.support_x, batch.support_y),
        params,
        (batch.query_x, batch.query_y),
        tasks=[0, 2, 4],
        grid=torch.linspace(-5.0, 5.0, 50),
    )
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    assert visible[0].get_ylabel() == "y" and all(ax.get_xlabel() == "x" for ax in visible)
    assert visible[1].get_title().startswith("task 2: A = ")
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert labels == {
        "90% predictive interval",
        "50% predictive interval",
        "predictive mean",
        "true function",
        "query points",
        "support points",
    }
    path = tmp_path / "band.png"
    fig.savefig(path, dpi=80)
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 400 and im.size[1] > 150
    support = (batch.support_x, batch.support_y)
    with pytest.raises(ValueError, match="tasks"):
        dg.predictive_band_plot(post, support, tasks=[7])
    with pytest.raises(ValueError, match=r"support's x must have shape \[T=5, B, 1\]"):
        dg.predictive_band_plot(post, (batch.support_x[:2], batch.support_y))
    with pytest.raises(ValueError, match="support must be a pair"):
        dg.predictive_band_plot(post, batch.support_x)
    with pytest.raises(ValueError, match=r"grid must be a Tensor \[G\]"):
        dg.predictive_band_plot(post, support, grid=torch.zeros(3, 1))


def test_ppc_plot(adapted):
    batch, _, post = adapted
    idata = dg.to_inference_data(
        post, (batch.query_x, batch.query_y), num_draws=10, var_names=["head.bias"]
    )
    ax = dg.ppc_plot(idata, num_pp_samples=5)
    assert ax.get_xlabel().startswith("y") and ax.get_ylabel() == "density"
    import matplotlib.pyplot as plt

    plt.close("all")


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_point_one_way_and_heavy_ones_are_lazy():
    for path in Path(dg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not any(n.startswith("bayesmeta.cli") for n in _imports(tree)), path.name
        top_level = {
            n for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom)) for n in _imports(s)
        }
        assert not {n.split(".")[0] for n in top_level} & LAZY, path.name


def test_public_names():
    assert all(hasattr(dg, name) for name in dg.__all__)
    assert {
        "to_inference_data",
        "from_mcmc",
        "compare_posteriors",
        "compare_learners",
        "reliability_diagram",
        "coverage_table",
        "predictive_band_plot",
        "predictive_entropy",
    } <= set(dg.__all__)


def test_classification_ppc_compares_per_task_accuracy(tmp_path):
    torch.manual_seed(0)
    model = bm.models.HierarchicalBNN(bm.nets.MLP(2, [8], 3), bm.models.Categorical(), 0.5)
    learner = bm.MetaLearner(model, method="bayes", inner_steps=1, inner_lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 12, 2, generator=g), torch.randint(0, 3, (4, 12), generator=g)
    post = learner.adapt(x[:, :6], y[:, :6])
    idata = dg.to_inference_data(post, (x[:, 6:], y[:, 6:]), num_draws=10)
    ax = dg.ppc_plot(idata, num_pp_samples=8)
    assert ax.get_xlabel() == "per-task accuracy of the predicted class"
    assert ax.get_xlim() == (0.0, 1.0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["replicated labels (8 draws)", "observed labels"]
    ax.figure.savefig(tmp_path / "ppc.png", dpi=60)
    import matplotlib.pyplot as plt

    plt.close("all")
