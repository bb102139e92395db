"""Seeds and nothing else: what ``lit-score predict`` (and ``lit-score-eval`` without a dataset) sample from when
the model comes from a checkpoint or an export, so that sampling needs no training data."""
from __future__ import annotations

from typing import Any

from lit_score.data.base import ScoreDataModule
from lit_score.data_space import DataSpace
from lit_score.errors import DataError

NO_IMAGES = ("SeedsDataModule serves seeds only, no images: {what} needs the experiment's data (its YAML, e.g. "
             "--config run/config.yaml, or --data ...){alternative}")


class SeedsDataModule(ScoreDataModule):
    """One seed per image to sample, ``first_seed`` to ``first_seed + num_samples - 1``, in batches of
    ``sample_batch_size``, in the data space of the model's checkpoint or export (the CLI passes it).

    Args:
        data_space: shape, range and quantisation of the samples (``lit_score.data_space.DataSpace`` as a dict).
        num_channels, image_size, centered: what the network was built with (the checkpoint's); by default those
            of ``data_space``.
        num_samples, sample_batch_size, first_seed, class_label: as for every lit-score DataModule; for a labelled
            data space (num_classes > 0) the batches are ``(seeds, labels)``, labels ``class_label`` when given, else
            drawn per seed with the data space's class frequencies.
    """

    def __init__(self, data_space: dict[str, Any], num_channels: int | None = None, image_size: int | None = None,
                 centered: bool | None = None, num_samples: int = 64, sample_batch_size: int = 64,
                 first_seed: int = 0, class_label: int | None = None) -> None:
        super().__init__(num_samples, sample_batch_size, first_seed, class_label)
        try:
            self._space = DataSpace.from_dict(data_space)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"SeedsDataModule needs a data_space with shape and centered, got {data_space!r} "
                            f"({err})") from None
        image = self._space.is_image
        self.num_channels = num_channels if num_channels is not None else self._space.shape[0]
        self.image_size = image_size if image_size is not None else (self._space.shape[1] if image else 1)
        self.centered = centered if centered is not None or not image else self._space.centered
        self.check_class_label()

    @property
    def data_space(self) -> DataSpace:
        return self._space

    def cache_key(self) -> str:
        raise DataError(NO_IMAGES.format(what="FID's reference statistics",
                                         alternative=", or a statistics file: --evaluation.reference FILE"))

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate"):
            raise DataError(NO_IMAGES.format(what="training" if stage == "fit" else "validation", alternative=""))

    def test_dataloader(self) -> None:
        raise DataError(NO_IMAGES.format(what="test-set bits/dim",
                                         alternative=" (lit-score-eval: or --evaluation.bpd false)"))
