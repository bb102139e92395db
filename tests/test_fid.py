"""The FID protocol: Frechet distance, float64 statistics, feature networks and the cached reference set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_fidelity
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_statistics_to_metric

import lightning as L
from lit_score.data_space import DataSpace
from lit_score.metrics import (FeatureStatistics, InceptionV3, RandomConvFeatures, frechet_distance,
                               reference_statistics, to_uint8)
from lit_score.metrics.reference import cache_path, reference_key


class _FidelityRandomConv(FeatureExtractorBase):
    """torch-fidelity's plug-in for our RandomConvFeatures (seed 0, 16 features)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.features = RandomConvFeatures(num_features=16, width=8, seed=0)

    @staticmethod
    def get_provided_features_list():
        return ("feat",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "feat"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        return (self.features(x),)


torch_fidelity.register_feature_extractor("lit-score-random-conv-test", _FidelityRandomConv)


class _Images(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _image_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (120, 3, 16, 16), generator=g, dtype=torch.uint8)
    b = (torch.rand(100, 3, 16, 16, generator=g) ** 2 * 255).round().to(torch.uint8)
    return a, b


def _fid_of_features(*features):
    stats = []
    for f in features:
        s = FeatureStatistics(f.shape[1])
        for chunk in f.split(32):
            s.update(chunk)
        stats.append(s.compute()[:2])
    return frechet_distance(*stats[0], *stats[1])


def _our_fid(a, b, features):
    return _fid_of_features(features(a), features(b))


def test_fid_equals_torch_fidelity_on_the_same_images_and_features():
    """Property: our FID of two image sets equals torch-fidelity's calculate_metrics with the same extractor."""
    a, b = _image_sets()
    ours = _our_fid(a, b, RandomConvFeatures(num_features=16, width=8, seed=0))
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(a), input2=_Images(b), fid=True, feature_extractor="lit-score-random-conv-test",
        feature_layer_fid="feat", cuda=False, cache=False, verbose=False, batch_size=50, save_cpu_ram=True,
    )["frechet_inception_distance"]
    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("network", ["random_conv", pytest.param("inception", marks=pytest.mark.slow)])
def test_fid_kid_is_equal_torch_fidelity_and_clean_fid(network, request, tmp_path):
    """Oracle: two well-kept implementations on the same uint8 images and the same feature network: our 16-d
    RandomConvFeatures (registered with torch-fidelity; its outputs serve as IS logits), or InceptionV3 on the
    random-weight file (slow on CPU: 70 Inception passes and two scipy sqrtm of 2048x2048).

    torch-fidelity: its full ``calculate_metrics`` (FID, KID, ISC); for Inception with its own
    ``inception-v3-compat`` extractor loading the file, and IS without shuffling (contiguous splits, as ours).
    clean-fid: its full two-folder pipeline ``compute_fid(fdir1, fdir2, mode="legacy_tensorflow")`` (PNG decoding,
    no resize outside the network, scipy sqrtm Frechet distance); its own Inception is a download that cannot run
    here, so ``custom_feat_extractor`` is torch-fidelity's Inception on the same file (or our RandomConvFeatures).
    Within 1e-4 relative (the issue's bar)."""
    from cleanfid import fid as cleanfid
    from PIL import Image
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from lit_score.evaluate import InceptionV3Logits, inception_score
    from lit_score.metrics import kernel_inception_distance

    g = torch.Generator().manual_seed(0)
    n = 10 if network == "inception" else 60
    a = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    b = (torch.rand(n, 3, 16, 16, generator=g) ** 2 * 255).round().to(torch.uint8)
    if network == "inception":
        weights = str(request.getfixturevalue("inception_weights"))
        features, logits = InceptionV3(weights), InceptionV3Logits(weights)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
        extractor = lambda x: net(x.round().to(torch.uint8))[0]  # noqa: E731
        options = dict(feature_extractor_weights_path=weights)
    else:
        features = logits = RandomConvFeatures(num_features=16, width=8, seed=0)
        extractor = lambda x: features(x.round().to(torch.uint8))  # noqa: E731
        options = dict(feature_extractor="lit-score-random-conv-test", feature_layer_fid="feat",
                       feature_layer_kid="feat", feature_layer_isc="feat")
    fa, fb = features(a), features(b)
    ours = {"fid": _fid_of_features(fa, fb), "kid": kernel_inception_distance(fa, fb, subsets=10, subset_size=8),
            "isc": inception_score(logits(a), splits=2)}
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(a), input2=_Images(b), fid=True, kid=True, isc=True, kid_subsets=10, kid_subset_size=8,
        isc_splits=2, samples_shuffle=False, cuda=False, cache=False, verbose=False, batch_size=10,
        save_cpu_ram=True, **options)
    assert ours["fid"] > 0 and ours["kid"][0] != 0 and ours["isc"][0] > 1
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["kid"][0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["kid"][1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)
    assert ours["isc"][0] == pytest.approx(theirs["inception_score_mean"], rel=1e-4)
    assert ours["isc"][1] == pytest.approx(theirs["inception_score_std"], rel=1e-3, abs=1e-6)

    for name, images in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i:03d}.png")
    clean = cleanfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="legacy_tensorflow",
                                 custom_feat_extractor=extractor, num_workers=0, batch_size=10,
                                 device=torch.device("cpu"), verbose=False)
    assert ours["fid"] == pytest.approx(clean, rel=1e-4)


def test_frechet_distance_equals_torch_fidelity_on_the_same_statistics():
    """Property: our Frechet distance equals torch-fidelity's fid_statistics_to_metric on identical float64 stats."""
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(300, 24))
    f2 = rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.5 + 0.3
    s1 = {"mu": f1.mean(0), "sigma": np.cov(f1, rowvar=False)}
    s2 = {"mu": f2.mean(0), "sigma": np.cov(f2, rowvar=False)}
    theirs = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(*(torch.from_numpy(s1[k]) for k in ("mu", "sigma")),
                            *(torch.from_numpy(s2[k]) for k in ("mu", "sigma")))
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert frechet_distance(torch.from_numpy(s1["mu"]), torch.from_numpy(s1["sigma"]),
                            torch.from_numpy(s1["mu"]), torch.from_numpy(s1["sigma"])) == pytest.approx(0, abs=1e-8)


def test_feature_statistics_are_float64_and_independent_of_batching():
    """Property: mean/cov equal numpy's float64 mean and unbiased cov, however the features are batched."""
    f = torch.randn(101, 8, generator=torch.Generator().manual_seed(1)) * 3 + 5
    whole, pieces = FeatureStatistics(8), FeatureStatistics(8)
    whole.update(f)
    for chunk in f.split(7):
        pieces.update(chunk)
    (m1, c1, n1), (m2, c2, n2) = whole.compute(), pieces.compute()
    assert n1 == n2 == 101
    assert m1.dtype == c1.dtype == torch.float64
    np.testing.assert_allclose(m1.numpy(), f.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(c1.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m1, m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c1, c2, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"expected features \(B, 8\)"):
        whole.update(torch.zeros(3, 4))


def test_to_uint8_quantises_like_stored_images():
    """Property: [0, 1] and [-1, 1] data map to the same uint8 values, rounding, clamping out-of-range values."""
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.2, 0.499 / 255])
    assert to_uint8(x, centered=False).tolist() == [0, 128, 255, 255, 0, 0]
    assert torch.equal(to_uint8(x * 2 - 1, centered=True), to_uint8(x, centered=False))
    assert to_uint8(x, centered=False).dtype == torch.uint8


def test_random_conv_features_are_fixed_by_seed_and_stay_in_eval_mode():
    """Property: the same seed gives the same network (same identity); train() cannot leave eval mode."""
    a, b, c = RandomConvFeatures(seed=3), RandomConvFeatures(seed=3), RandomConvFeatures(seed=4)
    assert a.identity == b.identity != c.identity
    a.train()
    assert not a.training and not any(m.training for m in a.modules())
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(ValueError, match="expects uint8 images"):
        a(x.float())


def test_missing_inception_weights_say_where_to_put_them(tmp_path):
    """Property: without the weights file, InceptionV3 fails when first needed, naming the path and the URL."""
    path = tmp_path / "missing" / "inception.pth"
    features = InceptionV3(str(path))
    with pytest.raises(FileNotFoundError) as err:
        features.prepare()
    assert str(path) in str(err.value) and "weights-inception-2015-12-05-6726825d.pth" in str(err.value)


def test_inception_identity_hashes_every_tensor_including_0_dim_buffers(inception_weights, tmp_path):
    """Property: InceptionV3 (94 0-dim num_batches_tracked buffers) has an identity; the same file gives the same one,
    other weights another, and a buffer's value alone changes it."""
    a, b = InceptionV3(str(inception_weights)), InceptionV3(str(inception_weights))
    assert a.identity == b.identity and a.identity.startswith("InceptionV3-2048-")
    state = torch.load(inception_weights, weights_only=True)
    assert sum(v.dim() == 0 for v in state.values()) == 94
    state = {k: (v + 1 if k.endswith("num_batches_tracked") and i == 0 else v)
             for i, (k, v) in enumerate(sorted(state.items(), key=lambda kv: not kv[0].endswith("tracked")))}
    torch.save(state, tmp_path / "changed.pth")
    assert InceptionV3(str(tmp_path / "changed.pth")).identity != a.identity


class _TinyImages(L.LightningDataModule):
    data_space = DataSpace((1, 8, 8), centered=True)

    def __init__(self, n=40, fail=False):
        super().__init__()
        self.n, self.fail = n, fail

    def cache_key(self):
        return f"tiny-noise-{self.n}-8x8-centered"

    def train_dataloader(self):
        if self.fail:
            raise RuntimeError("the training data were read although the statistics are cached")
        images = torch.rand(self.n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return DataLoader(_Images(images), batch_size=16, shuffle=True, drop_last=True)


def test_reference_statistics_cover_every_training_image_and_are_cached(tmp_path, feature_network):
    """Property: statistics use all training images (no drop_last), equal numpy's mean/cov of the features of every
    image, keep the first images' features, are written once under the data + feature key and later read back
    without touching the data."""
    n = 40 if feature_network().num_features == 8 else 10
    features = feature_network()
    ref = reference_statistics(_TinyImages(n), features, tmp_path, batch_size=16, keep_features=3)
    images = _TinyImages(n).train_dataloader().dataset.images
    direct = features(to_uint8(images, centered=True)).double().numpy()
    assert ref.count == n and ref.mean.dtype == torch.float64 and ref.features.shape == (3, features.num_features)
    np.testing.assert_allclose(ref.mean.numpy(), direct.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref.cov.numpy(), np.cov(direct, rowvar=False), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(ref.features.numpy(), direct[:3], rtol=1e-5, atol=1e-7)
    path = cache_path(reference_key(_TinyImages(n), features), tmp_path)
    assert path.is_file() and ref.key.startswith(f"tiny-noise-{n}-8x8-centered__{type(features).__name__}-")
    again = reference_statistics(_TinyImages(n, fail=True), features, tmp_path, keep_features=2)
    torch.testing.assert_close(again.cov, ref.cov, rtol=0, atol=0)
    torch.testing.assert_close(again.features, ref.features[:2], rtol=0, atol=0)
    other = reference_statistics(_TinyImages(n), RandomConvFeatures(num_features=8, width=4, seed=1), tmp_path)
    assert other.key != ref.key and len(list(tmp_path.iterdir())) == 2


def test_reference_statistics_need_a_cache_key():
    """Property: a DataModule without cache_key() is refused with a message naming the missing method."""
    with pytest.raises(TypeError, match="cache_key"):
        reference_statistics(L.LightningDataModule(), RandomConvFeatures(), "/nonexistent")


def _reference_worker(rank, world, tmp, weights):
    """One process of a 2-process gloo group computing the reference statistics of 11 images with each network."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        for name, features in (("RandomConvFeatures", RandomConvFeatures(num_features=8, width=4, seed=0)),
                               ("InceptionV3", InceptionV3(weights))):
            ref = reference_statistics(_TinyImages(11), features, tmp / name, batch_size=4, keep_features=5)
            torch.save({"count": ref.count, "mean": ref.mean, "cov": ref.cov, "features": ref.features},
                       tmp / f"{name}-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_references(tmp_path_factory, inception_weights):
    """One launch of 2 processes (process start-up dominates on CPU) for both feature networks."""
    tmp = tmp_path_factory.mktemp("ddp_reference")
    torch.multiprocessing.spawn(_reference_worker, args=(2, tmp, str(inception_weights)), nprocs=2)
    return tmp


@pytest.mark.slow  # 2 spawned processes (~12 s); FID under DDP is also in test_callbacks_ddp.py
def test_reference_statistics_under_ddp_count_every_image_once(ddp_references, feature_network, one_thread):
    """Property: 2 gloo processes sharing 11 images (6 + 5) both return, and cache, the global count 11, the mean and
    covariance of all 11 images' features and the features of images 0..4 in dataset order (the direct features on
    one thread, as the workers: float32 convolutions differ in the last bits with the thread count)."""
    features = feature_network()
    name = type(features).__name__
    images = _TinyImages(11).train_dataloader().dataset.images
    direct = features(to_uint8(images, centered=True)).double().numpy()
    [cached] = (ddp_references / name).iterdir()
    for result in [torch.load(ddp_references / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1)] + [
            torch.load(cached, weights_only=True)]:
        assert result["count"] == 11
        np.testing.assert_allclose(result["mean"].numpy(), direct.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(result["cov"].numpy(), np.cov(direct, rowvar=False), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(result["features"].numpy(), direct[:5], rtol=1e-5, atol=1e-7)
