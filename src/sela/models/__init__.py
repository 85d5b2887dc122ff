"""Backbones with linear cluster heads, behind a registry.

``create_model(name, n_clusters)`` builds a ``SelaModel``: ``forward_features`` gives (B, D)
features for evaluation, ``forward_head`` / ``forward`` give a list of (B, K_h) logits, one per head.
Importing this package registers every model below.
"""

from sela.models import alexnet as _alexnet  # noqa: F401  (registers alexnet)
from sela.models import convnet as _convnet  # noqa: F401  (registers convnet)
from sela.models import resnet as _resnet  # noqa: F401  (registers the resnets)
from sela.models.alexnet import AlexNet
from sela.models.base import SelaModel
from sela.models.convnet import ConvNet
from sela.models.export import load_exported
from sela.models.pretrained import load_pretrained, spec_from_state_dict
from sela.models.registry import check_arch, clusters_per_head, create_model, list_models, register_model
from sela.models.resnet import ResNet

__all__ = [
    "AlexNet",
    "ConvNet",
    "ResNet",
    "SelaModel",
    "check_arch",
    "clusters_per_head",
    "create_model",
    "list_models",
    "load_exported",
    "load_pretrained",
    "spec_from_state_dict",
    "register_model",
]
