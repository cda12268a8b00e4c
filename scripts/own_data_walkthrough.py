"""Build the folders of docs/own-data.md from the shipped CIFAR-10 subset, so the walkthrough can be re-run.

    python scripts/own_data_walkthrough.py /tmp/walkthrough
    cd /tmp/walkthrough && COLUMNS=100 clcli train --data photos --models resnet10t mobilenetv3_small_050 ...

Writes, deterministically (the first images of each class, in the subset's order):
    photos/<class>/NNN.jpg      60 training photos of each of airplane, frog, ship, truck (32x32 JPEG, quality 95)
    photos/frog/IMG_0042.jpg    a truncated JPEG (reported and skipped)
    photos/ship/notes.txt       a text file (ignored: not an image extension)
    val/<class>/NNN.jpg         25 photos of each class from the test split (for --val)
    new/<class>.jpg             one more unseen test photo per class, plus new/broken.jpg (truncated) and
                                new/readme.txt (not an image)
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

CLASSES = ("airplane", "frog", "ship", "truck")
TRAIN_PER_CLASS = 60
VAL_PER_CLASS = 25


def _jpeg(image_chw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _rows(data, name: str, count: int, skip: int = 0) -> list[int]:
    idx = data.class_names.index(name)
    rows = (data.labels == idx).nonzero().flatten().tolist()[skip:skip + count]
    if len(rows) < count:
        raise SystemExit(f"the shipped subset has too few '{name}' images")
    return rows


def build(root: Path) -> None:
    from clcli.data import QUICKSTART_DIR, load_image_tensors

    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty; give a new folder")
    train = load_image_tensors(str(QUICKSTART_DIR), "train")
    test = load_image_tensors(str(QUICKSTART_DIR), "test")
    for name in CLASSES:
        for folder, data, rows in (("photos", train, _rows(train, name, TRAIN_PER_CLASS)),
                                   ("val", test, _rows(test, name, VAL_PER_CLASS))):
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for k, r in enumerate(rows):
                (root / folder / name / f"{k:03d}.jpg").write_bytes(_jpeg(data.images[r]))
        (root / "new").mkdir(exist_ok=True)
        (root / "new" / f"{name}.jpg").write_bytes(_jpeg(test.images[_rows(test, name, 1, VAL_PER_CLASS)[0]]))
    whole = _jpeg(train.images[0])
    (root / "photos" / "frog" / "IMG_0042.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "photos" / "ship" / "notes.txt").write_text("shot on the harbour wall, 2019\n")
    (root / "new" / "broken.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "new" / "readme.txt").write_text("four photos to classify\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a new folder to build the walkthrough in")
    args = parser.parse_args(argv)
    build(args.root)
    print(f"walkthrough folders written to {args.root}")


if __name__ == "__main__":
    main(sys.argv[1:])
