"""Metrics: pure functions (tensors in, floats out), each tested against an independent computation."""

from neuroimagen.metrics.pixcorr import pixcorr, pixcorr_scores
from neuroimagen.metrics.stats import BootstrapCI, PermutationResult, bootstrap_ci, paired_permutation_test
from neuroimagen.metrics.twoway import correlation_distance, two_way_identification

__all__ = ["pixcorr", "pixcorr_scores", "two_way_identification", "correlation_distance", "bootstrap_ci",
           "paired_permutation_test", "BootstrapCI", "PermutationResult"]
