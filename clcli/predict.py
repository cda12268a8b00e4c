"""Classify image files with a trained network: a clcli export (with the preprocessing stored in its manifest; a split
export in PyTorch, an ONNX export through ONNX Runtime) or a plain timm weights file (with timm's own evaluation
transform).

    classifier = load_classifier("exported/resnet18.safetensors")
    for result in predict(classifier, image_files(["img1.jpg", "photos/"]), top=3):
        print(result)   # {"file", "top": [{"class", "index", "prob"}, ...]} or {"file", "error"}

An export is preprocessed exactly as its training images were decoded (`clcli.data.image_pixels`: grayscale or
RGB, bilinear resize to the input size, no crop) and normalised with the stored mean/std.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from clcli.errors import ClcliError, one_line


@dataclass
class Classifier:
    net: object                              # the torch module, in eval mode
    class_names: list[str]
    preprocess: Callable                     # PIL image -> float tensor [3, H, W], normalised
    description: str                         # how the images are preprocessed, in words


def load_classifier(path: str | Path, *, model: str | None = None, device: str = "cpu") -> Classifier:
    """A clcli export (`clcli.load`, or an ONNX export run by ONNX Runtime), or with `model` a plain timm weights
    file (safetensors or checkpoint)."""
    from clcli import export

    path = Path(path)
    if not path.is_file():
        raise ClcliError(f"no such file: {path}")
    if export.is_onnx(path):
        if model is not None:
            raise ClcliError(f"{path} is an ONNX export that names its own model; drop --model")
        net = export.load_onnx(path, device=device)
        return _export_classifier(net, net.clcli_manifest)
    if model is None:
        try:
            manifest = export.read_manifest(path)
        except ClcliError as e:
            raise ClcliError(f"{e}; for a plain timm weights file pass --model NAME") from None
    else:
        meta = _header(path)
        if export.PLAIN_META_KEY in meta:  # `clcli export --plain`: timm weights with clcli's preprocessing
            return _plain_classifier(path, meta, model, device)
        if export.SPLIT_META_KEY not in meta:
            return _timm_classifier(path, model, device)
        manifest = export.manifest_from_header(path, meta)
        if model != manifest["model"]:
            raise ClcliError(f"{path} is a clcli export of '{manifest['model']}', not '{model}'; drop --model")
    return _export_classifier(export.load(path, device=device), manifest)


def _header(path: Path) -> dict:
    """The safetensors header's metadata; empty for any other file (the timm reader decides whether it is a
    checkpoint)."""
    from clcli import export

    try:
        return export.safetensors_header(path)
    except ClcliError:
        return {}


def _plain_classifier(path: Path, meta: dict, model: str, device: str) -> Classifier:
    """A `clcli export --plain` file: the timm network built as trained (input size, stem, classes) and preprocessed
    as its training images were, from the preprocessing written into its header at export."""
    import json

    from clcli import export, models

    try:
        written = json.loads(meta[export.PLAIN_META_KEY])
    except json.JSONDecodeError:
        raise ClcliError(f"{path} has a corrupt '{export.PLAIN_META_KEY}' header") from None
    missing = [k for k in export.PLAIN_KEYS if k not in written]
    if missing:
        raise ClcliError(f"{path} lacks {', '.join(missing)} in its '{export.PLAIN_META_KEY}' header; export it "
                         f"again with this clcli (`clcli export RUN --plain`)")
    if model != written["model"]:
        raise ClcliError(f"{path} holds '{written['model']}' weights, not '{model}'")
    net = models.create(model, written["kwargs"], stem=export.stem_change(written))
    models.load_weights_file(net, model, path)
    return _export_classifier(net.to(device).eval(), written)


def _export_classifier(net, manifest: dict) -> Classifier:
    import torch

    from clcli.data import normalize
    from clcli.data import image_pixels

    height, width = manifest["input_size"]
    mean, std = tuple(manifest["mean"]), tuple(manifest["std"])
    channels = 1 if len(mean) == 1 else 3  # trained on grayscale images: decode as they were, repeat in normalize

    def preprocess(image):
        pixels = torch.from_numpy(image_pixels(image, channels, (width, height)).copy())
        pixels = pixels[None, None] if channels == 1 else pixels.permute(2, 0, 1)[None]
        return normalize(pixels, mean, std, channels=3)[0]

    return Classifier(net, list(manifest["class_names"]), preprocess,
                      f"{width}x{height} (bilinear resize, as in training), mean {_rounded(mean)}, std {_rounded(std)}")


def _timm_classifier(path: Path, name: str, device: str) -> Classifier:
    import timm.data

    from clcli import models

    state = models.read_weights_file(name, path)
    head = sorted(k for k in models.classifier_keys(name) if k.endswith(".weight") and k in state)
    if not head:
        raise ClcliError(f"{path} has no classifier for '{name}' (expected {', '.join(models.classifier_keys(name))})")
    num_classes = int(state[head[0]].shape[0])
    net = models.create(name, {"num_classes": num_classes})
    models.load_weights_file(net, name, path)
    net = net.to(device).eval()
    config = timm.data.resolve_model_data_config(net)
    transform = timm.data.create_transform(**config)
    subset = timm.data.infer_imagenet_subset(net)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        names = [info.index_to_description(i) for i in range(num_classes)]
    else:
        names = [str(i) for i in range(num_classes)]
    return Classifier(net, names, lambda image: transform(image.convert("RGB")),
                      f"timm's evaluation transform for {name}: resize and center crop to "
                      f"{config['input_size'][2]}x{config['input_size'][1]} ({config['interpolation']}, crop "
                      f"{config['crop_pct']}), mean {_rounded(config['mean'])}, std {_rounded(config['std'])}")


def _rounded(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The files named, and inside each folder (recursively, hidden entries skipped, sorted) the files with an image
    extension PIL knows. A named file is kept whatever its extension: it is reported if it is not an image."""
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if not item.is_dir():
            files.append(item)
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(item):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath) / f for f in filenames
                      if not f.startswith(".") and Path(f).suffix.lower() in extensions]
        if not found:
            raise ClcliError(f"no image files in folder {item}")
        files += sorted(found)
    return files


def predict(classifier: Classifier, files: list[Path], *, top: int = 1, batch_size: int = 64) -> Iterator[dict]:
    """One result per file, in order: {"file", "top": [{"class", "index", "prob"}]} or {"file", "error"}."""
    import torch

    from clcli.evaluation import device_of

    if top < 1 or batch_size < 1:
        raise ClcliError(f"--top and --batch-size must be at least 1 (got {top}, {batch_size})")
    k = min(top, len(classifier.class_names))
    device = device_of(classifier.net)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        inputs, errors = [], {}
        for i, path in enumerate(chunk):
            try:
                inputs.append((i, _read(path, classifier.preprocess)))
            except ClcliError as e:
                errors[i] = str(e)
        tops = {}
        if inputs:
            with torch.inference_mode():
                logits = classifier.net(torch.stack([x for _, x in inputs]).to(device))
                probs, indices = logits.float().softmax(dim=1).topk(k, dim=1)
            finite = torch.isfinite(probs).all(dim=1).tolist()
            for (i, _), p, idx, ok in zip(inputs, probs.tolist(), indices.tolist(), finite):
                if not ok:  # overflowing activations: no probability is better than a NaN one
                    errors[i] = "the network's output is not finite for this image (NaN or inf)"
                    continue
                tops[i] = [{"class": classifier.class_names[c], "index": c, "prob": round(q, 6)}
                           for c, q in zip(idx, p)]
        for i, path in enumerate(chunk):
            yield {"file": str(path), "error": errors[i]} if i in errors else {"file": str(path), "top": tops[i]}


def _read(path: Path, preprocess):
    from PIL import Image

    from clcli.data import DECODE_ERRORS

    if not path.exists():
        raise ClcliError("no such file")
    try:
        with Image.open(path) as image:
            return preprocess(image)
    except DECODE_ERRORS as e:
        raise ClcliError(f"not a readable image ({one_line(e)})") from None


__all__ = ["Classifier", "load_classifier", "image_files", "predict"]
