"""The multiscale DEQ (MDEQ) of the papers' MDEQ-Vision code, split into the DEQ protocol's parts.

Faithful to minicheshire/DEQ-White-Box-Robustness (a fork of locuslab/deq), read for the structure only:

* stem (`downsample`): conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU, stride 2 for the first
  `downsample_times` convs; `stage0` (conv1x1 -> BN -> ReLU) exists unless downsample_times == 0 and there
  are at most 2 branches, in which case the stem output itself is the injection;
* injection into branch 0 only; the other branches start from and are injected with nothing;
* the cell f (`fullstage`): one residual block per branch, then multiscale fusion and a post-fuse
  ReLU -> conv1x1 -> GroupNorm(num_groups // 2); with a single branch the code returns the block output
  directly (no fusion, no post-fuse layer, although its parameters exist);
* weight norm (dim 0) on the block convs and the post-fuse convs, variational dropout with one
  (sample, channel) mask per forward;
* the HRNet-style classification head (`incre_modules`, `downsamp_modules`, `final_layer`, `classifier`).

Submodules carry the papers' names, so a checkpoint of their code loads after only the renames of
`convert_paper_state_dict` (module. prefix, weight-norm parameter names).

One deliberate generalisation: branch i has spatial size ceil(H / 2^i) (what a stride-2 conv3x3 with
padding 1 produces), and upsampling interpolates (nearest) to the target size instead of a fixed scale
factor. For power-of-two sizes (CIFAR's 32x32) this is exactly the papers' computation; it also lets odd
sizes such as Fashion-MNIST's 28 -> 14 -> 7 -> 4 work, where the papers' H // 2 zero-initialised branches
would not match their own strided convolutions.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from bench.deq.protocol import DeployConfig, DEQClassifier
from bench.errors import BenchError

BN_MOMENTUM = 0.1
HEAD_EXPANSION = 4  # the head's Bottleneck expansion


@dataclass(frozen=True)
class MDEQConfig:
    """Hyper-parameters of one MDEQ; the field names follow the papers' yaml keys (lower-cased)."""

    in_channels: int
    image_size: int
    num_classes: int
    channels: tuple[int, ...]  # NUM_CHANNELS, one per branch (resolution)
    head_channels: tuple[int, ...]  # HEAD_CHANNELS, one per branch
    final_chansize: int
    expansion: int = 5
    num_groups: int = 8
    dropout: float = 0.22
    wnorm: bool = True
    block_gn_affine: bool = True
    fuse_gn_affine: bool = True
    post_gn_affine: bool = False
    num_layers: int = 8  # depth of the weight-tied unroll used for clean pretraining
    downsample_times: int = 0  # stride-2 stem convs (0 in the CIFAR configs)

    @property
    def num_branches(self) -> int:
        return len(self.channels)

    def validate(self) -> None:
        """Raise BenchError for a config the network cannot be built from."""
        if self.num_branches < 1 or len(self.head_channels) != self.num_branches:
            raise BenchError(
                f"MDEQ config needs one head channel per branch: channels={list(self.channels)}, "
                f"head_channels={list(self.head_channels)}"
            )
        if min(self.in_channels, self.image_size, self.num_classes, self.final_chansize, self.expansion) < 1:
            raise BenchError("MDEQ config: in_channels, image_size, num_classes, final_chansize must be >= 1")
        if min(self.channels) < 1 or min(self.head_channels) < 1:
            raise BenchError("MDEQ config: channel counts must be >= 1")
        post_groups = self.num_groups // 2
        for c in self.channels:
            if self.num_groups < 2 or c % self.num_groups or (c * self.expansion) % self.num_groups:
                raise BenchError(
                    f"MDEQ config: {c} channels do not split into num_groups={self.num_groups} groups "
                    "(num_groups must be >= 2 and divide every branch's channels)"
                )
            if c % post_groups:
                raise BenchError(
                    f"MDEQ config: {c} channels do not split into {post_groups} post-fuse groups"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise BenchError(f"MDEQ config: dropout must be in [0, 1), got {self.dropout}")
        if self.num_layers < 1 or self.downsample_times < 0:
            raise BenchError("MDEQ config: num_layers must be >= 1 and downsample_times >= 0")

    def branch_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of every branch: the stem's size, then halving (rounding up) per branch."""
        size = self.image_size
        for _ in range(self.downsample_times):
            size = _halved(size)
        shapes = []
        for c in self.channels:
            shapes.append((c, size, size))
            size = _halved(size)
        return shapes


def _halved(size: int) -> int:
    """Output size of a stride-2 conv3x3 with padding 1."""
    return (size - 1) // 2 + 1


MDEQ_LARGE = MDEQConfig(
    in_channels=3,
    image_size=32,
    num_classes=10,
    channels=(32, 64, 128, 256),
    head_channels=(14, 28, 56, 112),
    final_chansize=1680,
)
MDEQ_XL = MDEQConfig(
    in_channels=3,
    image_size=32,
    num_classes=10,
    channels=(72, 144, 288, 576),
    head_channels=(20, 40, 80, 160),
    final_chansize=1800,
)
# Fashion-MNIST, small enough for a 2-core CPU to adversarially train: the stride-2 stem puts the three
# branches at 14x14, 7x7 and 4x4 (the odd 7 -> 4 step uses the ceil sizes described above); most of the
# parameters sit in the cheap low-resolution branches.
MDEQ_TINY = MDEQConfig(
    in_channels=1,
    image_size=28,
    num_classes=10,
    channels=(8, 16, 32),
    head_channels=(4, 8, 16),
    final_chansize=128,
    num_groups=4,
    downsample_times=1,
)
# Unit tests only: every part of the architecture at a size that runs in milliseconds.
MDEQ_TEST = MDEQConfig(
    in_channels=3,
    image_size=8,
    num_classes=10,
    channels=(4, 8),
    head_channels=(2, 4),
    final_chansize=16,
    num_groups=2,
)
MDEQ_PRESETS: dict[str, MDEQConfig] = {
    "large": MDEQ_LARGE,
    "xl": MDEQ_XL,
    "tiny": MDEQ_TINY,
    "test": MDEQ_TEST,
}


def mdeq_config_from_dict(config: dict[str, Any]) -> MDEQConfig:
    """An MDEQConfig from a plain (TOML) dict: an optional "preset" name plus field overrides."""
    values = dict(config)
    preset_name = values.pop("preset", None)
    names = {f.name for f in fields(MDEQConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise BenchError(
            f"unknown MDEQ config keys {unknown}; valid keys: preset, {', '.join(sorted(names))}"
        )
    if preset_name is not None and preset_name not in MDEQ_PRESETS:
        raise BenchError(f"unknown MDEQ preset {preset_name!r}; valid presets: {', '.join(MDEQ_PRESETS)}")
    if preset_name is None:
        missing = [f.name for f in fields(MDEQConfig) if f.name not in values and f.default is MISSING]
        if missing:
            raise BenchError(f"MDEQ config without a preset is missing {missing}")
    try:
        for key in ("channels", "head_channels"):
            if key in values:
                values[key] = tuple(int(c) for c in values[key])
        cfg = MDEQConfig(**values) if preset_name is None else replace(MDEQ_PRESETS[preset_name], **values)
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise BenchError(f"bad MDEQ config {config}: {exc}") from None
    return cfg


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


class VariationalDropout2d(nn.Module):
    """Dropout with one mask per (sample, channel), shared over space and over every f call of a forward.

    `reset_mask` draws the mask (once per model forward); in eval mode, or with p = 0, it is the identity.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.mask: Tensor | None = None

    def reset_mask(self, batch_size: int, channels: int, like: Tensor) -> None:
        if not self.training or self.p == 0.0:
            self.mask = None
            return
        keep = torch.full((batch_size, channels, 1, 1), 1.0 - self.p, dtype=like.dtype, device=like.device)
        self.mask = torch.bernoulli(keep) / (1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape[0] != x.shape[0]:
            raise RuntimeError("variational dropout: call begin_forward(batch_size) in train mode before f")
        return x * self.mask


class BasicBlock(nn.Module):
    """The cell's per-branch residual block (Figure 2 of the MDEQ paper), with the injection added."""

    def __init__(self, channels: int, cfg: MDEQConfig) -> None:
        super().__init__()
        inner = cfg.expansion * channels
        self.conv1 = conv3x3(channels, inner)
        self.gn1 = nn.GroupNorm(cfg.num_groups, inner, affine=cfg.block_gn_affine)
        self.conv2 = conv3x3(inner, channels)
        self.gn2 = nn.GroupNorm(cfg.num_groups, channels, affine=cfg.block_gn_affine)
        self.gn3 = nn.GroupNorm(cfg.num_groups, channels, affine=cfg.block_gn_affine)
        self.drop = VariationalDropout2d(cfg.dropout)

    def forward(self, x: Tensor, injection: Tensor | None) -> Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + x
        return self.gn3(F.relu(out))


class BranchNet(nn.Module):
    """One resolution stream of the cell (one block: NUM_BLOCKS is 1 in every config of the papers)."""

    def __init__(self, channels: int, cfg: MDEQConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([BasicBlock(channels, cfg)])

    def forward(self, x: Tensor, injection: Tensor | None) -> Tensor:
        return self.blocks[0](x, injection)


class DownsampleModule(nn.Module):
    """Branch j -> i (i > j): (i - j) stride-2 conv3x3 + GN with ReLU between; channels c_j until the last."""

    def __init__(self, channels: tuple[int, ...], in_res: int, out_res: int, cfg: MDEQConfig) -> None:
        super().__init__()
        steps = out_res - in_res
        in_ch = channels[in_res]
        stages = []
        for k in range(steps):
            last = k == steps - 1
            out_ch = channels[out_res] if last else in_ch
            parts: list[tuple[str, nn.Module]] = [
                ("conv", conv3x3(in_ch, out_ch, stride=2)),
                ("gnorm", nn.GroupNorm(cfg.num_groups, out_ch, affine=cfg.fuse_gn_affine)),
            ]
            if not last:
                parts.append(("relu", nn.ReLU()))
            stages.append(nn.Sequential(OrderedDict(parts)))
        self.net = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class UpsampleModule(nn.Module):
    """Branch j -> i (i < j): conv1x1 + GN, then nearest interpolation to branch i's size."""

    def __init__(self, channels: tuple[int, ...], in_res: int, out_res: int, out_size: int, cfg: MDEQConfig):
        super().__init__()
        self.out_size = (out_size, out_size)
        self.net = nn.Sequential(
            OrderedDict(
                [
                    ("conv", nn.Conv2d(channels[in_res], channels[out_res], kernel_size=1, bias=False)),
                    ("gnorm", nn.GroupNorm(cfg.num_groups, channels[out_res], affine=cfg.fuse_gn_affine)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.net(x), size=self.out_size, mode="nearest")


class MDEQModule(nn.Module):
    """The cell f: per-branch residual blocks, then multiscale fusion and the post-fuse layers."""

    def __init__(self, cfg: MDEQConfig) -> None:
        super().__init__()
        channels = cfg.channels
        sizes = [s[1] for s in cfg.branch_shapes()]
        n = cfg.num_branches
        self.num_branches = n
        self.branches = nn.ModuleList([BranchNet(c, cfg) for c in channels])
        self.fuse_layers: nn.ModuleList | None = None
        if n > 1:
            rows = []
            for i in range(n):
                row: list[nn.Module | None] = []
                for j in range(n):
                    if i == j:
                        row.append(None)
                    elif j > i:
                        row.append(UpsampleModule(channels, j, i, sizes[i], cfg))
                    else:
                        row.append(DownsampleModule(channels, j, i, cfg))
                rows.append(nn.ModuleList(row))
            self.fuse_layers = nn.ModuleList(rows)
        self.post_fuse_layers = nn.ModuleList(
            [
                nn.Sequential(
                    OrderedDict(
                        [
                            ("relu", nn.ReLU()),
                            ("conv", nn.Conv2d(c, c, kernel_size=1, bias=False)),
                            ("gnorm", nn.GroupNorm(cfg.num_groups // 2, c, affine=cfg.post_gn_affine)),
                        ]
                    )
                )
                for c in channels
            ]
        )

    def weight_normed_convs(self) -> list[nn.Conv2d]:
        """The convs the papers weight-normalise: both block convs and the post-fuse conv of every branch."""
        convs: list[nn.Conv2d] = []
        for branch, post in zip(self.branches, self.post_fuse_layers, strict=True):
            for block in branch.blocks:
                convs += [block.conv1, block.conv2]
            convs.append(post.conv)
        return convs

    def dropouts(self) -> list[VariationalDropout2d]:
        return [block.drop for branch in self.branches for block in branch.blocks]

    def forward(self, zs: list[Tensor], injection: Tensor) -> list[Tensor]:
        if self.fuse_layers is None:
            return [self.branches[0](zs[0], injection)]
        pairs = zip(self.branches, zs, strict=True)
        blocks = [branch(z, injection if i == 0 else None) for i, (branch, z) in enumerate(pairs)]
        fused = []
        for i, (row, post) in enumerate(zip(self.fuse_layers, self.post_fuse_layers, strict=True)):
            y = blocks[i]
            for j, transform in enumerate(row):
                if j != i:
                    y = y + transform(blocks[j])
            fused.append(post(y))
        return fused


class Bottleneck(nn.Module):
    """The head's bottleneck; its three inner BatchNorms are non-affine (as in the papers' code)."""

    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        out = planes * HEAD_EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM, affine=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM, affine=False)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, momentum=BN_MOMENTUM, affine=False)
        self.downsample: nn.Sequential | None = None
        if inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, kernel_size=1, bias=False), nn.BatchNorm2d(out, momentum=BN_MOMENTUM)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class MDEQ(DEQClassifier):
    """The papers' MDEQ classifier. State z: the branch tensors flattened and concatenated, shape (B, D)."""

    def __init__(self, config: MDEQConfig, deploy: DeployConfig | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        if deploy is not None:
            self.deploy = deploy
        c0 = config.channels[0]
        stem: list[tuple[str, nn.Module]] = [
            ("0", conv3x3(config.in_channels, c0, stride=2 if config.downsample_times >= 1 else 1)),
            ("1", nn.BatchNorm2d(c0, momentum=BN_MOMENTUM)),
            ("2", nn.ReLU()),
            ("3", conv3x3(c0, c0, stride=2 if config.downsample_times >= 2 else 1)),
            ("4", nn.BatchNorm2d(c0, momentum=BN_MOMENTUM)),
            ("5", nn.ReLU()),
        ]
        for i in range(3, config.downsample_times + 1):
            stem += [
                (f"DS{i}", conv3x3(c0, c0, stride=2)),
                (f"DS{i}-BN", nn.BatchNorm2d(c0, momentum=BN_MOMENTUM)),
                (f"DS{i}-RELU", nn.ReLU()),
            ]
        self.downsample = nn.Sequential(OrderedDict(stem))  # the papers' name for the stem
        self.stage0: nn.Sequential | None = None
        if config.downsample_times > 0 or config.num_branches > 2:
            self.stage0 = nn.Sequential(
                nn.Conv2d(c0, c0, kernel_size=1, bias=False),
                nn.BatchNorm2d(c0, momentum=BN_MOMENTUM),
                nn.ReLU(),
            )
        self.fullstage = MDEQModule(config)
        self.incre_modules = nn.ModuleList(
            [
                nn.Sequential(Bottleneck(c, h))
                for c, h in zip(config.channels, config.head_channels, strict=True)
            ]
        )
        head_out = [h * HEAD_EXPANSION for h in config.head_channels]
        self.downsamp_modules = nn.ModuleList(
            [
                nn.Sequential(
                    conv3x3(head_out[i], head_out[i + 1], stride=2, bias=True),
                    nn.BatchNorm2d(head_out[i + 1], momentum=BN_MOMENTUM),
                    nn.ReLU(),
                )
                for i in range(config.num_branches - 1)
            ]
        )
        self.final_layer = nn.Sequential(
            nn.Conv2d(head_out[-1], config.final_chansize, kernel_size=1),
            nn.BatchNorm2d(config.final_chansize, momentum=BN_MOMENTUM),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(config.final_chansize, config.num_classes)

        self._shapes = config.branch_shapes()
        self._numels = [c * h * w for c, h, w in self._shapes]
        self.state_size = sum(self._numels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The papers' init: convs (and their biases) N(0, 0.01), affine BN gamma 1 / beta 0.

        Weight-normed convs keep PyTorch's default init with g = ||v||: the papers' code writes N(0, 0.01)
        into the derived weight tensor, which is recomputed from (g, v) before it is ever used.
        """
        normed = self.fullstage.weight_normed_convs() if self.config.wnorm else []
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not any(m is c for c in normed):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in normed:
            weight_norm(conv, name="weight", dim=0)

    # ----- the DEQ protocol -------------------------------------------------------------------------

    def inject(self, x: Tensor) -> Tensor:
        """Branch 0's injection (B, c0, H0, W0); the other branches are injected with nothing."""
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise BenchError(
                f"MDEQ expects images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        u = self.downsample(x)
        return self.stage0(u) if self.stage0 is not None else u

    def init_state(self, u: Tensor) -> Tensor:
        return u.new_zeros(u.shape[0], self.state_size)

    def split_state(self, z: Tensor) -> list[Tensor]:
        """The per-branch (B, C, H, W) views of a flat state (B, D)."""
        b = z.shape[0]
        parts = z.split(self._numels, dim=1)
        return [part.view(b, *shape) for part, shape in zip(parts, self._shapes, strict=True)]

    def join_state(self, zs: list[Tensor]) -> Tensor:
        b = zs[0].shape[0]
        return torch.cat([t.reshape(b, -1) for t in zs], dim=1)

    def f(self, z: Tensor, u: Tensor) -> Tensor:
        return self.join_state(self.fullstage(self.split_state(z), u))

    def head(self, z: Tensor) -> Tensor:
        zs = self.split_state(z)
        y = self.incre_modules[0](zs[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](zs[i + 1]) + down(y)
        y = self.final_layer(y)
        return self.classifier(y.mean(dim=(2, 3)))

    def begin_forward(self, batch_size: int) -> None:
        """Draw this forward's variational-dropout masks (train mode only; eval mode clears them)."""
        like = self.classifier.weight
        for drop, (c, _, _) in zip(self.fullstage.dropouts(), self._shapes, strict=True):
            drop.reset_mask(batch_size, c, like)

    # ----- training helpers -------------------------------------------------------------------------

    def unrolled_pretrain_forward(self, x: Tensor, layers: int | None = None) -> Tensor:
        """Logits of the weight-tied unroll z <- f(z, u), `layers` times from z = 0, with full backprop.

        The papers' clean pretraining phase (NUM_LAYERS = 8 applications) before DEQ training starts.
        """
        depth = self.config.num_layers if layers is None else layers
        self.begin_forward(x.shape[0])
        u = self.inject(x)
        z = self.init_state(u)
        for _ in range(depth):
            z = self.f(z, u)
        return self.head(z)

    @contextlib.contextmanager
    def weights_cached(self) -> Iterator[None]:
        """A context in which each weight-normed weight is computed once and reused by every f call.

        The papers' code likewise recomputes the weights once per forward. The weights are computed on
        entry with autograd on, so a solve under no_grad inside the context still leaves the estimator's
        surrogate differentiable in the parameters. Wrap one forward (solve and estimator) at most: the
        cache must not outlive a parameter update. Outside it, f recomputes the weights on every call.
        """
        with parametrize.cached():
            with torch.enable_grad():
                for conv in self.fullstage.weight_normed_convs() if self.config.wnorm else []:
                    conv.weight  # noqa: B018 - the access fills the cache
            yield
