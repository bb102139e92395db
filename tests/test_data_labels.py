"""Class labels from every data plugin: digits, image folders with one subfolder per class, Arrow tables with a
ClassLabel or a named column, the cached DataModule, and the labels of the seeds that predict samples from."""
import contextlib
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lit_score.data import CachedImageDataModule, DigitsDataModule, ImageDataModule, Toy2DDataModule
from lit_score.data.digits import load_digits_images
from lit_score.data.seeds import SeedsDataModule
from lit_score.data_space import DataSpace
from lit_score.errors import DataError

# classes created on disk out of sorted order; the red value of every pixel says the class
FOLDER_CLASSES = {"zebra": (2, 200), "ant": (3, 10), "cat": (4, 100)}  # name: (images, red value)
RED_TO_CLASS = {10: 0, 100: 1, 200: 2}  # sorted names: ant 0, cat 1, zebra 2


def _image(red: int, i: int) -> Image.Image:
    array = np.full((6, 6, 3), red, dtype=np.uint8)
    array[0, 0, 1] = 20 * i  # images of a class differ
    return Image.fromarray(array)


def class_folder(root: Path, classes: dict = FOLDER_CLASSES) -> Path:
    for name, (count, red) in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            _image(red, i).save(root / name / f"{name}_{i}.png")
    return root


def pairs(loader) -> list[tuple[int, int]]:
    """(red value, label) of every image of the loader's batches, which must be (x, y) tuples."""
    out = []
    for batch in loader:
        assert isinstance(batch, tuple) and len(batch) == 2
        x, y = batch
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        out += [(round(float(xi[0, 0, 1]) * 255), int(yi)) for xi, yi in zip(x, y)]
    return out


@contextlib.contextmanager
def one_line_error(match: str):
    """A DataError matching ``match``, in one line."""
    with pytest.raises(DataError, match=match) as info:
        yield
    assert "\n" not in str(info.value), str(info.value)


def test_digits_serve_sklearns_labels_and_count_the_training_split():
    from sklearn.datasets import load_digits

    targets = torch.from_numpy(load_digits().target).long()
    images = load_digits_images(8)
    dm = DigitsDataModule(image_size=8, batch_size=50, val_fraction=0.2, seed=3)
    space = dm.data_space
    val, train = dm.split_indices(len(targets))
    assert space.class_names == tuple("0123456789")
    assert list(space.class_counts) == torch.bincount(targets[train], minlength=10).tolist()
    assert sum(space.class_counts) == len(train) < len(targets)
    dm.setup("fit")
    x, y = map(torch.cat, zip(*dm.val_dataloader()))
    assert torch.equal(x, images[val]) and torch.equal(y, targets[val])
    x, y = next(iter(dm.train_dataloader()))  # shuffled: each image's label is its own
    for xi, yi in zip(x, y):
        same = (images == xi).flatten(1).all(1)
        assert same.any() and int(yi) in targets[same].tolist()
    plain = DigitsDataModule(image_size=8, labels=False)
    plain.setup("fit")
    assert plain.data_space.num_classes == 0 and isinstance(next(iter(plain.train_dataloader())), torch.Tensor)


def test_digits_plugin_table_has_a_classlabel_column():
    from sklearn.datasets import load_digits

    dm = ImageDataModule("digits", batch_size=16, val_size=0, num_workers=0)
    assert dm.data_space.class_names == tuple("0123456789")
    full = dm.full_dataset()
    assert full.labels.tolist() == load_digits().target.tolist()
    assert list(dm.data_space.class_counts) == np.bincount(load_digits().target).tolist()


def test_class_subfolders_are_labelled_by_sorted_name(tmp_path):
    root = class_folder(tmp_path / "animals")
    dm = ImageDataModule(path=str(root), batch_size=3, val_size=0, num_workers=0)
    space = dm.data_space  # built on every process: the names from the features, the counts once the data are read
    assert space.class_names == ("ant", "cat", "zebra") and space.class_counts is None
    dm.setup("fit")
    assert dm.data_space.class_counts == (3, 4, 2)
    served = pairs(dm.train_dataloader())
    assert len(served) == 9 and all(RED_TO_CLASS[red] == label for red, label in served)
    held_out = ImageDataModule(path=str(root), batch_size=2, val_size=3, num_workers=0, seed=1)
    held_out.setup("fit")
    counts = np.bincount(held_out.train_set.labels, minlength=3).tolist()
    assert list(held_out.data_space.class_counts) == counts and sum(counts) == 6
    assert all(RED_TO_CLASS[red] == label for red, label in pairs(held_out.val_dataloader()))


def test_split_folders_label_each_split_by_its_classes(tmp_path):
    """train/ with three class folders and test/ with two: the test labels are the training split's class indices
    (by name); flat train/ and test/ folders are unlabelled (their names are splits, not classes)."""
    class_folder(tmp_path / "split" / "train")
    class_folder(tmp_path / "split" / "test", {"cat": (1, 100), "zebra": (2, 200)})
    dm = ImageDataModule(path=str(tmp_path / "split"), batch_size=2, val_size=0, num_workers=0, test_split="test")
    assert dm.data_space.class_names == ("ant", "cat", "zebra")
    dm.setup("test")
    assert sorted(pairs(dm.test_dataloader())) == [(100, 1), (200, 2), (200, 2)]
    for split in ("train", "test"):
        for i in range(3):
            (tmp_path / "flat" / split).mkdir(parents=True, exist_ok=True)
            _image(50, i).save(tmp_path / "flat" / split / f"{i}.png")
    flat = ImageDataModule(path=str(tmp_path / "flat"), batch_size=3, val_size=0, num_workers=0, test_split="test")
    flat.setup("fit")
    assert flat.data_space.num_classes == 0
    assert isinstance(next(iter(flat.train_dataloader())), torch.Tensor)
    assert isinstance(next(iter(flat.test_dataloader())), torch.Tensor)


def test_a_flat_folder_is_unlabelled(tmp_path):
    for i in range(4):
        _image(30, i).save(tmp_path / f"{i}.png")
    dm = ImageDataModule(path=str(tmp_path), batch_size=4, val_size=0, num_workers=0)
    dm.setup("fit")
    assert dm.data_space == DataSpace((3, 6, 6)) and dm.classes() is None
    assert isinstance(next(iter(dm.train_dataloader())), torch.Tensor)
    seeds = next(iter(dm.predict_dataloader()))
    assert isinstance(seeds, torch.Tensor) and seeds.tolist() == list(range(64))
    with one_line_error("class_label 0 was given, but the data .* are unlabelled"):
        ImageDataModule(path=str(tmp_path), num_workers=0, class_label=0)


def _saved(tmp_path: Path, name: str, features: dict, **columns) -> Path:
    images = [_image(10 * i, i) for i in range(len(next(iter(columns.values()))))]
    table = datasets.Dataset.from_dict({"image": images, **columns},
                                       features=datasets.Features({"image": datasets.Image(), **features}))
    table.save_to_disk(str(tmp_path / name))
    return tmp_path / name


def test_arrow_tables_classlabel_found_named_column_mapped_missing_column_named(tmp_path):
    """A ClassLabel column `labels` is found by itself; a plain column is read when named (its sorted distinct
    values are the classes); a missing named column, a float column and contradictory options are one-line
    errors; labels: false ignores them."""
    labelled = _saved(tmp_path, "cl", {"labels": datasets.ClassLabel(names=["b", "a", "c"])}, labels=[2, 0, 1, 0, 2])
    dm = ImageDataModule(path=str(labelled), batch_size=5, val_size=0, num_workers=0)
    assert dm.data_space.class_names == ("b", "a", "c")
    dm.setup("fit")
    assert dm.data_space.class_counts == (2, 1, 2)
    assert sorted(pairs(dm.train_dataloader())) == [(0, 2), (10, 0), (20, 1), (30, 0), (40, 2)]
    off = ImageDataModule(path=str(labelled), batch_size=5, val_size=0, num_workers=0, labels=False)
    off.setup("fit")
    assert off.data_space.num_classes == 0 and isinstance(next(iter(off.train_dataloader())), torch.Tensor)

    digits = [11, 3, 7, 3, 11, 11]
    named = _saved(tmp_path, "int", {"digit": datasets.Value("int64"), "label": datasets.Value("int64")},
                   digit=digits, label=[0] * 6)
    auto = ImageDataModule(path=str(named), batch_size=6, val_size=0, num_workers=0)
    assert auto.data_space.num_classes == 0  # an integer column named label is no ClassLabel: not read by itself
    dm = ImageDataModule(path=str(named), batch_size=6, val_size=0, num_workers=0, label_column="digit")
    assert dm.data_space.class_names == ("3", "7", "11") and dm.data_space.class_counts == (2, 1, 3)
    dm.setup("fit")
    assert sorted(pairs(dm.train_dataloader())) == [(10 * i, {3: 0, 7: 1, 11: 2}[d]) for i, d in enumerate(digits)]
    words = _saved(tmp_path, "str", {"kind": datasets.Value("string")}, kind=["dog", "cat", "dog"])
    assert ImageDataModule(path=str(words), num_workers=0, label_column="kind").data_space.class_names == (
        "cat", "dog")

    with one_line_error(r"label column 'klass' not found; the columns are: image, digit, label"):
        ImageDataModule(path=str(named), num_workers=0, label_column="klass")
    floats = _saved(tmp_path, "float", {"score": datasets.Value("float32")}, score=[0.5, 1.5])
    with one_line_error(r"label column 'score' of .* holds float32 values"):
        ImageDataModule(path=str(floats), num_workers=0, label_column="score").data_space
    with one_line_error("label_column 'digit' is set but labels is false"):
        ImageDataModule(path=str(named), num_workers=0, label_column="digit", labels=False)


def test_streamed_classlabel_labels_and_a_streamed_plain_column_is_refused(tmp_path):
    labelled = _saved(tmp_path, "cl", {"label": datasets.ClassLabel(names=["x", "y"])}, label=[1, 0, 1, 1])
    dm = ImageDataModule(path=str(labelled), batch_size=2, val_size=0, num_workers=0, streaming=True)
    assert dm.data_space.class_names == ("x", "y") and dm.data_space.class_counts is None
    dm.setup("fit")
    assert sorted(pairs(dm.train_dataloader())) == [(0, 1), (10, 0), (20, 1), (30, 1)]
    named = _saved(tmp_path, "int", {"digit": datasets.Value("int64")}, digit=[1, 2])
    with one_line_error("is not a datasets.ClassLabel.*set streaming: false"):
        ImageDataModule(path=str(named), val_size=0, num_workers=0, streaming=True,
                        label_column="digit").data_space


def test_cached_datamodule_serves_the_same_pairs_and_rebuilds_an_unlabelled_cache(tmp_path, monkeypatch):
    """The cached training split gives the uncached (x, y) pairs, through its loader too. A cache written for the
    same folder before its images were sorted into class folders (same count, other order) is decoded again."""
    monkeypatch.setenv("LIT_SCORE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "animals"
    root.mkdir()
    k = 0
    for name, (count, red) in FOLDER_CLASSES.items():  # flat, interleaved names: another order than by class
        for i in range(count):
            _image(red, i).save(root / f"{(7 * k) % 9}_{name}_{i}.png")
            k += 1
    options = dict(path=str(root), batch_size=3, val_size=2, num_workers=0, random_flip=False)
    flat = CachedImageDataModule(**options)
    flat.setup("fit")
    assert flat.train_labels is None and isinstance(flat.serve(torch.arange(3)), torch.Tensor)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1
    for file in list(root.iterdir()):
        _, name, i = file.stem.split("_")
        (root / name).mkdir(exist_ok=True)
        shutil.move(file, root / name / f"{name}_{i}.png")

    cached, plain = CachedImageDataModule(**options), ImageDataModule(**options)
    cached.setup("fit")
    plain.setup("fit")
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1  # the same file, rewritten with the labels
    x, y = cached.serve(torch.arange(7))
    want = [plain.train_set[i] for i in range(7)]
    assert torch.equal(x, torch.stack([w[0] for w in want])) and y.tolist() == [w[1] for w in want]
    assert all(RED_TO_CLASS[round(float(xi[0, 0, 0]) * 255)] == int(yi) for xi, yi in zip(x, y))
    batch = cached.on_after_batch_transfer(next(iter(cached.train_dataloader())), 0)
    assert isinstance(batch, tuple) and all(RED_TO_CLASS[round(float(xi[0, 0, 0]) * 255)] == int(yi)
                                            for xi, yi in zip(*batch))
    assert torch.equal(torch.load(next((tmp_path / "cache").rglob("*.pt")), weights_only=True)["labels"], y)
    again = CachedImageDataModule(**options)
    monkeypatch.setattr("lit_score.data.cached.DataLoader", None)  # decoding would need it: the cache is read
    again.setup("fit")
    assert torch.equal(again.serve(torch.arange(7))[1], y)


SPACE = DataSpace((1, 4, 4), num_classes=3, class_names=("a", "b", "c"), class_counts=(1, 2, 7))


def test_predict_seeds_carry_labels_per_seed():
    def served(batch_size, **kw):
        dm = SeedsDataModule(SPACE.to_dict(), num_samples=11, sample_batch_size=batch_size, first_seed=5, **kw)
        batches = list(dm.predict_dataloader())
        assert all(isinstance(b, tuple) and b[1].dtype == torch.int64 for b in batches)
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    seeds, labels = served(4)
    assert seeds.tolist() == list(range(5, 16)) and torch.equal(labels, SPACE.labels_for(seeds))
    assert torch.equal(served(7)[1], labels) and len(set(labels.tolist())) > 1
    assert served(4, class_label=2)[1].tolist() == [2] * 11
    digits = DigitsDataModule(num_samples=3, class_label=9)
    assert next(iter(digits.predict_dataloader()))[1].tolist() == [9, 9, 9]
    unlabelled = SeedsDataModule(SPACE.unlabelled().to_dict(), num_samples=3)
    assert next(iter(unlabelled.predict_dataloader())).tolist() == [0, 1, 2]


def test_class_label_out_of_range_or_for_unlabelled_data_is_one_line(tmp_path):
    with one_line_error(r"class_label must be in 0..2 \(the data have 3 classes: a, b, c\), got 3"):
        SeedsDataModule(SPACE.to_dict(), class_label=3)
    with one_line_error("class_label must be a class index >= 0"):
        SeedsDataModule(SPACE.to_dict(), class_label=-1)
    with one_line_error("class_label 0 was given, but the data of SeedsDataModule are unlabelled"):
        SeedsDataModule(SPACE.unlabelled().to_dict(), class_label=0)
    with one_line_error(r"class_label must be in 0..9"):
        DigitsDataModule(class_label=10)
    with one_line_error("are unlabelled"):
        DigitsDataModule(class_label=1, labels=False)
    with one_line_error("are unlabelled"):
        Toy2DDataModule(num_train=8, num_val=2, batch_size=4, class_label=0)
    root = class_folder(tmp_path / "animals")
    with one_line_error(r"class_label must be in 0..2 \(the data have 3 classes: ant, cat, zebra\), got 3"):
        ImageDataModule(path=str(root), num_workers=0, class_label=3)
    dm = ImageDataModule(path=str(root), num_workers=0, class_label=2, num_samples=5)
    assert next(iter(dm.predict_dataloader()))[1].tolist() == [2] * 5
