"""The in-memory auto-augment ops held against what they stand for, so that a change in timm, torchvision or Pillow
fails a test, not an experiment:

  * LEVEL_TO_ARGUMENT (clcli's copy of timm's level functions, which timm keeps private) equals each timm op's public
    `level_fn`, exactly, at levels 0 to 20 with both signs; LEVEL_MAX (the clip of a drawn magnitude) is timm's;
  * each op's torchvision call (`_autoaugment.run`) against timm's own PIL op (`AugmentOp.aug_fn`) on real images
    (16 photos of the shipped CIFAR-10 subset, cropped to 32 x 26 so that width and height cannot be swapped), at
    levels 0 to 10 with both signs, the argument as timm's `level_fn` gives it;
  * TRIVIAL_OPS (TrivialAugmentWide's space, which torchvision keeps private) against torchvision's class itself.

Tolerances, in uint8 levels, by kind of op:
  * lookup tables and histograms (Equalize, Invert, Posterize, Solarize, SolarizeAdd): equal;
  * blends (Brightness, Color, Contrast, Sharpness, AutoContrast): at most 1 level apart. PIL blends in integer
    arithmetic (AutoContrast through a lookup table), torchvision in float32 and then truncates, so a pixel can land
    a level away (half of the cases have one), never two; a factor off by half a level (0.09, or 0.045 for the
    increasing ops) moves some pixel by more, which the test checks too;
  * rotations and shears: at most 1 level apart (bilinear weights rounded differently) wherever both sample the
    picture wholly inside it; the rim where the picture meets the fill colour is blended differently by PIL and
    torchvision (up to ~130 levels on one pixel), so it is left out, and its size is bounded: the two "wholly inside"
    masks (a white image filled with black, still 255) differ on no more pixels than a band one pixel wide around
    the image, 2 (h + w) (measured 13 to 58 of the 832 pixels; the bound is 116). Over whole images the mean
    difference is 1.2 to 3.0 levels; a sign error gives 5.6 to 47 levels inside, and half a level more (1.5 degrees,
    a shear of 0.015) breaks the 1-level bound;
  * translations are whole pixels by design (nearest; a sub-pixel shift would be a bilinear blur and one call per
    image under magnitude noise): the shift is timm's rounded (at most half a pixel away) and the image equals PIL's
    at that whole shift.
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

import clcli.data as D
from clcli.data import _autoaugment as A

MEAN = (0.49, 0.48, 0.45)
FILL = A.fill_colour(MEAN, 3)
LEVELS = (0.0, 0.5, 1.0, 2.5, 4.0, 5.0, 7.5, 9.0, 10.0)

EXACT = {"Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal", "Solarize",
         "SolarizeIncreasing", "SolarizeAdd"}
BLENDS = {"AutoContrast", "Brightness", "BrightnessIncreasing", "Color", "ColorIncreasing", "Contrast",
          "ContrastIncreasing", "Sharpness", "SharpnessIncreasing"}
GEOMETRY = {"Rotate", "ShearX", "ShearY"}
TRANSLATIONS = {"TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
# every string the in-memory path takes (tests/test_augment.py covers the refused ones)
SPECS = ("rand-m9-n2-mstd0.5", "rand-m9-n2-inc1", "rand-m7-n3-tweights", "original", "originalr", "v0", "v0r")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> torch.Tensor:
    data = D.load_image_tensors(str(D.QUICKSTART_DIR), "test", limit=16, cache_dir=str(tmp_path_factory.mktemp("c")))
    return data.images[..., 3:29].contiguous()  # 32 high, 26 wide


def pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def timm_op(name: str, h: int, w: int) -> timm_aa.AugmentOp:
    """timm's op as its create_transform builds it for h x w images, filled with FILL (the probability, magnitude and
    interpolation are not used: its level_fn and aug_fn are called directly)."""
    return timm_aa.AugmentOp(name, prob=1.0, hparams=dict(translate_const=int(min(h, w) * 0.45), img_mean=FILL))


def timm_images(op: timm_aa.AugmentOp, x: torch.Tensor, args: tuple, fill=FILL) -> torch.Tensor:
    out = []
    for image in x:
        try:
            out.append(tensor(op.aug_fn(pil(image), *args, fillcolor=fill, resample=Image.BILINEAR)))
        except ValueError:
            # recent Pillow refuses to keep 0 bits (timm's own transform on PIL images then raises); before, its
            # table (i & ~255) made the image black, as torchvision does
            assert op.aug_fn is timm_aa.NAME_TO_OP["Posterize"] and args == (0,)
            out.append(torch.zeros_like(image))
    return torch.stack(out)


def timm_arguments(op: timm_aa.AugmentOp, level: float) -> set:
    """The arguments timm's level function gives at `level` (both signs where it draws one: 32 tries, seeded)."""
    if op.level_fn is None:
        return {None}
    state = random.getstate()
    random.seed(0)
    try:
        return {op.level_fn(level, op.hparams)[0] for _ in range(32)}
    finally:
        random.setstate(state)


def ours(name: str, level: float, hparams: dict) -> dict[bool, object]:
    to_argument = A.LEVEL_TO_ARGUMENT[name]
    return {negative: None if to_argument is None else to_argument(level, -1.0 if negative else 1.0, hparams)
            for negative in (False, True)}


def test_every_op_of_every_accepted_string_has_its_level_and_call_written_out():
    names = {op.name for spec in SPECS for op in A.Policy(spec).ops}
    assert names <= set(A.LEVEL_TO_ARGUMENT) == set(A.ARGUMENT_TO_CALL)
    assert names >= set(A.LEVEL_TO_ARGUMENT) - {"TranslateX", "TranslateY"}  # in pixels: used by no string
    for name in A.LEVEL_TO_ARGUMENT:
        op = timm_aa.AugmentOp(name)  # a name timm knows
        assert (op.level_fn is None) == (A.LEVEL_TO_ARGUMENT[name] is None), name


@pytest.mark.parametrize("name", sorted(A.LEVEL_TO_ARGUMENT))
def test_the_level_to_argument_table_is_timms_level_function(name):
    for hparams in ({"translate_const": 250}, {"translate_const": 100, "translate_pct": 0.3}):
        op = timm_aa.AugmentOp(name, hparams=dict(img_mean=FILL, **hparams))
        for level in np.arange(0.0, 20.001, 0.05).tolist():  # up to mmax20: beyond the default clip
            mine = ours(name, level, op.hparams)
            assert timm_arguments(op, level) == set(mine.values()), (name, level, hparams)


def test_the_magnitude_clip_is_timms():
    x = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for magnitude_max, clipped in ((None, A.LEVEL_MAX), (20, 20.0)):
        hparams = {"img_mean": FILL, **({"magnitude_max": magnitude_max} if magnitude_max else {})}
        op = timm_aa.AugmentOp("SolarizeAdd", prob=1.0, magnitude=25, hparams=hparams)  # no sign, no noise
        expected = tensor(op(pil(x)))
        assert torch.equal(A.run(A.timm_call("SolarizeAdd", clipped, False, op.hparams, 8, 8), x[None], [])[0],
                           expected)
        assert not torch.equal(A.run(A.timm_call("SolarizeAdd", clipped / 2, False, op.hparams, 8, 8), x[None],
                                     [])[0], expected)
        spec = "rand-m25-n1-p1.0" + (f"-mmax{magnitude_max}" if magnitude_max else "")
        assert A.Policy(spec).draw(16, torch.Generator().manual_seed(0))["level"].eq(clipped).all()


def inside(call, op, args, h, w) -> torch.Tensor:
    """[H, W]: where both torchvision's call and timm's PIL op sample the picture wholly inside it."""
    white = torch.full((1, 3, h, w), 255, dtype=torch.uint8)
    ours_ = A.run(call, white, [0.0, 0.0, 0.0])[0].eq(255).all(0)
    timm_ = timm_images(op, white, args, fill=(0, 0, 0))[0].eq(255).all(0)
    rim = int((ours_ != timm_).sum())
    assert rim <= 2 * (h + w), f"the rim where picture meets fill is {rim} pixels: wider than one pixel's width"
    return ours_ & timm_


def levels_apart(got: torch.Tensor, expected: torch.Tensor, where: torch.Tensor | None = None) -> int:
    """The largest difference in uint8 levels (only `where` [H, W] is True, if given)."""
    difference = (got.int() - expected.int()).abs()
    return int((difference if where is None else difference[..., where]).max())


def tolerance(name: str) -> int:
    return 0 if name in EXACT or name in TRANSLATIONS else 1


@pytest.mark.parametrize("name", sorted(A.LEVEL_TO_ARGUMENT))
def test_each_op_changes_real_photos_as_timms_pil_op_does(name, photos):
    h, w = photos.shape[-2:]
    fill = [float(v) for v in FILL]
    op = timm_op(name, h, w)
    for level in LEVELS if op.level_fn is not None else LEVELS[:1]:
        arguments = ours(name, level, op.hparams)
        assert timm_arguments(op, level) == set(arguments.values()), (name, level)
        for negative, argument in arguments.items():
            if negative and argument == arguments[False]:
                continue  # an op without a sign, or level 0
            call = A.timm_call(name, level, negative, op.hparams, h, w)
            got = photos if call is None else A.run(call, photos, fill)
            args = () if argument is None else (argument,)
            where = None  # every pixel
            if name in TRANSLATIONS:
                pixels = argument * (w if name == "TranslateXRel" else h if name == "TranslateYRel" else 1)
                shift = call[1][0] + call[1][1] if call else 0
                assert abs(shift + pixels) <= 0.5, (name, level, negative)  # PIL samples at x + pixels
                args = (-shift,)  # PIL at the whole shift
                op_at = timm_aa.AugmentOp(name.replace("Rel", ""), hparams=op.hparams)
                assert levels_apart(got, timm_images(op_at, photos, args)) == 0, (name, level, negative)
                continue
            if name in GEOMETRY:
                where = inside(call, op, args, h, w)
            apart = levels_apart(got, timm_images(op, photos, args), where)
            assert apart <= tolerance(name), f"{name} at level {level} (negative {negative}): {apart} levels from timm"
            if level >= 1.0 and name in GEOMETRY | BLENDS - {"AutoContrast"}:
                # the tolerance sees half a level: timm's op at level + 0.5 is out of it
                further = ours(name, level + 0.5, op.hparams)[negative]
                if further != argument:  # (an increasing enhance at its floor of 0.1 stays there)
                    assert levels_apart(got, timm_images(op, photos, (further,)), where) > tolerance(name), (name,
                                                                                                         level)


def test_trivialaugment_is_torchvisions_trivialaugmentwide(photos):
    from torchvision.transforms.v2 import InterpolationMode, TrivialAugmentWide

    image = photos[0]
    h, w = image.shape[-2:]
    fill = [float(v) for v in FILL]
    candidates: dict[bytes, set[str]] = {}
    for name, (magnitudes, signed, _) in A.TRIVIAL_OPS.items():
        for b in range(A.TRIVIAL_BINS if magnitudes is not None else 1):
            for negative in (False, True) if signed else (False,):
                call = A.trivial_call(name, b, negative)
                out = image if call is None else A.run(call, image[None], fill)[0]
                candidates.setdefault(out.numpy().tobytes(), set()).add(name)
    torchvision_class = TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR, fill=fill)
    seen = set()
    with torch.random.fork_rng():
        for seed in range(200):
            torch.manual_seed(seed)
            out = torchvision_class(image)
            assert out.numpy().tobytes() in candidates, f"seed {seed}: torchvision made an image none of ours is"
            seen |= candidates[out.numpy().tobytes()]
    assert seen == set(A.TRIVIAL_OPS)
    assert A.Policy("trivialaugment").ops == list(A.TRIVIAL_OPS) and (h, w) == (32, 26)
