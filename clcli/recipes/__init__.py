"""Recipes: YAML files validated against a typed schema, with dotted `--set` overrides.

Built-in recipes live in the repository's `recipes/` folder (installed inside the package as `clcli/recipes/builtin`
too). A recipe is named by its file stem or given as a path.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clcli.errors import ClcliError

RECIPE_VERSION = 1
SITE_PATTERN = r"\d+x\d+|all"  # cl.sites: besides a site number


def _one_of(default: str, choices):
    """A field whose value must be one of `choices`: a tuple, or a function giving the names of a registry (looked
    up when a recipe is checked, so that a name registered later, e.g. with `losses.register_metric`, is valid)."""
    return field(default=default, metadata={"choices": choices})


def _list_of(**check):
    """A list field, empty by default, each of whose items is checked as `_one_of` (`choices=`) or `_within`
    (`range=(low, high)`) check a single value; a string item against `pattern=(regex, what it means)`."""
    return field(default_factory=list, metadata=check)


def _within(default, low, high):
    """A numeric field whose value must lie in [low, high]."""
    return field(default=default, metadata={"range": (low, high)})


def _metric_names() -> tuple[str, ...]:
    from clcli import losses

    return tuple(losses.METRICS)


def _fusions() -> tuple[str, ...]:
    from clcli import mkb

    return mkb.FUSIONS


def _stems() -> tuple[str, ...]:
    from clcli import models

    return models.STEMS


@dataclass
class DataConfig:
    source: str = "uoft-cs/cifar10"     # hub id, local folder, or "builtin:quickstart"
    config: str | None = None           # dataset config (e.g. "exact_subset")
    train_split: str = "train"
    test_split: str = "test"            # else a "validation" split, else a held-out part of train_split
    val_source: str | None = None       # a separate folder (or hub id) with the evaluation images
    val_fraction: float = _within(0.1, 0.01, 0.9)  # held out of train_split when there is no evaluation split
    val_seed: int = 0                   # the held-out draw; apart from train.seed so seeds share one validation set
    # hold val_fraction of each class out of the training images as a validation split, evaluated every epoch (the
    # plateau schedule, train.keep_best and `clcli tune` watch it; never the test split); keep_best implies it
    validate: bool = False
    image_column: str | None = None     # auto-detected from the features when None
    label_column: str | None = None
    image_size: int | None = None       # resize on decode (STL-10 96 -> 32); None: input_size
    augment: str = _one_of("crop_flip", ("none", "crop_flip", "flip", "rrc_flip"))
    padding: int = _within(4, 0, 64)
    # dataset: train-split mean/std; pretrained: the first model's timm config
    normalize: str = _one_of("dataset", ("dataset", "imagenet", "pretrained", "none"))
    train_limit: int | None = None      # first n rows, for quick runs
    test_limit: int | None = None
    folds: str | None = None            # fold-indices file (STL-10 fold_indices.txt): one fold of train rows a line
    # with folds: train on this fold only; None runs every fold, then mean ± std
    fold: int | None = _within(None, 0, 1 << 20)
    stream: bool = False                # decode images in DataLoader workers each epoch instead of into memory
    # DataLoader workers when streaming (None: the CPUs less one, shared by a machine's processes, up to 32)
    workers: int | None = _within(None, 0, 256)
    # streaming test images: shorter side to this, then center crop input_size
    test_resize: int | None = _within(None, 8, 8192)
    # after the crop and flip: timm's auto_augment string (rand-m9-n2-mstd0.5, original, v0, ...) or trivialaugment;
    # checked with the data (clcli.data), before any image is decoded
    auto_augment: str | None = None
    # random erasing of the normalised batch (timm's RandomErasing): probability per image (0: off), fill, boxes
    re_prob: float = _within(0.0, 0.0, 1.0)
    re_mode: str = _one_of("const", ("const", "rand", "pixel"))
    re_count: int = _within(1, 1, 64)


@dataclass
class CLConfig:
    alpha: float = _within(0.2, 0.0, 100.0)
    metric: str = _one_of("dot", _metric_names)
    fuse: str = _one_of("mul", _fusions)
    input: str = _one_of("siamese", ("siamese", "different"))
    manner: str = _one_of("simultaneous", ("simultaneous", "iterative"))
    multi: str = _one_of("pairwise", ("pairwise", "mean"))  # Eq 5 (pairwise) or Eq 6 (mean of the others)
    mkbs: int = _within(1, 1, 16)
    # instead of the best cl.mkbs: the probe's listed sites, each a number (`clcli probe` numbers them), a map size
    # (4x4: the best site where the networks meet at that size) or all (one MKB at every size where they meet)
    sites: list[int | str] = _list_of(range=(1, 1000), pattern=(SITE_PATTERN, "a site number, a map size such as "
                                                                               "4x4, or all"))
    embedding: int = _within(1024, 8, 1 << 20)
    budget: float = _within(0.10, 0.0, 10.0)
    w2_grid: int = _within(8, 1, 64)
    # Variants beyond the paper (docs/results.md section 4); each default keeps the paper's method as implemented.
    # epochs over which alpha ramps linearly from 0 (0: full alpha from the start)
    alpha_warmup: int = _within(0, 0, 100000)
    # L_verification's weight inside alpha (L_metric + w * L_verification)
    verification_weight: float = _within(1.0, 0.0, 100.0)
    # each decoder's last BatchNorm weight at start: 0 starts every MKB as identity
    gate_init: float = _within(0.0, 0.0, 10.0)
    # + soft_weight * T^2 * KL(soft target || softmax(z_i / T)): a logit-level term
    soft_weight: float = _within(0.0, 0.0, 100.0)
    # ensemble: softmax of the cohort's mean logits (KDCL); peers: each peer's (DML)
    soft_target: str = _one_of("ensemble", ("ensemble", "peers"))
    temperature: float = _within(3.0, 0.05, 100.0)  # T of the soft-target term


def _tracker_names() -> tuple[str, ...]:
    from clcli import tracking

    return tuple(tracking.TRACKERS)


def _optimizer_names() -> tuple[str, ...]:
    from timm.optim import list_optimizers

    return tuple(list_optimizers())


@dataclass
class TrainConfig:
    epochs: int = _within(200, 1, 100000)
    batch_size: int = _within(128, 1, 1 << 16)
    # The optimiser: any name timm.optim.create_optimizer_v2 knows (sgd, momentum, adamw, lamb, lion, ...)
    opt: str = _one_of("sgd", _optimizer_names)
    lr: float = _within(0.1, 0.0, 100.0)
    momentum: float = _within(0.9, 0.0, 1.0)    # optimisers with momentum (SGD family, ...)
    nesterov: bool = False                      # SGD family only: this key decides, whatever timm's default
    opt_eps: float | None = None                # adam-like optimisers (None: the optimiser's default)
    opt_betas: list[float] | None = None
    weight_decay: float = _within(1e-4, 0.0, 1.0)
    filter_bias_and_bn: bool = False            # no weight decay on norm layers and biases (timm's)
    layer_decay: float | None = _within(None, 0.0, 1.0)  # layer-wise lr decay, models with a group matcher
    # The schedule (timm.scheduler.create_scheduler_v2), stepped per update; plateau watches evaluation accuracy
    schedule: str = _one_of("plateau", ("plateau", "cosine", "step", "multistep", "poly", "constant"))
    min_lr: float = _within(0.0, 0.0, 100.0)
    warmup_epochs: int = _within(0, 0, 100000)
    warmup_lr: float = _within(1e-5, 0.0, 100.0)
    cooldown_epochs: int = _within(0, 0, 100000)
    decay_rate: float = _within(0.1, 0.0, 1.0)  # step, multistep, plateau
    decay_epochs: float | None = _within(None, 0.0, 100000.0)  # step: every so many epochs (None: a third)
    decay_milestones: list[int] = field(default_factory=list)  # multistep: epochs (empty: 50 % and 75 %)
    plateau_patience: int = 5
    # Regularisation: soft targets through the batch (label smoothing, timm.data.Mixup)
    label_smoothing: float = _within(0.0, 0.0, 1.0)
    mixup: float = _within(0.0, 0.0, 100.0)     # mixup alpha (0: off)
    cutmix: float = _within(0.0, 0.0, 100.0)    # cutmix alpha (0: off)
    mixup_prob: float = _within(1.0, 0.0, 1.0)
    mixup_switch_prob: float = _within(0.5, 0.0, 1.0)
    mixup_mode: str = _one_of("batch", ("batch", "pair", "elem"))
    # An exponential moving average of each network's weights, its MKB half included (timm.utils.ModelEmaV3)
    ema_decay: float = _within(0.0, 0.0, 1.0)   # 0: off
    ema_warmup: bool = False
    clip_grad: float | None = _within(None, 0.0, 1e9)  # timm.utils.dispatch_clip_grad
    clip_mode: str = _one_of("norm", ("norm", "value", "agc"))
    # Per network, the weights of its best epoch on data.val_fraction of the training split (never the test split)
    keep_best: bool = False
    patience: int | None = _within(None, 1, 100000)  # with keep_best: stop when no network improved for so long
    seed: int = 0
    device: str = _one_of("auto", ("auto", "cpu", "cuda", "mps"))
    amp: bool = True                    # CUDA only
    channels_last: bool = False
    compile: bool = False               # torch.compile each network after its MKB halves are hooked in
    accumulate: int = _within(1, 1, 1 << 16)  # micro-batches per step (per process): the same batch in less memory
    grad_checkpointing: bool = False    # timm's: blocks re-run in the backward pass, less activation memory
    # under torchrun: DDP, or per-network (one network per process)
    placement: str = _one_of("replicated", ("replicated", "per-network"))
    log_every: int = _within(20, 1, 1 << 20)
    # Experiment trackers that receive every metrics.jsonl record: tensorboard, wandb, mlflow (clcli.tracking)
    log: list[str] = _list_of(choices=_tracker_names)
    log_project: str | None = None      # W&B project / MLflow experiment (None: WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME)
    log_entity: str | None = None       # W&B entity (None: WANDB_ENTITY)
    log_group: str | None = None        # W&B group / MLflow parent run (`clcli compare` sets it)
    threads: int | None = None
    network_lr: dict[str, float] = field(default_factory=dict)           # per-network overrides, by network label
    network_weight_decay: dict[str, float] = field(default_factory=dict)

    @property
    def mixing(self) -> bool:
        """Whether timm's Mixup mixes the training batches."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class KDConfig:
    """Hinton KD (and FitNets' second stage): network 0 is the frozen teacher, the others learn from it."""
    temperature: float = _within(4.0, 0.05, 100.0)
    weight: float = _within(0.9, 0.0, 100.0)  # (1 - weight) * CE + weight * T^2 * KL
    teacher: str | None = None          # IL run folder, its checkpoint.pt, or a `clcli export` file of network 0


@dataclass
class DMLConfig:
    weight: float = _within(1.0, 0.0, 100.0)  # CE + weight * mean over peers of KL(p_peer || p_i)


@dataclass
class FitNetsConfig:
    """Hint learning at the first planned MKB site; the teacher and the KD stage come from `kd`."""
    hint_weight: float = _within(1.0, 0.0, 1000.0)
    hint_epochs: int = _within(1, 0, 100000)  # stage 1 (hint loss only); KD after that


@dataclass
class WELConfig:
    weight: float = _within(1.0, 0.0, 100.0)  # CE + weight * MSE(embedding distance, W2^2 of the input images / 2)
    embedding: int = _within(128, 8, 1 << 20)
    w2_grid: int = _within(8, 1, 64)


@dataclass
class SearchRange:
    """One number `clcli tune` searches: a log-uniform range [low, high], or a choice among `values`; neither: the
    recipe's own value, not searched."""
    low: float | None = _within(None, 0.0, 1e6)
    high: float | None = _within(None, 0.0, 1e6)
    values: list[float] = _list_of(range=(0.0, 1e6))


@dataclass
class TuneConfig:
    """`clcli tune`'s search space, searched on the validation split held out of the training images."""
    # MKB configurations to try, each as cl.sites takes it, several sites joined by '+' (4x4, 4x4+2x2, all, 3);
    # empty: one MKB at each map size the networks meet at, and one at all of them at once
    sites: list[str] = _list_of(pattern=(rf"({SITE_PATTERN}|\d+)(\+({SITE_PATTERN}|\d+))*",
                                         "MKB sites as cl.sites takes them, joined by '+' (4x4, 4x4+2x2, all, 3)"))
    alpha: SearchRange = field(default_factory=lambda: SearchRange(low=0.02, high=2.0))  # cl.alpha
    lr: SearchRange = field(default_factory=SearchRange)  # train.lr (not searched unless given)
    sampler: str = _one_of("auto", ("auto", "tpe", "grid", "random"))  # auto: grid when every dimension is a choice
    pruner: str = _one_of("median", ("median", "halving", "none"))
    objective: str = _one_of("mean", ("mean", "min"))  # over the networks; min: no network may lose


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    version: int = RECIPE_VERSION
    models: list[str] = field(default_factory=lambda: ["resnet34", "mobilenetv2_100"])
    methods: list[str] = field(default_factory=lambda: ["cl"])
    input_size: int | None = _within(32, 8, 4096)  # None: the first model's pretrained input size
    stem: str = _one_of("small", _stems)
    pretrained: bool = False            # start from timm's pretrained weights (the Hub), except models in `weights`
    weights: dict[str, str] = field(default_factory=dict)   # model name -> local safetensors / timm checkpoint
    # timm.create_model keyword arguments for every network (drop_path_rate, drop_rate, ...): in plan.json and exports
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    cl: CLConfig = field(default_factory=CLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    dml: DMLConfig = field(default_factory=DMLConfig)
    fitnets: FitNetsConfig = field(default_factory=FitNetsConfig)
    wel: WELConfig = field(default_factory=WELConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

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
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml"):
        # a built-in name wins over a folder of that name (an --out folder `quickstart/`)
        for d in _builtin_dirs():
            if (d / f"{name_or_path}.yaml").is_file():
                return d / f"{name_or_path}.yaml"
    if path.is_dir():
        raise ClcliError(f"recipe {path} is a folder, not a file")
    if path.suffix in (".yaml", ".yml"):
        raise ClcliError(f"recipe file not found: {path}")
    raise ClcliError(f"unknown recipe '{name_or_path}'; built-in recipes: {', '.join(builtin_names())}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(key: str, tp, value: Any, where: str, meta=None) -> Any:
    """Validate one value against its annotation and its field's choices or range (`meta`); returns the (possibly
    coerced) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        arm = next((a for a in inner if isinstance(value, typing.get_origin(a) or a)
                    and not (a is int and isinstance(value, bool))),
                   inner[0])  # int | str: the arm the value is, else the first (whose check says what is wrong)
        if len(inner) > 1 and not isinstance(value, typing.get_origin(arm) or arm):
            raise ClcliError(f"{where}: '{key}' must be {' or '.join(map(_type_name, inner))}, got {value!r}")
        return _check_value(key, arm, value, where, meta)
    if origin is list:
        if not isinstance(value, list):
            raise ClcliError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
        return [_check_value(f"{key}.{i}", args[0], v, where, meta) for i, v in enumerate(value)]  # each item
    if origin is dict:
        if not isinstance(value, dict):
            raise ClcliError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        return {str(k): _check_value(f"{key}.{k}", args[1], v, where) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot, no exponent sign) as a string; a user means the number
    if tp is bool and not isinstance(value, bool):
        raise ClcliError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ClcliError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    choices = (meta or {}).get("choices")
    if choices is not None:
        names = choices() if callable(choices) else choices
        if value not in names:
            raise ClcliError(f"{where}: '{key}' must be one of {', '.join(names)}, got {value!r}")
    if "pattern" in (meta or {}) and isinstance(value, str) and not re.fullmatch(meta["pattern"][0], value):
        raise ClcliError(f"{where}: '{key}' must be {meta['pattern'][1]}, got {value!r}")
    if "range" in (meta or {}) and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta["range"]
        if not lo <= value <= hi:
            raise ClcliError(f"{where}: '{key}' must be between {lo} and {hi}, got {value!r}")
    return value


def _build(cls, raw: dict, where: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ClcliError(f"{where}: '{prefix or 'recipe'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ClcliError(f"{where}: unknown key '{prefix}{unknown[0]}' (valid: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, where, f"{prefix}{name}.")
        else:
            values[name] = _check_value(f"{prefix}{name}", tp, value, where, fields[name].metadata)
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


# mappings a file gives whole, never merged key by key into the defaults: per-network tables, and tune's search
# ranges (`alpha: {values: [0.1, 0.2]}` is a choice, not a choice beside the default range)
_GIVEN_WHOLE = {"train.network_lr", "train.network_weight_decay", "model_kwargs", "tune.alpha", "tune.lr"}


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = dict(base)
    for k, v in over.items():
        key = f"{path}{k}"
        out[k] = (_merge(base[k], v, f"{key}.") if isinstance(v, dict) and isinstance(base.get(k), dict)
                  and key not in _GIVEN_WHOLE else v)
    return out


def load(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe. Unknown keys, wrong types and out-of-range values are one-line errors."""
    from clcli import files

    path = find(name_or_path)
    where = str(path)
    raw = files.read_yaml(path, "recipe", expect=None)
    if raw is None:
        raise ClcliError(f"recipe {where} is empty; write at least 'models' and 'data.source' (see `clcli recipes "
                         f"show quickstart`)")
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
    _check_train(recipe, where)
    if recipe.data.augment == "rrc_flip" and not recipe.data.stream:
        raise ClcliError(f"{where}: 'data.augment' rrc_flip (random-resized crop) needs 'data.stream: true'")
    return recipe


def _check_tune(recipe: Recipe, where: str) -> None:
    for key, r in (("tune.alpha", recipe.tune.alpha), ("tune.lr", recipe.tune.lr)):
        if (r.low is None) != (r.high is None):
            raise ClcliError(f"{where}: '{key}' needs both low and high (a range), or values (a choice)")
        if r.low is not None and r.values:
            raise ClcliError(f"{where}: '{key}' is either a range (low, high) or a choice (values), not both "
                             f"(--set '{key}={{values: [0.1, 0.2]}}' gives a choice in place of the range)")
        if r.low is not None and not 0 < r.low < r.high:
            raise ClcliError(f"{where}: '{key}' must have 0 < low < high (searched on a log scale), got "
                             f"{r.low}, {r.high}")


def _check_train(recipe: Recipe, where: str) -> None:
    """Combinations of training options that cannot work, refused before any work."""
    _check_tune(recipe, where)
    cfg = recipe.train
    if cfg.opt_betas is not None and len(cfg.opt_betas) not in (2, 3):
        raise ClcliError(f"{where}: 'train.opt_betas' needs 2 (or 3) values, got {cfg.opt_betas}")
    if cfg.mixing:
        # the pairs' W2 targets are distances between the unmixed images a network would no longer see
        if "wel" in recipe.methods:
            raise ClcliError(f"{where}: train.mixup/cutmix cannot train wel: its W2 targets are distances between "
                             "unmixed images; set train.mixup=0 and train.cutmix=0 for wel")
        if recipe.cl.input == "different" and any(m in recipe.methods for m in ("cl", "mkb-solo")):
            raise ClcliError(f"{where}: train.mixup/cutmix with cl.input=different is not defined (each network sees "
                             "its own partner image, so one mix cannot serve the cohort); use cl.input=siamese")
        if cfg.batch_size % 2:
            raise ClcliError(f"{where}: train.mixup/cutmix mix each batch with its mirror and need an even "
                             f"train.batch_size, got {cfg.batch_size}")
    if cfg.patience is not None and not cfg.keep_best:
        raise ClcliError(f"{where}: train.patience (early stopping) watches the validation split that "
                         "train.keep_best holds out; set train.keep_best=true")
    for key, value in recipe.model_kwargs.items():
        if key in ("num_classes", "in_chans", "img_size", "pretrained"):
            raise ClcliError(f"{where}: model_kwargs.{key} is set by clcli (from the data, input_size and "
                             "--pretrained); remove it")
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            raise ClcliError(f"{where}: model_kwargs.{key} must be a number, string or boolean, got {value!r}")


def flat(recipe: Recipe) -> dict[str, Any]:
    """The recipe as dotted keys (`train.lr`): how `clcli compare` tells recipes apart and how trackers show the
    hyperparameters. The per-network mappings (train.network_lr, train.network_weight_decay) stay whole values."""
    def walk(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("network_lr", "network_weight_decay"):
                out.update(walk(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    return walk(recipe.to_dict(), "")


def from_dict(raw: dict, where: str = "recipe") -> Recipe:
    recipe = _build(Recipe, raw, where)
    _check_train(recipe, where)
    return recipe


# What `pretrained=True` changes before the user's overrides (which still win): the weights expect their own input
# size, normalisation and ImageNet stem.
PRETRAINED_OVERRIDES = ["pretrained=true", "input_size=null", "data.normalize=pretrained", "stem=imagenet"]


def resolve(recipe: str | None = None, *, data: str | None = None, val: str | None = None,
            val_fraction: float | None = None, models: list[str] | None = None, pretrained: bool = False,
            weights: dict[str, str] | list[str] | None = None, methods: list[str] | str | None = None,
            epochs: int | None = None, seed: int | None = None, placement: str | None = None,
            log: list[str] | str | None = None, overrides: list[str] | None = None) -> Recipe:
    """The recipe `clcli train` trains with these options (the same names as its flags; `overrides` are `--set`;
    `log`: the trackers, "tensorboard,wandb" or a list).

    Without `recipe`: 'finetune' when starting from pretrained or given weights, else 'quickstart'. A local `data` or
    `val` folder and weight files become absolute paths, so the run folder works from anywhere. `weights` maps a model
    name to a file (or is a list of MODEL=FILE)."""
    sets = (list(PRETRAINED_OVERRIDES) if pretrained else []) + list(overrides or [])
    if models is not None:
        sets.append(f"models=[{', '.join(models)}]")
    if methods is not None:
        sets.append(f"methods=[{methods if isinstance(methods, str) else ', '.join(methods)}]")
    if log is not None:
        sets.append(f"train.log=[{log if isinstance(log, str) else ', '.join(log)}]")
    for key, value in (("train.epochs", epochs), ("train.seed", seed), ("train.placement", placement),
                       ("data.val_fraction", val_fraction)):
        if value is not None:
            sets.append(f"{key}={value}")
    for key, value in (("data.source", data), ("data.val_source", val)):
        if value is not None:
            sets.append(f"{key}={json.dumps(_local_or_hub(value))}")
    weight_files = _weight_files(weights)
    if weight_files:
        sets.append(f"weights={json.dumps(weight_files)}")
    if recipe is None:
        recipe = "finetune" if pretrained or weight_files else "quickstart"
    return load(recipe, sets)


def _local_or_hub(source: str) -> str:
    """A local folder as an absolute path; anything else (a hub id) as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _weight_files(weights: dict[str, str] | list[str] | None) -> dict[str, str]:
    """{model: absolute file} from a mapping or from MODEL=FILE strings (model names may contain dots)."""
    if isinstance(weights, dict):
        pairs = list(weights.items())
    else:
        pairs = []
        for pair in weights or []:
            name, sep, file = pair.partition("=")
            if not sep or not name or not file:
                raise ClcliError(f"--weights expects MODEL=FILE, got '{pair}'")
            pairs.append((name, file))
    return {name: str(Path(file).expanduser().resolve()) for name, file in pairs}


__all__ = ["Recipe", "DataConfig", "CLConfig", "TrainConfig", "KDConfig", "DMLConfig", "FitNetsConfig", "WELConfig",
           "load", "from_dict", "flat", "resolve", "find", "builtin_names", "PRETRAINED_OVERRIDES",
           "apply_override", "RECIPE_VERSION"]
