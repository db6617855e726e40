"""Metrics: pure functions (tensors in, floats out), each tested against an independent computation.

The package re-exports the public functions, so ``from neuroimagen.metrics import ssim, inception_score``
gives the functions; their modules (``neuroimagen.metrics.ssim``, ``neuroimagen.metrics.inception_score``)
stay importable by ``from neuroimagen.metrics.ssim import ...``.  Importing the package loads torch and numpy
only (no torchvision, transformers or scikit-image).
"""

from neuroimagen.metrics.inception_score import inception_score
from neuroimagen.metrics.nway import effective_n, n_way_top_k_accuracy, n_way_top_k_hits
from neuroimagen.metrics.pixcorr import pixcorr, pixcorr_scores
from neuroimagen.metrics.retrieval import cosine_similarity, retrieval_accuracy, retrieval_hits
from neuroimagen.metrics.ssim import mean_ssim, ssim
from neuroimagen.metrics.stats import BootstrapCI, PermutationResult, bootstrap_ci, paired_permutation_test
from neuroimagen.metrics.twoway import correlation_distance, two_way_identification

__all__ = ["ssim", "mean_ssim", "inception_score", "n_way_top_k_accuracy", "n_way_top_k_hits", "effective_n",
           "cosine_similarity", "retrieval_hits", "retrieval_accuracy", "pixcorr", "pixcorr_scores",
           "two_way_identification", "correlation_distance", "bootstrap_ci", "paired_permutation_test",
           "BootstrapCI", "PermutationResult"]
