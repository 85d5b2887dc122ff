"""Training objectives behind one small interface and a registry: the paper's (``sela``) and the online
one (``swapped``).

Each objective is a class registered by name (:func:`register_objective`, :data:`OBJECTIVES`,
:func:`make_objective`). It declares what it needs before the model is built: ``cosine_heads`` (build the
model with ``create_model(..., normalize_heads=objective.cosine_heads)``) and ``online_labels`` (labels
come from the loss itself, per batch, instead of global label steps: the training plan then schedules no
label step during training and one global step after the last epoch). The training loop asks it for the
loss of a batch (:meth:`Objective.loss`) and calls its hooks; it changes labels only through the label
layer (:class:`sela.labeller.LabelState`). Everything particular to an objective (its views, queue,
prototype normalisation, settings and their checks) lives in its class.

Letters: N images, B batch (this rank's part), H heads, K_h clusters of head h, P the heads' input
width, C channels, S the training view's side.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sela import distributed as dist
from sela.data import BatchAugment
from sela.labeller import LabelState
from sela.sinkhorn import soft_codes

PROTOTYPES = ("learned", "centroids")


def make_views(augment: BatchAugment, images: Tensor, generator: torch.Generator) -> Tensor:
    """Augmented float views (b, C, S, S) of a uint8 batch, in the device's preferred memory format."""
    views = augment(images, generator=generator)
    if views.device.type == "cuda":
        views = views.contiguous(memory_format=torch.channels_last)
    return views


class Objective:
    """The interface the training loop uses; subclasses implement :meth:`loss`.

    Attributes:
        name: as ``--objective`` takes it (set by :func:`register_objective`).
        cosine_heads: the model must have cosine heads (``create_model(..., normalize_heads=True)``).
        online_labels: labels come online from :meth:`loss` (through ``LabelState.set_labels``); False:
            global label steps run during training (the paper). Either way one global label step gives
            the exported labels: an online objective's runs once, after the last epoch.
        empty_advice: what to tell the user when a head has empty clusters.
        logit_scale: the label step solves on logits x this (cosine heads: 1 / temperature).
        soft_targets: label steps keep this many soft codes per image (``LabelState``'s ``soft``).
        needs_embeddings: recorded outputs include the heads' inputs (key "z"), for :meth:`after_labels`.
    """

    name = ""
    cosine_heads = False
    online_labels = False
    empty_advice = ""
    logit_scale = 1.0
    soft_targets = 0
    needs_embeddings = False

    def prepare(self, model: nn.Module) -> None:
        """Check (and adapt, e.g. freeze) the model before training; called once, before it moves to its
        device. A ValueError when its heads are not the kind this objective needs."""
        _check_heads(self, model)

    def start_epoch(self) -> None:
        """Reset per-epoch state."""

    def loss(
        self,
        net: nn.Module,
        images: Tensor,
        idx: Tensor,
        labels: LabelState,
        *,
        generator: torch.Generator,
        autocast: contextlib.AbstractContextManager,
    ) -> tuple[Tensor, dict[int | str, Tensor] | None]:
        """The loss of a uint8 batch ``images`` (b, C, H, W) of rows ``idx`` (b,), averaged over heads
        (a scalar with its graph), and what a recorded label step may keep (None when the objective has
        none): {head: (b, K_h) outputs}, with ``"z"``: (b, P) the heads' inputs when
        ``needs_embeddings``. An online objective sets the batch's labels here (``labels.set_labels``)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step."""

    def after_labels(self, model: nn.Module, head: int, z: Tensor, labels: Tensor) -> None:
        """Called after a label step re-assigned ``head``, with this rank's rows: the heads' inputs ``z``
        (n_r, P) that the step scored and their new labels (n_r,)."""


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str):
    """Class decorator: registers an :class:`Objective` subclass under ``name`` (``--objective``'s value)."""

    def decorator(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"an objective named {name!r} is already registered; pick another name")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return decorator


def make_objective(name: str, augment: BatchAugment, **options) -> Objective:
    """The registered objective ``name`` built with the training augmentation and its own keyword options;
    a ValueError naming the choices for an unknown name."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](augment, **options)


def _check_heads(objective: Objective, model: nn.Module) -> None:
    if bool(getattr(model, "normalize_heads", False)) != objective.cosine_heads:
        kind = "cosine heads" if objective.cosine_heads else "linear heads (no normalize_heads)"
        raise ValueError(
            f"the {objective.name} objective with these settings needs {kind}; build the model with "
            "create_model(..., normalize_heads=objective.cosine_heads)"
        )


@register_objective("sela")
class SelaObjective(Objective):
    """The paper's objective: cross-entropy of each head's outputs on an augmented view against the
    image's current self-label, averaged over heads (Asano et al. 2020, eq. 1); the labels come from global
    label steps. Two of SeLa-v2's training improvements (Caron et al. 2020) are options:

    Args:
        augment: the training augmentation, uint8 batch -> normalised float views.
        temperature: None for the paper's linear heads; a number T makes the heads cosine classifiers
            (unit-norm prototypes, no bias, over L2-normalised inputs) whose scores are divided by T, in
            the loss and in the label step alike.
        small_crops, small_augment: multi-crop: this many extra, smaller views per image (made by
            ``small_augment``) that all learn the image's current label; the label step and the recorded
            outputs use the full view only. Each costs about (s / S)^2 of a full view.
        soft_targets: 0 for the paper's hard labels (argmax of the transport plan Q); k > 0: each view
            learns its image's k largest entries of Q, renormalised (soft codes, as SwAV's).
        prototypes: ``learned`` (the heads' weights train by gradient) or ``centroids`` (cosine heads
            only): after every label step each prototype is set to the unit-norm mean of the head inputs
            of the images it labelled, and the prototypes get no gradient, as DeepCluster-v2 in the
            SwAV authors' code (``main_deepclusterv2.py``) sets and freezes its prototypes; the loss then
            pulls each view towards its cluster's current centre.
    """

    online_labels = False
    empty_advice = (
        "empty clusters (partial collapse); more label updates or a smaller --lam keep clusters balanced"
    )

    def __init__(
        self,
        augment: BatchAugment,
        *,
        temperature: float | None = None,
        small_crops: int = 0,
        small_augment: BatchAugment | None = None,
        soft_targets: int = 0,
        prototypes: str = "learned",
    ):
        if soft_targets < 0:
            raise ValueError(f"soft_targets must be >= 0 (0: hard labels), got {soft_targets}")
        if prototypes not in PROTOTYPES:
            raise ValueError(f"prototypes must be one of {', '.join(PROTOTYPES)}, got {prototypes!r}")
        if prototypes == "centroids" and temperature is None:
            raise ValueError("centroid prototypes need cosine heads: set a temperature (sela_temperature)")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"the sela objective's temperature must be > 0 (or unset), got {temperature}")
        if small_crops < 0 or (small_crops and small_augment is None):
            raise ValueError(f"small_crops must be >= 0 and needs small_augment, got {small_crops}")
        self.augment, self.temperature = augment, temperature
        self.small_crops, self.small_augment = small_crops, small_augment
        self.logit_scale = 1.0 if temperature is None else 1.0 / temperature
        self.soft_targets, self.prototypes = soft_targets, prototypes
        self.needs_embeddings = prototypes == "centroids"

    @property
    def cosine_heads(self) -> bool:
        return self.temperature is not None

    def prepare(self, model: nn.Module) -> None:
        _check_heads(self, model)
        if self.prototypes == "centroids":
            for head in model.heads:
                head.weight.requires_grad_(False)

    def after_step(self, model: nn.Module) -> None:
        if self.temperature is not None and self.prototypes == "learned":
            model.normalize_prototypes()

    def after_labels(self, model: nn.Module, head: int, z: Tensor, labels: Tensor) -> None:
        if self.prototypes == "centroids":
            set_centroids(model.heads[head], z, labels)

    def loss(self, net, images, idx, labels, *, generator, autocast):
        b, m = len(idx), self.small_crops
        views = make_views(self.augment, images, generator)  # (b, C, S, S)
        if m:  # (m b, C, s, s): one more backbone pass in the same forward call
            small = torch.cat([make_views(self.small_augment, images, generator) for _ in range(m)])
            views = [views, small]
        with autocast:
            outputs = net(views, embeddings=self.needs_embeddings)  # H x ((1 + m) b, K_h)
            if self.needs_embeddings:
                outputs, z = outputs  # and ((1 + m) b, P), the heads' unit-norm inputs
            logits = [
                o.float() if self.temperature is None else o.float() * self.logit_scale for o in outputs
            ]
            loss = sum(_label_loss(o, labels, h, idx, 1 + m) for h, o in enumerate(logits)) / len(outputs)
        recorded: dict = {h: o[:b].detach() for h, o in enumerate(logits)}
        if self.needs_embeddings:
            recorded["z"] = z[:b].detach()
        return loss, recorded


def _label_loss(logits: Tensor, labels: LabelState, head: int, idx: Tensor, repeats: int) -> Tensor:
    """Cross-entropy of one head's ``logits`` (repeats x b, K) against the current labels of rows ``idx``
    (b,), each view of an image against its image's target: the hard label, or with soft targets
    (``labels.codes``) the weighted sum over the image's kept codes, -sum_j w_j log p(code_j)."""
    device = logits.device
    if labels.codes is None:
        return F.cross_entropy(logits, labels.labels[head, idx].to(device, non_blocking=True).repeat(repeats))
    codes = labels.codes[head, idx].to(device, torch.int64).repeat(repeats, 1)  # (repeats b, k)
    weights = labels.weights[head, idx].to(device).repeat(repeats, 1)
    return -(weights * F.log_softmax(logits, dim=1).gather(1, codes)).sum(1).mean()


@register_objective("swapped")
class SwappedObjective(Objective):
    """An online deviation from the paper, as SwAV (Caron et al. 2020): two views per image, each
    predicts the other's per-batch Sinkhorn codes over cosine-similarity heads (unit-norm prototypes,
    no bias). The first view's hard codes are kept as the images' current labels.

    Args:
        augment: the training augmentation of the two full views.
        temperature, epsilon: the softmax temperature and the entropic regularisation of the per-batch
            codes (SwAV's 0.1 and 0.05).
        queue: the L2-normalised head inputs of the last this-many full views (per process, no
            gradient) are scored against the current prototypes and balanced together with the batch,
            so that each batch's codes share the K clusters with more images than the batch holds; only
            the batch's codes are used. Emptied at every epoch start (so a resumed run continues
            exactly). Memory: queue x P x 4 bytes; 0: no queue.
        small_crops, small_augment: multi-crop: this many extra, smaller views per image, made by
            ``small_augment``, also predict the two full views' codes (codes come from the full views
            only). Each costs about (s / S)^2 of a full view.
        relax: None: codes balanced equally within the batch; rho: the relaxed marginal of the label
            steps (``--marginal relaxed``; :func:`sela.sinkhorn.soft_codes`).
    """

    cosine_heads = True
    online_labels = True
    empty_advice = (  # online codes, balanced within each batch only
        "prototypes that no image's codes chose this epoch; harmless if it passes after the first "
        "epochs, else use fewer --clusters"
    )

    def __init__(
        self,
        augment: BatchAugment,
        *,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        queue: int = 0,
        small_crops: int = 0,
        small_augment: BatchAugment | None = None,
        relax: float | None = None,
    ):
        if not (temperature > 0 and epsilon > 0):
            raise ValueError(f"swap temperature and epsilon must be > 0, got {temperature}, {epsilon}")
        if queue < 0 or small_crops < 0:
            raise ValueError(f"swap_queue and small_crops must be >= 0, got {queue} and {small_crops}")
        if small_crops and small_augment is None:
            raise ValueError("small_crops > 0 needs small_augment, the augmentation that makes them")
        self.augment, self.small_augment = augment, small_augment
        self.temperature, self.epsilon = temperature, epsilon
        self.queue_size, self.small_crops, self.relax = queue, small_crops, relax
        self.queue: Tensor | None = None  # (n_q, P), newest rows first
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module) -> None:
        """The heads are prototypes (cosine heads, built by ``create_model(normalize_heads=True)``)."""
        _check_heads(self, model)
        if min(model.n_clusters) < model.head_dim:
            warnings.warn(
                f"the swapped objective with {min(model.n_clusters)} prototypes in a {model.head_dim}-d "
                "space: the features can turn orthogonal to them all and the loss collapses to ln K "
                f"(seen on digits); use --clusters >= {model.head_dim} or a narrower head input",
                stacklevel=3,
            )
        self.model = model

    def start_epoch(self) -> None:
        self.queue = None

    def after_step(self, model: nn.Module) -> None:
        model.normalize_prototypes()

    def loss(self, net, images, idx, labels, *, generator, autocast):
        """Two full views of each image (and ``small_crops`` smaller ones) go through the network in one
        call; each head's cosine scores of the full views (2b, K_h) give per-batch balanced codes
        (:func:`sela.sinkhorn.soft_codes`, no gradient; with the queue's scores when it is on). Each full
        view's codes are the targets of every other view: cross-entropy of softmax(scores / T),
        averaged over the 1 + small_crops predicting views and the two targets (SwAV's loss)."""
        b, m = len(idx), self.small_crops
        views = torch.cat([self._views(images, generator), self._views(images, generator)])  # (2b, C, S, S)
        if m:  # multi-crop: (m b, C, s, s) small views, one more backbone pass in the same forward call
            small = torch.cat([make_views(self.small_augment, images, generator) for _ in range(m)])
            views = [views, small]
        with autocast:
            # H x ((2 + m) b, K_h) cosine similarities; ((2 + m) b, P) unit-norm head inputs
            outputs, z = net(views, embeddings=True)
        loss, codes_of_batch = 0.0, []
        for h, scores in enumerate(outputs):
            scores = scores.float()
            codes = self._codes(h, scores[: 2 * b].detach())  # (2b, K_h)
            logp = F.log_softmax(scores / self.temperature, dim=1).view(2 + m, b, -1)  # (2 + m, b, K_h)
            # cross-entropy of every view against each full view's codes: (2, 2 + m) mean over images
            ce = -torch.einsum("vbk,ubk->vu", codes.view(2, b, -1), logp) / b
            loss = loss + (ce.sum() - ce[0, 0] - ce[1, 1]) / (2 * (1 + m))  # a view never predicts itself
            codes_of_batch.append(codes[:b].argmax(1))  # the first view's codes
        labels.set_labels(idx, torch.stack(codes_of_batch))  # (H, b), one transfer
        if self.queue_size:  # newest first, the oldest rows drop out
            z = z[: 2 * b].detach().float()
            self.queue = (z if self.queue is None else torch.cat([z, self.queue]))[: self.queue_size]
        return loss / len(outputs), None

    def _views(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return make_views(self.augment, images, generator)

    def _codes(self, head: int, scores: Tensor) -> Tensor:
        """Balanced soft codes (2b, K_h) of the full views' scores, with the queue scored by the current
        prototypes joining the balancing when there is one."""
        balanced = scores
        if self.queue is not None and len(self.queue):  # (2b + n_q, K_h)
            prototypes = self.model.heads[head].weight.detach().float()  # (K_h, P), unit rows
            balanced = torch.cat([scores, self.queue @ prototypes.t()])
        return soft_codes(balanced, epsilon=self.epsilon, relax=self.relax)[: len(scores)]


@torch.no_grad()
def set_centroids(head: nn.Linear, z: Tensor, labels: Tensor) -> None:
    """Set ``head``'s prototypes (K, P) to the unit-norm means of the rows of ``z`` (n_r, P) in each cluster
    (``labels`` (n_r,)), summed over ranks; a cluster that holds no row keeps its prototype."""
    sums = torch.zeros(head.weight.shape, device=z.device)  # (K, P)
    sums.index_add_(0, labels.to(z.device), z.float())
    dist.all_reduce_sum_(sums)
    filled = sums.norm(dim=1) > 0
    head.weight[filled] = F.normalize(sums[filled], dim=1).to(head.weight.device, head.weight.dtype)
