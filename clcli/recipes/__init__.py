"""Recipes: YAML files validated against a typed schema, with dotted `--set` overrides.

Built-in recipes live in the repository's `recipes/` folder (installed inside the package as `clcli/recipes/builtin`
too). A recipe is named by its file stem or given as a path.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clcli.errors import ClcliError, one_line

RECIPE_VERSION = 1
_CHOICES: dict[str, tuple[str, ...]] = {
    "augment": ("none", "crop_flip", "flip", "rrc_flip"),
    "normalize": ("dataset", "imagenet", "pretrained", "none"),
    "stem": ("imagenet", "small"),
    "metric": ("dot", "l2", "cosine"),
    "fuse": ("mul", "add"),
    "input": ("siamese", "different"),
    "manner": ("simultaneous", "iterative"),
    "multi": ("pairwise", "mean"),
    "schedule": ("plateau", "cosine", "step", "constant"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "placement": ("replicated", "per-network"),
    "soft_target": ("ensemble", "peers"),
}
_RANGES: dict[str, tuple[float, float]] = {
    "alpha": (0.0, 100.0),
    "alpha_warmup": (0, 100000),
    "verification_weight": (0.0, 100.0),
    "gate_init": (0.0, 10.0),
    "soft_weight": (0.0, 100.0),
    "mkbs": (1, 16),
    "embedding": (8, 1 << 20),
    "budget": (0.0, 10.0),
    "epochs": (1, 100000),
    "batch_size": (1, 1 << 16),
    "lr": (0.0, 100.0),
    "momentum": (0.0, 1.0),
    "weight_decay": (0.0, 1.0),
    "input_size": (8, 4096),
    "padding": (0, 64),
    "log_every": (1, 1 << 20),
    "accumulate": (1, 1 << 16),
    "w2_grid": (1, 64),
    "temperature": (0.05, 100.0),
    "weight": (0.0, 100.0),             # kd.weight is further limited to [0, 1] by the kd method
    "hint_weight": (0.0, 1000.0),
    "hint_epochs": (0, 100000),
    "val_fraction": (0.01, 0.9),
    "fold": (0, 1 << 20),
    "workers": (0, 256),
    "test_resize": (8, 8192),
}


@dataclass
class DataConfig:
    source: str = "uoft-cs/cifar10"     # hub id, local folder, or "builtin:quickstart"
    config: str | None = None           # dataset config (e.g. "exact_subset")
    train_split: str = "train"
    test_split: str = "test"            # else a "validation" split, else a held-out part of train_split
    val_source: str | None = None       # a separate folder (or hub id) with the evaluation images
    val_fraction: float = 0.1           # held out of train_split when there is no evaluation split
    val_seed: int = 0                   # the held-out draw; apart from train.seed so seeds share one validation set
    image_column: str | None = None     # auto-detected from the features when None
    label_column: str | None = None
    image_size: int | None = None       # resize on decode (STL-10 96 -> 32); None: input_size
    augment: str = "crop_flip"
    padding: int = 4
    normalize: str = "dataset"          # dataset: train-split mean/std; pretrained: the first model's timm config
    train_limit: int | None = None      # first n rows, for quick runs
    test_limit: int | None = None
    folds: str | None = None            # fold-indices file (STL-10 fold_indices.txt): one fold of train rows a line
    fold: int | None = None             # with folds: train on this fold only; None runs every fold, then mean ± std
    stream: bool = False                # decode images in DataLoader workers each epoch instead of into memory
    workers: int | None = None          # DataLoader workers when streaming (None: up to 8, by CPU count)
    test_resize: int | None = None      # streaming test images: shorter side to this, then center crop input_size


@dataclass
class CLConfig:
    alpha: float = 0.2
    metric: str = "dot"
    fuse: str = "mul"
    input: str = "siamese"
    manner: str = "simultaneous"
    multi: str = "pairwise"             # Eq 5 (pairwise) or Eq 6 (mean of the others)
    mkbs: int = 1
    embedding: int = 1024
    budget: float = 0.10
    w2_grid: int = 8
    # Variants beyond the paper (docs/results.md section 4); each default keeps the paper's method as implemented.
    alpha_warmup: int = 0               # epochs over which alpha ramps linearly from 0 (0: full alpha from the start)
    verification_weight: float = 1.0    # L_verification's weight inside alpha (L_metric + w * L_verification)
    gate_init: float = 0.0              # each decoder's last BatchNorm weight at start: 0 starts every MKB as identity
    soft_weight: float = 0.0            # + soft_weight * T^2 * KL(soft target || softmax(z_i / T)): a logit-level term
    soft_target: str = "ensemble"       # ensemble: softmax of the cohort's mean logits (KDCL); peers: each peer's (DML)
    temperature: float = 3.0            # T of the soft-target term


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "plateau"
    plateau_patience: int = 5
    seed: int = 0
    device: str = "auto"
    amp: bool = True                    # CUDA only
    channels_last: bool = False
    compile: bool = False               # torch.compile each network after its MKB halves are hooked in
    accumulate: int = 1                 # micro-batches per step (per process): the same batch in less memory
    placement: str = "replicated"       # under torchrun: DDP, or per-network (one network per process)
    log_every: int = 20
    threads: int | None = None
    network_lr: dict[str, float] = field(default_factory=dict)           # per-network overrides, by network label
    network_weight_decay: dict[str, float] = field(default_factory=dict)


@dataclass
class KDConfig:
    """Hinton KD (and FitNets' second stage): network 0 is the frozen teacher, the others learn from it."""
    temperature: float = 4.0
    weight: float = 0.9                 # (1 - weight) * CE + weight * T^2 * KL
    teacher: str | None = None          # IL run folder, its checkpoint.pt, or a `clcli export` file of network 0


@dataclass
class DMLConfig:
    weight: float = 1.0                 # CE + weight * mean over peers of KL(p_peer || p_i)


@dataclass
class FitNetsConfig:
    """Hint learning at the first planned MKB site; the teacher and the KD stage come from `kd`."""
    hint_weight: float = 1.0
    hint_epochs: int = 1                # stage 1 (hint loss only); KD after that


@dataclass
class WELConfig:
    weight: float = 1.0                 # CE + weight * MSE(embedding distance, W2^2 of the input images / 2)
    embedding: int = 128
    w2_grid: int = 8


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    version: int = RECIPE_VERSION
    models: list[str] = field(default_factory=lambda: ["resnet34", "mobilenetv2_100"])
    methods: list[str] = field(default_factory=lambda: ["cl"])
    input_size: int | None = 32         # None: the first model's pretrained input size
    stem: str = "small"
    pretrained: bool = False            # start from timm's pretrained weights (the Hub), except models in `weights`
    weights: dict[str, str] = field(default_factory=dict)   # model name -> local safetensors / timm checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    cl: CLConfig = field(default_factory=CLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    dml: DMLConfig = field(default_factory=DMLConfig)
    fitnets: FitNetsConfig = field(default_factory=FitNetsConfig)
    wel: WELConfig = field(default_factory=WELConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _builtin_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here / "builtin", here.parent.parent / "recipes"]


def builtin_names() -> list[str]:
    names = set()
    for d in _builtin_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ClcliError(f"recipe file not found: {path}")
        return path
    for d in _builtin_dirs():
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ClcliError(f"unknown recipe '{name_or_path}'; built-in recipes: {', '.join(builtin_names())}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check_value(key: str, tp, value: Any, where: str) -> Any:
    """Validate one value against its annotation; returns the (possibly coerced) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ClcliError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
        return [_check_value(f"{key}.{i}", args[0], v, where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ClcliError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        return {str(k): _check_value(f"{key}.{k}", args[1], v, where) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is bool and not isinstance(value, bool):
        raise ClcliError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ClcliError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _CHOICES and value not in _CHOICES[leaf]:
        raise ClcliError(f"{where}: '{key}' must be one of {', '.join(_CHOICES[leaf])}, got {value!r}")
    if leaf in _RANGES and isinstance(value, (int, float)):
        lo, hi = _RANGES[leaf]
        if not lo <= value <= hi:
            raise ClcliError(f"{where}: '{key}' must be between {lo} and {hi}, got {value!r}")
    return value


def _build(cls, raw: dict, where: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ClcliError(f"{where}: '{prefix or 'recipe'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ClcliError(f"{where}: unknown key '{prefix}{unknown[0]}' (valid: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, where, f"{prefix}{name}.")
        else:
            values[name] = _check_value(f"{prefix}{name}", tp, value, where)
    return cls(**values)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (list items by index: `models.0=resnet18`) to the raw recipe mapping."""
    if "=" not in assignment:
        raise ClcliError(f"--set expects key=value, got '{assignment}'")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ClcliError(f"--set {key}: '{part}' is not a valid index")
            idx = int(part)
            if last:
                value = _parse_scalar(text)
                node.append(value) if idx == len(node) else node.__setitem__(idx, value)
                return
            node = node[idx]
        else:
            if last:
                node[part] = _parse_scalar(text)
                return
            node = node.setdefault(part, {})


def _defaults_raw() -> dict:
    return Recipe().to_dict()


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in (
            "network_lr", "network_weight_decay") else v
    return out


def load(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe. Unknown keys, wrong types and out-of-range values are one-line errors."""
    import yaml

    path = find(name_or_path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ClcliError(f"{where}: not valid YAML ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ClcliError(f"{where}: a recipe must be a mapping")
    recipe = _build(Recipe, raw, where)  # validate the file itself first, so errors name the file's keys
    merged = _merge(_defaults_raw(), raw)
    merged.setdefault("name", path.stem)
    if "name" not in raw:
        merged["name"] = path.stem
    for assignment in overrides or []:
        apply_override(merged, assignment)
    recipe = _build(Recipe, merged, f"{where} (after --set)" if overrides else where)
    if len(recipe.models) < 1:
        raise ClcliError(f"{where}: 'models' must name at least one model")
    if recipe.data.fold is not None and not recipe.data.folds:
        raise ClcliError(f"{where}: 'data.fold' needs 'data.folds' (the fold-indices file)")
    if recipe.data.augment == "rrc_flip" and not recipe.data.stream:
        raise ClcliError(f"{where}: 'data.augment' rrc_flip (random-resized crop) needs 'data.stream: true'")
    return recipe


def from_dict(raw: dict, where: str = "recipe") -> Recipe:
    return _build(Recipe, raw, where)


__all__ = ["Recipe", "DataConfig", "CLConfig", "TrainConfig", "KDConfig", "DMLConfig", "FitNetsConfig", "WELConfig",
           "load", "from_dict", "find", "builtin_names",
           "apply_override", "RECIPE_VERSION"]
