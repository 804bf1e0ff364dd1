"""A learner on a GPU, seeded on the CPU, follows the same learner on the CPU (needs CUDA)."""

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import FewShotClassification, Sinusoid
from bayesmeta.models import Categorical, HierarchicalBNN, Normal
from bayesmeta.nets import MLP, Conv4

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _images():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(60, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    return FewShotClassification(images, torch.arange(60) % 6, ways=3, shots=1, queries=2)


def _run(device, method, task):
    torch.manual_seed(0)
    if task == "sinusoid":
        net, lik, tasks, lr = MLP(1, [16], 1), Normal(0.3), Sinusoid(5, 5), 0.01
    else:
        net, lik, tasks, lr = Conv4(1, 3, hidden=4, image_size=16), Categorical(), _images(), 0.1
    model = HierarchicalBNN(net, lik, prior_scale=0.1)
    extra = {"particles": 2, "eval_particles": 3} if method == "bayes" else {}
    # SGD: Adam moves a weight by about meta_lr whatever its gradient's size, so it would turn
    # rounding differences between the devices' kernels into differences of order meta_lr.
    learner = bm.MetaLearner(
        model,
        method,
        inner_steps=2,
        inner_lr=lr,
        optimizer="sgd",
        meta_lr=1e-3,
        device=device,
        **extra,
    )
    learner.fit(tasks, meta_steps=3, meta_batch=4, seed=0, progress=False)
    scores = bm.evaluate(learner, tasks, num_tasks=8, meta_batch=4, seed=1)
    theta = {k: v.detach().cpu() for k, v in learner.model.state_dict().items()}
    return theta, scores


@cuda
@pytest.mark.parametrize("task", ["sinusoid", "images"])
@pytest.mark.parametrize("method", ["bayes", "maml", "metasgd"])
def test_a_cuda_learner_follows_the_cpu_learner_from_one_seed(method, task, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    theta_cpu, scores_cpu = _run("cpu", method, task)
    theta_gpu, scores_gpu = _run("cuda", method, task)
    for name, value in theta_cpu.items():
        torch.testing.assert_close(theta_gpu[name], value, atol=1e-4, rtol=1e-4, msg=name)
    for key, value in scores_cpu.items():
        assert scores_gpu[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
