"""Feature networks for FID: uint8 images (B, C, H, W) in, feature vectors (B, D) out, always in eval mode."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_score.errors import WeightsError

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor of any dtype and rank (0-dim buffers such as BatchNorm's ``num_batches_tracked``
    included), read on the CPU, so a hash of them is the same on every device."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a state_dict of torch-fidelity's InceptionV3 with random weights (He-normal convolutions, perturbed
    BatchNorm statistics) drawn from ``seed``, for tests and benchmarks where the published weights cannot be
    downloaded. Its FIDs exercise the real architecture and resize but are comparable with nothing published."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    # torch-fidelity's constructor always loads weights: give it none, then draw our own.
    with mock.patch.object(tfi, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def default_inception_path() -> Path:
    """Where torch-fidelity's own download lands: ``$TORCH_HOME/hub/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


class FeatureExtractor(nn.Module):
    """Base class: a frozen network in eval mode; ``identity`` names it (class, size and a hash of its weights)."""

    num_features: int

    def __init__(self) -> None:
        super().__init__()
        self._identity: str | None = None

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)

    def prepare(self) -> None:
        """Make the network ready (e.g. load weights from disk); raises if it cannot be."""

    @property
    def identity(self) -> str:
        if self._identity is None:
            digest = hashlib.sha256()
            for name, t in self.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor_bytes(t))
            self._identity = f"{type(self).__name__}-{self.num_features}-{digest.hexdigest()[:16]}"
        return self._identity

    def _check(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{type(self).__name__} expects uint8 images (B, 1 or 3, H, W), "
                             f"got {x.dtype} {tuple(x.shape)}")
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionV3(FeatureExtractor):
    """The 2048-d pool3 features of the TensorFlow FID Inception (torch-fidelity's port), from a local weights file.

    Grayscale images are repeated to three channels.
    """

    num_features = 2048

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        self.weights_path = Path(weights_path).expanduser() if weights_path else default_inception_path()
        self.net: nn.Module | None = None

    def prepare(self) -> None:
        """Load the weights (building a config does not need them; fitting with FID does)."""
        if self.net is not None:
            return
        path = self.weights_path
        if not path.is_file():
            raise WeightsError(
                f"InceptionV3 weights for FID not found at {path}. Download {INCEPTION_URL} "
                f"(torch-fidelity's port of the TensorFlow FID Inception) and put it at {path}, "
                f"or pass its location as weights_path.")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(path))
        self.eval()

    @property
    def identity(self) -> str:
        self.prepare()
        return super().identity

    def forward(self, x: Tensor) -> Tensor:
        self.prepare()
        return self.net(self._check(x))[0]


class RandomConvFeatures(FeatureExtractor):
    """A small fixed random conv net (weights drawn from ``seed``): a cheap stand-in for Inception in tests and
    quickstarts. Its FIDs are comparable only with each other, never with published numbers."""

    def __init__(self, num_features: int = 64, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        if num_features < 1 or width < 1:
            raise ValueError(f"num_features and width must be positive, got {num_features}, {width}")
        self.num_features = num_features
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_features))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.net:
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    fan_in = module.weight[0].numel()
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                    module.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self._check(x).float() / 127.5 - 1)
