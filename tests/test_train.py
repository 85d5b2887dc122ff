"""The training loop: schedules, an end-to-end run, exact resume, divergence handling."""

import json
import math
import warnings

import pytest
import torch

from sela.data import BatchAugment, EvalTransform, ImageSet, load_dataset
from sela.models import create_model
from sela.train import (
    Trainer,
    TrainingDiverged,
    compare_configs,
    label_epochs,
    label_schedule,
    lr_at,
    planned_epochs,
    schedule_progress,
)


def test_label_schedule_quadratic_dense_early():
    steps = label_schedule(5, 100, "quadratic")
    assert steps == [0, 4, 16, 36, 64]
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert gaps == sorted(gaps)  # spacing grows: dense early


def test_label_schedule_linear_and_merging():
    assert label_schedule(4, 100, "linear") == [0, 25, 50, 75]
    assert label_schedule(1, 10) == [0]
    merged = label_schedule(50, 10, "quadratic")  # more updates than steps: collisions merge
    assert merged[0] == 0 and len(merged) == len(set(merged)) <= 10


@pytest.mark.parametrize(
    "bad", [dict(n_updates=0, total_steps=10), dict(n_updates=3, total_steps=10, spacing="cubic")]
)
def test_label_schedule_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        label_schedule(**bad)


def test_lr_warmup_cosine_and_step():
    kw = dict(base_lr=1.0, warmup_steps=10)
    assert lr_at(0, 110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, 110, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, 110, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, 110, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(109, 110, schedule="cosine", **kw) < 0.01
    assert lr_at(70, 110, schedule="step", **kw) == pytest.approx(0.1)
    assert lr_at(100, 110, schedule="step", **kw) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        lr_at(0, 10, base_lr=1.0, schedule="linear", warmup_steps=0)


def test_lr_anchor_continues_the_decay_to_the_new_end():
    kw = dict(base_lr=1.0, warmup_steps=10, schedule="cosine")
    # the plan was 110 steps; at step 60 (half the decay) it becomes 210 steps
    anchor = (60, schedule_progress(60, 110, warmup_steps=10))
    assert anchor[1] == pytest.approx(0.5)
    assert lr_at(60, 210, anchor=anchor, **kw) == pytest.approx(lr_at(60, 110, **kw))  # continuous
    assert lr_at(135, 210, anchor=anchor, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(209, 210, anchor=anchor, **kw) < 0.001  # reaches 0 at the new end
    assert lr_at(500, 210, anchor=anchor, **kw) == pytest.approx(0.0)  # clamped, never back up
    assert lr_at(5, 210, anchor=anchor, **kw) == pytest.approx(0.6)  # warm-up unchanged


def test_planned_epochs_fill_the_budget():
    assert planned_epochs(2, [10.0, 10.0], 100.0) == 10  # 80 s left at 10 s per epoch
    # 100 s left at the median 20 s, less 10 s kept for an epoch as slow as the slowest recent one (30 s)
    assert planned_epochs(3, [10.0, 30.0, 20.0], 160.0) == 3 + 4
    assert (
        planned_epochs(3, [10.0, 30.0, 20.0], 170.0) == 3 + 5
    )  # 110 s left: 4 epochs of 20 s and one of 30 s
    assert planned_epochs(5, [10.0] * 5, 40.0) == 6  # budget spent: the next epoch is the last
    # the median of the last five ignores an outlier epoch (e.g. one with a long label step)
    assert planned_epochs(6, [100.0, 10.0, 10.0, 10.0, 10.0, 10.0], 250.0) == 6 + 10


def test_label_epochs_round_steps_up_to_epoch_ends():
    assert label_epochs([0, 3, 6, 7, 8], steps_per_epoch=4) == [1, 2]  # the step-0 update is not moved
    assert label_epochs(label_schedule(5, 50, "linear"), steps_per_epoch=10) == [1, 2, 3, 4]
    assert label_epochs([0], steps_per_epoch=4) == []


def test_compare_configs_names_differences():
    assert compare_configs({"arch": "convnet", "lr": 1}, {"arch": "convnet", "lr": 2}) == []
    assert compare_configs({"arch": "convnet"}, {"arch": "resnet18"}) == ["arch: 'convnet' -> 'resnet18'"]
    # the same weights' names, another network: an un-pooled block
    assert compare_configs({"pools": None}, {"pools": [True, False]}) == ["pools: None -> [True, False]"]


@pytest.fixture(scope="module")
def tiny_set():
    full = load_dataset("digits", split="train")
    idx = torch.arange(240)
    return ImageSet(
        images=full.images[idx],
        targets=full.targets[idx],
        classes=full.classes,
        name="digits",
        mean=full.mean,
        std=full.std,
    )


def make_trainer(imageset, out, *, epochs=2, lr=0.05, seed=0, init_seed=0, projector=(), **settings):
    torch.manual_seed(init_seed)
    settings = {"label_updates": 4, "label_heads": "round-robin", **settings}
    model = create_model("convnet", [6, 8], widths=(8, 16), input_size=8, projector=projector)
    return Trainer(
        model,
        imageset,
        out_dir=out,
        epochs=epochs,
        batch_size=40,
        lr=lr,
        lam=25.0,
        **settings,
        augment=BatchAugment(8, crop_scale=(0.6, 1.0), flip_p=0.0, mean=imageset.mean, std=imageset.std),
        eval_transform=EvalTransform(8, mean=imageset.mean, std=imageset.std),
        device=torch.device("cpu"),
        seed=seed,
        config={"arch": "convnet", "epochs": epochs},
        progress=False,
    )


def test_end_to_end_writes_the_run(tiny_set, tmp_path):
    from sela.train import finish_run

    trainer = make_trainer(tiny_set, tmp_path)
    history = trainer.fit()
    summary = finish_run(trainer, tiny_set, knn_k=20, knn_temperature=0.1)
    for name in (
        "checkpoint.pt",
        "metrics.jsonl",
        "labels.csv",
        "summary.json",
        "curves.png",
        "clusters.png",
        "cluster_sizes.png",
    ):
        assert (tmp_path / name).is_file(), name
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2] and len(history) == 2
    assert all(math.isfinite(m["loss"]) and 0 <= m["label_share"] <= 1 for m in lines)
    assert trainer.label_steps == [0, 3, 6]  # 4 quadratic updates over 12 steps, two merged at step 0
    assert trainer.state.n_updates == 3
    # labels are balanced (equipartition) and every head was updated round-robin
    for h, k in enumerate([6, 8]):
        sizes = torch.bincount(trainer.state.labels[h], minlength=k)
        assert sizes.min() >= 240 / k * 0.5, sizes
    assert set(summary) >= {"knn_top1", "nmi", "ari", "accuracy", "heads", "best_head"}
    csv = (tmp_path / "labels.csv").read_text().splitlines()
    assert csv[0] == "index,head0,head1" and len(csv) == 241


RECORDED = {"label_inputs": "recorded", "label_updates": 3, "label_spacing": "linear"}


@pytest.mark.filterwarnings("ignore:epoch")  # the tiny run's loss stays near chance in the recorded case
@pytest.mark.filterwarnings("ignore:the swapped objective")
@pytest.mark.parametrize(
    "settings",
    [
        {"precision": "fp32"},
        {"precision": "bf16"},
        {**RECORDED, "precision": "bf16"},
        {"objective": "swapped", "precision": "fp32"},
        {"objective": "swapped", "precision": "fp32", "swap_queue": 100},
    ],
    ids=["eval-fp32", "eval-bf16", "recorded-bf16", "swapped", "swapped-queue"],
)
def test_resume_is_exact(tiny_set, tmp_path, settings):
    full = make_trainer(tiny_set, tmp_path / "a", epochs=3, **settings)
    full.fit()
    first = make_trainer(tiny_set, tmp_path / "b", epochs=3, **settings)
    first.fit(max_epochs=1)
    second = make_trainer(tiny_set, tmp_path / "b", epochs=3, init_seed=123, **settings)  # overwritten
    second.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert second.epoch == 1
    second.fit()
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(full.state.labels, second.state.labels)


def test_resume_rejects_other_configuration(tiny_set, tmp_path):
    t = make_trainer(tiny_set, tmp_path)
    t.fit(max_epochs=1)
    other = make_trainer(tiny_set, tmp_path, epochs=3)
    with pytest.raises(ValueError, match="different configuration"):
        other.load_checkpoint(tmp_path / "checkpoint.pt")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_set, tmp_path):
    t = make_trainer(tiny_set, tmp_path)
    t.fit(max_epochs=1)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    with torch.no_grad():
        t.model.heads[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        t.fit()
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert kept["epoch"] == saved["epoch"] == 1


def test_recorded_label_steps_use_the_training_pass(tiny_set, tmp_path, monkeypatch):
    t = make_trainer(tiny_set, tmp_path, epochs=3, **RECORDED)
    assert t.label_steps == [0] and t.label_epochs == [1, 2]
    passes, snapshots = [], []
    features, update = t._features, t.update_labels
    monkeypatch.setattr(t, "_features", lambda rows: passes.append(len(rows)) or features(rows))
    monkeypatch.setattr(
        t, "update_labels", lambda step: (update(step), snapshots.append(t.state.labels.clone()))[0]
    )
    monkeypatch.setattr(t, "_check_health", lambda stats: snapshots.append(t.state.labels.clone()))
    t.fit()
    assert passes == [240]  # one forward pass over the data: the first assignment, from the random network
    assert t.state.n_updates == 3
    first, epoch1, epoch2, epoch3 = snapshots
    # round-robin: the first step assigns both heads, then head 1 (end of epoch 1), head 0 (end of epoch 2)
    assert all(len(first[h].unique()) == k for h, k in enumerate([6, 8]))
    assert torch.equal(first[0], epoch1[0]) and not torch.equal(first[1], epoch1[1])
    assert not torch.equal(epoch1[0], epoch2[0]) and torch.equal(epoch1[1], epoch2[1])
    assert torch.equal(epoch2, epoch3)
    for h, k in enumerate([6, 8]):  # equipartition over the recorded rows (all 240: 6 batches of 40)
        assert torch.bincount(t.state.labels[h], minlength=k).min() >= 240 / k * 0.5
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [m["label_updates"] for m in lines] == [2, 3, 3]
    assert "label_buffers_mb" in lines[1] and "label_buffers_mb" not in lines[2]
    assert lines[1]["label_time_s"] > 0 and lines[2]["label_time_s"] == 0


def test_recorded_outputs_are_the_loss_outputs(tiny_set, tmp_path, monkeypatch):
    """The labels of a recorded step are the solver's answer for exactly the logits the loss saw."""
    import sela.train as train_mod

    t = make_trainer(tiny_set, tmp_path, epochs=2, label_heads="all", **{**RECORDED, "label_updates": 2})
    seen, solved = [], []
    forward = t.net.forward
    monkeypatch.setattr(t.net, "forward", lambda x: seen.append(out := forward(x)) or out)
    real_assign = train_mod.assign
    monkeypatch.setattr(
        train_mod, "assign", lambda logits, **kw: solved.append(logits.clone()) or real_assign(logits, **kw)
    )
    t.fit()
    # epoch 1: 6 training batches (their head-0 outputs, in order) then one solve per head
    steps_1 = torch.cat([o[0].detach() for o in seen[:6]])  # (240, 6)
    assert torch.equal(solved[2], steps_1)  # solves 0-1: the first step's pass; 2-3: end of epoch 1


def test_label_step_goes_through_the_projector(tiny_set, tmp_path):
    from sela.sinkhorn import assign

    t = make_trainer(tiny_set, tmp_path, projector=(12,), label_heads="all", precision="fp32")
    t.update_labels(0)  # eval-mode inputs: BatchNorm (the projector's too) calibrated from the data first
    assert t.model.projector[1].num_batches_tracked > 0
    with torch.no_grad():
        logits = t.model.eval()(t.eval_transform(tiny_set.images))  # H x (N, K_h)
    for h, out in enumerate(logits):
        agree = (assign(out, lam=25.0).labels == t.state.labels[h]).float().mean()
        assert agree > 0.98, (h, agree)


def test_autocast_dtype_resolves_precision(monkeypatch):
    import sela.train as train_mod

    cpu = torch.device("cpu")
    assert train_mod.autocast_dtype("fp32", cpu) is None
    assert train_mod.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: False)
    assert train_mod.autocast_dtype("auto", cpu) is None  # emulated bf16 would be slower
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: True)
    assert train_mod.autocast_dtype("auto", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        train_mod.autocast_dtype("fp16", cpu)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_forward_passes_run_in_the_chosen_precision(tiny_set, tmp_path, monkeypatch, precision):
    t = make_trainer(tiny_set, tmp_path, epochs=1, precision=precision, **RECORDED)
    assert t.precision == precision
    dtypes = []
    forward = t.net.forward
    monkeypatch.setattr(t.net, "forward", lambda x: dtypes.append((out := forward(x))[0].dtype) or out)
    t.fit()
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert dtypes and set(dtypes) == {expected}
    assert t.model.heads[0].weight.dtype == torch.float32  # weights stay float32


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
def test_swapped_objective_trains_cosine_prototypes_and_labels_all_images(tiny_set, tmp_path, monkeypatch):
    import sela.train as train_mod

    t = make_trainer(tiny_set, tmp_path, epochs=2, objective="swapped", precision="fp32")
    assert t.model.normalize_heads and t.label_steps == []
    solved = []
    real_assign = train_mod.assign
    monkeypatch.setattr(train_mod, "assign", lambda x, **kw: solved.append(len(x)) or real_assign(x, **kw))
    before = [h.weight.detach().clone() for h in t.model.heads]
    history = t.fit()
    assert all(math.isfinite(m["loss"]) for m in history)
    assert solved == [len(tiny_set)] * 2  # no label step until the last epoch ends: one per head
    assert t.state.n_updates == 1
    for h, head in enumerate(t.model.heads):
        assert not torch.allclose(head.weight, before[h])  # the prototypes learn
        assert torch.allclose(head.weight.norm(dim=1), torch.ones(head.out_features), atol=1e-5)
        assert torch.equal(head.bias, torch.zeros_like(head.bias))
        sizes = torch.bincount(t.state.labels[h], minlength=head.out_features)
        assert sizes.sum() == len(tiny_set) and sizes.min() > 0  # the final global, balanced step
    with torch.no_grad():  # the heads output cosine similarities
        scores = t.model.eval()(t.eval_transform(tiny_set.images[:5]))
    assert all(s.abs().max() <= 1 + 1e-5 for s in scores)


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
def test_swapped_loss_predicts_the_other_views_codes(tiny_set, tmp_path, monkeypatch):
    import sela.train as train_mod

    t = make_trainer(tiny_set, tmp_path, epochs=1, objective="swapped", precision="fp32")
    seen = []
    real = train_mod.soft_codes
    monkeypatch.setattr(
        train_mod, "soft_codes", lambda x, **kw: seen.append((x, out := real(x, **kw))) or out
    )
    images, idx = tiny_set.images[:8], torch.arange(8)
    loss = t._swapped_loss(images, idx, torch.Generator().manual_seed(0))
    expected = 0.0
    for scores, codes in seen:  # one per head, (16, K): 8 first views, then 8 second views
        swapped = torch.cat([codes[8:], codes[:8]])
        expected += -(swapped * torch.log_softmax(scores / 0.1, 1)).sum(1).mean()
        assert not torch.allclose(scores[:8], scores[8:])  # two different views
    assert torch.allclose(loss, expected / len(seen))
    assert torch.equal(t.state.labels[0, :8], seen[0][1][:8].argmax(1))


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
def test_swapped_queue_joins_the_balancing_scored_by_the_current_prototypes(tiny_set, tmp_path, monkeypatch):
    import sela.train as train_mod

    t = make_trainer(tiny_set, tmp_path, objective="swapped", precision="fp32", swap_queue=40)
    seen = []
    real = train_mod.soft_codes
    monkeypatch.setattr(
        train_mod, "soft_codes", lambda x, **kw: seen.append((x, out := real(x, **kw))) or out
    )
    b, gen = 8, torch.Generator().manual_seed(0)
    t._swapped_loss(tiny_set.images[:b], torch.arange(b), gen)  # empty queue: the batch alone
    assert [x.shape[0] for x, _ in seen] == [2 * b, 2 * b]
    first_rows = t._queue.clone()
    assert first_rows.shape == (2 * b, t.model.head_dim)
    assert torch.allclose(first_rows.norm(dim=1), torch.ones(2 * b))  # unit-norm head inputs
    with torch.no_grad():  # the prototypes move between steps; the queue is scored by the new ones
        for head in t.model.heads:
            head.weight.copy_(torch.nn.functional.normalize(torch.randn_like(head.weight), dim=1))
    seen.clear()
    images = tiny_set.images[b : 2 * b]
    loss = t._swapped_loss(images, torch.arange(b, 2 * b), gen)
    expected = 0.0
    for h, (x, balanced) in enumerate(seen):
        assert x.shape[0] == 4 * b  # the batch's 2b views and the queue's 2b rows
        assert torch.allclose(x[2 * b :], first_rows @ t.model.heads[h].weight.t(), atol=1e-6)
        codes = balanced[: 2 * b]  # only the batch's codes are targets
        assert not torch.allclose(codes, real(x[: 2 * b], epsilon=t.swap_epsilon))  # the queue mattered
        scores = x[: 2 * b]  # the batch's own scores come first
        swapped = torch.cat([codes[b:], codes[:b]])
        expected += -(swapped * torch.log_softmax(scores / 0.1, 1)).sum(1).mean()
    assert torch.allclose(loss, expected / len(seen), atol=1e-6)
    assert t._queue.shape[0] == 4 * b and torch.equal(t._queue[2 * b :], first_rows)  # newest first
    t._swapped_loss(tiny_set.images[:b], torch.arange(b), gen)
    assert t._queue.shape[0] == 40  # capped: the oldest rows dropped
    assert torch.equal(t._queue[4 * b :], first_rows[:8])  # the first batch's newest 8 rows remain
    t.train_one_epoch(0)
    assert len(t._queue) == 40


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
def test_multicrop_small_views_predict_the_full_views_codes(tiny_set, tmp_path, monkeypatch):
    import sela.train as train_mod

    small = BatchAugment(4, crop_scale=(0.2, 0.5), mean=tiny_set.mean, std=tiny_set.std)
    t = make_trainer(
        tiny_set, tmp_path, objective="swapped", precision="fp32", small_crops=3, small_augment=small
    )
    seen, inputs = [], []
    real = train_mod.soft_codes
    monkeypatch.setattr(train_mod, "soft_codes", lambda x, **kw: seen.append(out := real(x, **kw)) or out)
    forward = t.net.forward
    monkeypatch.setattr(t.net, "forward", lambda x, **kw: inputs.append(x) or forward(x, **kw))
    b, c = 8, tiny_set.images.shape[1]
    loss = t._swapped_loss(tiny_set.images[:b], torch.arange(b), torch.Generator().manual_seed(0))
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


@pytest.mark.filterwarnings("ignore:the swapped objective")
def test_multicrop_run_resumes_exactly(tiny_set, tmp_path):
    small = dict(small_crops=2, small_augment=BatchAugment(4, mean=tiny_set.mean, std=tiny_set.std))
    kw = dict(epochs=2, objective="swapped", precision="fp32", **small)
    full = make_trainer(tiny_set, tmp_path / "a", **kw)
    full.fit()
    part = make_trainer(tiny_set, tmp_path / "b", **kw)
    part.fit(max_epochs=1)
    again = make_trainer(tiny_set, tmp_path / "b", init_seed=7, **kw)
    again.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    again.fit()
    for (name, x), (_, y) in zip(
        full.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    assert torch.equal(full.state.labels, again.state.labels)


def test_trainer_validates(tiny_set, tmp_path):
    model = create_model("convnet", [300], widths=(8,), input_size=8)
    with pytest.raises(ValueError, match="clusters"):
        Trainer(
            model,
            tiny_set,
            out_dir=tmp_path,
            epochs=1,
            batch_size=40,
            lr=0.1,
            augment=BatchAugment(8),
            eval_transform=EvalTransform(8),
            device=torch.device("cpu"),
        )


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"objective": "swav"}, "objective must be one of sela, swapped"),
        ({"objective": "swapped", "label_inputs": "recorded"}, "--label-inputs eval"),
        ({"objective": "swapped", "swap_temperature": 0.0}, "temperature"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"small_crops": 2, "small_augment": BatchAugment(4)}, "need the swapped objective"),
        ({"objective": "swapped", "small_crops": -1}, "count >= 0"),
        ({"objective": "swapped", "small_crops": 2}, "needs small_augment"),
        ({"swap_queue": 64}, "queue .* needs the swapped objective"),
        ({"objective": "swapped", "swap_queue": -1}, "size >= 0"),
    ],
)
def test_trainer_rejects_bad_objective_settings(tiny_set, tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tiny_set, tmp_path, **settings)


def test_swapped_objective_warns_when_prototypes_cannot_span_the_features(tiny_set, tmp_path):
    # make_trainer's heads have 6 and 8 prototypes on 16-d features
    with pytest.warns(UserWarning, match="collapses to ln K"):
        make_trainer(tiny_set, tmp_path, objective="swapped")


@pytest.mark.filterwarnings("ignore:the swapped objective")
@pytest.mark.parametrize(("objective", "advice"), [("sela", "larger --lam"), ("swapped", "fewer --clusters")])
def test_health_warns_about_chance_level_loss_and_empty_clusters(tiny_set, tmp_path, objective, advice):
    t = make_trainer(tiny_set, tmp_path, objective=objective)
    healthy = {"min": 3, "n_empty": 0}
    stats = {"epoch": 3, "loss": 0.5, "heads": [healthy, healthy]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t._check_health(stats)  # learning, no empty cluster: silent
    with pytest.warns(UserWarning, match="chance level ln K"):
        t._check_health({**stats, "loss": math.log(7.0)})  # heads of 6 and 8 clusters: ln K about 1.9
    with pytest.warns(UserWarning, match=rf"heads \[1\].*{advice}"):
        t._check_health({**stats, "heads": [healthy, {"min": 0, "n_empty": 2}]})


def _fixed_epoch_time(trainer: Trainer, seconds: float) -> None:
    """Make every epoch of ``trainer`` report ``seconds`` (the time budget's clock), deterministically."""
    train_one_epoch = trainer.train_one_epoch

    def timed(epoch: int) -> dict:
        return {**train_one_epoch(epoch), "time_s": seconds}

    trainer.train_one_epoch = timed


@pytest.mark.filterwarnings("ignore:epoch")
@pytest.mark.parametrize("settings", [{}, RECORDED], ids=["eval", "recorded"])
def test_time_limit_replans_the_run_to_fill_the_budget(tiny_set, tmp_path, settings):
    # 10 s per epoch and 60 s: the first plan of 2 epochs grows to 6 after the first epoch
    t = make_trainer(tiny_set, tmp_path, epochs=2, time_limit_s=60.0, **settings)
    _fixed_epoch_time(t, 10.0)
    lrs = []
    step = t.optimizer.step

    def record_lr(*a, **kw):
        lrs.append(t.optimizer.param_groups[0]["lr"])
        return step(*a, **kw)

    t.optimizer.step = record_lr
    history = t.fit()
    assert len(history) == t.epochs == t.epoch == 6 and t.total_steps == 36
    assert t.lr_anchor == (6, 0.0)  # re-planned at the end of the one-epoch warm-up
    decay = lrs[6:]
    assert decay == sorted(decay, reverse=True) and decay[0] == pytest.approx(0.05) and decay[-1] < 1e-3
    # the label schedule follows the new length: 4 updates over 36 steps, not over the first plan's 12
    if settings:
        # step 0 and the first plan's end of epoch 1 (12 * 1 / 3 steps), then the new plan's epochs 2, 4
        assert t.label_epochs == [2, 4] and t.state.n_updates == 4
    else:
        # 36 * (i / 4)^2 from step 6 on; epoch 1 ran the first plan's steps 0 and 3 (12 * (i / 4)^2)
        assert t.label_steps == [9, 20] and t.state.n_updates == 4
    assert [m["epoch"] for m in map(json.loads, open(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
@pytest.mark.filterwarnings("ignore:epoch")  # the tiny run's loss stays near chance
def test_time_limit_shrinks_the_plan_and_resume_counts_time_spent(tiny_set, tmp_path):
    # a first plan of 8 epochs at 10 s each does not fit 30 s: after epoch 1 the run becomes 3 epochs
    first = make_trainer(tiny_set, tmp_path, epochs=8, time_limit_s=30.0, objective="swapped")
    _fixed_epoch_time(first, 10.0)
    first.fit(max_epochs=2)
    assert first.epochs == 3 and first.epoch == 2 and first.state.n_updates == 0
    resumed = make_trainer(tiny_set, tmp_path, epochs=8, time_limit_s=30.0, objective="swapped")
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert (resumed.epochs, resumed.epoch_times, resumed.lr_anchor) == (3, [10.0, 10.0], first.lr_anchor)
    _fixed_epoch_time(resumed, 10.0)
    assert len(resumed.fit()) == 1 and resumed.epoch == 3
    assert resumed.state.n_updates == 1  # the swapped objective's final label step ran in the last epoch


def test_time_limit_must_be_positive(tiny_set, tmp_path):
    with pytest.raises(ValueError, match="time limit must be > 0"):
        make_trainer(tiny_set, tmp_path, time_limit_s=0.0)
