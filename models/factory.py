"""Architectures by name: the registry (bench/registry/models.toml) stores an architecture name and a
plain config dict; this module turns them into an untrained nn.Module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from bench.errors import BenchError, did_you_mean
from models.mdeq import MDEQ, mdeq_config_from_dict
from models.resnet import ResNet18
from models.small import TinyCNN, small_resnet
from models.wrn import WideResNet


def _checked(arch: str, config: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    unknown = sorted(set(config) - allowed)
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise BenchError(f"unknown config keys {unknown} for architecture {arch!r}; valid keys: {valid}")
    return dict(config)


def _mdeq(config: dict[str, Any]) -> nn.Module:
    return MDEQ(mdeq_config_from_dict(config))


def _resnet18(config: dict[str, Any]) -> nn.Module:
    return ResNet18(**_checked("resnet18", config, {"num_classes", "in_channels"}))


def _wrn34_10(config: dict[str, Any]) -> nn.Module:
    kwargs = _checked("wrn34-10", config, {"num_classes", "sub_block1", "bias_last"})
    return WideResNet(depth=34, widen_factor=10, **kwargs)


def _small_resnet(config: dict[str, Any]) -> nn.Module:
    return small_resnet(**_checked("small-resnet", config, {"num_classes", "in_channels"}))


def _tiny_cnn(config: dict[str, Any]) -> nn.Module:
    return TinyCNN(**_checked("tiny-cnn", config, {"num_classes", "in_channels", "width"}))


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "mdeq": _mdeq,
    "resnet18": _resnet18,
    "wrn34-10": _wrn34_10,
    "small-resnet": _small_resnet,
    "tiny-cnn": _tiny_cnn,
}


def build_architecture(arch: str, config: dict[str, Any] | None = None) -> nn.Module:
    """An untrained model of architecture `arch` built from `config` (e.g. {"preset": "large"} for "mdeq")."""
    if arch not in ARCHITECTURES:
        hint = did_you_mean(arch, ARCHITECTURES)
        names = "" if hint.startswith(";") else f"; valid names: {', '.join(ARCHITECTURES)}"
        raise BenchError(f"unknown architecture {arch!r}{hint}{names}")
    try:
        return ARCHITECTURES[arch](dict(config or {}))
    except (TypeError, ValueError) as exc:  # a config value of the wrong type reaching a constructor
        raise BenchError(f"bad config for architecture {arch!r}: {exc}") from None
