"""DeepLabv3+ on torchvision backbones, plus BatchNorm that synchronises on CPU."""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

MODELS = ("deeplabv3plus",)
BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v3_large", "tiny")
OUTPUT_STRIDES = (8, 16)
# ASPP atrous rates per output stride, the one place they are chosen: ST++ builds (12, 24, 36)
# on its stride-8 ResNet (model/semseg/deeplabv3plus.py, model/backbone/resnet.py
# replace_stride_with_dilation=[False, True, True]); UniMatch's configs/pascal.yaml pairs
# stride 16 ([False, False, True]) with dilations [6, 12, 18].
_ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}

# The autograd-aware all_reduce below is deprecated in favour of a private API with no
# documented autograd contract; keep the public one and silence the notice.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")

_TORCHVISION = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
    "mobilenet_v3_large": (tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1),
}
# Classification-head keys of torchvision checkpoints; not part of the backbone.
_HEAD_PREFIXES = ("fc.", "classifier.")
# features[:4] of MobileNetV3-Large end at stride 4 with 24 channels.
_MOBILENET_LOW_LEVEL_BLOCKS = 4
# features[7] is the first block of the stride-16 stage.
_MOBILENET_STRIDE16_BLOCK = 7


# --------------------------------------------------------------------------- backbones


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The ASPP atrous rates that go with a backbone output stride."""
    if output_stride not in _ASPP_RATES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    return _ASPP_RATES[output_stride]


def _dilate(module: nn.Module) -> None:
    """Remove the strides in `module` and double the dilation of its k>1 convs."""
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        conv.stride = (1, 1)
        if conv.kernel_size != (1, 1):
            conv.dilation = tuple(2 * d for d in conv.dilation)
            conv.padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))


class ResNetBackbone(nn.Module):
    """Torchvision ResNet trunk; state-dict keys equal torchvision's minus `fc`."""

    def __init__(self, net: tvm.ResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.high_channels = net.fc.in_features
        self.low_channels = net.fc.in_features // 8  # layer1 width = layer4 width / 8

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


class MobileNetBackbone(nn.Module):
    """Torchvision MobileNetV3 `features`; state-dict keys equal torchvision's minus `classifier`."""

    def __init__(self, net: tvm.MobileNetV3):
        super().__init__()
        self.features = net.features
        self.low_channels = net.features[_MOBILENET_LOW_LEVEL_BLOCKS - 1].out_channels
        self.high_channels = net.features[-1].out_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.features[:_MOBILENET_LOW_LEVEL_BLOCKS](x)
        return low, self.features[_MOBILENET_LOW_LEVEL_BLOCKS:](low)


class TinyBackbone(nn.Module):
    """A small residual trunk of torchvision BasicBlocks for CPU demos (no pretrained weights).

    It keeps more resolution early than ResNet-18 (no max-pool, stride-2 stem), which
    small images with thin structures need, at a fraction of the compute.
    """

    widths = (32, 48, 96, 160)

    def __init__(self, output_stride: int = 8):
        super().__init__()
        w0, w1, w2, w3 = self.widths
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        self.layer1 = self._block(w0, w1, 2)
        self.layer2 = self._block(w1, w2, 2)
        self.layer3 = self._block(w2, w3, 2)
        if output_stride == 8:
            _dilate(self.layer3)
        self.low_channels, self.high_channels = w1, w3

    @staticmethod
    def _block(cin: int, cout: int, stride: int) -> nn.Module:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(tvm.resnet.BasicBlock(cin, cout, stride, down), tvm.resnet.BasicBlock(cout, cout))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.layer1(self.stem(x))
        return low, self.layer3(self.layer2(low))


def _build_resnet(backbone: str, output_stride: int, weights) -> ResNetBackbone:
    ctor = _TORCHVISION[backbone][0]
    if backbone == "resnet18":
        # torchvision's BasicBlock rejects dilation > 1, so dilate the convs by hand. Unlike
        # torchvision's Bottleneck (first block keeps the previous dilation), every 3x3 conv of
        # a dilated stage gets the new rate, as in torchvision's dilated MobileNetV3.
        net = ctor(weights=weights)
        if output_stride == 8:
            _dilate(net.layer3)
            _dilate(net.layer4)
        _dilate(net.layer4)
    else:
        net = ctor(weights=weights, replace_stride_with_dilation=[False, output_stride == 8, True])
    return ResNetBackbone(net)


def _build_mobilenet(output_stride: int, weights) -> MobileNetBackbone:
    net = tvm.mobilenet_v3_large(weights=weights, dilated=True)  # output stride 16
    if output_stride == 8:
        _dilate(net.features[_MOBILENET_STRIDE16_BLOCK:])
    return MobileNetBackbone(net)


def build_backbone(backbone: str, output_stride: int = 16, pretrained: str = "none") -> nn.Module:
    """Backbone returning (stride-4 low-level, stride-`output_stride` high-level) features."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choices: {', '.join(BACKBONES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if backbone == "tiny":
        if pretrained == "imagenet":
            raise ValueError("the 'tiny' backbone has no ImageNet weights; use pretrained=none or a local file")
        module = TinyBackbone(output_stride)
        if pretrained != "none":
            load_backbone_weights(module, pretrained, backbone)
        return module
    weights = _TORCHVISION[backbone][1] if pretrained == "imagenet" else None
    if backbone == "mobilenet_v3_large":
        module = _build_mobilenet(output_stride, weights)
    else:
        module = _build_resnet(backbone, output_stride, weights)
    if pretrained not in ("none", "imagenet"):
        load_backbone_weights(module, pretrained, backbone)
    return module


# --------------------------------------------------------------------------- weights


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and format errors alike
        raise ValueError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: {str(err)[:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _check_keys(expected: dict, state: dict, source: str, backbone: str) -> None:
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{name}: {items[:5]}{' ...' if len(items) > 5 else ''}"
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    if problems:
        raise ValueError(f"{source}: weights do not fit backbone {backbone!r}; " + "; ".join(problems))


def load_backbone_weights(backbone_module: nn.Module, pretrained: str, backbone: str) -> nn.Module:
    """Load weights into a backbone from `build_backbone`.

    pretrained: "none" (no-op), "imagenet" (torchvision's ImageNet weights, downloaded)
    or a path to a backbone / torchvision classification state dict (fc/classifier keys ignored).
    """
    if pretrained == "none":
        return backbone_module
    if pretrained == "imagenet":
        state, source = _TORCHVISION[backbone][1].get_state_dict(progress=True, check_hash=True), "imagenet"
    else:
        state, source = _read_state_dict(pretrained), pretrained
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    _check_keys(backbone_module.state_dict(), state, source, backbone)
    backbone_module.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    return backbone_module


# --------------------------------------------------------------------------- head


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    # align_corners=True in every resize, as both references (ST++ and UniMatch
    # model/semseg/deeplabv3plus.py).
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv, BatchNorm, ReLU, broadcast, as
    ST++'s and UniMatch's ASPPPooling. Its BatchNorm sees one value per channel and image, so
    a training forward needs at least 2 images per BatchNorm (config validation ensures it)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _conv_bn_relu(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _upsample(self.conv(F.adaptive_avg_pool2d(x, 1)), x.shape[-2:])


class ASPP(nn.Module):
    """1x1 conv, three atrous 3x3 convs, image pooling; concat, 1x1 projection, then
    `Dropout2d(dropout)` when dropout > 0."""

    def __init__(self, cin: int, channels: int, rates: tuple[int, int, int], dropout: float = 0.0):
        super().__init__()
        branches = [_conv_bn_relu(cin, channels, 1)]
        branches += [_conv_bn_relu(cin, channels, 3, dilation=r) for r in rates]
        branches.append(ASPPPooling(cin, channels))
        self.branches = nn.ModuleList(branches)
        project = [_conv_bn_relu(len(branches) * channels, channels, 1)]
        if dropout > 0:
            project.append(nn.Dropout2d(dropout))
        self.project = nn.Sequential(*project)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


# Dropout of each head as its reference builds it: (after the ASPP projection, nn.Dropout2d;
# after the decoder's fuse convs, nn.Dropout). ST++ model/semseg/deeplabv3plus.py has
# Dropout2d(0.5) and Dropout(0.1); UniMatch model/semseg/deeplabv3plus.py has none.
# The parameters are the same in both: only training differs.
HEAD_DROPOUT = {"stpp": (0.5, 0.1), "unimatch": (0.0, 0.0)}
HEADS = tuple(HEAD_DROPOUT)


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ (Chen et al. 2018): ASPP on high-level features plus a low-level decoder.

    `head`: `stpp` or `unimatch`, the decoder as that reference builds it (HEAD_DROPOUT)."""

    def __init__(self, backbone: nn.Module, num_classes: int, output_stride: int = 16, channels: int = 256,
                 head: str = "stpp", projection_channels: int = 0):
        super().__init__()
        if head not in HEAD_DROPOUT:
            raise ValueError(f"unknown head {head!r}; choices: {', '.join(HEADS)}")
        aspp_dropout, fuse_dropout = HEAD_DROPOUT[head]
        self.head_name = head
        self.backbone = backbone
        self.aspp = ASPP(backbone.high_channels, channels, aspp_rates(output_stride), aspp_dropout)
        self.reduce = _conv_bn_relu(backbone.low_channels, 48, 1)
        fuse = [_conv_bn_relu(48 + channels, channels, 3), _conv_bn_relu(channels, channels, 3)]
        if fuse_dropout > 0:
            fuse.append(nn.Dropout(fuse_dropout))
        self.fuse = nn.Sequential(*fuse)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        _init_head([self.aspp, self.reduce, self.fuse, self.classifier])
        self.projection = None
        if projection_channels:
            # U2PL's representation head (u2pl/models/decoder.py): beside the classifier's convs,
            # on the same low-level + ASPP features. Built last: the other layers' draws stay.
            self.projection = nn.Sequential(_conv_bn_relu(48 + channels, channels, 3), nn.Dropout2d(0.1),
                                            _conv_bn_relu(channels, channels, 3), nn.Dropout2d(0.1),
                                            nn.Conv2d(channels, projection_channels, 1))
            _init_head([self.projection])

    def forward(self, x: torch.Tensor, feature_dropout: float | None = None, projection: bool = False):
        """Logits; with `feature_dropout` (UniMatch's feature perturbation) the pair (logits,
        logits of the same backbone features after channel dropout with that probability);
        with `projection` (U2PL) the triple (logits, logits at the feature resolution, the
        projection head's features)."""
        low, high = self.backbone(x)
        if projection:
            features, small = self._features(low, high)
            return _upsample(small, x.shape[-2:]), small, self.projection(features)
        if feature_dropout is not None:
            b = x.shape[0]
            low = torch.cat([low, F.dropout2d(low, feature_dropout, training=True)])
            high = torch.cat([high, F.dropout2d(high, feature_dropout, training=True)])
            return self._decode(low, high, x.shape[-2:]).split([b, b])
        return self._decode(low, high, x.shape[-2:])

    def _features(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low-level + ASPP features, logits at their resolution)."""
        y = _upsample(self.aspp(high), low.shape[-2:])
        features = torch.cat([self.reduce(low), y], dim=1)  # low-level first, as the references
        return features, self.classifier(self.fuse(features))

    def _decode(self, low: torch.Tensor, high: torch.Tensor, size) -> torch.Tensor:
        return _upsample(self._features(low, high)[1], size)


def _init_head(modules: list[nn.Module]) -> None:
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"deeplabv3plus": DeepLabV3Plus}


def build_model(
    name: str,
    backbone: str,
    num_classes: int,
    *,
    output_stride: int = 16,
    pretrained: str = "none",
    aspp_channels: int = 256,
    head: str = "stpp",
    projection_channels: int = 0,
) -> nn.Module:
    """Segmentation model; forward(B x 3 x H x W) -> logits B x num_classes x H x W.

    `head`: whose DeepLabv3+ head (`stpp` or `unimatch`, see HEAD_DROPOUT)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choices: {', '.join(MODELS)}")
    if num_classes < 1 or aspp_channels < 1:
        raise ValueError("num_classes and aspp_channels must be positive")
    if head not in HEAD_DROPOUT:
        raise ValueError(f"unknown head {head!r}; choices: {', '.join(HEADS)}")
    trunk = build_backbone(backbone, output_stride, pretrained)
    return _BUILDERS[name](trunk, num_classes, output_stride=output_stride, channels=aspp_channels, head=head,
                           projection_channels=projection_channels)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, all other parameters), for the 10x head learning rate."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    return backbone, [p for p in model.parameters() if id(p) not in ids]


# --------------------------------------------------------------------------- distributed BN


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks; works on CPU (gloo).

    In training mode with an initialised process group, the per-rank sum, sum of squares
    and count are summed with one autograd-aware all_reduce, so gradients are exact.
    Otherwise it is plain BatchNorm2d.
    """

    process_group = None  # None = the default (world) group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        count = x.new_full((1,), x.numel() / max(channels, 1))
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        group = dist.group.WORLD if self.process_group is None else self.process_group
        stats = all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        total, total_sq, n = stats[:channels], stats[channels:-1], stats[-1]
        if n.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel across ranks, got {int(n.item())}")
        mean = total / n
        var = (total_sq / n - mean * mean).clamp_min(0.0)  # biased, as used for normalisation
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def _to_distributed_bn(bn: nn.BatchNorm2d) -> DistributedBatchNorm2d:
    """Swap the class, sharing bn's parameters and buffers (as convert_sync_batchnorm does)."""
    new = DistributedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for name, param in bn.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in bn.named_buffers(recurse=False):
        setattr(new, name, buf)
    new.train(bn.training)
    return new


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        return _to_distributed_bn(module)
    for name, child in module.named_children():
        new = _replace_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def convert_batchnorm_for_distributed(model: nn.Module, device_type: str) -> nn.Module:
    """SyncBatchNorm for "cuda"; DistributedBatchNorm2d (gloo-friendly) for "cpu"."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device_type == "cpu":
        return _replace_batchnorm(model)
    raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
