"""Out-of-episode queries: the split of 2N-way tasks, the scores, and the per-task AUROC."""

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import FewShotClassification
from bayesmeta.inference import evaluate_out_of_episode, uncertainty_scores
from bayesmeta.inference.ooe import OOE_SCORES, split_out_of_episode

N, K, Q = 3, 1, 2


def _tasks(classes=10, per_class=4, noise=0) -> FewShotClassification:
    """Every image of class ``c`` is the constant ``c`` (plus noise), so a batch's images tell
    their class."""
    g = torch.Generator().manual_seed(0)
    base = (
        torch.arange(classes)
        .mul(20)
        .view(classes, 1, 1, 1, 1)
        .expand(classes, per_class, 1, 16, 16)
    )
    jitter = torch.randint(0, noise + 1, base.shape, generator=g)
    images = (base + jitter).reshape(-1, 1, 16, 16).clamp(max=255).to(torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return FewShotClassification(images, labels, N, K, Q)


def _learner(method="bayes-proto", prior_scale=None):
    torch.manual_seed(0)
    net = bm.nets.Conv4(1, N, hidden=8, image_size=16)
    model = bm.models.HierarchicalBNN(net, bm.models.Categorical(), prior_scale=prior_scale)
    return bm.MetaLearner(model, method, inner_steps=1, inner_lr=0.1)


def test_the_split_keeps_n_classes_and_as_many_out_of_episode_queries():
    tasks = _tasks()
    batch = tasks.with_ways(2 * N).sample(4, torch.Generator().manual_seed(1))
    inside, outside = split_out_of_episode(batch, N)
    assert inside.support_x.shape[1] == N * K and inside.query_x.shape[1] == N * Q
    assert outside.shape == inside.query_x.shape
    assert int(inside.support_y.max()) == N - 1 and inside.num_classes == N
    for t in range(4):
        # An image's value is its class: no out-of-episode query shares a task's class.
        task_classes = set(inside.support_x[t, :, 0, 0, 0].tolist())
        assert task_classes == set(inside.query_x[t, :, 0, 0, 0].tolist())
        assert not task_classes & set(outside[t, :, 0, 0, 0].tolist())
    with pytest.raises(ValueError, match="2N = 4 classes"):
        split_out_of_episode(tasks.sample(2), 2)
    with pytest.raises(ValueError, match="ways must be at most the number of classes"):
        tasks.with_ways(11)


def test_scores_are_the_written_out_formulas():
    tasks = _tasks()
    batch = tasks.sample(2, torch.Generator().manual_seed(1))
    for method in ("bayes-proto", "maml"):
        post = _learner(method).adapt(batch.support_x, batch.support_y)
        pred = post.predict(batch.query_x)
        scores = uncertainty_scores(pred)
        assert sorted(scores) == sorted(OOE_SCORES)
        logits = pred.outputs.mean(0)
        torch.testing.assert_close(scores["energy"], -torch.logsumexp(logits, -1))
        torch.testing.assert_close(scores["neg_max_logit"], -logits.max(-1).values)
        torch.testing.assert_close(scores["entropy"], pred.entropy)
    with pytest.raises(TypeError, match="prediction must be a Prediction"):
        uncertainty_scores(pred.outputs)


def test_queries_identical_to_the_support_are_told_from_other_classes():
    tasks = _tasks()
    result = evaluate_out_of_episode(_learner(), tasks, num_tasks=12, meta_batch=5)
    assert result["num_tasks"] == 12
    for score in OOE_SCORES:
        assert 0 <= result[f"auroc_{score}"] <= 1 and result[f"auroc_{score}_ci"] >= 0
    # In-episode queries are copies of their class's support image: the nearest class's
    # density ranks every one of them above every out-of-episode query.
    assert result["auroc_neg_max_logit"] == 1.0
    # A point estimate's mutual information is 0 for every query: chance.
    assert result["auroc_mutual_information"] == 0.5


def test_a_learner_that_draws_scores_the_same_whatever_the_global_generator():
    tasks = _tasks(noise=30)
    learner = _learner("bayes", prior_scale=0.1)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # (a process starts from a random one)
        results.append(evaluate_out_of_episode(learner, tasks, num_tasks=6, meta_batch=3))
    assert results[0] == results[1]
    # and the draws matter: another seed gives other scores
    other = evaluate_out_of_episode(learner, tasks, num_tasks=6, meta_batch=3, seed=5)
    assert other["auroc_mutual_information"] != results[0]["auroc_mutual_information"]
