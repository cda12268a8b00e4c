"""Auto-augmentation and random erasing: timm's policies drawn per image on in-memory uint8 batches and run through
torchvision's public functionals one batched call per distinct draw; timm's transform on streamed splits; timm's
RandomErasing.

Small random batches on the CPU; expected pixels come from torchvision's op on one image at a time, or from timm's own
PIL ops (each op on real images, at every level: tests/test_augment_vs_timm.py)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

import clcli.data as D
from clcli import recipes
from clcli.data import _autoaugment, _stream
from clcli.errors import ClcliError

MEAN = (0.49, 0.48, 0.45)


def images(b=24, c=3, h=20, w=20, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def one_by_one(policy, x, draws, fill) -> torch.Tensor:
    """Each image through torchvision's op for its own draws, one image at a time."""
    fill = [float(v) for v in fill]
    out = []
    for i in range(len(x)):
        image = x[i:i + 1]
        for j in range(policy.slots):
            if not bool(draws["apply"][i, j]):
                continue
            target = policy.call(int(draws["op"][i, j]), float(draws["level"][i, j]), bool(draws["negative"][i, j]),
                                 x.shape[-2], x.shape[-1])
            if target is not None:
                image = _autoaugment.run(target, image, fill)
        out.append(image)
    return torch.cat(out)


@pytest.mark.parametrize("spec", ["rand-m9-n2-mstd0.5", "rand-m7-n3-tweights", "original", "v0", "trivialaugment",
                                  "rand-m15-n2-mmax20-inc1"])  # beyond m10: PosterizeIncreasing keeps 0 bits
def test_each_op_group_equals_torchvisions_op_on_each_of_its_images(spec):
    x = images()
    policy = _autoaugment.Policy(spec)
    draws = policy.draw(len(x), torch.Generator().manual_seed(1))
    fill = _autoaugment.fill_colour(MEAN, 3)
    got = policy.apply(x, draws, fill)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, one_by_one(policy, x, draws, fill))
    assert not torch.equal(got, x)


def test_images_of_one_batch_draw_different_ops():
    # one op a layer, always applied, magnitude 9: every image must be one of the 15 ops (either sign) of timm's set
    x = images(b=32)
    aug = D.BatchAugment("none", auto_augment="rand-m9-n1-p1.0", fill=MEAN)
    got = aug(x, torch.Generator().manual_seed(0))
    policy, fill = aug.policy, [float(v) for v in _autoaugment.fill_colour(MEAN, 3)]
    candidates = {policy.call(op, 9.0, negative, 20, 20)
                  for op in range(len(policy.ops)) for negative in (False, True)} - {None}
    names = set()
    for i in range(len(x)):
        matches = {call[0] for call in candidates
                   if torch.equal(got[i:i + 1], _autoaugment.run(call, x[i:i + 1], fill))}
        assert matches, f"image {i} is no op of the policy"
        names |= matches
    assert len(names) >= 6


def test_the_same_seed_gives_the_same_batch_and_a_part_equals_its_rows_of_the_whole():
    x = images(b=16)
    aug = D.BatchAugment("crop_flip", padding=2, auto_augment="rand-m9-n2-mstd0.5", fill=MEAN)
    whole = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(whole, aug(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(whole, aug(x, torch.Generator().manual_seed(6)))
    parts = [aug(x[k * 4:(k + 1) * 4], torch.Generator().manual_seed(5), (k, 4)) for k in range(4)]
    assert torch.equal(torch.cat(parts), whole)
    # the crop and flip draws come first: without auto-augment the crops are those of plain crop_flip
    plain = D.BatchAugment("crop_flip", padding=2)(x, torch.Generator().manual_seed(5))
    assert not torch.equal(plain, whole)


def test_magnitude_noise_is_drawn_per_image_and_op():
    b = 400
    fixed = _autoaugment.Policy("rand-m5-n2-p1.0").draw(b, torch.Generator().manual_seed(0))
    assert fixed["level"].eq(5).all() and fixed["apply"].all()
    noisy = _autoaugment.Policy("rand-m5-n2-mstd2").draw(b, torch.Generator().manual_seed(0))["level"]
    assert len(noisy.unique()) > b and 1.5 < float(noisy.std()) < 2.5 and noisy.min() >= 0 and noisy.max() <= 10
    uniform = _autoaugment.Policy("rand-m5-n2-mstd101").draw(b, torch.Generator().manual_seed(0))["level"]
    assert uniform.min() >= 0 and uniform.max() <= 5 and 2 < float(uniform.mean()) < 3
    half = _autoaugment.Policy("rand-m5-n2").draw(b, torch.Generator().manual_seed(0))["apply"]  # timm's p0.5
    assert 0.4 < float(half.float().mean()) < 0.6


def test_autoaugment_draws_one_sub_policy_per_image_with_its_probabilities():
    policy = _autoaugment.Policy("original")
    draws = policy.draw(2000, torch.Generator().manual_seed(0))
    timm_policy = timm_aa.auto_augment_transform("original", None).policy
    starts = np.cumsum([0] + [len(s) for s in timm_policy])[:-1]
    sub = np.searchsorted(starts, draws["op"][:, 0].numpy(), side="right") - 1
    assert len(set(sub.tolist())) == len(timm_policy)
    assert (draws["op"][:, 1].numpy() == draws["op"][:, 0].numpy() + 1).all()  # its second op, in order
    # sub-policy 2 is (Equalize p0.8, Equalize p0.6)
    chosen = torch.from_numpy(sub == 2)
    assert abs(float(draws["apply"][chosen, 0].float().mean()) - 0.8) < 0.15
    assert abs(float(draws["apply"][chosen, 1].float().mean()) - 0.6) < 0.15


def pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize("name,level", [("TranslateXRel", 10.0), ("TranslateYRel", 10.0), ("Posterize", 6.0),
                                        ("Solarize", 4.0), ("SolarizeAdd", 7.0), ("Brightness", 3.0),
                                        ("Contrast", 8.0), ("Equalize", 0.0), ("AutoContrast", 0.0),
                                        ("Invert", 0.0), ("SharpnessIncreasing", 6.0)])
@pytest.mark.parametrize("negative", [False, True])
def test_ops_change_an_image_as_timms_pil_ops_do(name, level, negative):
    # 20 px: timm's 0.45 * 20 = 9 px translation at level 10 is whole, so PIL's bilinear resampling is exact
    x = images(b=1)[0]
    policy = _autoaugment.Policy(f"rand-m{int(level)}-n1-p1.0-inc1")
    op = timm_aa.AugmentOp(name, magnitude=level)
    policy.ops = [op]
    # timm's argument as its level function gives it with this sign (held to timm's level_fn in test_augment_vs_timm)
    to_argument = _autoaugment.LEVEL_TO_ARGUMENT[name]
    args = (to_argument(level, -1.0 if negative else 1.0, op.hparams),) if to_argument else ()
    fill = _autoaugment.fill_colour(MEAN, 3)
    expected = tensor(op.aug_fn(pil(x), *args, fillcolor=fill, resample=Image.BILINEAR))
    target = policy.call(0, level, negative, 20, 20)
    got = x[None] if target is None else _autoaugment.run(target, x[None], [float(v) for v in fill])
    # PIL's blends and contrast stretch round through integer tables, torchvision's compute in float: one level apart
    rounding = 1 if name in ("Brightness", "Contrast", "AutoContrast", "SharpnessIncreasing") else 0
    assert int((got[0].int() - expected.int()).abs().max()) <= rounding


def test_the_sign_timm_would_draw_comes_from_the_generator_not_pythons_random():
    policy = _autoaugment.Policy("rand-m9-n2-mstd0.5")
    random.seed(0)
    a = policy.draw(64, torch.Generator().manual_seed(3))
    random.seed(1)
    b = policy.draw(64, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rotate = next(i for i, op in enumerate(policy.ops) if op.name == "Rotate")
    assert policy.call(rotate, 9.0, False, 32, 32) == ("rotate", 27.0)
    assert policy.call(rotate, 9.0, True, 32, 32) == ("rotate", -27.0)


@pytest.mark.parametrize("spec,why", [("foo", "Unknown AA policy"), ("rand-m9-msd0.5", "config section"),
                                      ("augmix-m5", "streamed data only"), ("rand-t3a", "GaussianBlur"),
                                      ("", "null")])
def test_an_unknown_or_unsupported_string_is_one_line(spec, why):
    with pytest.raises(ClcliError) as e:
        D.BatchAugment("crop_flip", auto_augment=spec)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_a_recipe_with_an_unknown_string_stops_before_any_image_is_decoded(tmp_path):
    recipe = recipes.load("quickstart", ["data.auto_augment=rand-m9-bogus1", f"data.source={tmp_path}/nothing"])
    with pytest.raises(ClcliError, match="auto_augment 'rand-m9-bogus1'"):
        D.load_data(recipe, "cpu")
    # what timm runs on PIL images only is fine on a streamed split
    _autoaugment.check("augmix-m5", stream=True)
    with pytest.raises(ClcliError, match="streamed data only"):
        _autoaugment.check("augmix-m5", stream=False)
    for key, value in (("re_mode", "blur"), ("re_prob", "1.5"), ("re_count", "0")):
        with pytest.raises(ClcliError, match=key):
            recipes.load("quickstart", [f"data.{key}={value}"])


def test_a_streamed_posterize_that_keeps_no_bits_makes_the_image_black_instead_of_raising():
    # Pillow 13 refuses ImageOps.posterize(image, 0), which timm's levels reach (AutoAugment v0: ~3 % of images,
    # PosterizeIncreasing at high magnitudes); the in-memory path makes such an image black, as Pillow did before
    import random

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    state = random.getstate()
    random.seed(0)
    try:
        for spec in ("v0", "rand-m9-mstd0.5-inc1"):
            stage = _autoaugment.stream_transform(spec, 32, MEAN)
            posterizes = [op for op in _autoaugment._augment_ops(stage) if op.name.startswith("Posterize")]
            assert posterizes and all(op.aug_fn is _autoaugment._posterize_keeping_none for op in posterizes)
            for _ in range(300):  # v0 drew 0 bits in 89 of 3,000 before
                stage(photo)
    finally:
        random.setstate(state)
    black = _autoaugment._posterize_keeping_none(photo, 0)
    assert black.size == photo.size and not np.asarray(black).any()
    assert np.array_equal(np.asarray(_autoaugment._posterize_keeping_none(photo, 3)),
                          np.asarray(timm_aa.posterize(photo, 3)))


def test_the_streamed_transform_runs_timms_auto_augment_after_todays_crop():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    transform = _stream._transform(True, 24, "rrc_flip", 4, None, "rand-m9-n2-mstd0.5", MEAN)
    names = [type(t).__name__ for t in transform.transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"] and names[-1] == "PILToTensor"
    stage = transform.transforms[2].transforms
    rand = next(t for t in stage if isinstance(t, timm_aa.RandAugment))
    assert rand.num_layers == 2 and {op.magnitude for op in rand.ops} == {9}
    assert {op.magnitude_std for op in rand.ops} == {0.5}
    assert rand.ops[0].kwargs["fillcolor"] == _autoaugment.fill_colour(MEAN, 3)
    out = transform(photo)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
    from torchvision.transforms.v2 import TrivialAugmentWide

    trivial = _stream._transform(True, 24, "crop_flip", 4, None, "trivialaugment", MEAN)
    assert any(isinstance(t, TrivialAugmentWide) for t in trivial.transforms)
    assert trivial(photo).dtype == torch.uint8
    plain = _stream._transform(True, 24, "crop_flip", 4, None)
    assert [type(t).__name__ for t in plain.transforms] == ["Resize", "CenterCrop", "RandomCrop",
                                                            "RandomHorizontalFlip", "PILToTensor"]
    with pytest.raises(ClcliError, match="not an auto-augment timm knows"):
        _stream._transform(True, 24, "rrc_flip", 4, None, "nonsense", MEAN)


def test_random_erasing_is_timms_on_the_normalised_batch():
    cfg = recipes.load("quickstart").data
    assert D.batch_erasing(cfg, "cpu") is None
    cfg = recipes.load("quickstart", ["data.re_prob=1.0", "data.re_count=2"]).data
    erase = D.batch_erasing(cfg, "cpu")
    from timm.data.random_erasing import RandomErasing

    assert isinstance(erase, RandomErasing) and erase.probability == 1.0 and erase.max_count == 2
    x = D.normalize(images(b=8, h=32, w=32), MEAN, (0.25, 0.25, 0.25))
    random.seed(0)
    torch.manual_seed(0)
    a = erase(x.clone())
    random.seed(0)
    torch.manual_seed(0)
    b = erase(x.clone())
    assert torch.equal(a, b)
    erased = (a == 0).all(1) & (x != 0).any(1)  # const mode: every channel 0 inside a box
    assert bool(erased.flatten(1).any(1).all())  # p = 1: a box in every image


def test_a_streamed_epoch_with_auto_augment_is_repeatable_from_seed_and_epoch(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        path = tmp_path / "photos" / "train" / ("cat", "dog")[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 36, 3), dtype=np.uint8)).save(path)
    split = _stream.StreamSplit(str(tmp_path / "photos"), "train", train=True, size=16, augment="flip",
                                auto_augment="rand-m9-n2-mstd0.5", fill=MEAN, workers=1,
                                cache_dir=str(tmp_path / "cache"))
    order = list(torch.arange(12).split(6))

    def epoch(e):
        return torch.cat([x for x, _ in split.epoch_feed(order, seed=0, epoch=e)])

    a = epoch(0)
    assert a.dtype == torch.uint8 and a.shape == (12, 3, 16, 16)
    assert torch.equal(a, epoch(0)) and not torch.equal(a, epoch(1))


def test_the_benchmark_pipeline_augments_normalises_then_erases():
    from clcli.bench import pipeline_batches

    x, labels = images(b=16, h=32, w=32), torch.arange(16)
    plain = pipeline_batches(x, labels, batch_size=8)()[0]
    augmented = pipeline_batches(x, labels, batch_size=8, auto_augment="original")()[0]
    erased = pipeline_batches(x, labels, batch_size=8, auto_augment="original", re_prob=1.0)()[0]
    assert plain.dtype == torch.float32 and plain.shape == (8, 3, 32, 32)
    assert not torch.equal(plain, augmented)
    assert bool(((erased == 0).all(1) & (augmented != 0).any(1)).flatten(1).any(1).all())
