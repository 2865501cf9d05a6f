"""Accuracy against ground truth (VGGT / CO3D pose AUC, aligned centre errors) and simulated priors."""

from .metrics import AUC_THRESHOLDS, EvaluationResult, evaluate

__all__ = ["AUC_THRESHOLDS", "EvaluationResult", "evaluate"]
