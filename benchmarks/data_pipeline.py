"""Is the data pipeline fast enough to never starve training?

Measures, in one process and on one device, the images/s of
  * the pipeline of the training loop: epoch index -> gather uint8 batch -> BatchAugment('crop_flip') -> normalize,
  * one training step of a small timm model (forward + backward + SGD step) on batches of the same shape,
and prints their ratio. Goal: the pipeline produces at least 10x what a training step consumes.
Also reports decode time of the split and the cache-hit reload time (their ratio is the cache's speed-up).

    python benchmarks/data_pipeline.py [--model resnet10t] [--batch-size 128] [--device cpu] [--json]

With --augmentations it times the pipeline alone (no training step) once per augmentation setting, in alternating
rounds: none, crop_flip, and crop_flip with each of RandAugment (rand-m9-n2-mstd0.5, and rand-m9-n2 without
magnitude noise), TrivialAugment, AutoAugment (original) and random erasing (re_prob 0.25); images/s and the ratio to
plain crop_flip.

    python benchmarks/data_pipeline.py --augmentations [--image-size 224 --limit 512] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

GOAL = 10.0
# (name, data.augment, data.auto_augment, data.re_prob)
AUGMENTATIONS = [
    ("none", "none", None, 0.0),
    ("crop_flip", "crop_flip", None, 0.0),
    ("+ rand-m9-n2-mstd0.5", "crop_flip", "rand-m9-n2-mstd0.5", 0.0),
    ("+ rand-m9-n2", "crop_flip", "rand-m9-n2", 0.0),  # no magnitude noise: fewer distinct draws, fewer calls
    ("+ trivialaugment", "crop_flip", "trivialaugment", 0.0),
    ("+ original", "crop_flip", "original", 0.0),
    ("+ re_prob 0.25", "crop_flip", None, 0.25),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="dataset folder (default: the shipped quickstart subset)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=None, help="resize on decode (default: native size)")
    parser.add_argument("--augment", default="crop_flip")
    parser.add_argument("--auto-augment", default=None, help="data.auto_augment (e.g. rand-m9-n2-mstd0.5)")
    parser.add_argument("--re-prob", type=float, default=0.0, help="data.re_prob (random erasing)")
    parser.add_argument("--augmentations", action="store_true",
                        help="time the pipeline alone for each augmentation setting (no training step)")
    parser.add_argument("--limit", type=int, default=None, help="first n images of the split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (at least): each is --pipeline-batches "
                        "pipeline batches then one training step")
    parser.add_argument("--pipeline-batches", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cache-dir", default=None, help="clcli cache root (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    import timm
    import torch

    import clcli.data as D
    from clcli.bench import pipeline_batches, time_steps

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    source = args.data or str(D.QUICKSTART_DIR)
    with tempfile.TemporaryDirectory(prefix="clcli-bench-") as tmp:
        cache_dir = args.cache_dir or tmp
        t0 = time.perf_counter()
        data = D.load_image_tensors(source, args.split, image_size=args.image_size, cache_dir=cache_dir,
                                    limit=args.limit)
        load_first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = D.load_image_tensors(source, args.split, image_size=args.image_size, cache_dir=cache_dir,
                                    limit=args.limit)
        load_hit_s = time.perf_counter() - t0

    images, labels = data.images.to(device), data.labels.to(device)
    n, c, h, w = images.shape
    bs = min(args.batch_size, n)
    if args.augmentations:
        return augmentations(images, labels, bs, device, args, source)
    next_batch = pipeline_batches(images, labels, batch_size=bs, augment=args.augment,
                                  auto_augment=args.auto_augment, re_prob=args.re_prob)

    def pipeline_round():
        for _ in range(args.pipeline_batches):
            next_batch()

    model = timm.create_model(args.model, pretrained=False, num_classes=len(data.class_names)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x_fixed, y_fixed = next_batch()  # train on a ready batch: this side measures consumption only

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x_fixed), y_fixed).backward()
        optimizer.step()

    # alternating rounds, as the training loop alternates: both sides see the same (possibly busy) machine
    times = time_steps({"pipeline": pipeline_round, "train": train_step}, device, min_rounds=args.rounds,
                       min_seconds=args.seconds)
    pipe_s = statistics.median(times["pipeline"]["wall"]) / args.pipeline_batches
    train_s = statistics.median(times["train"]["wall"])
    rounds = len(times["train"]["wall"])

    pipeline_ips = bs / pipe_s
    train_ips = bs / train_s
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "data": source, "split": args.split,
        "images": n, "shape": [c, h, w], "batch_size": bs, "augment": args.augment,
        "auto_augment": args.auto_augment, "re_prob": args.re_prob, "model": args.model,
        "pipeline_images_per_s": round(pipeline_ips, 1), "pipeline_ms_per_batch": round(pipe_s * 1e3, 3),
        "train_images_per_s": round(train_ips, 1), "train_ms_per_step": round(train_s * 1e3, 2),
        "rounds": rounds, "pipeline_batches_per_round": args.pipeline_batches,
        "ratio": round(pipeline_ips / train_ips, 1), "goal": GOAL, "meets_goal": pipeline_ips / train_ips >= GOAL,
        "decode_s": round(load_first_s, 3), "cache_hit_s": round(load_hit_s, 4),
        "cache_speedup": round(load_first_s / max(load_hit_s, 1e-9), 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"data      {source} [{args.split}]  {n} x {c}x{h}x{w}, batch {bs}, {device}, {result['threads']} threads")
        print(f"decode    {load_first_s:.3f} s first load, {load_hit_s:.4f} s cache hit ({result['cache_speedup']}x)")
        extra = "".join(f", {x}" for x in (args.auto_augment, args.re_prob and f"re_prob {args.re_prob}") if x)
        print(f"pipeline  {pipeline_ips:12,.0f} images/s  ({pipe_s * 1e3:.3f} ms/batch: index, {args.augment}"
              f"{extra}, normalize)")
        print(f"train     {train_ips:12,.0f} images/s  ({train_s * 1e3:.1f} ms/step: {args.model} fwd+bwd+SGD)")
        verdict = "meets" if result["meets_goal"] else "BELOW"
        print(f"ratio     {result['ratio']:.1f}x pipeline / train ({verdict} the goal of {GOAL:.0f}x)")
    return result


def augmentations(images, labels, bs: int, device, args, source: str) -> dict:
    """The pipeline's images/s for each of AUGMENTATIONS, timed in alternating rounds (one machine state for all),
    and the batched torchvision calls an auto-augment makes per batch (over 50 batches)."""
    import torch

    from clcli.bench import pipeline_batches, time_steps
    from clcli.data import BatchAugment

    def rounds_of(next_batch):
        def one_round():
            for _ in range(args.pipeline_batches):
                next_batch()
        return one_round

    steps = {name: rounds_of(pipeline_batches(images, labels, batch_size=bs, augment=augment, auto_augment=policy,
                                              re_prob=re_prob))
             for name, augment, policy, re_prob in AUGMENTATIONS}
    times = time_steps(steps, device, min_rounds=args.rounds, min_seconds=args.seconds, warmup=1)
    rate = {name: bs * args.pipeline_batches / statistics.median(t["wall"]) for name, t in times.items()}
    calls = {}  # batched torchvision calls per batch: one per distinct (op, magnitude) an op slot drew
    for name, augment, policy, _ in AUGMENTATIONS:
        if policy:
            aug, gen = BatchAugment(augment, auto_augment=policy), torch.Generator(device=device).manual_seed(0)
            for _ in range(50):
                aug(images[torch.randint(len(images), (bs,), generator=gen, device=device)], gen)
            calls[name] = aug.policy.calls / 50
    n, c, h, w = images.shape
    result = {"device": str(device), "threads": torch.get_num_threads(), "data": source, "images": n,
              "shape": [c, h, w], "batch_size": bs, "rounds": len(times["none"]["wall"]),
              "pipeline_batches_per_round": args.pipeline_batches,
              "images_per_s": {name: round(r, 1) for name, r in rate.items()},
              "vs_crop_flip": {name: round(r / rate["crop_flip"], 3) for name, r in rate.items()},
              "calls_per_batch": calls}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"data      {source}  {n} x {c}x{h}x{w}, batch {bs}, {device}, {result['threads']} threads, "
              f"{result['rounds']} rounds of {args.pipeline_batches} batches")
        print(f"{'augmentation':24s} {'images/s':>12s} {'ms/batch':>10s} {'vs crop_flip':>13s} {'calls/batch':>12s}")
        for name, r in rate.items():
            print(f"{name:24s} {r:12,.0f} {bs / r * 1e3:10.2f} {r / rate['crop_flip']:13.3f} "
                  f"{calls[name] if name in calls else '':>12}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
