"""Auto-augmentation policies on whole uint8 batches: every image draws its own ops and magnitudes, and the images that
drew the same op with the same argument go through one batched call of a public torchvision.transforms.v2 functional.

Names (`data.auto_augment`): timm's `auto_augment` strings, RandAugment `rand-m9-n2-mstd0.5` (sections m, n, p, mstd,
mmax, inc, t) and AutoAugment `original`, `originalr`, `v0`, `v0r` (with `-mstd`), and `trivialaugment`
(torchvision's TrivialAugmentWide: timm 1.0 has no TrivialAugment string).

Only public names of timm and torchvision are used (tests/test_public_api.py holds clcli to it):
  * the policy is timm's own: timm parses the string (`rand_augment_transform`, `auto_augment_transform`) and the
    public attributes of what it returns are read: `RandAugment.ops`, `.num_layers`, `.choice_weights`,
    `AutoAugment.policy`, and each `AugmentOp`'s `name`, `prob`, `magnitude`, `magnitude_std`, `magnitude_max` and
    `hparams`. How timm draws them is redone on the generator: apply with the op's probability; magnitude + N(0, mstd)
    per image and op (uniform in [0, m] for timm's infinite mstd), clipped to [0, mmax or LEVEL_MAX]; the weighted
    choice (tweights) without replacement as timm's; the random sign timm draws inside its level functions;
  * a magnitude becomes an op's argument through LEVEL_TO_ARGUMENT, timm's level functions written out here (timm
    keeps them private): held equal to each op's public `level_fn` by tests/test_augment_vs_timm.py;
  * an argument becomes a call (ARGUMENT_TO_CALL) of torchvision.transforms.v2.functional on uint8 tensors (`run`):
    rotate and affine (bilinear; filled with the dataset's mean colour as timm's `create_transform` does; shears
    about the top-left corner as PIL's affine; translations to the nearest whole pixel), adjust_brightness,
    adjust_saturation, adjust_contrast and adjust_sharpness (PIL's enhance factor as it is), posterize, solarize,
    autocontrast, equalize, invert. SolarizeAdd has no torchvision functional: one torch expression equal to timm's
    lookup table. Each op is held against timm's own PIL op on real images (tests/test_augment_vs_timm.py);
  * `trivialaugment` is TrivialAugmentWide's space (TRIVIAL_OPS, written out here, held against torchvision's class).
Refused in memory (one line): AugMix (`augmix-...`) and 3-Augment (`3a`, `rand-t3a`, `rand-t3aw`: PIL's Gaussian blur
has no torchvision op); on a streamed split they run as timm runs them, on PIL images in the workers.

Streamed splits use timm's transform itself (`create_transform(..., separate=True)`'s auto-augment stage) on PIL
images, or torchvision's TrivialAugmentWide; its posterize ops keep 0 bits as a black image (Pillow 13 refuses 0).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from clcli.errors import ClcliError, one_line

TRIVIAL = "trivialaugment"
_EXAMPLES = "e.g. rand-m9-n2-mstd0.5, rand-m7-n1, original, v0, trivialaugment"

# timm's magnitude scale: an op's level runs from 0 to LEVEL_MAX ('m9' is 9 / 10 of the op's range); a drawn magnitude
# is clipped to [0, LEVEL_MAX] unless the string sets mmax (timm's default upper bound).
LEVEL_MAX = 10.0
TRANSLATE_PCT = 0.45  # timm's relative translation at LEVEL_MAX, unless hparams set translate_pct
TRANSLATE_CONST = 0.45  # TranslateX/Y's pixels at LEVEL_MAX: 0.45 of the shorter side, as create_transform sets them

# A call: (torchvision functional, its argument), or None where the draw leaves the image as it is. Draws that agree
# on the call share one batched call.
Call = tuple[str, object]


def _scaled(level: float, scale: float) -> float:
    return (level / LEVEL_MAX) * scale  # in timm's order of operations: the same float, bit for bit


def _enhance(level, sign, hparams):  # PIL's enhance factor: 0.1 at level 0, 1.0 (no change) at 5, 1.9 at 10
    return _scaled(level, 1.8) + 0.1


def _enhance_increasing(level, sign, hparams):  # 1 +- 0.9 * level / 10, kept >= 0.1
    return max(0.1, 1.0 + sign * _scaled(level, 0.9))


# timm op name -> its argument at magnitude `level` (after the clip) with `sign` +1.0 or -1.0 (timm negates the
# argument of the geometric and the increasing enhance ops half the time), or None for an op without argument.
# This is timm's arithmetic (its auto_augment.py), written out because timm keeps its level functions private:
# tests/test_augment_vs_timm.py holds each one equal to the op's public `level_fn` at many levels and both signs.
LEVEL_TO_ARGUMENT: dict[str, Callable[[float, float, dict], float] | None] = {
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
    "Rotate": lambda level, sign, hp: sign * _scaled(level, 30.0),  # degrees, counter-clockwise
    "Posterize": lambda level, sign, hp: int(_scaled(level, 4)),  # bits kept
    "PosterizeIncreasing": lambda level, sign, hp: 4 - int(_scaled(level, 4)),
    "PosterizeOriginal": lambda level, sign, hp: int(_scaled(level, 4)) + 4,
    "Solarize": lambda level, sign, hp: min(256, int(_scaled(level, 256))),  # pixels >= this are inverted
    "SolarizeIncreasing": lambda level, sign, hp: 256 - min(256, int(_scaled(level, 256))),
    "SolarizeAdd": lambda level, sign, hp: min(128, int(_scaled(level, 110))),  # added below 128
    "Color": _enhance,
    "ColorIncreasing": _enhance_increasing,
    "Contrast": _enhance,
    "ContrastIncreasing": _enhance_increasing,
    "Brightness": _enhance,
    "BrightnessIncreasing": _enhance_increasing,
    "Sharpness": _enhance,
    "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda level, sign, hp: sign * _scaled(level, 0.3),  # PIL's affine (1, a, 0, 0, 1, 0)
    "ShearY": lambda level, sign, hp: sign * _scaled(level, 0.3),
    "TranslateX": lambda level, sign, hp: sign * _scaled(level, float(hp["translate_const"])),  # pixels
    "TranslateY": lambda level, sign, hp: sign * _scaled(level, float(hp["translate_const"])),
    "TranslateXRel": lambda level, sign, hp: sign * _scaled(level, hp.get("translate_pct", TRANSLATE_PCT)),  # of w
    "TranslateYRel": lambda level, sign, hp: sign * _scaled(level, hp.get("translate_pct", TRANSLATE_PCT)),  # of h
}


def _posterize(bits: int) -> Call | None:
    return None if bits >= 8 else ("posterize", max(0, int(bits)))  # PIL keeps none of them below 0, as at 0


def _solarize(threshold: int) -> Call | None:
    # PIL inverts pixels >= threshold; torchvision too, at a float threshold: half a level below, which no rounding
    # moves across a pixel value
    return None if threshold >= 256 else ("solarize", threshold - 0.5)


def _shift(pixels: float) -> int:
    """PIL's affine samples at x + pixels: the content moves by -pixels, to the nearest whole pixel (a whole pixel
    keeps draws that differ in the noise of their magnitude in one call)."""
    return round(-pixels)


# timm op name -> (its argument from LEVEL_TO_ARGUMENT, image height, width) -> the torchvision call doing timm's PIL op
ARGUMENT_TO_CALL: dict[str, Callable[[object, int, int], Call | None]] = {
    "AutoContrast": lambda a, h, w: ("autocontrast", None),
    "Equalize": lambda a, h, w: ("equalize", None),
    "Invert": lambda a, h, w: ("invert", None),
    "Rotate": lambda a, h, w: ("rotate", a),
    "Posterize": lambda a, h, w: _posterize(a),
    "PosterizeIncreasing": lambda a, h, w: _posterize(a),
    "PosterizeOriginal": lambda a, h, w: _posterize(a),
    "Solarize": lambda a, h, w: _solarize(a),
    "SolarizeIncreasing": lambda a, h, w: _solarize(a),
    "SolarizeAdd": lambda a, h, w: ("solarize_add", a) if a > 0 else None,
    "Color": lambda a, h, w: ("saturation", a),  # ImageEnhance.Color: a blend with the image's grey
    "ColorIncreasing": lambda a, h, w: ("saturation", a),
    "Contrast": lambda a, h, w: ("contrast", a),
    "ContrastIncreasing": lambda a, h, w: ("contrast", a),
    "Brightness": lambda a, h, w: ("brightness", a),
    "BrightnessIncreasing": lambda a, h, w: ("brightness", a),
    "Sharpness": lambda a, h, w: ("sharpness", a),
    "SharpnessIncreasing": lambda a, h, w: ("sharpness", a),
    "ShearX": lambda a, h, w: ("shear_x", a),
    "ShearY": lambda a, h, w: ("shear_y", a),
    "TranslateX": lambda a, h, w: ("translate", (_shift(a), 0)),
    "TranslateY": lambda a, h, w: ("translate", (0, _shift(a))),
    "TranslateXRel": lambda a, h, w: ("translate", (_shift(a * w), 0)),  # timm: a fraction of the width
    "TranslateYRel": lambda a, h, w: ("translate", (0, _shift(a * h))),
}


def timm_call(name: str, level: float, negative: bool, hparams: dict, h: int, w: int) -> Call | None:
    """The torchvision call doing timm's op `name` at magnitude `level` (already clipped) with the sign drawn for it,
    on h x w images."""
    to_argument = LEVEL_TO_ARGUMENT[name]
    argument = None
    if to_argument is not None:
        if name in ("TranslateX", "TranslateY"):  # in pixels: create_transform sets them for the image size
            hparams = dict(hparams, translate_const=int(min(h, w) * TRANSLATE_CONST))
        argument = to_argument(level, -1.0 if negative else 1.0, hparams)
    return ARGUMENT_TO_CALL[name](argument, h, w)


# TrivialAugmentWide (torchvision.transforms.v2, its default 31 magnitude bins), written out because torchvision keeps
# its space private: op -> (its magnitudes, one a bin, or None; whether signed; magnitude -> the call torchvision's
# class makes). tests/test_augment_vs_timm.py holds every output of torchvision's class to one of these calls.
TRIVIAL_BINS = 31


def _trivial_ops() -> dict[str, tuple[list[float] | None, bool, Callable[[float], Call | None]]]:
    linear = torch.linspace(0.0, 0.99, TRIVIAL_BINS).tolist()  # float32 values, as torchvision's
    return {
        "Identity": (None, False, lambda m: None),
        "ShearX": (linear, True, lambda m: ("shear_x", m)),
        "ShearY": (linear, True, lambda m: ("shear_y", m)),
        "TranslateX": (torch.linspace(0.0, 32.0, TRIVIAL_BINS).tolist(), True, lambda m: ("translate", (int(m), 0))),
        "TranslateY": (torch.linspace(0.0, 32.0, TRIVIAL_BINS).tolist(), True, lambda m: ("translate", (0, int(m)))),
        "Rotate": (torch.linspace(0.0, 135.0, TRIVIAL_BINS).tolist(), True, lambda m: ("rotate", m)),
        "Brightness": (linear, True, lambda m: ("brightness", 1.0 + m)),
        "Color": (linear, True, lambda m: ("saturation", 1.0 + m)),
        "Contrast": (linear, True, lambda m: ("contrast", 1.0 + m)),
        "Sharpness": (linear, True, lambda m: ("sharpness", 1.0 + m)),
        "Posterize": ((8 - (torch.arange(TRIVIAL_BINS) / ((TRIVIAL_BINS - 1) / 6))).round().int().tolist(), False,
                      lambda m: _posterize(int(m))),
        "Solarize": (torch.linspace(1.0, 0.0, TRIVIAL_BINS).tolist(), False, lambda m: ("solarize", 255 * m)),
        "AutoContrast": (None, False, lambda m: ("autocontrast", None)),
        "Equalize": (None, False, lambda m: ("equalize", None)),
    }


TRIVIAL_OPS = _trivial_ops()


def trivial_call(name: str, bin: int, negative: bool) -> Call | None:
    """The call TrivialAugmentWide makes for op `name` at magnitude bin `bin` with the sign drawn for it."""
    magnitudes, signed, to_call = TRIVIAL_OPS[name]
    if magnitudes is None:
        return to_call(0.0)
    magnitude = float(magnitudes[int(bin)])
    return to_call(-magnitude if signed and negative else magnitude)


def run(call: Call, images: torch.Tensor, fill: list[float]) -> torch.Tensor:
    """`images` (uint8 [B, C, H, W]) through one call of torchvision.transforms.v2.functional (bilinear, `fill`
    outside the image)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    kind, value = call
    bilinear = InterpolationMode.BILINEAR
    if kind == "rotate":
        return F.rotate(images, angle=value, interpolation=bilinear, fill=fill)
    if kind in ("shear_x", "shear_y"):
        # PIL's (1, a, 0, 0, 1, 0) about the top-left corner is torchvision's shear by atan(a) about [0, 0]
        angle = math.degrees(math.atan(value))
        return F.affine(images, angle=0.0, translate=[0, 0], scale=1.0,
                        shear=[angle, 0.0] if kind == "shear_x" else [0.0, angle], interpolation=bilinear, fill=fill,
                        center=[0, 0])
    if kind == "translate":
        return F.affine(images, angle=0.0, translate=list(value), scale=1.0, shear=[0.0, 0.0],
                        interpolation=bilinear, fill=fill)
    if kind == "brightness":
        return F.adjust_brightness(images, brightness_factor=value)
    if kind == "saturation":
        return F.adjust_saturation(images, saturation_factor=value)
    if kind == "contrast":
        return F.adjust_contrast(images, contrast_factor=value)
    if kind == "sharpness":
        return F.adjust_sharpness(images, sharpness_factor=value)
    if kind == "posterize":
        return F.posterize(images, bits=value)
    if kind == "solarize":
        return F.solarize(images, threshold=value)
    if kind == "solarize_add":  # timm's lookup table: + value below 128, saturating at 255
        added = (images.to(torch.int16) + int(value)).clamp_(max=255).to(torch.uint8)
        return torch.where(images < 128, added, images)
    if kind == "autocontrast":
        return F.autocontrast(images)
    if kind == "equalize":
        return F.equalize(images)
    if kind == "invert":
        return F.invert(images)
    raise ValueError(f"no torchvision call {kind!r}")


def _timm_policy(spec: str):
    """timm's own transform object for `spec` (its parser), or one line naming what is wrong."""
    from timm.data import auto_augment as timm_aa

    try:
        if spec.startswith("rand"):
            return timm_aa.rand_augment_transform(spec, None)
        if spec.startswith("augmix"):
            return timm_aa.augment_and_mix_transform(spec, None)
        return timm_aa.auto_augment_transform(spec, None)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        why = f" ({one_line(e)})" if str(e) else ""
        raise ClcliError(f"data.auto_augment '{spec}' is not an auto-augment timm knows{why}; {_EXAMPLES}") from None


def check(spec: str | None, *, stream: bool) -> None:
    """Refuse, in one line, a `data.auto_augment` string that timm does not know, or that the in-memory path cannot
    run (`stream=False`)."""
    if spec is None or spec == TRIVIAL:
        return
    if not spec:
        raise ClcliError("data.auto_augment is empty; use null to turn it off")
    if stream:
        _timm_policy(spec)
    else:
        Policy(spec)


class Policy:
    """One auto-augment policy for in-memory batches: `draw` makes every image's draws from a generator, `apply` runs
    them slot by slot (an op slot of RandAugment, AutoAugment's sub-policy or TrivialAugment's single op)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.weights = None
        self.calls = 0  # batched op calls made so far: the cost of a batch (benchmarks/data_pipeline.py reports it)
        if spec == TRIVIAL:
            self.kind, self.slots = "trivial", 1
            self.ops = list(TRIVIAL_OPS)
            return
        from timm.data import auto_augment as timm_aa

        policy = _timm_policy(spec)
        if isinstance(policy, timm_aa.RandAugment):
            self.kind, self.slots, self.ops = "rand", int(policy.num_layers), list(policy.ops)
            if policy.choice_weights is not None:
                self.weights = torch.as_tensor(policy.choice_weights, dtype=torch.float64)
                if self.slots > len(self.ops):
                    raise ClcliError(f"data.auto_augment '{spec}': n{self.slots} is more ops than its weighted set "
                                     f"has ({len(self.ops)}), drawn without replacement")
        elif isinstance(policy, timm_aa.AutoAugment):
            self.kind = "auto"
            self.ops = [op for sub in policy.policy for op in sub]
            lengths = [len(sub) for sub in policy.policy]
            self.slots = max(lengths)
            self.lengths = torch.tensor(lengths)
            self.starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
        else:
            raise ClcliError(f"data.auto_augment '{spec}' ({type(policy).__name__}) mixes several augmented copies "
                             f"of each image; it runs on streamed data only (data.stream: true)")
        unsupported = sorted({op.name for op in self.ops} - set(LEVEL_TO_ARGUMENT))
        if unsupported:
            raise ClcliError(f"data.auto_augment '{spec}' uses {', '.join(unsupported)}: no torchvision op "
                             f"for in-memory batches; it runs on streamed data only (data.stream: true)")
        if self.slots < 1:
            raise ClcliError(f"data.auto_augment '{spec}' draws no op (n0); use null to turn it off")
        self.prob = torch.tensor([float(op.prob) for op in self.ops], dtype=torch.float64)
        self.level = torch.tensor([float(op.magnitude) for op in self.ops], dtype=torch.float64)
        self.std = torch.tensor([float(op.magnitude_std) for op in self.ops], dtype=torch.float64)
        self.upper = torch.tensor([float(op.magnitude_max or LEVEL_MAX) for op in self.ops], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Policy({self.spec!r})"

    def draw(self, b: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every image's draws, [b, slots] each, on the CPU: the op (an index into `ops`, -1 none), whether it
        applies, its magnitude level and its sign. Always the same numbers of draws in the same order, made on the
        generator's device and brought to the CPU in one copy (grouping the images is done there)."""
        dev = generator.device
        shape = (b, self.slots)
        if self.kind == "trivial":
            op = torch.randint(len(self.ops), shape, generator=generator, device=dev)
            bins = torch.randint(TRIVIAL_BINS, shape, generator=generator, device=dev)
            u_sign = torch.rand(shape, generator=generator, device=dev)
            op, level, u_sign = torch.stack([op.double(), bins.double(), u_sign.double()]).cpu().unbind(0)
            return {"op": op.long(), "apply": torch.ones(shape, dtype=torch.bool), "level": level,
                    "negative": u_sign < 0.5}
        if self.kind == "rand" and self.weights is not None:
            choice = torch.multinomial(self.weights.to(dev).expand(b, -1), self.slots, replacement=False,
                                       generator=generator)
        elif self.kind == "rand":
            choice = torch.randint(len(self.ops), shape, generator=generator, device=dev)
        else:  # one sub-policy per image, its ops in order
            choice = torch.randint(len(self.lengths), (b, 1), generator=generator, device=dev).expand(shape)
        drawn = [choice] + [sample(shape, generator=generator, device=dev)
                            for sample in (torch.rand, torch.randn, torch.rand, torch.rand)]
        choice, u_apply, gauss, uniform, u_sign = torch.stack([d.double() for d in drawn]).cpu().unbind(0)
        choice = choice.long()
        if self.kind == "auto":
            slot = torch.arange(self.slots)
            op = torch.where(slot < self.lengths[choice], self.starts[choice] + slot, -1)
        else:
            op = choice
        known = op >= 0
        at = op.clamp(min=0)
        std, level = self.std[at], self.level[at]
        # timm's AugmentOp: apply with its probability; magnitude + N(0, mstd) (uniform in [0, m] for mstd = inf),
        # clipped to [0, mmax or LEVEL_MAX]
        noisy = torch.where(torch.isinf(std), uniform * level, level + torch.nan_to_num(std, posinf=0.0) * gauss)
        noisy = torch.where(std > 0, noisy, level)
        level = torch.minimum(noisy.clamp(min=0.0), self.upper[at])
        # timm: apply unless random() > p; negate when random() > 0.5
        return {"op": op, "apply": known & (u_apply <= self.prob[at]), "level": level, "negative": u_sign > 0.5}

    def call(self, op: int, level: float, negative: bool, h: int, w: int) -> Call | None:
        """The torchvision call (`run`) of one draw on h x w images, or None where it leaves the image as it is."""
        if self.kind == "trivial":
            return trivial_call(self.ops[op], int(level), negative)
        timm_op = self.ops[op]
        return timm_call(timm_op.name, level, negative, timm_op.hparams, h, w)

    def apply(self, images: torch.Tensor, draws: dict[str, torch.Tensor], fill: Sequence[int]) -> torch.Tensor:
        """`images` (uint8 [B, C, H, W], rows matching `draws`) after every slot's ops: per slot, the images are
        sorted by their call (op and argument) and each run goes through one batched torchvision call."""
        h, w = images.shape[-2:]
        fill = [float(v) for v in fill]
        for j in range(self.slots):
            rows = draws["apply"][:, j].nonzero().flatten()
            if len(rows) == 0:
                continue
            keys = torch.stack([draws["op"][rows, j].double(), draws["level"][rows, j].double(),
                                draws["negative"][rows, j].double()], 1)
            distinct, which = torch.unique(keys, dim=0, return_inverse=True)
            calls: dict[Call, int] = {}  # call -> its index: draws that agree share it
            call_of = []
            for op, level, negative in distinct.tolist():
                target = self.call(int(op), level, bool(negative), h, w)
                call_of.append(-1 if target is None else calls.setdefault(target, len(calls)))
            call = torch.tensor(call_of, dtype=torch.int64)[which]
            rows, call = rows[call >= 0], call[call >= 0]
            if len(rows) == 0:
                continue
            self.calls += len(calls)
            order = torch.argsort(call, stable=True)
            rows, counts = rows[order], torch.bincount(call, minlength=len(calls)).tolist()
            at = rows.to(images.device)
            parts = [run(target, chunk, fill) for target, chunk in zip(calls, images.index_select(0, at).split(counts))]
            images = images.index_copy(0, at, torch.cat(parts))
        return images


def fill_colour(mean: Sequence[float] | None, channels: int) -> tuple[int, ...]:
    """The fill of geometric ops for `channels`-channel uint8 images: the normalisation mean as timm's
    create_transform sets it (round(255 * mean), clipped); timm's grey 128 without one."""
    values = [0.5] * channels if mean is None else [float(m) for m in mean]
    if len(values) != channels:
        values = [sum(values) / len(values)] * channels  # grayscale data normalised with RGB statistics
    return tuple(min(255, max(0, round(255 * v))) for v in values)


def stream_transform(spec: str, size: int, mean: Sequence[float] | None):
    """The auto-augment stage of a streamed training transform (PIL image in, PIL image out): timm's, as its
    `create_transform` builds it for `spec`, or torchvision's TrivialAugmentWide."""
    if spec == TRIVIAL:
        from torchvision.transforms.v2 import InterpolationMode, TrivialAugmentWide

        return TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR, fill=list(fill_colour(mean, 3)))
    from timm.data import create_transform

    _timm_policy(spec)  # one line for a string timm does not know, before timm asserts
    # timm fills with round(255 * mean) itself; without a mean, its grey 128
    _, stage, _ = create_transform(size, is_training=True, auto_augment=spec, interpolation="bilinear",
                                   mean=tuple(mean) if mean is not None else (0.5, 0.5, 0.5), use_prefetcher=True,
                                   separate=True)
    for op in _augment_ops(stage):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize_keeping_none
    return stage


def _augment_ops(node):
    """Every timm `AugmentOp` in an auto-augment stage: RandAugment's and AugMix's `ops`, AutoAugment's `policy`
    (sub-policies of ops), a Compose's `transforms`."""
    from timm.data.auto_augment import AugmentOp

    if isinstance(node, AugmentOp):
        yield node
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _augment_ops(item)
    else:
        for attribute in ("ops", "policy", "transforms"):
            yield from _augment_ops(getattr(node, attribute, ()))


def _posterize_keeping_none(image, bits_to_keep, **kwargs):
    """timm's posterize on a PIL image, where keeping 0 bits (timm's levels reach 0: Posterize at a low magnitude,
    PosterizeIncreasing at a high one, AutoAugment v0) makes the image black, as Pillow before 13 and the in-memory
    path do: Pillow 13 refuses 0 bits, which stopped a streamed run in its first epoch."""
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)  # every bit of every band cleared, in the image's own mode
    from timm.data.auto_augment import posterize

    return posterize(image, bits_to_keep, **kwargs)
