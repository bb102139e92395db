"""The paper's datasets with the official score_sde preprocessing, as hub datasets; ``path`` overrides the location.

============  ===============================  ==========  ==============================================
name          hub dataset (config)             resolution  preprocessing (all: random horizontal flip)
============  ===============================  ==========  ==============================================
cifar10       uoft-cs/cifar10 (plain_text)     32          none
celeba64      flwrlabs/celeba                  64          center crop 140, resize 64
celebahq256   eurecom-ds/celeba-hq-256         256         resize the shorter side to 256, center crop
ffhq256       merkol/ffhq-256                  256         resize the shorter side to 256, center crop
lsun_bedroom  pcuenq/lsun-bedrooms             256         resize the shorter side to 256, center crop
lsun_church   tglcourse/lsun_church_train      256         resize the shorter side to 256, center crop
============  ===============================  ==========  ==============================================

The image column is detected (the one column of image type), so a local copy may name it differently; a
``path`` override drops the preset's hub config.
"""
from __future__ import annotations

from lit_score.data.plugins import DATASETS, DatasetPlugin, load_huggingface


def _preset(name: str, path: str, image_size: int, config_name: str | None = None,
            center_crop: int | None = None, description: str = "",
            class_names: tuple[str, ...] | None = None) -> DatasetPlugin:
    plugin = DatasetPlugin(load=load_huggingface, path=path, config_name=config_name, split="train",
                           image_size=image_size, num_channels=3, class_names=class_names,
                           center_crop=center_crop, random_flip=True, description=description)
    return DATASETS.register(name)(plugin)


CIFAR10 = _preset("cifar10", "uoft-cs/cifar10", 32, config_name="plain_text",
                  description="CIFAR-10 train, 50k 32x32 RGB (its ClassLabel column `label`: 10 classes)",
                  class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"))
CELEBA64 = _preset("celeba64", "flwrlabs/celeba", 64, config_name="img_align+identity+attr",
                   center_crop=140, description="CelebA aligned 178x218, center crop 140, resized to 64")
CELEBAHQ256 = _preset("celebahq256", "eurecom-ds/celeba-hq-256", 256, description="CelebA-HQ at 256x256")
FFHQ256 = _preset("ffhq256", "merkol/ffhq-256", 256, description="FFHQ at 256x256")
LSUN_BEDROOM = _preset("lsun_bedroom", "pcuenq/lsun-bedrooms", 256,
                       description="LSUN bedroom, shorter side resized to 256, center crop")
LSUN_CHURCH = _preset("lsun_church", "tglcourse/lsun_church_train", 256,
                      description="LSUN church outdoor, shorter side resized to 256, center crop")
