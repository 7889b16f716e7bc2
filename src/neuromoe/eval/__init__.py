"""Evaluation: metrics (classification, regression, bootstrap CIs, segmentation), conformal, plots, reports."""

from neuromoe.eval.metrics import (
    bootstrap_ci,
    classification_metrics,
    regression_metrics,
    segmentation_metrics,
)

__all__ = ["bootstrap_ci", "classification_metrics", "regression_metrics", "segmentation_metrics"]
