"""Building timm models the way every part of clcli needs them: by name, sized for the data, with an optional
small stem. The small stem is recorded as a `StemChange` so that training, export and `clcli.load` rebuild exactly
the same network without tracing again."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from clcli.errors import ClcliError


@dataclass
class StemChange:
    """What `--stem small` changed: the first strided conv set to stride 1, the first pooling removed."""

    conv: str | None = None          # module path of the conv made stride 1
    pool: str | None = None          # module path of the pooling replaced by Identity

    def to_dict(self) -> dict:
        return asdict(self)


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


def create(name: str, kwargs: dict, *, stem: StemChange | None = None, pretrained: bool = False, meta: bool = False):
    """timm.create_model(name, **kwargs) with the stem change applied; on the meta device when `meta`."""
    import torch
    import timm

    check_model_name(name)
    try:
        if meta:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ClcliError(f"cannot build '{name}' with {kwargs}: {e}") from None
    if stem is not None:
        apply_stem(model, stem)
    return model


def apply_stem(model, stem: StemChange) -> None:
    from torch import nn

    if stem.conv:
        conv = model.get_submodule(stem.conv)
        k = conv.kernel_size
        conv.stride = (1, 1)
        if not (all(x % 2 == 1 for x in k) and tuple(conv.padding) == tuple(x // 2 for x in k)) \
                and type(conv) is nn.Conv2d:
            conv.padding = "same"  # keep H x W: a patchify conv (k=4, pad 0) would otherwise shrink the map
    if stem.pool:
        model.set_submodule(stem.pool, nn.Identity())


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
