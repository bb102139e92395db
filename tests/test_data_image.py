"""ImageDataModule on image folders and Arrow datasets written by the tests (PNG and JPEG, mixed sizes,
grayscale and RGB): shapes inferred from the data, deterministic splits, per-worker seeding, errors that name
the problem, cache keys, dataset plugins (entry point of an installed package, dotted path), sigma_max."""
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lit_score.data import DATASETS, DigitsDataModule, ImageDataModule, get_plugin
from lit_score.data.image import ArrowImages, ImageReadError, find_image_column
from lit_score.data.sigma_max import estimate_sigma_max, max_pairwise_distance

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, sizes: list[tuple[int, int]], mode: str = "RGB", suffix: str = ".png") -> list[Path]:
    """One image per (width, height); image i's pixels encode i (value 4 * i in the first channel's corner)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    paths = []
    for i, (w, h) in enumerate(sizes):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        array[:, :, 0] = 4 * i
        image = Image.fromarray(array)
        image = image.convert("L") if mode == "L" else image
        paths.append(folder / f"img_{i:03d}{suffix}")
        image.save(paths[-1])
    return paths


def save_arrow(images: list[Image.Image], target: Path, column: str = "image", **extra: list) -> Path:
    features = datasets.Features({column: datasets.Image(), **{k: datasets.Value("int64") for k in extra}})
    datasets.Dataset.from_dict({column: images, **extra}, features=features).save_to_disk(str(target))
    return target


def test_rgb_folder_of_png_and_jpeg_in_mixed_sizes(tmp_path):
    """Size and channels come from the first image; every image is resized and center-cropped to it."""
    write_images(tmp_path, [(32, 32), (48, 40), (40, 64)], suffix=".png")
    write_images(tmp_path / "more", [(100, 80)] * 3, suffix=".jpg")
    datamodule = ImageDataModule(path=str(tmp_path), batch_size=6, val_size=0, num_workers=0)
    assert (datamodule.num_channels, datamodule.image_size) == (3, 32)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (6, 3, 32, 32) and 0 <= batch.min() and batch.max() <= 1


def test_grayscale_folder_gives_one_channel_and_centered_range(tmp_path):
    """A folder of grayscale images configures 1 channel; centered data lie in [-1, 1]."""
    write_images(tmp_path, [(20, 24)] * 8, mode="L")
    datamodule = ImageDataModule(path=str(tmp_path), batch_size=4, val_size=0.25, centered=True, num_workers=0)
    assert (datamodule.num_channels, datamodule.image_size) == (1, 20)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (4, 1, 20, 20) and batch.min() < 0 and batch.min() >= -1 and batch.max() <= 1


def test_explicit_shape_converts_every_image(tmp_path):
    """num_channels / image_size given in the YAML override the data: RGB files become 1-channel 8x8."""
    write_images(tmp_path, [(32, 32)] * 4)
    datamodule = ImageDataModule(path=str(tmp_path), image_size=8, num_channels=1, batch_size=4, val_size=0,
                                 num_workers=0)
    datamodule.setup("fit")
    assert next(iter(datamodule.train_dataloader())).shape == (4, 1, 8, 8)


def test_saved_arrow_dataset_and_dataset_dict(tmp_path):
    """A save_to_disk directory (Dataset, or DatasetDict with the split chosen by `split`) is read as Arrow."""
    images = [Image.new("L", (12, 12), color=10 * i) for i in range(10)]
    save_arrow(images, tmp_path / "ds", label=list(range(10)))
    datamodule = ImageDataModule(path=str(tmp_path / "ds"), batch_size=5, val_size=0, num_workers=0)
    assert (datamodule.num_channels, datamodule.image_size) == (1, 12)
    datamodule.setup("fit")
    values = sorted(round(x[0, 0, 0].item() * 255) for b in datamodule.train_dataloader() for x in b)
    assert values == [10 * i for i in range(10)]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    assert len(ImageDataModule(path=str(tmp_path / "dd"), split="test", num_workers=0).full_dataset()) == 3
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'valid'"):
        ImageDataModule(path=str(tmp_path / "dd"), split="valid", num_workers=0)


def test_split_is_deterministic_disjoint_and_seeded(tmp_path):
    """Train and validation rows are disjoint, cover the data, repeat for a seed and change with it."""
    write_images(tmp_path, [(8, 8)] * 40)

    def split(seed):
        datamodule = ImageDataModule(path=str(tmp_path), batch_size=4, val_size=0.25, seed=seed, num_workers=0)
        datamodule.setup("fit")
        return set(datamodule.train_set.rows.tolist()), set(datamodule.val_set.rows.tolist())

    train, val = split(0)
    assert len(val) == 10 and not train & val and train | val == set(range(40))
    assert split(0) == (train, val) and split(1)[1] != val
    counted = ImageDataModule(path=str(tmp_path), batch_size=4, val_size=7, num_workers=0)
    counted.setup("fit")
    assert len(counted.val_set) == 7 and len(counted.val_dataloader()) == 2


def test_no_validation_with_val_size_zero(tmp_path):
    """val_size=0 trains on every image and has no validation batches."""
    write_images(tmp_path, [(8, 8)] * 6)
    datamodule = ImageDataModule(path=str(tmp_path), batch_size=2, val_size=0, num_workers=0)
    datamodule.setup("fit")
    assert len(datamodule.train_set) == 6 and datamodule.val_dataloader() == []


def test_test_split_serves_the_whole_test_split_unaugmented(tmp_path):
    """With test_split, `lit-score test` reads every image of that split, not the validation images."""
    write_images(tmp_path / "train", [(8, 8)] * 6)
    write_images(tmp_path / "test", [(8, 8)] * 3)
    datamodule = ImageDataModule(path=str(tmp_path), batch_size=2, val_size=0, num_workers=0, test_split="test",
                                 random_flip=True)
    datamodule.setup("test")
    batches = list(datamodule.test_dataloader())
    assert sum(len(b) for b in batches) == 3
    firsts = sorted(round(float(b[i, 0, 0, 0]) * 255) for b in batches for i in range(len(b)))
    assert firsts == [0, 4, 8]


def test_flips_are_seeded_per_worker_and_reproducible(tmp_path):
    """With 2 workers, the data seed alone fixes the augmented epoch: the same seed gives the same epoch twice,
    whatever the global torch seed, and another seed gives another epoch."""
    write_images(tmp_path, [(8, 8)] * 16)

    def epoch(seed, torch_seed):
        datamodule = ImageDataModule(path=str(tmp_path), batch_size=2, val_size=0, random_flip=True,
                                     num_workers=2, seed=seed)
        datamodule.setup("fit")
        torch.manual_seed(torch_seed)
        return torch.cat(list(datamodule.train_dataloader()))

    first = epoch(0, torch_seed=0)
    assert torch.equal(first, epoch(0, torch_seed=1)) and not torch.equal(first, epoch(1, torch_seed=0))


def test_corrupt_image_error_names_the_file(tmp_path):
    """A file that breaks after setup fails with an ImageReadError naming its path, also from inside a worker
    process."""
    paths = write_images(tmp_path, [(8, 8)] * 4)
    datamodule = ImageDataModule(path=str(tmp_path), batch_size=4, val_size=0, num_workers=0)
    datamodule.setup("fit")
    paths[2].write_bytes(paths[2].read_bytes()[:30])
    with pytest.raises(ImageReadError, match=r"cannot read image '.*img_002\.png' \(row 2 of "):
        next(iter(datamodule.train_dataloader()))
    datamodule.num_workers = 1
    with pytest.raises(ImageReadError, match=r"img_002\.png"):
        next(iter(datamodule.train_dataloader()))


def _two_corrupt(folder: Path, n: int = 12) -> list[Path]:
    """``n`` PNGs of which img_003 is truncated (its header intact) and img_008 holds no image at all."""
    paths = write_images(folder, [(24, 24)] * n)
    paths[3].write_bytes(paths[3].read_bytes()[:300])
    paths[8].write_bytes(b"these bytes are no image")
    return paths


def test_every_unreadable_image_is_named_at_setup_and_an_option_skips_them(tmp_path, monkeypatch):
    """Property: the unreadable images of a folder are found in one pass when the data are set up, before any
    batch: one line naming each and their count, and the option that leaves them out; with it, the others train,
    after one warning. The check is kept beside the folder's datasets cache, so the next run reads no image."""
    import lit_score.data.image as image_module

    _two_corrupt(tmp_path / "images")
    datamodule = ImageDataModule(path=str(tmp_path / "images"), batch_size=2, val_size=2, num_workers=0)
    with pytest.raises(ImageReadError) as raised:
        datamodule.prepare_data()
    message = str(raised.value)
    assert "\n" not in message and message.startswith("2 of 12 images of ")
    assert "img_003.png" in message and "img_008.png (not an image)" in message
    assert "data.init_args.skip_unreadable true" in message
    with pytest.raises(ImageReadError, match="2 of 12 images"):
        datamodule.setup("fit")

    skipping = ImageDataModule(path=str(tmp_path / "images"), batch_size=2, val_size=2, num_workers=0,
                               skip_unreadable=True)
    with pytest.warns(UserWarning, match=r"leaving out the 2 of 12 images that cannot be read") as caught:
        skipping.prepare_data()
        skipping.setup("fit")
    assert len([w for w in caught if "cannot be read" in str(w.message)]) == 1
    assert len(skipping.train_set) + len(skipping.val_set) == 10
    assert next(iter(skipping.train_dataloader())).shape == (2, 3, 24, 24)

    monkeypatch.setattr(image_module, "_unreadable_memo", {})
    monkeypatch.setattr(image_module, "_check_cell", lambda cell: pytest.fail("read again"))
    table, column = skipping.load()
    assert [name.rsplit("/", 1)[-1] for _, name, _ in image_module.unreadable_images(table, column)] == [
        "img_003.png", "img_008.png"]


def test_an_unreadable_first_image_names_every_unreadable_one(tmp_path):
    """The first image is read when the DataModule is built (for the data's shape): when it cannot be read,
    every unreadable image is named then; with skip_unreadable the shape comes from the first readable one."""
    paths = _two_corrupt(tmp_path)
    paths[0].write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"^3 of 12 images .*img_000\.png .*img_003\.png.*img_008\.png"):
        ImageDataModule(path=str(tmp_path), num_workers=0)
    assert ImageDataModule(path=str(tmp_path), num_workers=0, skip_unreadable=True).image_size == 24


def test_corrupt_embedded_image_error_names_the_row(tmp_path):
    """Undecodable bytes inside an Arrow table are named by their row: by the check of the whole table, and when
    a row is read."""
    good = Image.new("RGB", (8, 8))
    save_arrow([good, good, good], tmp_path / "ds")
    table = datasets.load_from_disk(str(tmp_path / "ds")).cast_column("image", datasets.Image(decode=False))
    rows = table.to_list()
    rows[1]["image"] = {"bytes": b"not an image", "path": None}
    broken = datasets.Dataset.from_list(rows, features=table.features)
    broken.save_to_disk(str(tmp_path / "broken"))
    datamodule = ImageDataModule(path=str(tmp_path / "broken"), batch_size=1, val_size=0, num_workers=0)
    with pytest.raises(ImageReadError, match=r"^1 of 3 images of .*broken.* cannot be read: row 1 \(not an image\)"):
        datamodule.full_dataset()
    table, column = datamodule.load()
    with pytest.raises(ImageReadError, match=r"cannot read image row 1 of .*broken"):
        ArrowImages(table, column, np.arange(3), datamodule.transform(), datamodule.source_name)[1]


def test_image_column_detection_and_missing_column_lists_columns(tmp_path):
    """The single image-typed column is found; a missing one lists the columns; two need a choice."""
    features = datasets.Features({"label": datasets.Value("int64"), "photo": datasets.Image()})
    assert find_image_column(features, ["label", "photo"], None) == "photo"
    save_arrow([Image.new("RGB", (4, 4))] * 2, tmp_path / "ds", column="photo", label=[0, 1])
    with pytest.raises(ValueError, match="image column 'image' not found; the columns are: photo, label"):
        ImageDataModule(path=str(tmp_path / "ds"), image_column="image", num_workers=0)
    two = datasets.Features({"a": datasets.Image(), "b": datasets.Image()})
    with pytest.raises(ValueError, match="several image columns"):
        find_image_column(two, ["a", "b"], None)
    with pytest.raises(ValueError, match="no column of image type; the columns are: label"):
        find_image_column(datasets.Features({"label": datasets.Value("int64")}), ["label"], None)


def test_empty_and_missing_folders_say_so(tmp_path):
    """An empty folder and a path that does not exist each get an error naming the path."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"folder .*empty contains no images"):
        ImageDataModule(path=str(tmp_path / "empty"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"no such directory: .*nowhere"):
        ImageDataModule(path=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(ValueError, match="needs a path"):
        ImageDataModule(num_workers=0)


def test_bad_arguments_are_named(tmp_path):
    """Impossible splits and sizes fail at construction or setup with the argument's name."""
    write_images(tmp_path, [(8, 8)] * 4)
    with pytest.raises(ValueError, match="val_size must be in"):
        ImageDataModule(path=str(tmp_path), val_size=1.5)
    with pytest.raises(ValueError, match="give val_size as a number of images"):
        ImageDataModule(path=str(tmp_path), streaming=True, val_size=0.1)
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        ImageDataModule(path=str(tmp_path), batch_size=8, val_size=0, num_workers=0).setup("fit")


def test_unknown_plugin_lists_the_known_ones():
    """A misspelt dataset name fails listing every registered name and the dotted-path alternative."""
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar100'; known: .*cifar10, .*huggingface.*dotted path"):
        ImageDataModule("cifar100")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg'"):
        get_plugin("no_such_pkg.PLUGIN")


def test_dotted_path_plugin_and_registry(tmp_path):
    """A dataset named by dotted path (here the digits plugin object) loads like a registered one."""
    datamodule = ImageDataModule("lit_score.data.digits.DIGITS", batch_size=16, num_workers=0)
    assert (datamodule.num_channels, datamodule.image_size) == (1, 16)
    assert get_plugin("digits") is DATASETS["digits"]
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))  # the digits plugin's table is labelled
    assert x.shape == (16, 1, 16, 16) and y.shape == (16,) and y.dtype == torch.int64


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory):
    """tests/plugin_pkg, pip-installed (wheel built from a copy) into a target directory put on sys.path."""
    work = tmp_path_factory.mktemp("plugin")
    shutil.copytree(ROOT / "tests" / "plugin_pkg", work / "src")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(work / "site"), str(work / "src")], check=True, timeout=300)
    sys.path.insert(0, str(work / "site"))
    yield work / "site"
    sys.path.remove(str(work / "site"))


def test_entry_point_plugin_of_an_installed_package_is_found_by_name(installed_plugin):
    """`dataset: checkerboards` resolves through the lit_score.datasets entry point of another package."""
    datamodule = ImageDataModule("checkerboards", batch_size=8, val_size=8, num_workers=0)
    assert (datamodule.num_channels, datamodule.image_size) == (3, 24)
    assert datamodule.plugin.random_flip
    datamodule.setup("fit")
    assert next(iter(datamodule.train_dataloader())).shape == (8, 3, 24, 24)
    with pytest.raises(ValueError, match="known: .*checkerboards"):
        ImageDataModule("checkerbords")


def test_cache_key_names_identity_and_deterministic_preprocessing(tmp_path):
    """The key is stable, ignores flips/scaling, and changes with resolution, crop, channels or data."""
    write_images(tmp_path / "a", [(16, 16)] * 4)
    write_images(tmp_path / "b", [(16, 16)] * 4)

    def key(path="a", **kw):
        return ImageDataModule(path=str(tmp_path / path), num_workers=0, **kw).cache_key()

    assert key() == key(random_flip=True, centered=True, dequantize=True) and key().startswith("a-16px-rgb-")
    assert len({key(), key("b"), key(image_size=8), key(center_crop=12), key(num_channels=1)}) == 5
    assert ImageDataModule("cifar10").cache_key().startswith("cifar10-32px-rgb-")
    assert ImageDataModule("celeba64").cache_key() != ImageDataModule("celeba64", center_crop=0).cache_key()
    assert DigitsDataModule().cache_key() == "digits-16px-gray"


def test_max_pairwise_distance_matches_brute_force():
    """The chunked search equals the largest entry of the full distance matrix, for any chunk size."""
    x = torch.randn(37, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    brute = torch.cdist(x.reshape(37, -1).double(), x.reshape(37, -1).double()).max().item()
    assert max_pairwise_distance(x, chunk_size=5) == pytest.approx(brute, rel=1e-9)
    assert max_pairwise_distance(x) == pytest.approx(brute, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        max_pairwise_distance(x[:1])


def test_sigma_max_of_a_folder_is_the_distance_of_its_extreme_images(tmp_path):
    """Black, white and grey 4x4 RGB images: the largest distance is black-white, sqrt(48) in [0, 1]."""
    tmp_path.mkdir(exist_ok=True)
    for i, value in enumerate((0, 255, 128, 64)):
        Image.new("RGB", (4, 4), (value,) * 3).save(tmp_path / f"{i}.png")
    datamodule = ImageDataModule(path=str(tmp_path), num_workers=0)
    assert estimate_sigma_max(datamodule) == pytest.approx(48 ** 0.5)
    centered = ImageDataModule(path=str(tmp_path), centered=True, num_workers=0)
    assert estimate_sigma_max(centered) == pytest.approx(2 * 48 ** 0.5)


def test_fid_reference_statistics_of_a_folder_cover_every_image_and_are_cached(tmp_path):
    """FID reference statistics of an image folder use every image of the split (the validation images too),
    are written once under the data + feature key, and are read back identically."""
    from lit_score.metrics import RandomConvFeatures
    from lit_score.metrics.reference import cache_path, reference_key, reference_statistics

    write_images(tmp_path / "images", [(10, 12)] * 7 + [(16, 16)] * 5)
    datamodule = ImageDataModule(path=str(tmp_path / "images"), batch_size=2, val_size=2, random_flip=True,
                                 num_workers=0)
    features = RandomConvFeatures(num_features=8, width=4, seed=0)
    ref = reference_statistics(datamodule, features, tmp_path / "cache", batch_size=5)
    assert ref.count == 12
    path = cache_path(reference_key(datamodule, features), tmp_path / "cache")
    assert path.is_file() and len(list((tmp_path / "cache").iterdir())) == 1
    again = reference_statistics(datamodule, features, tmp_path / "cache")
    torch.testing.assert_close(again.mean, ref.mean, rtol=0, atol=0)
    torch.testing.assert_close(again.cov, ref.cov, rtol=0, atol=0)
