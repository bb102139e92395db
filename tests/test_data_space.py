"""The data space: declared by the DataModule, carried by the model and its checkpoint, inferred for old
checkpoints, and the one uint8 quantiser."""
from __future__ import annotations

import pytest
import torch

from lit_score.data import DigitsDataModule, Toy2DDataModule
from lit_score.data_space import DataSpace, data_space_of, to_uint8
from lit_score.runtime.module import ScoreModel
from lit_score.networks import DDPMpp, ScoreMLP
from lit_score.diffusion.sdes import VPSDE

TINY = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_channels=1, image_size=8)


def test_uint8_levels_round_trip_in_both_ranges():
    """Property: every one of the 256 stored levels k maps into the space (k / 255, or 2 k / 255 - 1) and back to k,
    and values between levels round to the nearest one, clamped to the range."""
    k = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    for centered in (False, True):
        space = DataSpace((1, 16, 16), centered)
        x = space.to_model(k)
        assert float(x.min()) == space.range[0] and float(x.max()) == space.range[1]
        assert torch.equal(space.to_uint8(x), k)
    x = torch.tensor([0.3 / 255, 0.6 / 255, -0.2, 1.7]).reshape(1, 1, 2, 2)
    assert to_uint8(x, centered=False).flatten().tolist() == [0, 1, 0, 255]


def test_datamodules_declare_their_space():
    digits = DigitsDataModule(image_size=8, centered=True).data_space
    assert digits.unlabelled() == DataSpace((1, 8, 8), True, 256) and digits.num_classes == 10
    assert DigitsDataModule(image_size=8, centered=True, labels=False).data_space == DataSpace((1, 8, 8), True, 256)
    toy = Toy2DDataModule(num_train=8, num_val=2, batch_size=4).data_space
    assert toy == DataSpace((2,), False, None) and not toy.is_image
    with pytest.raises(ValueError, match="not images"):
        toy.to_uint8(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="data_space"):
        data_space_of(object())


def test_checkpoint_carries_the_space_and_old_checkpoints_infer_it(tmp_path):
    """A checkpoint's hyperparameters hold the data space as plain values (so the CLI's checkpoints, whose network is
    a config, stay readable with weights_only=True) and it comes back on load; a model saved before (no data_space) gets the network's shape and ``centered``."""
    import lightning as L

    space = DataSpace((1, 8, 8), centered=False)
    model = ScoreModel(DDPMpp(**TINY, centered=False), VPSDE(), data_space=space)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["hyper_parameters"]  # the network was an object: saved as None
    assert saved["data_space"] == {"shape": [1, 8, 8], "centered": False, "num_levels": 256}
    assert saved["net"] is None and saved["sde"] is None
    with pytest.raises(ValueError, match="does not record its net and sde.*net=..., sde=..."):
        ScoreModel.load_from_checkpoint(path)
    loaded = ScoreModel.load_from_checkpoint(path, net=DDPMpp(**TINY, centered=False), sde=VPSDE())
    assert loaded.data_space == space
    torch.testing.assert_close(loaded.net.state_dict(), model.net.state_dict())

    old = ScoreModel(DDPMpp(**TINY, centered=True), VPSDE())
    assert old.data_space == DataSpace((1, 8, 8), centered=True, num_levels=256)
    assert ScoreModel(ScoreMLP(num_channels=3), VPSDE()).data_space == DataSpace((3,), False, None)
    bare = ScoreModel(torch.nn.Linear(3, 3), VPSDE())  # a network that declares nothing: an error when asked
    with pytest.raises(ValueError, match="pass data_space=DataSpace"):
        bare.data_space
    with pytest.raises(ValueError, match="network takes samples of shape"):
        ScoreModel(DDPMpp(**TINY), VPSDE(), data_space=DataSpace((3, 8, 8)))
