"""The training loop: schedules, an end-to-end run, exact resume, divergence handling."""

import json
import math
import time
import warnings

import pytest
import torch

from sela.data import BatchAugment, EvalTransform
from sela.models import create_model
from sela.objectives import SelaObjective, SwappedObjective
from sela.train import Trainer, TrainingDiverged

SWAP_KEYS = {"swap_temperature": "temperature", "swap_epsilon": "epsilon", "swap_queue": "queue"}


def make_objective(imageset, objective="sela", **swap):
    """The objective of make_trainer; ``swap``: SwappedObjective's settings (swap_* / small_* names)."""
    augment = BatchAugment(8, crop_scale=(0.6, 1.0), flip_p=0.0, mean=imageset.mean, std=imageset.std)
    if objective == "sela":
        prototypes = swap.pop("sela_prototypes", "learned")
        return SelaObjective(
            augment, temperature=swap.pop("sela_temperature", None), prototypes=prototypes, **swap
        )
    return SwappedObjective(augment, **{SWAP_KEYS.get(k, k): v for k, v in swap.items()})


def make_trainer(imageset, out, *, epochs=2, lr=0.05, seed=0, init_seed=0, projector=(), **settings):
    # label_share 0.5: the tiny runs keep several label passes (0.15 would merge all but the first)
    settings = {"label_updates": 4, "label_heads": "round-robin", "lam": 25.0, "label_share": 0.5, **settings}
    swap = {k: settings.pop(k) for k in list(settings) if k.startswith(("swap_", "small_", "sela_", "soft_"))}
    objective = make_objective(imageset, settings.pop("objective", "sela"), **swap)
    torch.manual_seed(init_seed)
    model = create_model(
        "convnet",
        [6, 8],
        widths=(8, 16),
        input_size=8,
        projector=projector,
        normalize_heads=objective.cosine_heads,
    )
    return Trainer(
        model,
        imageset,
        objective=objective,
        out_dir=out,
        epochs=epochs,
        batch_size=40,
        lr=lr,
        **settings,
        eval_transform=EvalTransform(8, mean=imageset.mean, std=imageset.std),
        device=torch.device("cpu"),
        seed=seed,
        metadata={"arch": "convnet", "epochs": epochs},
        progress=False,
    )


def assert_resumes_exactly(imageset, tmp_path, **kw) -> None:
    """A run stopped after one epoch and resumed by a new Trainer (other initial weights, overwritten by
    the checkpoint) ends with the same weights and labels as the run trained straight through."""
    full = make_trainer(imageset, tmp_path / "a", **kw)
    full.fit()
    part = make_trainer(imageset, tmp_path / "b", **kw)
    part.fit(max_epochs=1)
    again = make_trainer(imageset, tmp_path / "b", init_seed=7, **kw)
    again.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert again.epoch == 1
    again.fit()
    for (name, x), (_, y) in zip(
        full.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    assert torch.equal(full.state.labels, again.state.labels)
    if full.state.codes is not None:
        assert torch.equal(full.state.codes, again.state.codes)
        assert torch.equal(full.state.weights, again.state.weights)


@pytest.mark.filterwarnings("ignore:the run collapsed")  # 2 epochs of 240 tiny digits: one cluster holds 96 %
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
    assert trainer.plan.label_steps == [0, 3, 6]  # 4 quadratic updates over 12 steps, two merged at step 0
    assert trainer.state.n_updates == 3
    # labels are balanced (equipartition) and every head was updated round-robin
    for h, k in enumerate([6, 8]):
        sizes = torch.bincount(trainer.state.labels[h], minlength=k)
        assert sizes.min() >= 240 / k * 0.5, sizes
    assert set(summary) >= {"knn_top1", "nmi", "ari", "many_to_one", "heads", "best_head", "eval_time_s"}
    assert "accuracy" not in summary  # 6 and 8 clusters for 10 classes: no one-to-one matching
    csv = (tmp_path / "labels.csv").read_text().splitlines()
    assert csv[0] == "index,head0,head1" and len(csv) == 241
    # the label-free signals (docs/training.md, "Did it learn? The verdict"): stable names, floats
    assert set(summary["signals"]) == {
        "rankme",
        "rankme_fraction",
        "head_nmi",
        "label_agreement",
        "view_knn_overlap",
        "raw_view_knn_overlap",
        "largest_cluster_share",
    }
    assert all(isinstance(v, float) for v in summary["signals"].values())
    assert 1 <= summary["signals"]["rankme"] <= 16 and 0 < summary["signals"]["view_knn_overlap"] <= 1
    assert summary["verdict"].startswith("verdict: ") and "raw pixels" in summary["verdict"]
    assert json.loads((tmp_path / "summary.json").read_text())["signals"] == summary["signals"]


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
    assert_resumes_exactly(tiny_set, tmp_path, epochs=3, **settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"sela_temperature": 0.1},
        {"small_crops": 2},
        {**RECORDED, "sela_temperature": 0.1, "small_crops": 1},
        {"soft_targets": 3},
        {**RECORDED, "sela_temperature": 0.1, "soft_targets": 2},
        {**RECORDED, "sela_temperature": 0.1, "sela_prototypes": "centroids"},
    ],
    ids=[
        "cosine",
        "multicrop",
        "recorded-cosine-multicrop",
        "soft",
        "recorded-cosine-soft",
        "recorded-centroids",
    ],
)
def test_sela_objective_options_resume_exactly(tiny_set, tmp_path, settings):
    if "small_crops" in settings:
        settings = {**settings, "small_augment": BatchAugment(4, mean=tiny_set.mean, std=tiny_set.std)}
    assert_resumes_exactly(tiny_set, tmp_path, epochs=3, precision="fp32", **settings)


def test_resume_rejects_a_checkpoint_of_another_network(tiny_set, tmp_path):
    t = make_trainer(tiny_set, tmp_path)
    t.fit(max_epochs=1)
    other = make_trainer(tiny_set, tmp_path, projector=(12,))
    with pytest.raises(ValueError, match="does not fit this model"):
        other.load_checkpoint(tmp_path / "checkpoint.pt")


def test_resume_keeps_each_epoch_once_in_the_metrics(tiny_set, tmp_path):
    t = make_trainer(tiny_set, tmp_path, epochs=3)
    t.fit(max_epochs=2)
    # a crash after epoch 3's metrics line but before its checkpoint: the line is there twice after resume
    t.fit(max_epochs=1)
    torch.save({**torch.load(tmp_path / "checkpoint.pt", weights_only=True), "epoch": 2}, tmp_path / "c.pt")
    again = make_trainer(tiny_set, tmp_path, epochs=3)
    again.load_checkpoint(tmp_path / "c.pt")
    assert [m["epoch"] for m in map(json.loads, open(tmp_path / "metrics.jsonl"))] == [1, 2]
    again.fit()
    assert [m["epoch"] for m in map(json.loads, open(tmp_path / "metrics.jsonl"))] == [1, 2, 3]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_set, tmp_path):
    t = make_trainer(tiny_set, tmp_path)
    t.fit(max_epochs=1)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    with torch.no_grad():
        t.model.heads[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        t.fit()
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == saved["epoch"] == 1


def test_recorded_label_steps_use_the_training_pass(tiny_set, tmp_path, monkeypatch):
    t = make_trainer(tiny_set, tmp_path, epochs=3, **RECORDED)
    assert t.plan.label_steps == [0] and t.plan.label_epochs == [1, 2]
    passes, snapshots = [], []
    features, update = t.label_pass.head_inputs, t.update_labels
    monkeypatch.setattr(t.label_pass, "head_inputs", lambda rows: passes.append(len(rows)) or features(rows))
    monkeypatch.setattr(t, "update_labels", lambda: (update(), snapshots.append(t.state.labels.clone()))[0])
    monkeypatch.setattr(t.health, "on_epoch", lambda stats: snapshots.append(t.state.labels.clone()))
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
    assert ["label_agreement" in m for m in lines] == [True, True, False]  # the recorded steps' NMI
    assert lines[1]["label_time_s"] > 0 and lines[2]["label_time_s"] == 0


def test_recorded_outputs_are_the_loss_outputs(tiny_set, tmp_path, monkeypatch):
    """The labels of a recorded step are the solver's answer for exactly the logits the loss saw."""
    import sela.labeller as labeller_mod

    t = make_trainer(tiny_set, tmp_path, epochs=2, label_heads="all", **{**RECORDED, "label_updates": 2})
    seen, solved = [], []
    forward = t.net.forward
    monkeypatch.setattr(t.net, "forward", lambda x, **kw: seen.append(out := forward(x, **kw)) or out)
    real_assign = labeller_mod.assign
    monkeypatch.setattr(
        labeller_mod,
        "assign",
        lambda logits, **kw: solved.append(logits.clone()) or real_assign(logits, **kw),
    )
    t.fit()
    # epoch 1: 6 training batches (their head-0 outputs, in order) then one solve per head
    steps_1 = torch.cat([o[0].detach() for o in seen[:6]])  # (240, 6)
    assert torch.equal(solved[2], steps_1)  # solves 0-1: the first step's pass; 2-3: end of epoch 1


def test_label_steps_record_how_much_they_changed_the_labels(tiny_set, tmp_path):
    """Each label step after the first notes, per head it re-assigns, the NMI between the head's labels
    before and after it; the epoch's metrics line holds their mean."""
    from sela.eval.signals import label_nmi

    t = make_trainer(tiny_set, tmp_path, epochs=2)
    t.update_labels()  # the first step: nothing to compare with
    assert t.label_pass.agreement == [None, None] and t.label_pass.agreement_stats() == {}
    t.state.n_updates = 0  # let fit's own first step assign again
    t.fit()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    # label steps 0 (both heads, the first), 3 (head 1) in epoch 1 and 6 (head 0) in epoch 2
    assert [round(m["label_agreement"], 4) for m in lines] == [
        round(t.label_pass.agreement[h], 4) for h in (1, 0)
    ]
    before = t.state.labels.clone()
    t.update_labels()  # step 4, round-robin: head 1
    assert t.label_pass.agreement[1] == label_nmi(before[1], t.state.labels[1])
    assert t.label_pass.agreement_stats() == {"label_agreement": round(t.label_pass.agreement[1], 4)}
    assert t.label_pass.agreement_stats() == {}  # read once per epoch


def test_a_collapsed_network_gets_a_collapse_warning(tiny_set, tmp_path):
    from sela.train import finish_run

    t = make_trainer(tiny_set, tmp_path, epochs=1)
    t.fit()
    last = [m for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    with torch.no_grad():  # every image's features become the same vector
        last.weight.zero_()
        last.bias.fill_(1.0)
    with pytest.warns(UserWarning, match="the run collapsed .*effective rank 1/16.*--lr"):
        summary = finish_run(t, tiny_set, knn_k=20, knn_temperature=0.1)
    assert summary["verdict"].startswith("verdict: collapsed")
    assert summary["signals"]["rankme"] == pytest.approx(1.0, abs=0.01)
    assert summary["signals"]["largest_cluster_share"] == 1.0
    assert summary["signals"]["view_knn_overlap"] < 0.2  # chance, 10 / 239 = 0.04, not a perfect score


def test_label_step_goes_through_the_projector(tiny_set, tmp_path):
    from sela.sinkhorn import assign

    t = make_trainer(tiny_set, tmp_path, projector=(12,), label_heads="all", precision="fp32")
    t.update_labels()  # eval-mode inputs: BatchNorm (the projector's too) calibrated from the data first
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
    monkeypatch.setattr(
        t.net, "forward", lambda x, **kw: dtypes.append((out := forward(x, **kw))[0].dtype) or out
    )
    t.fit()
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert dtypes and set(dtypes) == {expected}
    assert t.model.heads[0].weight.dtype == torch.float32  # weights stay float32


@pytest.mark.filterwarnings("ignore:the swapped objective")  # 6 and 8 prototypes, 16-d
def test_swapped_objective_trains_cosine_prototypes_and_labels_all_images(tiny_set, tmp_path, monkeypatch):
    import sela.labeller as labeller_mod

    t = make_trainer(tiny_set, tmp_path, epochs=2, objective="swapped", precision="fp32")
    assert t.model.normalize_heads and t.plan.label_steps == []
    solved = []
    real_assign = labeller_mod.assign
    monkeypatch.setattr(labeller_mod, "assign", lambda x, **kw: solved.append(len(x)) or real_assign(x, **kw))
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


@pytest.mark.filterwarnings("ignore:the swapped objective")
def test_multicrop_run_resumes_exactly(tiny_set, tmp_path):
    small = dict(small_crops=2, small_augment=BatchAugment(4, mean=tiny_set.mean, std=tiny_set.std))
    assert_resumes_exactly(tiny_set, tmp_path, epochs=2, objective="swapped", precision="fp32", **small)


def test_trainer_validates(tiny_set, tmp_path):
    model = create_model("convnet", [300], widths=(8,), input_size=8)
    with pytest.raises(ValueError, match="clusters"):
        Trainer(
            model,
            tiny_set,
            objective=SelaObjective(BatchAugment(8)),
            out_dir=tmp_path,
            epochs=1,
            batch_size=40,
            lr=0.1,
            eval_transform=EvalTransform(8),
            device=torch.device("cpu"),
        )


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"objective": "swapped", "label_inputs": "recorded"}, "--label-inputs eval"),
        ({"objective": "swapped", "swap_temperature": 0.0}, "temperature"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"objective": "swapped", "small_crops": -1}, ">= 0"),
        ({"objective": "swapped", "small_crops": 2}, "needs small_augment"),
        ({"objective": "swapped", "swap_queue": -1}, ">= 0"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": float("nan")}, "learning rate"),
        ({"lam": 0.0}, "lam must be"),
        ({"lam": float("inf")}, "lam must be"),
    ],
)
def test_trainer_rejects_bad_settings(tiny_set, tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tiny_set, tmp_path, **settings)


def test_swapped_objective_warns_when_prototypes_cannot_span_the_features(tiny_set, tmp_path):
    # make_trainer's heads have 6 and 8 prototypes on 16-d features
    with pytest.warns(UserWarning, match="collapses to ln K"):
        make_trainer(tiny_set, tmp_path, objective="swapped")


@pytest.mark.filterwarnings("ignore:the swapped objective")
@pytest.mark.parametrize(
    ("objective", "advice"), [("sela", "smaller --lam"), ("swapped", "fewer --clusters")]
)
def test_health_warns_about_chance_level_loss_and_empty_clusters(tiny_set, tmp_path, objective, advice):
    t = make_trainer(tiny_set, tmp_path, objective=objective)
    healthy = {"min": 3, "n_empty": 0}
    stats = {"epoch": 3, "loss": 0.5, "heads": [healthy, healthy]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.health.on_epoch(stats)  # learning, no empty cluster: silent
    with pytest.warns(UserWarning, match="chance level ln K"):
        t.health.on_epoch({**stats, "loss": math.log(7.0)})  # heads of 6 and 8 clusters: ln K about 1.9
    with pytest.warns(UserWarning, match=rf"heads \[1\].*{advice}"):
        t.health.on_epoch({**stats, "heads": [healthy, {"min": 0, "n_empty": 2}]})


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
    assert len(history) == t.epochs == t.epoch == 6 and t.plan.total_steps == 36
    assert t.plan.lr_anchor == (6, 0.0)  # re-planned at the end of the one-epoch warm-up
    decay = lrs[6:]
    assert decay == sorted(decay, reverse=True) and decay[0] == pytest.approx(0.05) and decay[-1] < 1e-3
    # the label schedule follows the new length: 4 updates over 36 steps, not over the first plan's 12
    if settings:
        # step 0 and the first plan's end of epoch 1 (12 * 1 / 3 steps), then the new plan's epochs 2, 4
        assert t.plan.label_epochs == [2, 4] and t.state.n_updates == 4
    else:
        # 36 * (i / 4)^2 from step 6 on; epoch 1 ran the first plan's steps 0 and 3 (12 * (i / 4)^2)
        assert t.plan.label_steps == [9, 20] and t.state.n_updates == 4
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
    assert (resumed.epochs, resumed.plan.epoch_times, resumed.plan.lr_anchor) == (
        3,
        [10.0, 10.0],
        first.plan.lr_anchor,
    )
    _fixed_epoch_time(resumed, 10.0)
    assert len(resumed.fit()) == 1 and resumed.epoch == 3
    assert resumed.state.n_updates == 1  # the swapped objective's final label step ran in the last epoch


def test_time_limit_must_be_positive(tiny_set, tmp_path):
    with pytest.raises(ValueError, match="time limit must be > 0"):
        make_trainer(tiny_set, tmp_path, time_limit_s=0.0)


def test_label_passes_are_bounded_to_their_share_of_training(tiny_set, tmp_path):
    t = make_trainer(tiny_set, tmp_path, epochs=12, label_updates=40, label_share=0.15)
    # a pass at 8 px costs a third of an epoch of 8 px views: at most 15 % means >= 1.9 epochs apart
    steps = t.plan.label_steps
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert steps[0] == 0 and min(gaps) >= 12 and len(steps) <= 12 * 6 // 12
    assert [s for s in steps if s < t.plan.steps_per_epoch] == [0]  # no second pass in epoch 1
    t.fit()
    passes = sum(m["label_passes"] for m in map(json.loads, open(tmp_path / "metrics.jsonl")))
    assert passes == len(t.plan.label_steps)


@pytest.mark.filterwarnings("ignore:the swapped objective")
def test_a_budget_shorter_than_the_first_epoch_stops_after_it(tiny_set, tmp_path):
    lines = []
    t = make_trainer(tiny_set, tmp_path, epochs=8, time_limit_s=5.0, objective="swapped", log=lines.append)
    _fixed_epoch_time(t, 10.0)
    history = t.fit()
    assert len(history) == 1 and t.epoch == t.epochs == 1
    assert "first epoch took 10 s of the 5 s budget: stopping after it" in lines[-1]
    assert t.state.n_updates == 1 and history[0]["label_updates"] == 1  # the final labels were assigned
    sizes = torch.bincount(t.state.labels[0], minlength=6)
    assert sizes.sum() == len(tiny_set) and sizes.min() > 0


def test_one_progress_line_per_epoch(tiny_set, tmp_path):
    lines = []
    make_trainer(tiny_set, tmp_path, epochs=2, log=lines.append).fit()
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: loss ") and "label steps" in lines[0]
    assert "smallest" in lines[1] and "min left" in lines[1]


def test_monitor_numbers_join_every_nth_epoch_and_the_last_outside_the_epoch_time(tiny_set, tmp_path):
    calls, lines = [], []

    def monitor(model):
        calls.append(1)
        time.sleep(0.2)
        return {"knn_top1": 50.0 + len(calls)}

    t = make_trainer(tiny_set, tmp_path, epochs=5, monitor=monitor, monitor_every=2, log=lines.append)
    t.fit()
    metrics = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [m.get("knn_top1") for m in metrics] == [None, 51.0, None, 52.0, 53.0]  # epochs 2, 4 and the last
    assert all(m["monitor_time_s"] >= 0.2 for m in metrics if "knn_top1" in m)
    # the plan (time budget) counts the epochs' own times, which leave the monitor out
    assert t.plan.epoch_times == pytest.approx([m["time_s"] for m in metrics], abs=1e-3)
    assert "kNN top-1 52.0 %" in lines[3] and "kNN" not in lines[2]
    with pytest.raises(ValueError, match="monitor_every must be >= 0"):
        make_trainer(tiny_set, tmp_path, monitor=monitor, monitor_every=-1)
