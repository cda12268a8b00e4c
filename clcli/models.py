"""Building timm models the way every part of clcli needs them: by name, sized for the data, with an optional
small stem. The small stem is recorded as a `StemChange` so that training, export and `clcli.load` rebuild exactly
the same network without tracing again."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

from clcli.errors import ClcliError, one_line

STEMS = ("imagenet", "small")  # as timm builds it, or stride 1 without stem pooling (small inputs)


def network_labels(names: list[str]) -> list[str]:
    """What tells the networks of a cohort apart in tables, metrics, run.json, export file names and per-network
    recipe keys: the timm name, numbered (-1, -2, ...) where the same model appears more than once."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        if names.count(name) == 1:
            labels.append(name)
        else:
            seen[name] = seen.get(name, 0) + 1
            labels.append(f"{name}-{seen[name]}")
    return labels


@dataclass
class StemChange:
    """What `--stem small` changed: the first strided conv set to stride 1 (with the strided convs of the branches
    that run beside it, as in RepVGG and MobileOne stems), the first pooling removed."""

    conv: str | None = None          # module path of the conv made stride 1
    pool: str | None = None          # module path of the pooling replaced by Identity
    branches: list[str] = field(default_factory=list)  # strided layers beside `conv`: convs made stride 1, pools removed

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def convs(self) -> list[str]:
        return ([self.conv] if self.conv else []) + list(self.branches)


def check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ClcliError(f"unknown model '{name}'{hint}")


def _needs_img_size(name: str) -> bool:
    """Models with a fixed input size (ViT position embeddings) must be built for the size we feed them."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))


def model_kwargs(name: str, *, num_classes: int, in_chans: int = 3, input_size: int | tuple[int, int] = 32) -> dict:
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if _needs_img_size(name):
        kwargs["img_size"] = input_size
    return kwargs


def pretrained_config(name: str) -> dict:
    """Input size (H, W), mean and std of timm's default pretrained weights for `name`; nothing is downloaded."""
    import timm

    check_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.input_size or not cfg.mean or not cfg.std:
        raise ClcliError(f"timm has no pretrained config for '{name}'; set input_size and data.normalize in the recipe")
    return {"input_size": tuple(cfg.input_size[1:]), "mean": tuple(cfg.mean), "std": tuple(cfg.std)}


def create(name: str, kwargs: dict, *, stem: StemChange | None = None, pretrained: bool = False,
           weights_file: str | None = None, meta: bool = False):
    """timm.create_model(name, **kwargs) with the stem change applied; on the meta device when `meta`.

    Starting weights: `weights_file` (a local file, see `load_weights_file`), else timm's pretrained weights when
    `pretrained` (the Hub; a classifier of another size is left as initialised, timm's rule), else random."""
    import torch
    import timm

    check_model_name(name)
    try:
        if meta:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **kwargs)
        elif pretrained and weights_file is None:
            model = _create_pretrained(name, kwargs)
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ClcliError(f"cannot build '{name}' with {kwargs}: {e}") from None
    if weights_file is not None and not meta:
        load_weights_file(model, name, weights_file)
    if stem is not None:
        apply_stem(model, stem)
    return model


def _create_pretrained(name: str, kwargs: dict):
    import timm

    from clcli import hub

    offline = hub.offline_reason()  # no network: the Hub's offline mode (local cache only) before timm retries
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except TypeError:
        raise
    except Exception as e:  # offline, hub unreachable, no pretrained weights for this model: point to a local file
        local = f"pass --weights {name}=FILE (a local safetensors file or timm checkpoint)"
        if offline:
            raise ClcliError(f"'{name}' starts from timm's pretrained weights, which are on the Hugging Face Hub and "
                             f"not in the local cache, and the Hub cannot be reached ({offline}); {local}, or "
                             f"--set pretrained=false to start from random weights") from None
        raise ClcliError(f"cannot load timm's pretrained weights for '{name}' ({one_line(e)}); {local}, or set "
                         f"HF_HUB_OFFLINE=1 to use only the local Hub cache") from None


def read_weights_file(name: str, path) -> dict:
    """The tensors of a local weights file for `name`: a safetensors file or a timm/PyTorch checkpoint, read by
    timm's own reader with torch.load(weights_only=True), so nothing beyond tensors is ever unpickled (it also
    unwraps 'state_dict', 'model' and EMA entries and strips 'module.')."""
    from pathlib import Path

    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise ClcliError(f"weights file for '{name}' not found: {path}")
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:  # damaged file, a pickle with more than tensors, not a checkpoint at all
        raise ClcliError(f"cannot read weights file {path} ({one_line(e)}); expected a safetensors file or a "
                         f"timm checkpoint of tensors") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ClcliError(f"{path} is not a state dict of tensors; expected a safetensors file or a timm checkpoint")
    check_finite(state, str(path))
    return state


def non_finite(state: dict, limit: int = 3) -> tuple[int, list[str]]:
    """(how many, the first `limit` names) of the floating-point tensors in `state` holding NaN or inf. A scalar may
    hold +-inf: it is a bound, not a weight (gemma4_vit's clamp limits are -inf and inf until set)."""
    import torch

    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return 0, []
    flags = torch.stack([(~torch.isnan(state[k]) if state[k].dim() == 0 else torch.isfinite(state[k]).all())
                         .to(state[names[0]].device) for k in names])
    bad = [k for k, ok in zip(names, flags.tolist()) if not ok]  # one host sync for the whole state
    return len(bad), bad[:limit]


def describe_non_finite(count: int, names: list[str]) -> str:
    """'3 tensors holding NaN or inf (a, b, c, ...)': what `non_finite` found, for an error line."""
    return (f"{count} tensor{'s' if count > 1 else ''} holding NaN or inf "
            f"({', '.join(names)}{', ...' if count > len(names) else ''})")


def input_size_error(name: str, hw, error: BaseException, *, stem: str = "imagenet", made_for=None,
                     context: str = "", where: str = "") -> ClcliError:
    """The one line for a model that fails by itself on an input size (seen by the probe or by the first forward):
    what failed, and the size it was made for or the stem to change."""
    from clcli.errors import one_line

    with_stem = f" with --stem {stem}" if stem != "imagenet" else ""
    if with_stem:
        hint = "try --stem imagenet or another --input-size"
    elif made_for:
        hint = f"it was made for {made_for[-2]}x{made_for[-1]}: try --input-size {max(made_for[-2:])}"
    else:
        hint = "try another --input-size"
    at = f", at {where}" if where else ""
    return ClcliError(f"{name} fails on a {hw[0]}x{hw[1]} input{with_stem}{context} ({one_line(error)}{at}); {hint}")


def check_finite(state: dict, what: str) -> None:
    """A one-line error naming the first tensors of `state` that hold NaN or inf (`what`: whose tensors)."""
    count, names = non_finite(state)
    if count:
        raise ClcliError(f"{what} has {describe_non_finite(count, names)}; it diverged: train again with a lower "
                         f"train.lr")


def classifier_keys(name: str) -> set[str]:
    """The state-dict keys of timm's classifier for `name` (from its pretrained config: 'fc', 'head.fc', ...)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    classifiers = (cfg.classifier if cfg is not None else None) or ()
    return {f"{c}.{p}" for c in ([classifiers] if isinstance(classifiers, str) else classifiers)
            for p in ("weight", "bias")}


def load_weights_file(model, name: str, path) -> None:
    """Load a local file of timm weights for `name` into `model` (see `read_weights_file`).

    Every tensor must match the model except the classifier: the file's classifier is kept when it has the model's
    number of classes, otherwise the model's fresh one stays (the classifier is re-sized to the dataset's classes).
    A file for another architecture is an error, never a silent partial load."""
    state = read_weights_file(name, path)
    own = model.state_dict()
    head = classifier_keys(name)
    for k in head:
        if k in state and k in own and tuple(state[k].shape) != tuple(own[k].shape):
            del state[k]
    missing = [k for k in own if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        problems = [f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in
                    ((missing, "of the model's tensors missing"), (unexpected, "unexpected tensors"),
                     (reshaped, "tensors of another shape")) if keys]
        raise ClcliError(f"{path} does not hold '{name}' weights in timm's layout ({'; '.join(problems)})")
    model.load_state_dict(state, strict=False)


def apply_stem(model, stem: StemChange) -> None:
    from torch import nn

    for path in stem.convs:
        conv = model.get_submodule(path)
        if isinstance(conv, (nn.MaxPool2d, nn.AvgPool2d)):  # a pooling shortcut beside the strided conv
            model.set_submodule(path, nn.Identity())
            continue
        k = conv.kernel_size
        _patch_size_follows(model, path, tuple(conv.stride))
        conv.stride = (1, 1)
        if not (all(x % 2 == 1 for x in k) and tuple(conv.padding) == tuple(x // 2 for x in k)) \
                and type(conv) is nn.Conv2d:
            conv.padding = "same"  # keep H x W: a patchify conv (k=4, pad 0) would otherwise shrink the map
    if stem.pool:
        model.set_submodule(stem.pool, nn.Identity())


def _patch_size_follows(model, conv_path: str, stride: tuple) -> None:
    """A patch embedding that computes its output grid from a recorded patch size (Twins: `H // patch_size`) records
    the new stride of its conv, so that the grid it reports is the map the conv makes."""
    parent = model.get_submodule(conv_path.rpartition(".")[0]) if "." in conv_path else model
    size = getattr(parent, "patch_size", None)
    if isinstance(size, int):
        size = (size, size)
    if isinstance(size, (tuple, list)) and tuple(size) == stride:
        parent.patch_size = 1 if isinstance(getattr(parent, "patch_size"), int) else (1, 1)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
