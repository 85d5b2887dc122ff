"""Evaluate a trained model end to end: kNN, linear probe and the clustering quality of every head.

The protocol (``sela eval``):
  * features: the backbone's pooled output (or an intermediate ``layer``), un-augmented images;
  * weighted kNN (Wu et al. 2018): training features vote for test images, top-1 and top-5;
  * linear probe on the frozen, cached features, weight decay chosen on a split of the TRAINING set;
  * every head's argmax predictions on train and test against the ground truth: NMI, AMI, ARI,
    Hungarian accuracy and many-to-one accuracy (the majority class of each cluster, fitted on the
    training predictions and applied to the test ones; the fair score when K exceeds the classes);
  * the stored self-labels of each head against the training ground truth.
The reported head is chosen by NMI on the TRAINING split; its test scores are the headline numbers.

Letters: N training images, M test images, D features, H heads, K_h clusters of head h.
Accuracies are in percent; NMI, AMI and ARI keep scikit-learn's scale.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sela.data import EvalTransform, ImageSet, make_loader
from sela.eval.features import Extracted, extract
from sela.eval.knn import KNN_K, KNN_TEMPERATURE, knn_accuracy
from sela.eval.linear import linear_probe
from sela.eval.metrics import cluster_metrics, cluster_sizes, many_to_one_accuracy

_SCORES = ("nmi", "ami", "ari", "accuracy", "many_to_one")


class _Split(NamedTuple):
    """One split's extracted features and head logits, and which of its images have a ground-truth class."""

    imageset: ImageSet
    extracted: Extracted
    mask: Tensor | None  # (n,) bool, or None when no image has a class

    def truth(self) -> Tensor:
        """(n_labelled,) ground-truth classes of the labelled images."""
        return self.imageset.targets[self.mask]


def _labelled(imageset: ImageSet | None) -> Tensor | None:
    """(n,) bool mask of the images with a ground-truth class, or None when there are none."""
    if imageset is None or imageset.targets is None:
        return None
    mask = imageset.targets >= 0
    return mask if bool(mask.any()) else None


def _extract(model: nn.Module, imageset: ImageSet, *, batch_size: int, workers: int, **kwargs) -> Extracted:
    if imageset.in_memory:
        return extract(model, imageset.images, batch_size=batch_size, **kwargs)
    loader = make_loader(imageset, batch_size, num_workers=workers)  # streamed: decode in workers
    return extract(model, loader, **kwargs)


def _split(model: nn.Module, imageset: ImageSet, **opts) -> _Split:
    """``imageset``'s features and logits (``opts`` as for :func:`_extract`) and its labelled images."""
    return _Split(imageset, _extract(model, imageset, **opts), _labelled(imageset))


def _scores(pred: Tensor, truth: Tensor, k: int, fit: tuple[Tensor, Tensor] | None = None) -> dict:
    """NMI, AMI, ARI, Hungarian and many-to-one accuracy of (n,) clusters; many-to-one fitted on ``fit``.

    Hungarian accuracy (a one-to-one matching of clusters to classes) is left out unless the head has as
    many clusters as there are classes: with more clusters most of them cannot be matched, and the number
    means nothing; many-to-one accuracy is the fair score then.
    """
    m = cluster_metrics(pred, truth, n_clusters=k)
    out = {key: m[key] for key in _SCORES}
    if k != len(torch.unique(truth)):
        del out["accuracy"]
    if fit is not None:
        out["many_to_one"] = many_to_one_accuracy(fit[0], fit[1], pred, truth)
    return out


def _check_arguments(
    n_heads: int, n_train: int, *, head: int | None, untrained: set[int], labels: Tensor | None
) -> None:
    """Raise ``ValueError`` for a ``head`` that is missing or untrained, or ``labels`` that are not (H, N)."""
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"--head {head} does not exist; the model has heads 0..{n_heads - 1}")
    if head is not None and head in untrained:
        raise ValueError(
            f"head {head} is not in the checkpoint; choose a trained head, not {sorted(untrained)}"
        )
    if labels is not None and tuple(labels.shape) != (n_heads, n_train):
        raise ValueError(
            f"labels must be (H, N) = ({n_heads}, {n_train}), got {tuple(labels.shape)}; "
            "pass the self-labels of this training set"
        )


def _skipped(train: _Split, test: _Split | None) -> list[str]:
    """Notes on the scores that missing ground truth rules out."""
    if train.mask is None:
        return ["the training split has no ground truth: kNN, linear probe and cluster scores skipped"]
    if test is None or test.mask is None:
        return ["no labelled test split: kNN and linear probe skipped, cluster scores on train only"]
    return []


def _representation(
    train: _Split,
    test: _Split | None,
    *,
    knn_k: int,
    knn_temperature: float,
    linear: bool,
    device: torch.device | str | None,
) -> dict:
    """kNN and (when ``linear``) linear-probe accuracies in percent; empty without labelled train and test."""
    if train.mask is None or test is None or test.mask is None:
        return {}
    bank, y_bank = train.extracted.features[train.mask], train.truth()  # (N', D), (N',)
    query, y_query = test.extracted.features[test.mask], test.truth()  # (M', D), (M',)
    knn = knn_accuracy(bank, y_bank, query, y_query, k=knn_k, temperature=knn_temperature, device=device)
    result = {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}
    if linear:
        probe = linear_probe(bank, y_bank, query, y_query, device=device)
        result.update(
            linear_top1=probe["top1"],
            linear_top5=probe["top5"],
            linear_weight_decay=probe["weight_decay"],
        )
    return result


def _head_entry(
    h: int, k: int, train: _Split, test: _Split | None, labels: Tensor | None, *, trained: bool
) -> dict:
    """Head ``h``'s cluster sizes, agreement with its self-labels and scores per split (see :func:`evaluate`)."""
    entry: dict = {"head": h, "k": k, "trained": trained}
    if not trained:
        return entry
    pred = train.extracted.logits[h].argmax(dim=1)  # (N,)
    entry["sizes"] = cluster_sizes(pred, k)
    if labels is not None:
        entry["label_agreement"] = 100.0 * float((pred == labels[h]).float().mean())
    if train.mask is None:
        return entry
    truth = train.truth()
    fit = (pred[train.mask], truth)
    entry["train"] = _scores(pred[train.mask], truth, k)
    if test is not None and test.mask is not None:
        test_pred = test.extracted.logits[h].argmax(dim=1)[test.mask]  # (M',)
        entry["test"] = _scores(test_pred, test.truth(), k, fit=fit)
    if labels is not None:
        entry["self_labels"] = _scores(labels[h][train.mask], truth, k)
    return entry


def _head_entries(
    n_clusters: list[int], train: _Split, test: _Split | None, labels: Tensor | None, untrained: set[int]
) -> list[dict]:
    """One :func:`_head_entry` per head, in order; heads in ``untrained`` are only marked untrained."""
    return [
        _head_entry(h, k, train, test, labels, trained=h not in untrained) for h, k in enumerate(n_clusters)
    ]


def _headline(heads: list[dict], head: int | None) -> dict:
    """The reported head's scores: ``head``, or when None the head with the best NMI on the training split."""
    scored = [e for e in heads if "train" in e]
    if head is None and scored:
        head = max(scored, key=lambda e: e["train"]["nmi"])["head"]
    if head is None:
        return {}
    if "train" not in heads[head]:
        return {"best_head": head}
    split = "test" if "test" in heads[head] else "train"
    return {**heads[head][split], "best_head": head, "split": split}


def _setup(
    train: _Split, test: _Split | None, *, layer: str | None, knn_k: int, knn_temperature: float
) -> dict:
    """What the scores were computed on: the features, the split sizes and the kNN settings."""
    return dict(
        layer=layer or "pooled",
        feature_dim=int(train.extracted.features.shape[1]),
        n_train=len(train.imageset),
        n_test=0 if test is None else len(test.imageset),
        knn_k=knn_k,
        knn_temperature=knn_temperature,
    )


def evaluate(
    model: nn.Module,
    train_set: ImageSet,
    test_set: ImageSet | None = None,
    *,
    transform: EvalTransform,
    labels: Tensor | None = None,
    untrained_heads: list[int] | None = None,
    head: int | None = None,
    layer: str | None = None,
    knn_k: int = KNN_K,
    knn_temperature: float = KNN_TEMPERATURE,
    linear: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool | None = None,
) -> dict:
    """Evaluate ``model`` (a ``SelaModel``) on a dataset's train and test splits (protocol above).

    Args:
        model: features (``forward_features`` / ``features_by_layer``) and H heads.
        train_set: the kNN bank, the linear probe's training data and the split that picks the head.
        test_set: the held-out split, or None (then only training-split cluster scores).
        transform: uint8 -> normalised float images, as during training's label step.
        labels: (H, N) stored self-labels of ``train_set``, or None.
        untrained_heads: heads whose weights are placeholders; reported as untrained.
        head: report this head instead of the best one on the training split.
        layer: features from this layer instead of the pooled backbone output.
        knn_k, knn_temperature: the kNN classifier's k and T.
        linear: also fit the linear probe.
        device, batch_size, progress: for feature extraction (see ``sela.eval.extract``).
        workers: DataLoader workers that decode streamed images.

    Returns:
        A JSON-ready dict. ``knn_top1``, ``knn_top5``, ``linear_top1`` (percent), ``nmi``, ``ami``,
        ``ari``, ``accuracy`` (only when K equals the number of classes), ``many_to_one`` of the reported head (``best_head``) on ``split``
        (``"test"``, or ``"train"`` without a labelled test split); ``heads``: one dict per head with
        ``head``, ``k``, ``trained``, ``sizes`` (of its training predictions), ``train`` / ``test`` /
        ``self_labels`` scores and ``label_agreement`` (percent of training predictions equal to the
        self-labels); ``notes``: what was skipped and why. Keys whose inputs are missing are absent.
    """
    untrained = set(untrained_heads or [])
    _check_arguments(len(model.n_clusters), len(train_set), head=head, untrained=untrained, labels=labels)
    start = time.perf_counter()
    opts = dict(transform=transform, device=device, layer=layer, progress=progress)
    opts.update(batch_size=batch_size, workers=workers)
    train = _split(model, train_set, **opts)
    test = _split(model, test_set, **opts) if test_set is not None and len(test_set) else None
    knn = dict(knn_k=knn_k, knn_temperature=knn_temperature)

    # representation: kNN and linear probe (need labelled train and test images)
    result = _representation(train, test, **knn, linear=linear, device=device)

    # clusters: every head's predictions and self-labels, then the reported one
    heads = _head_entries(model.n_clusters, train, test, labels, untrained)
    result.update(_headline(heads, head))
    result.update(heads=heads, **_setup(train, test, layer=layer, **knn))
    result.update(time_s=round(time.perf_counter() - start, 2), notes=_skipped(train, test))
    return result


def _acc(scores: dict, spec: str) -> str:
    """Hungarian accuracy formatted, or '-' where it is left out (K differs from the classes)."""
    return format(scores["accuracy"], spec) if "accuracy" in scores else format("-", spec.split(".")[0] or "")


def format_report(result: dict) -> str:
    """The result of :func:`evaluate` as a plain-text table (one row per head and split)."""
    lines = []
    if "knn_top1" in result:
        lines.append(
            f"kNN (k={result['knn_k']}, T={result['knn_temperature']}, {result['layer']} features, "
            f"D={result['feature_dim']}):  top-1 {result['knn_top1']:.2f}  top-5 {result['knn_top5']:.2f}"
        )
    if "linear_top1" in result:
        lines.append(
            f"linear probe (weight decay {result['linear_weight_decay']:g}, chosen on train):  "
            f"top-1 {result['linear_top1']:.2f}  top-5 {result['linear_top5']:.2f}"
        )
    if "nmi" in result:
        lines.append(
            f"head {result['best_head']} (best NMI on train) on {result['split']}:  NMI {result['nmi']:.4f}  "
            f"AMI {result['ami']:.4f}  ARI {result['ari']:.4f}  acc {_acc(result, '.2f')}  "
            f"many-to-one {result['many_to_one']:.2f}"
        )
    header = f"{'head':>5} {'K':>5}  {'split':<11} {'NMI':>6} {'AMI':>6} {'ARI':>6} {'acc':>6} {'m-to-1':>6}"
    rows = []
    for e in result["heads"]:
        mark = "*" if e["head"] == result.get("best_head") else " "
        name = f"{e['head']}{mark}"
        if not e["trained"]:
            rows.append(f"{name:>5} {e['k']:>5}  (not in the checkpoint)")
            continue
        for split in ("train", "test", "self_labels"):
            if split in e:
                s = e[split]
                rows.append(
                    f"{name:>5} {e['k']:>5}  {split.replace('_', '-'):<11} {s['nmi']:6.3f} {s['ami']:6.3f} "
                    f"{s['ari']:6.3f} {_acc(s, '6.2f')} {s['many_to_one']:6.2f}"
                )
        sizes = e["sizes"]
        extra = f", agrees with self-labels {e['label_agreement']:.1f}%" if "label_agreement" in e else ""
        rows.append(
            f"{'':>5} {'':>5}  argmax on train: sizes {sizes['min']}..{sizes['max']}, {sizes['n_empty']} "
            f"empty, size entropy {sizes['normalized_entropy']:.3f} of max{extra}"
        )
    lines += ["", header, *rows]
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)
