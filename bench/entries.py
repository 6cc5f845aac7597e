"""What the registry knows about a model (`ModelEntry`, `CheckpointRef`) and what loading gives
(`LoadedModel`): plain data shared by the registry and the loaders of zoo and user models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.paths import checkpoints_dir
from bench.spec import parse_eps

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class CheckpointRef:
    file: str = ""
    sha256: str = ""
    url: str = ""
    license: str = ""
    provenance: str = ""

    @property
    def registered(self) -> bool:
        return bool(self.file)

    def path(self) -> Path:
        return checkpoints_dir() / self.file


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    architecture: str
    dataset: str
    input_shape: tuple[int, int, int]
    threat_model: str
    eps: str
    parameters: int
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointRef = CheckpointRef()
    deploy: dict[str, Any] = field(default_factory=dict)
    expected_clean_acc: float | None = None
    expected_clean_n: int | None = None
    expected: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    import_path: str = ""  # "package.module:factory" (TOML key `import`): the user's code builds the model

    @property
    def eps_value(self) -> float:
        return parse_eps(self.eps)


@dataclass
class LoadedModel:
    """A model ready for evaluation, with where its weights came from (for records)."""

    entry: ModelEntry
    model: nn.Module
    checkpoint_path: str | None
    checkpoint_sha256: str | None
    checkpoint_metadata: dict[str, str]
    # a user's model (bench/user_models.py): its import path, the factory's arguments, the weights' sha256
    user_model: dict[str, Any] | None = None
