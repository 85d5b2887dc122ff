"""Evaluation on frozen models: feature extraction, weighted kNN, linear probe, clustering metrics.

Accuracies are in percent (0..100) throughout; NMI, AMI and ARI keep scikit-learn's scale.
"""

from sela.eval.features import Extracted, extract
from sela.eval.knn import knn_accuracy, knn_classify
from sela.eval.linear import linear_probe
from sela.eval.metrics import (
    cluster_metrics,
    cluster_sizes,
    hungarian_accuracy,
    many_to_one_accuracy,
    topk_accuracy,
)

__all__ = [
    "Extracted",
    "cluster_metrics",
    "cluster_sizes",
    "extract",
    "hungarian_accuracy",
    "knn_accuracy",
    "knn_classify",
    "linear_probe",
    "many_to_one_accuracy",
    "topk_accuracy",
]
