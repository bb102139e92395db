"""Make tests/reference/edm_param_counts.json: the parameter counts of NVlabs edm's CIFAR-10 networks (config F:
DDPM++ and NCSN++ as its train.py builds them, 128 channels x [2, 2, 2], dropout 0.13, with and without its
augmentation labels (augment_dim 9) and class labels (label_dim 10)), for tests/test_augment.py.

    git clone https://github.com/NVlabs/edm /tmp/edm
    python tests/reference/make_edm_param_counts.py --official /tmp/edm

It imports training.networks from the given checkout (which needs torch, numpy, click and pillow here) and copies
none of its code. The networks are built with EDMPrecond, as train.py --precond edm builds them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ARCHS = {  # train.py's --arch settings
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of NVlabs/edm")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("edm_param_counts.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(args.official))
    import torch
    from training.networks import EDMPrecond

    counts = {}
    for arch, kwargs in ARCHS.items():
        for augment_dim in (0, 9):
            for label_dim in (0, 10):
                with torch.device("meta"):
                    net = EDMPrecond(img_resolution=32, img_channels=3, label_dim=label_dim, dropout=0.13,
                                     augment_dim=augment_dim, **kwargs)
                key = f"{arch}_augment{augment_dim}_label{label_dim}"
                counts[key] = sum(p.numel() for p in net.parameters())
                print(f"{key}: {counts[key]:,}")
    args.out.write_text(json.dumps(counts, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
