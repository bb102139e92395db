"""The FID protocol: feature networks, float64 feature statistics, the Frechet distance, KID, the Inception Score,
cached reference sets and the reference-statistics files of other code bases."""
from lit_score.data_space import to_uint8
from lit_score.metrics.features import FeatureExtractor, InceptionV3, RandomConvFeatures, random_inception_weights
from lit_score.metrics.frechet import FeatureStatistics, Moments, frechet_distance, metric_tag, sample_count
from lit_score.metrics.inception_score import InceptionScore, InceptionV3Logits, inception_score
from lit_score.metrics.kid import kernel_inception_distance
from lit_score.metrics.reference import ReferenceStatistics, reference_statistics
from lit_score.metrics.reference_file import load_reference, save_reference

__all__ = ["FeatureExtractor", "InceptionV3", "RandomConvFeatures", "random_inception_weights", "to_uint8",
           "FeatureStatistics", "Moments", "frechet_distance", "metric_tag", "sample_count",
           "kernel_inception_distance", "ReferenceStatistics", "reference_statistics", "InceptionV3Logits",
           "InceptionScore", "inception_score", "load_reference", "save_reference"]
