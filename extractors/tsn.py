"""Feature recipes that reproduce the field's public features (TSN, Kinetics-400).

`tsn-kinetics`: the public THUMOS'14 / TVSeries features of LSTR, TeSTra and MAT: RGB
through mmaction2's TSN ResNet-50, flow (DenseFlow's TV-L1) through TSN's BN-Inception.
`tsn-kinetics-r50`: mmaction2's TSN ResNet-50 for both streams.

Every number below comes from the reference code; docs/extract.md says where:
- RGB: mmaction2 `tsn_r50_320p_1x1x8_100e_kinetics400_rgb`: Resize(scale=(-1, 256)) (cv2
  bilinear on uint8, sizes rounded as `mmcv.rescale_size`), CenterCrop(256) (the centre
  of its test-time ThreeCrop(256)), RGB order, mean (123.675, 116.28, 103.53), std
  (58.395, 57.12, 57.375); ResNet-50 loaded from the mmaction2 checkpoint, pooled 2048-d.
- Flow: DenseFlow: gray frames (cv2 BGR2GRAY), resized to a short side (`--newShort`, only
  when larger), OpenCV DualTVL1 with its defaults, each of x and y mapped to an 8-bit image
  with bound 20 (`convertFlowToImage`) and, optionally, the JPEG file round trip; the
  images then go through the network's own test pipeline (`FlowRecipe`).
The streams take raw decoded frames (uint8): these resizes must happen on 8-bit images, as
in the references, to give the same numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from vidpipe.core.errors import VidpipeError
from vidpipe.extractors.backbone import file_sha256, inference_ready, read_checkpoint, seeded, weights_identity
from vidpipe.extractors.bninception import BNInception, load_bninception
from vidpipe.extractors.flow import OpenCVFlow, frame_pairs
from vidpipe.extractors.rgb import center_crop

FLOW_BOUND = 20.0     # DenseFlow -b=20 (mmaction2 build_rawframes.py; TSN's extract_optical_flow.sh)
MMACTION_MEAN = (123.675, 116.28, 103.53)     # img_norm_cfg of the TSN Kinetics configs
MMACTION_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class FlowRecipe:
    network: str          # bninception (tsn-pytorch) | resnet50 (mmaction2)
    short: int            # DenseFlow's frame short side for TV-L1
    resize: int           # flow images resized to this short side by the test pipeline
    crop: int             # centre crop
    mean: float           # per-channel normalisation of the 8-bit images
    std: float
    weights_name: str     # what to download, for messages


@dataclass(frozen=True)
class Recipe:
    name: str
    flow: FlowRecipe
    rgb_resize: int = 256
    rgb_crop: int = 256
    rgb_weights_name: str = "mmaction2 tsn_r50_320p_1x1x8_100e_kinetics400_rgb_*.pth"

    def describe(self) -> dict[str, str]:
        """The preprocessing, as the cache records it."""
        f = self.flow
        return {
            "rgb_input": (f"centre frame, short side {self.rgb_resize} (cv2 bilinear, uint8), centre crop "
                          f"{self.rgb_crop}, RGB, mean {list(MMACTION_MEAN)} std {list(MMACTION_STD)}"),
            "flow_input": (f"DenseFlow TV-L1 on gray frames at short side {f.short}, bound {FLOW_BOUND:g} -> "
                           f"8-bit x/y images, short side {f.resize} (cv2 bilinear), centre crop {f.crop}, x1 y1 x2 y2 ..., "
                           f"(v - {f.mean:g}) / {f.std:g}"),
        }


RECIPES = {
    # TSN (tsn-pytorch) BN-Inception flow: frames at 256 (TSN extracted 340x256), test-time
    # GroupScale(256) then GroupCenterCrop(224), input_mean [128], input_std [1] (values 0..255,
    # no division: ToTorchFormatTensor(div=False) for BNInception).
    "tsn-kinetics": Recipe("tsn-kinetics", FlowRecipe(
        "bninception", short=256, resize=256, crop=224, mean=128.0, std=1.0,
        weights_name="TSN BN-Inception Kinetics-400 flow (tsn-pytorch format)")),
    # mmaction2 tsn_r50_320p_1x1x8_110e_kinetics400_flow: flow of 320p frames, Resize(-1, 256),
    # CenterCrop(224), mean [128, 128] std [128, 128], in_channels 10.
    "tsn-kinetics-r50": Recipe("tsn-kinetics-r50", FlowRecipe(
        "resnet50", short=320, resize=256, crop=224, mean=128.0, std=128.0,
        weights_name="mmaction2 tsn_r50_320p_1x1x8_110e_kinetics400_flow_*.pth")),
}


# -- 8-bit image operations, as the references do them ----------------------------------------
def rescale_size(width: int, height: int, short: int) -> tuple[int, int]:
    """mmcv.rescale_size for mmaction2's Resize(scale=(-1, short)): (new_w, new_h)."""
    factor = short / min(width, height)
    return int(width * factor + 0.5), int(height * factor + 0.5)


def mmaction_resize(image: np.ndarray, short: int) -> np.ndarray:
    """(H, W[, C]) uint8 -> short side `short` with cv2 bilinear, as mmcv.imresize."""
    height, width = image.shape[:2]
    return cv2.resize(image, rescale_size(width, height, short), interpolation=cv2.INTER_LINEAR)


def denseflow_size(width: int, height: int, short: int) -> tuple[int, int] | None:
    """DenseFlow's --newShort: (new_w, new_h) rounded half away from zero, None when the frame
    is already no larger (DenseFlow never enlarges)."""
    if min(width, height) <= short:
        return None
    if width < height:
        return short, int(np.floor(height / width * short + 0.5))
    return int(np.floor(width / height * short + 0.5)), short


def flow_to_images(flow: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """(h, w, 2) float32 pixels -> (2, h, w) uint8 x/y images: DenseFlow's convertFlowToImage,
    255 * (v + bound) / (2 * bound) in double, cvRound (half to even), clipped to 0..255."""
    scaled = 255.0 * (flow.astype(np.float64) + bound) / (2 * bound)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    """Encode as DenseFlow writes flow images (cv::imencode '.jpg', quality 95) and decode as
    mmcv.imfrombytes(flag='grayscale') reads them."""
    ok, encoded = cv2.imencode(".jpg", image)
    if not ok:   # pragma: no cover - OpenCV always encodes a uint8 image
        raise VidpipeError("JPEG encoding of a flow image failed")
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


# -- networks -----------------------------------------------------------------------------------
MMACTION_KEY = re.compile(r"^backbone\.(.+?)(?:\.(conv|bn))?\.(\w+)$")


def timm_key(key: str) -> str | None:
    """mmaction2 ResNet name -> timm resnet50 name; None for keys outside the backbone.

    backbone.conv1.conv.weight -> conv1.weight; backbone.conv1.bn.x -> bn1.x;
    backbone.layer1.0.conv2.bn.x -> layer1.0.bn2.x; ...downsample.conv/.bn -> downsample.0/.1
    """
    match = MMACTION_KEY.match(key)
    if not match:
        return None
    module, layer, param = match.groups()
    if module.endswith("downsample"):
        return f"{module}.{0 if layer == 'conv' else 1}.{param}"
    parent, _, name = module.rpartition(".")
    if layer == "bn":              # convN.bn -> bnN
        name = "bn" + name[len("conv"):]
    return f"{parent}.{name}.{param}" if parent else f"{name}.{param}"


def load_mmaction_resnet50(path: str | Path, in_chans: int) -> nn.Module:
    """timm resnet50 (pooled, no classifier) from an mmaction2 TSN checkpoint file: a dict
    with `state_dict` holding `backbone.*` (ConvModule names) and `cls_head.*` keys."""
    import timm

    model = timm.create_model("resnet50", num_classes=0, in_chans=in_chans)
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    mapped = {timm_key(k): v for k, v in state.items() if timm_key(k)}
    expected = set(model.state_dict())
    missing = sorted(expected - set(mapped))
    unexpected = sorted(set(mapped) - expected)
    if missing or unexpected or not state:
        found = ", ".join(list(state)[:2]) or "none"
        raise VidpipeError(
            f"{path}: not an mmaction2 TSN ResNet-50 checkpoint: expected a state_dict with keys like "
            f"backbone.conv1.conv.weight, backbone.layer1.0.conv1.bn.running_mean; found {len(state)} "
            f"keys like {found} ({len(missing)} missing; {len(unexpected)} unknown)")
    if mapped["conv1.weight"].shape[1] != in_chans:
        raise VidpipeError(f"{path}: the ResNet-50's first conv takes {mapped['conv1.weight'].shape[1]} "
                           f"channels, this stream feeds {in_chans} (RGB 3, flow 10)")
    model.load_state_dict(mapped)
    return model.eval()


def recipe_network(kind: str, in_chans: int, *, weights_file: str | None, random_init: bool,
                   seed: int, option: str, download: str) -> tuple[nn.Module, str]:
    """A recipe's network and its weights identity: a local file (these weights are on no hub
    vidpipe can reach) or seeded random weights."""
    import timm

    builders = {"resnet50": lambda: timm.create_model("resnet50", num_classes=0, in_chans=in_chans),
                "bninception": lambda: BNInception(in_chans)}
    loaders = {"resnet50": load_mmaction_resnet50, "bninception": load_bninception}
    if random_init:
        return inference_ready(seeded(seed, builders[kind])), weights_identity(True, seed, None, kind)
    if not weights_file:
        raise VidpipeError(f"{kind}: pretrained weights unavailable (no weights file given; download "
                           f"{download}); pass a weights file with {option}, or choose --random-init")
    path = Path(weights_file).expanduser()
    if not path.is_file():
        raise VidpipeError(f"{path}: weights file not found")
    model = inference_ready(loaders[kind](path, in_chans))
    return model, f"file {path.name} sha256:{file_sha256(path)}"


# -- streams ------------------------------------------------------------------------------------
class TSNRGBStream(nn.Module):
    """Centre frames (B, H, W, 3) uint8 -> mmaction2 TSN preprocessing -> ResNet-50 -> (B, 2048)."""

    def __init__(self, recipe: Recipe, *, weights_file: str | None, random_init: bool, seed: int):
        super().__init__()
        self.recipe = recipe
        self.backbone, self.weights_identity = recipe_network(
            "resnet50", 3, weights_file=weights_file, random_init=random_init, seed=seed,
            option="--rgb-weights PATH", download=recipe.rgb_weights_name)
        self.register_buffer("mean", torch.tensor(MMACTION_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(MMACTION_STD).view(1, 3, 1, 1))

    @property
    def dim(self) -> int:
        return self.backbone.num_features

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, crop, crop) uint8: resized on 8 bits, centre-cropped."""
        resized = [mmaction_resize(frame, self.recipe.rgb_resize) for frame in frames.cpu().numpy()]
        images = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
        return center_crop(images, self.recipe.rgb_crop)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(frames).to(self.mean.device).float()    # (B, 3, crop, crop)
        return self.backbone((x - self.mean) / self.std)            # (B, 2048)


class TSNFlowStream(nn.Module):
    """Chunks (B, K, H, W, 3) uint8 -> DenseFlow TV-L1 8-bit images -> the recipe's flow network."""

    def __init__(self, recipe: Recipe, fields: int, *, jpeg: bool, weights_file: str | None,
                 random_init: bool, seed: int):
        super().__init__()
        self.recipe = recipe.flow
        self.fields = fields
        self.jpeg = jpeg
        self.estimator = OpenCVFlow("tvl1")
        self.backbone, self.weights_identity = recipe_network(
            recipe.flow.network, 2 * fields, weights_file=weights_file, random_init=random_init,
            seed=seed, option="--flow-weights PATH", download=recipe.flow.weights_name)

    @property
    def dim(self) -> int:
        return self.backbone.num_features

    def flow_images(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Two (H, W, 3) uint8 RGB frames -> (2, h, w) uint8 x/y images as the network reads them."""
        grays = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in (first, second)]
        size = denseflow_size(grays[0].shape[1], grays[0].shape[0], self.recipe.short)
        if size is not None:
            grays = [cv2.resize(gray, size) for gray in grays]
        images = flow_to_images(self.estimator.estimator.calc(grays[0], grays[1], None))
        if self.jpeg:
            images = np.stack([jpeg_round_trip(image) for image in images])
        return np.stack([mmaction_resize(image, self.recipe.resize) for image in images])

    def compute_flow(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, K, H, W, 3) uint8 -> (B, fields, 2, h, w) uint8 flow images."""
        first, second = frame_pairs(frames.shape[1], self.fields)
        chunks = frames.cpu().numpy()
        images = [[self.flow_images(chunk[a], chunk[b]) for a, b in zip(first, second)] for chunk in chunks]
        return torch.from_numpy(np.array(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, fields, 2, h, w) uint8 images -> (B, D)."""
        device = next(self.backbone.parameters()).device
        x = center_crop(images, self.recipe.crop).flatten(1, 2).to(device).float()   # (B, 2*fields, crop, crop)
        return self.backbone((x - self.recipe.mean) / self.recipe.std)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.embed(self.compute_flow(frames))
