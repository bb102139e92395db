"""The FID protocol: feature networks, float64 feature statistics, the Frechet distance and cached reference sets."""
from lit_score.metrics.features import FeatureExtractor, InceptionV3, RandomConvFeatures, to_uint8
from lit_score.metrics.frechet import FeatureStatistics, frechet_distance
from lit_score.metrics.reference import ReferenceStatistics, reference_statistics

__all__ = ["FeatureExtractor", "InceptionV3", "RandomConvFeatures", "to_uint8", "FeatureStatistics",
           "frechet_distance", "ReferenceStatistics", "reference_statistics"]
