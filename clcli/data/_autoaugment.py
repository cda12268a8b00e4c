"""Auto-augmentation policies on whole uint8 batches: every image draws its own ops and magnitudes, and the images that
drew the same op with the same argument go through one batched call of torchvision.transforms.v2's op.

Names (`data.auto_augment`): timm's `auto_augment` strings, RandAugment `rand-m9-n2-mstd0.5` (sections m, n, p, mstd,
mmax, inc, t) and AutoAugment `original`, `originalr`, `v0`, `v0r` (with `-mstd`), and `trivialaugment`
(torchvision's TrivialAugmentWide: timm 1.0 has no TrivialAugment string).

What is honoured of a timm string, and how, in memory:
  * the policy is timm's own: timm parses the string (`rand_augment_transform`, `auto_augment_transform`) and its ops,
    their probabilities, the magnitude on timm's 0..10 scale, the magnitude noise (mstd: Gaussian per image and op;
    uniform in [0, m] above 100), its upper bound (mmax), the increasing variants (inc1) and the weighted choice
    (tweights, without replacement as in timm) are read from timm's objects;
  * each op's argument comes from timm's own level function (timm's scale, not torchvision's 31 bins); only the random
    sign, which timm draws from Python's `random` inside it, is drawn per image from our generator instead;
  * the op is torchvision.transforms.v2's on uint8 tensors (`_apply_image_or_video_transform`, what its AutoAugment
    classes call), bilinear (timm draws bilinear or bicubic per op on PIL images; tensor ops take nearest or bilinear),
    filled with the dataset's mean colour as timm's `create_transform` does. Translations are whole pixels
    (torchvision truncates); shears are about the top-left corner as in timm. SolarizeAdd has no torchvision op: one
    torch expression equal to timm's lookup table.
Refused in memory (one line): AugMix (`augmix-...`) and 3-Augment (`3a`, `rand-t3a`, `rand-t3aw`: PIL's Gaussian blur
has no torchvision op); on a streamed split they run as timm runs them, on PIL images in the workers.

Streamed splits use timm's transform itself (`create_transform(..., separate=True)`'s auto-augment stage) on PIL
images, or torchvision's TrivialAugmentWide.
"""
from __future__ import annotations

import functools
import operator
import types
from typing import Sequence

import torch

from clcli.errors import ClcliError, one_line

TRIVIAL = "trivialaugment"
_TRIVIAL_BINS = 31  # TrivialAugmentWide's magnitude bins
_EXAMPLES = "e.g. rand-m9-n2-mstd0.5, rand-m7-n1, original, v0, trivialaugment"


def _same(value):
    return value


# timm op name -> (torchvision op, timm's argument -> torchvision's magnitude, or None to leave the image as it is).
# Directions were checked against timm's PIL ops (tests/test_augment.py).
_TO_TORCHVISION = {
    "AutoContrast": ("AutoContrast", lambda a, h, w: 0.0),
    "Equalize": ("Equalize", lambda a, h, w: 0.0),
    "Invert": ("Invert", lambda a, h, w: 0.0),
    "Rotate": ("Rotate", lambda a, h, w: a),                            # degrees, counter-clockwise in both
    "Posterize": ("Posterize", lambda a, h, w: a if a < 8 else None),  # bits kept
    "PosterizeIncreasing": ("Posterize", lambda a, h, w: a if a < 8 else None),
    "PosterizeOriginal": ("Posterize", lambda a, h, w: a if a < 8 else None),
    # inverts pixels >= a; torchvision's threshold is 255 * m: half a level below a, so float rounding cannot move it
    "Solarize": ("Solarize", lambda a, h, w: (a - 0.5) / 255.0 if a < 256 else None),
    "SolarizeIncreasing": ("Solarize", lambda a, h, w: (a - 0.5) / 255.0 if a < 256 else None),
    "SolarizeAdd": ("SolarizeAdd", lambda a, h, w: a),
    "Color": ("Color", lambda a, h, w: a - 1.0),                        # enhance factor f: torchvision's 1 + m
    "ColorIncreasing": ("Color", lambda a, h, w: a - 1.0),
    "Contrast": ("Contrast", lambda a, h, w: a - 1.0),
    "ContrastIncreasing": ("Contrast", lambda a, h, w: a - 1.0),
    "Brightness": ("Brightness", lambda a, h, w: a - 1.0),
    "BrightnessIncreasing": ("Brightness", lambda a, h, w: a - 1.0),
    "Sharpness": ("Sharpness", lambda a, h, w: a - 1.0),
    "SharpnessIncreasing": ("Sharpness", lambda a, h, w: a - 1.0),
    "ShearX": ("ShearX", lambda a, h, w: a),  # PIL's affine (1, a, 0, 0, 1, 0) is torchvision's shear by atan(a)
    "ShearY": ("ShearY", lambda a, h, w: a),
    "TranslateX": ("TranslateX", lambda a, h, w: -a),  # PIL samples at x + a: the content moves by -a
    "TranslateY": ("TranslateY", lambda a, h, w: -a),
    "TranslateXRel": ("TranslateX", lambda a, h, w: -a * w),
    "TranslateYRel": ("TranslateY", lambda a, h, w: -a * h),
}


@functools.lru_cache(maxsize=None)
def _with_sign(level_fn, negative: bool):
    """timm's level function with its `_randomly_negate` bound to a fixed sign: the arithmetic stays timm's, the
    sign is drawn per image from our generator (timm draws it from Python's `random` inside the function)."""
    code = getattr(level_fn, "__code__", None)
    if code is None or "_randomly_negate" not in code.co_names:
        return level_fn
    scope = dict(level_fn.__globals__, _randomly_negate=operator.neg if negative else _same)
    return types.FunctionType(code, scope, level_fn.__name__, level_fn.__defaults__, level_fn.__closure__)


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
            from torchvision.transforms.v2 import TrivialAugmentWide

            self.kind, self.slots = "trivial", 1
            self.space = TrivialAugmentWide._AUGMENTATION_SPACE
            self.ops = list(self.space)
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
        unsupported = sorted({op.name for op in self.ops} - set(_TO_TORCHVISION))
        if unsupported:
            raise ClcliError(f"data.auto_augment '{spec}' uses {', '.join(unsupported)}: no torchvision op "
                             f"for in-memory batches; it runs on streamed data only (data.stream: true)")
        if self.slots < 1:
            raise ClcliError(f"data.auto_augment '{spec}' draws no op (n0); use null to turn it off")
        self.prob = torch.tensor([float(op.prob) for op in self.ops], dtype=torch.float64)
        self.level = torch.tensor([float(op.magnitude) for op in self.ops], dtype=torch.float64)
        self.std = torch.tensor([float(op.magnitude_std) for op in self.ops], dtype=torch.float64)
        self.upper = torch.tensor([float(op.magnitude_max or timm_aa._LEVEL_DENOM) for op in self.ops],
                                  dtype=torch.float64)

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
            bins = torch.randint(_TRIVIAL_BINS, shape, generator=generator, device=dev)
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
        # clipped to [0, mmax or 10]
        noisy = torch.where(torch.isinf(std), uniform * level, level + torch.nan_to_num(std, posinf=0.0) * gauss)
        noisy = torch.where(std > 0, noisy, level)
        level = torch.minimum(noisy.clamp(min=0.0), self.upper[at])
        # timm: apply unless random() > p; negate when random() > 0.5
        return {"op": op, "apply": known & (u_apply <= self.prob[at]), "level": level, "negative": u_sign > 0.5}

    def torchvision_op(self, op: int, level: float, negative: bool, h: int, w: int) -> tuple[str, float] | None:
        """(torchvision op, magnitude) of one draw on h x w images, or None where it leaves the image as it is."""
        if self.kind == "trivial":
            name = self.ops[op]
            magnitudes_fn, signed = self.space[name]
            magnitudes = magnitudes_fn(_TRIVIAL_BINS, h, w)
            if magnitudes is None:
                return None if name == "Identity" else (name, 0.0)
            magnitude = float(magnitudes[int(level)])
            return name, -magnitude if signed and negative else magnitude
        timm_op = self.ops[op]
        name, to_magnitude = _TO_TORCHVISION[timm_op.name]
        args = ()
        if timm_op.level_fn is not None:
            # translate_const as create_transform sets it for this image size
            hparams = dict(timm_op.hparams, translate_const=int(min(h, w) * 0.45))
            args = _with_sign(timm_op.level_fn, negative)(level, hparams)
        magnitude = to_magnitude(args[0] if args else None, h, w)
        return None if magnitude is None else (name, magnitude)

    def apply(self, images: torch.Tensor, draws: dict[str, torch.Tensor], fill: Sequence[int]) -> torch.Tensor:
        """`images` (uint8 [B, C, H, W], rows matching `draws`) after every slot's ops: per slot, the images are
        sorted by their (op, magnitude) and each run goes through one batched torchvision call."""
        h, w = images.shape[-2:]
        applier = _applier(tuple(int(v) for v in fill))
        for j in range(self.slots):
            rows = draws["apply"][:, j].nonzero().flatten()
            if len(rows) == 0:
                continue
            keys = torch.stack([draws["op"][rows, j].double(), draws["level"][rows, j].double(),
                                draws["negative"][rows, j].double()], 1)
            distinct, which = torch.unique(keys, dim=0, return_inverse=True)
            calls: dict[tuple[str, float], int] = {}  # (op, magnitude) -> its call: draws that agree share it
            call_of = []
            for op, level, negative in distinct.tolist():
                target = self.torchvision_op(int(op), level, bool(negative), h, w)
                call_of.append(-1 if target is None else calls.setdefault(target, len(calls)))
            call = torch.tensor(call_of, dtype=torch.int64)[which]
            rows, call = rows[call >= 0], call[call >= 0]
            if len(rows) == 0:
                continue
            self.calls += len(calls)
            order = torch.argsort(call, stable=True)
            rows, counts = rows[order], torch.bincount(call, minlength=len(calls)).tolist()
            at = rows.to(images.device)
            parts = [_run(applier, name, magnitude, chunk)
                     for (name, magnitude), chunk in zip(calls, images.index_select(0, at).split(counts))]
            images = images.index_copy(0, at, torch.cat(parts))
        return images


@functools.lru_cache(maxsize=16)
def _applier(fill: tuple[int, ...]):
    """A torchvision auto-augment object whose per-op method runs the ops (bilinear, `fill` outside the image)."""
    from torchvision.transforms.v2 import InterpolationMode, TrivialAugmentWide

    return TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR, fill=list(fill))


def _run(applier, name: str, magnitude: float, images: torch.Tensor) -> torch.Tensor:
    if name == "SolarizeAdd":  # timm's lookup table: + magnitude below 128, saturating at 255
        added = (images.to(torch.int16) + int(magnitude)).clamp_(max=255).to(torch.uint8)
        return torch.where(images < 128, added, images)
    return applier._apply_image_or_video_transform(images, name, magnitude, interpolation=applier.interpolation,
                                                   fill=applier._fill)


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
        return _applier(fill_colour(mean, 3))
    from timm.data import create_transform

    _timm_policy(spec)  # one line for a string timm does not know, before timm asserts
    # timm fills with round(255 * mean) itself; without a mean, its grey 128
    _, stage, _ = create_transform(size, is_training=True, auto_augment=spec, interpolation="bilinear",
                                   mean=tuple(mean) if mean is not None else (0.5, 0.5, 0.5), use_prefetcher=True,
                                   separate=True)
    return stage

