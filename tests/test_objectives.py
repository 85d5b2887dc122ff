"""The objectives: the paper's cross-entropy and the swapped (SwAV-style) loss with its queue and multi-crop."""

import pytest
import torch
from test_train import make_trainer

from sela.data import BatchAugment, EvalTransform


def swapped_loss(trainer, images, idx, generator):
    """The swapped objective's loss of one batch, as the trainer computes it."""
    loss, _ = trainer.objective.loss(
        trainer.net, images, idx, trainer.state, generator=generator, autocast=trainer.autocast
    )
    return loss


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
def test_swapped_loss_predicts_the_other_views_codes(tiny_set, tmp_path, monkeypatch):
    import sela.objectives as objectives_mod

    t = make_trainer(tiny_set, tmp_path, epochs=1, objective="swapped", precision="fp32")
    seen = []
    real = objectives_mod.soft_codes
    monkeypatch.setattr(
        objectives_mod, "soft_codes", lambda x, **kw: seen.append((x, out := real(x, **kw))) or out
    )
    images, idx = tiny_set.images[:8], torch.arange(8)
    loss = swapped_loss(t, images, idx, torch.Generator().manual_seed(0))
    expected = 0.0
    for scores, codes in seen:  # one per head, (16, K): 8 first views, then 8 second views
        swapped = torch.cat([codes[8:], codes[:8]])
        expected += -(swapped * torch.log_softmax(scores / 0.1, 1)).sum(1).mean()
        assert not torch.allclose(scores[:8], scores[8:])  # two different views
    assert torch.allclose(loss, expected / len(seen))
    assert torch.equal(t.state.labels[0, :8], seen[0][1][:8].argmax(1))


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
def test_swapped_queue_joins_the_balancing_scored_by_the_current_prototypes(tiny_set, tmp_path, monkeypatch):
    import sela.objectives as objectives_mod

    t = make_trainer(tiny_set, tmp_path, objective="swapped", precision="fp32", swap_queue=40)
    seen = []
    real = objectives_mod.soft_codes
    monkeypatch.setattr(
        objectives_mod, "soft_codes", lambda x, **kw: seen.append((x, out := real(x, **kw))) or out
    )
    b, gen = 8, torch.Generator().manual_seed(0)
    swapped_loss(t, tiny_set.images[:b], torch.arange(b), gen)  # empty queue: the batch alone
    assert [x.shape[0] for x, _ in seen] == [2 * b, 2 * b]
    first_rows = t.objective.queue.clone()
    assert first_rows.shape == (2 * b, t.model.head_dim)
    assert torch.allclose(first_rows.norm(dim=1), torch.ones(2 * b))  # unit-norm head inputs
    with torch.no_grad():  # the prototypes move between steps; the queue is scored by the new ones
        for head in t.model.heads:
            head.weight.copy_(torch.nn.functional.normalize(torch.randn_like(head.weight), dim=1))
    seen.clear()
    images = tiny_set.images[b : 2 * b]
    loss = swapped_loss(t, images, torch.arange(b, 2 * b), gen)
    expected = 0.0
    for h, (x, balanced) in enumerate(seen):
        assert x.shape[0] == 4 * b  # the batch's 2b views and the queue's 2b rows
        assert torch.allclose(x[2 * b :], first_rows @ t.model.heads[h].weight.t(), atol=1e-6)
        codes = balanced[: 2 * b]  # only the batch's codes are targets
        assert not torch.allclose(codes, real(x[: 2 * b], epsilon=t.objective.epsilon))  # the queue mattered
        scores = x[: 2 * b]  # the batch's own scores come first
        swapped = torch.cat([codes[b:], codes[:b]])
        expected += -(swapped * torch.log_softmax(scores / 0.1, 1)).sum(1).mean()
    assert torch.allclose(loss, expected / len(seen), atol=1e-6)
    assert t.objective.queue.shape[0] == 4 * b and torch.equal(
        t.objective.queue[2 * b :], first_rows
    )  # newest first
    swapped_loss(t, tiny_set.images[:b], torch.arange(b), gen)
    assert t.objective.queue.shape[0] == 40  # capped: the oldest rows dropped
    assert torch.equal(t.objective.queue[4 * b :], first_rows[:8])  # the first batch's newest 8 rows remain
    t.train_one_epoch(0)
    assert len(t.objective.queue) == 40


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
def test_multicrop_small_views_predict_the_full_views_codes(tiny_set, tmp_path, monkeypatch):
    import sela.objectives as objectives_mod

    small = BatchAugment(4, crop_scale=(0.2, 0.5), mean=tiny_set.mean, std=tiny_set.std)
    t = make_trainer(
        tiny_set, tmp_path, objective="swapped", precision="fp32", small_crops=3, small_augment=small
    )
    seen, inputs = [], []
    real = objectives_mod.soft_codes
    monkeypatch.setattr(
        objectives_mod, "soft_codes", lambda x, **kw: seen.append(out := real(x, **kw)) or out
    )
    forward = t.net.forward
    monkeypatch.setattr(t.net, "forward", lambda x, **kw: inputs.append(x) or forward(x, **kw))
    b, c = 8, tiny_set.images.shape[1]
    loss = swapped_loss(t, tiny_set.images[:b], torch.arange(b), torch.Generator().manual_seed(0))
    (views,) = inputs  # one forward call: a list of the full and the small views
    assert [tuple(v.shape) for v in views] == [(2 * b, c, 8, 8), (3 * b, c, 4, 4)]
    with torch.no_grad():
        scores = forward(views)  # the same batch: train-mode BatchNorm gives the same outputs
    expected = 0.0
    for h, codes in enumerate(seen):
        assert codes.shape == (2 * b, t.model.n_clusters[h])  # codes of the two full views only
        logp = torch.log_softmax(scores[h] / 0.1, 1).view(5, b, -1)
        q = codes.view(2, b, -1)
        terms = [-(q[v] * logp[u]).sum(1).mean() for v in range(2) for u in range(5) if u != v]
        assert len(terms) == 2 * 4
        expected += sum(terms) / len(terms)
    assert torch.allclose(loss, expected / len(seen), atol=1e-6)
    assert torch.equal(t.state.labels[0, :b], seen[0][:b].argmax(1))  # the first full view's codes
    loss.backward()  # the small views' branch is part of the graph
    assert t.model.stem[0].weight.grad is not None


def test_sela_multicrop_small_views_learn_the_images_label(tiny_set, tmp_path):
    small = BatchAugment(4, crop_scale=(0.2, 0.5), mean=tiny_set.mean, std=tiny_set.std)
    t = make_trainer(tiny_set, tmp_path, precision="fp32", small_crops=2, small_augment=small)
    t.update_labels()
    b, gen = 8, torch.Generator().manual_seed(0)
    idx = torch.arange(b)
    loss, recorded = t.objective.loss(
        t.net, tiny_set.images[:b], idx, t.state, generator=gen, autocast=t.autocast
    )
    gen = torch.Generator().manual_seed(0)  # the same views again
    full = t.objective.augment(tiny_set.images[:b], generator=gen)
    smalls = torch.cat([small(tiny_set.images[:b], generator=gen) for _ in range(2)])
    outputs = t.net([full, smalls])
    expected = sum(
        torch.nn.functional.cross_entropy(o, t.state.labels[h, idx].repeat(3)) for h, o in enumerate(outputs)
    ) / len(outputs)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert [r.shape[0] for r in recorded.values()] == [b, b]  # the full view's outputs only
    loss.backward()
    assert t.model.stem[0].weight.grad is not None


def test_sela_cosine_heads_divide_normalised_scores_by_the_temperature(tiny_set, tmp_path):
    t = make_trainer(tiny_set, tmp_path, precision="fp32", sela_temperature=0.1)
    assert t.model.normalize_heads and t.model.spec["normalize_heads"]
    for head in t.model.heads:
        assert torch.allclose(head.weight.norm(dim=1), torch.ones(head.out_features), atol=1e-5)
    t.update_labels()
    with torch.no_grad():
        scores = t.model.eval()(t.eval_transform(tiny_set.images))  # cosine similarities
    from sela.sinkhorn import assign

    for h, s in enumerate(scores):
        assert s.abs().max() <= 1 + 1e-5
        agree = (assign(s / 0.1, lam=25.0).labels == t.state.labels[h]).float().mean()
        assert agree > 0.98  # the label step solves on scores / T, like the loss
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_trainer(tiny_set, tmp_path, sela_temperature=0.0)


def test_sela_soft_targets_are_the_largest_entries_of_the_transport_plan(tiny_set, tmp_path):
    """Each image keeps its k largest entries of Q = diag(a) P^lam diag(b), renormalised; each view's loss
    is -sum_j w_j log p(code_j), and k = 1 is the paper's hard cross-entropy."""
    from sela.sinkhorn import assign

    t = make_trainer(tiny_set, tmp_path, precision="fp32", soft_targets=3)
    t.update_labels()
    codes, weights = t.state.codes, t.state.weights  # (H, N, 3)
    assert codes.shape == (2, len(tiny_set), 3) and torch.allclose(
        weights.sum(2), torch.ones(2, len(tiny_set))
    )
    assert (weights[..., :-1] >= weights[..., 1:]).all()  # largest first
    with torch.no_grad():
        logits = t.model.eval()(t.eval_transform(tiny_set.images))
    for h, z in enumerate(logits):
        b = assign(z, lam=25.0).scaling.float()
        q = torch.softmax(25.0 * z + b.log(), dim=1)  # rows of Q, each renormalised to sum to 1
        top = q.topk(3, dim=1)
        assert torch.equal(codes[h].long(), top.indices)
        assert torch.allclose(weights[h], top.values / top.values.sum(1, keepdim=True), atol=1e-4)
        hard = t.state.labels[h]
        assert (codes[h, :, 0].long() == hard).float().mean() > 0.95  # the argmax, but for repaired rows
    b, gen = 8, torch.Generator().manual_seed(0)
    idx = torch.arange(b)
    loss, _ = t.objective.loss(
        t.net.train(), tiny_set.images[:b], idx, t.state, generator=gen, autocast=t.autocast
    )
    gen = torch.Generator().manual_seed(0)
    outputs = t.net(t.objective.augment(tiny_set.images[:b], generator=gen))
    expected = sum(
        -(weights[h, idx] * o.log_softmax(1).gather(1, codes[h, idx].long())).sum(1).mean()
        for h, o in enumerate(outputs)
    ) / len(outputs)
    assert torch.allclose(loss, expected, atol=1e-5)
    one = make_trainer(tiny_set, tmp_path / "one", precision="fp32", soft_targets=1)
    one.update_labels()
    assert torch.equal(one.state.weights, torch.ones_like(one.state.weights))
    with pytest.raises(ValueError, match="soft_targets must be >= 0"):
        make_trainer(tiny_set, tmp_path, soft_targets=-1)


def test_sela_centroid_prototypes_are_the_clusters_mean_inputs_and_get_no_gradient(tiny_set, tmp_path):
    """prototypes="centroids" (DeepCluster-v2's): after a label step each prototype is the unit-norm mean
    of the head inputs of the images it labelled; the loss trains the backbone, never the prototypes."""
    t = make_trainer(tiny_set, tmp_path, precision="fp32", sela_temperature=0.1, sela_prototypes="centroids")
    t.update_labels()
    with torch.no_grad():
        _, z = t.model.eval()(t.eval_transform(tiny_set.images), embeddings=True)  # (N, P), unit rows
    for h, head in enumerate(t.model.heads):
        labels = t.state.labels[h]
        for k in labels.unique().tolist():
            centre = torch.nn.functional.normalize(z[labels == k].mean(0), dim=0)
            assert torch.allclose(head.weight[k], centre, atol=1e-5)
    before = [head.weight.clone() for head in t.model.heads]
    loss, recorded = t.objective.loss(
        t.net.train(),
        tiny_set.images[:8],
        torch.arange(8),
        t.state,
        generator=torch.Generator(),
        autocast=t.autocast,
    )
    loss.backward()
    assert all(head.weight.grad is None for head in t.model.heads) and t.model.stem[0].weight.grad is not None
    assert recorded["z"].shape == (8, t.model.head_dim) and recorded[0].shape == (8, 6)
    t.optimizer.step()
    assert all(torch.equal(b, head.weight) for b, head in zip(before, t.model.heads, strict=True))
    with pytest.raises(ValueError, match="centroid prototypes need cosine heads"):
        make_trainer(tiny_set, tmp_path, sela_prototypes="centroids")


# ------------------------------------------------------------------------------------------------------
# the registry, and the loop's independence of which objective it runs


def _augment(imageset):
    return BatchAugment(8, crop_scale=(0.6, 1.0), flip_p=0.0, mean=imageset.mean, std=imageset.std)


def test_registry_lists_both_objectives_and_makes_them_by_name(tiny_set):
    from sela.objectives import OBJECTIVES, SelaObjective, SwappedObjective, make_objective

    assert {"sela": SelaObjective, "swapped": SwappedObjective}.items() <= OBJECTIVES.items()
    assert all(cls.name == name for name, cls in OBJECTIVES.items())
    swapped = make_objective("swapped", _augment(tiny_set), temperature=0.2, queue=10)
    assert isinstance(swapped, SwappedObjective) and (swapped.temperature, swapped.queue_size) == (0.2, 10)
    assert swapped.cosine_heads and swapped.online_labels
    sela = make_objective("sela", _augment(tiny_set))
    assert not sela.cosine_heads and not sela.online_labels
    assert make_objective("sela", _augment(tiny_set), temperature=0.1).cosine_heads
    with pytest.raises(ValueError, match=r"unknown objective 'dino'; choose one of sela, swapped"):
        make_objective("dino", _augment(tiny_set))


def test_prepare_rejects_a_model_built_with_the_other_kind_of_heads(tiny_set):
    from sela.models import create_model
    from sela.objectives import SelaObjective, SwappedObjective

    plain = create_model("convnet", [6], widths=(8,), input_size=8)
    cosine = create_model("convnet", [6], widths=(8,), input_size=8, normalize_heads=True)
    SelaObjective(_augment(tiny_set)).prepare(plain)
    for objective, model in [
        (SwappedObjective(_augment(tiny_set)), plain),
        (SelaObjective(_augment(tiny_set), temperature=0.1), plain),
        (SelaObjective(_augment(tiny_set)), cosine),
    ]:
        with pytest.raises(ValueError, match=r"normalize_heads=objective\.cosine_heads"):
            objective.prepare(model)
    assert not plain.normalize_heads and not plain.spec["normalize_heads"]  # prepare changed nothing


def _register_toy_objectives(monkeypatch):
    """Two objectives the package does not know: offline labels (plain cross-entropy on one view) and
    online labels (each batch's argmax becomes its labels)."""
    import torch.nn.functional as F

    import sela.objectives as objectives_mod

    monkeypatch.setattr(objectives_mod, "OBJECTIVES", dict(objectives_mod.OBJECTIVES))

    @objectives_mod.register_objective("toy")
    class ToyObjective(objectives_mod.Objective):
        def __init__(self, augment):
            self.augment = augment

        def loss(self, net, images, idx, labels, *, generator, autocast):
            with autocast:
                outputs = net(self.augment(images, generator=generator))
            logits = [o.float() for o in outputs]
            loss = sum(F.cross_entropy(o, labels.labels[h, idx]) for h, o in enumerate(logits)) / len(logits)
            return loss, {h: o.detach() for h, o in enumerate(logits)}

    @objectives_mod.register_objective("toy-online")
    class OnlineToy(ToyObjective):
        online_labels = True

        def loss(self, net, images, idx, labels, *, generator, autocast):
            loss, outputs = super().loss(net, images, idx, labels, generator=generator, autocast=autocast)
            labels.set_labels(idx, torch.stack([o.argmax(1) for o in outputs.values()]))
            return loss, None

    return objectives_mod


@pytest.mark.filterwarnings("ignore:epoch")
@pytest.mark.parametrize("name", ["toy", "toy-online"])
def test_a_newly_registered_objective_trains_without_any_change_to_the_loop(
    tiny_set, tmp_path, monkeypatch, name
):
    from sela.models import create_model
    from sela.train import Trainer

    objectives_mod = _register_toy_objectives(monkeypatch)
    assert name in objectives_mod.OBJECTIVES
    objective = objectives_mod.make_objective(name, _augment(tiny_set))
    torch.manual_seed(0)
    model = create_model(
        "convnet", [6, 8], widths=(8, 16), input_size=8, normalize_heads=objective.cosine_heads
    )
    t = Trainer(
        model, tiny_set, objective=objective, out_dir=tmp_path, epochs=2, batch_size=40, lr=0.05,
        label_updates=4, label_share=0.5, lam=25.0, eval_transform=EvalTransform(8, mean=tiny_set.mean, std=tiny_set.std),
        device=torch.device("cpu"), precision="fp32", progress=False,
    )  # fmt: skip
    history = t.fit()
    assert len(history) == 2 and all(m["loss"] == m["loss"] for m in history)
    # offline: the plan's label steps during training; online: none, then one global pass after the end
    assert t.state.n_updates == (1 if name == "toy-online" else len(t.plan.label_steps))
    assert [m["label_updates"] for m in history] == ([0, 1] if name == "toy-online" else [2, 3])
    for h, k in enumerate([6, 8]):  # the last labels of every image come from a global solve
        assert torch.bincount(t.state.labels[h], minlength=k).min() > 0


def test_the_loop_uses_only_the_objectives_hooks():
    """fit and train_one_epoch (and their helpers) call the objective's hooks, never read what it is."""
    import ast
    import inspect

    import sela.train as train_mod

    tree = ast.parse(inspect.getsource(train_mod.Trainer))
    loop = {"fit", "_next_epoch", "train_one_epoch", "_step", "_recorder", "update_labels"}
    used = {
        node.attr
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef) and fn.name in loop
        for node in ast.walk(fn)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "objective"
    }
    assert used <= {"loss", "after_step", "start_epoch"}, used
    assert "isinstance" not in inspect.getsource(train_mod.Trainer.train_one_epoch)
