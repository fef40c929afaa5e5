"""BN-Inception (Inception with batch norm, Ioffe & Szegedy 2015) as TSN uses it.

timm does not have this network. The layout follows TSN's tsn-pytorch
(`tf_model_zoo/bninception`, built from `bn_inception.yaml`) and Cadene's
`pretrainedmodels.bninception`, which share their parameter names: flat names such as
`conv1_7x7_s2.weight`, `conv1_7x7_s2_bn.running_mean`, `inception_3a_double_3x3_1.bias`.
Here the network is written as small blocks; `reference_key` turns each of our parameter
names into that flat name, so their checkpoint files load unchanged (with or without
tsn-pytorch's `module.` / `base_model.` prefixes) and any other layout is refused.

Pooled output: 1024-d (the 7x7 average pool of the reference at 224x224 input, as an
adaptive average so that other sizes work too).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vidpipe.core.errors import VidpipeError, first_line
from vidpipe.extractors.backbone import read_checkpoint

PREFIXES = ("module.", "base_model.")                  # tsn-pytorch's DataParallel + TSN wrapper
CLASSIFIERS = ("last_linear.", "fc.", "new_fc.", "fc_action.")   # pretrainedmodels, tf_model_zoo, TSN


class ConvBNReLU(nn.Module):
    """conv (with bias, as the Caffe model) -> batch norm -> ReLU: reference names X, X_bn."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel, stride=stride, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@dataclass(frozen=True)
class BlockSpec:
    """Output channels of each branch of one inception block (0: the branch is absent)."""
    in_chans: int
    single: int          # 1x1
    reduce: int          # 3x3_reduce -> 3x3
    conv: int
    double_reduce: int   # double_3x3_reduce -> double_3x3_1 -> double_3x3_2
    double: int
    pool_proj: int       # pool -> pool_proj; 0: a stride-2 block whose pool is passed through
    pool: str = "avg"    # avg (3x3, stride 1) | max (3x3, stride 1 or 2)


BLOCKS = {   # from bn_inception.yaml / pretrainedmodels' layer definitions
    "inception_3a": BlockSpec(192, 64, 64, 64, 64, 96, 32),
    "inception_3b": BlockSpec(256, 64, 64, 96, 64, 96, 64),
    "inception_3c": BlockSpec(320, 0, 128, 160, 64, 96, 0, "max"),
    "inception_4a": BlockSpec(576, 224, 64, 96, 96, 128, 128),
    "inception_4b": BlockSpec(576, 192, 96, 128, 96, 128, 128),
    "inception_4c": BlockSpec(576, 160, 128, 160, 128, 160, 128),
    "inception_4d": BlockSpec(608, 96, 128, 192, 160, 192, 128),
    "inception_4e": BlockSpec(608, 0, 128, 192, 192, 256, 0, "max"),
    "inception_5a": BlockSpec(1056, 352, 192, 320, 160, 224, 128),
    "inception_5b": BlockSpec(1024, 352, 192, 320, 192, 224, 128, "max"),
}


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated; without a 1x1 branch the block halves the size."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        stride = 1 if spec.pool_proj else 2
        self.units = nn.ModuleDict()
        if spec.single:
            self.units["1x1"] = ConvBNReLU(spec.in_chans, spec.single, 1)
        self.units["3x3_reduce"] = ConvBNReLU(spec.in_chans, spec.reduce, 1)
        self.units["3x3"] = ConvBNReLU(spec.reduce, spec.conv, 3, stride)
        self.units["double_3x3_reduce"] = ConvBNReLU(spec.in_chans, spec.double_reduce, 1)
        self.units["double_3x3_1"] = ConvBNReLU(spec.double_reduce, spec.double, 3)
        self.units["double_3x3_2"] = ConvBNReLU(spec.double, spec.double, 3, stride)
        if spec.pool == "avg":   # Caffe pooling: ceil mode, padding counted
            self.pool = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        else:
            self.pool = nn.MaxPool2d(3, stride=stride, padding=1 if stride == 1 else 0, ceil_mode=True)
        if spec.pool_proj:
            self.units["pool_proj"] = ConvBNReLU(spec.in_chans, spec.pool_proj, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.units
        branches = [u["1x1"](x)] if "1x1" in u else []
        branches.append(u["3x3"](u["3x3_reduce"](x)))
        branches.append(u["double_3x3_2"](u["double_3x3_1"](u["double_3x3_reduce"](x))))
        pooled = self.pool(x)
        branches.append(u["pool_proj"](pooled) if "pool_proj" in u else pooled)
        return torch.cat(branches, dim=1)


class BNInception(nn.Module):
    """(B, in_chans, H, W) -> (B, 1024) pooled features. TSN's flow network has in_chans = 10."""

    num_features = 1024

    def __init__(self, in_chans: int = 3):
        super().__init__()
        self.stem = nn.ModuleDict({
            "conv1_7x7_s2": ConvBNReLU(in_chans, 64, 7, stride=2),
            "conv2_3x3_reduce": ConvBNReLU(64, 64, 1),
            "conv2_3x3": ConvBNReLU(64, 192, 3),
        })
        self.stem_pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.blocks = nn.ModuleDict({name: InceptionBlock(spec) for name, spec in BLOCKS.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_pool(self.stem["conv1_7x7_s2"](x))                            # (B, 64, H/4, W/4)
        x = self.stem_pool(self.stem["conv2_3x3"](self.stem["conv2_3x3_reduce"](x)))  # (B, 192, H/8, W/8)
        for block in self.blocks.values():
            x = block(x)                                                            # (B, 1024, H/32, W/32)
        return x.mean(dim=(2, 3))                                                   # (B, 1024)


def reference_key(key: str) -> str:
    """Our parameter name -> the tsn-pytorch / pretrainedmodels flat name.

    'blocks.inception_3a.units.double_3x3_1.bn.weight' -> 'inception_3a_double_3x3_1_bn.weight'
    'stem.conv1_7x7_s2.conv.bias' -> 'conv1_7x7_s2.bias'
    """
    *path, param = key.split(".")
    path = [part for part in path if part not in ("stem", "blocks", "units")]
    layer = path.pop()                 # conv | bn
    return "_".join(path) + ("_bn" if layer == "bn" else "") + "." + param


def load_bninception(path: str | Path, in_chans: int) -> BNInception:
    """A BN-Inception from a tsn-pytorch / pretrainedmodels state dict file; other layouts are
    refused with one line naming the keys expected and found."""
    model = BNInception(in_chans)
    state = read_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]          # tsn-pytorch saves {'epoch', 'arch', 'state_dict', ...}
    found = {_strip(key): value for key, value in state.items()} if isinstance(state, dict) else {}
    found = {k: v for k, v in found.items()
             if not k.startswith(CLASSIFIERS) and not k.endswith("num_batches_tracked")}
    ours = {reference_key(k): k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(ours) - set(found))
    unexpected = sorted(set(found) - set(ours))
    if missing or unexpected:
        raise VidpipeError(
            f"{path}: not a BN-Inception checkpoint in the tsn-pytorch/pretrainedmodels layout: expected "
            f"{len(ours)} keys like conv1_7x7_s2.weight, inception_3a_1x1_bn.running_mean "
            f"(optionally under module./base_model.); found {len(found)} keys like "
            f"{', '.join(list(found)[:2]) or 'none'} ({len(missing)} missing, e.g. "
            f"{missing[0] if missing else '-'}; {len(unexpected)} unknown, e.g. {unexpected[0] if unexpected else '-'})")
    first = found["conv1_7x7_s2.weight"]
    if first.shape[1] != in_chans:
        raise VidpipeError(f"{path}: BN-Inception's first conv takes {first.shape[1]} channels, "
                           f"this stream feeds {in_chans}")
    try:
        model.load_state_dict({ours[k]: v for k, v in found.items()}, strict=False)
    except RuntimeError as exc:
        raise VidpipeError(f"{path}: BN-Inception weights do not fit ({first_line(exc)[:150]})") from None
    return model.eval()


def _strip(key: str) -> str:
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key
