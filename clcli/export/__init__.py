"""Split export: each network of a run on its own, with its MKB halves, as safetensors.

One file per network holds the timm weights under timm's own keys and, under `mkb.`, its encoder, its copy of the
shared space transfer and its decoder at every site: nothing of the other networks. The safetensors header carries
a JSON manifest (key `clcli`) with everything `load()` needs to rebuild the network without the run folder.
No pickle anywhere: checkpoints are read with weights_only=True, exports are safetensors only.
`--onnx` adds one ONNX file per network, its MKB halves inside the graph, checked against ONNX Runtime (`_onnx`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from clcli import files
from clcli.errors import ClcliError, is_out_of_memory, one_line
from clcli.models import network_labels

from . import _onnx
from ._onnx import export_onnx, load_onnx, read_onnx_manifest
from ._onnx import tolerance as onnx_tolerance

# A split export's format name and version, in each file's manifest and in the folder's manifest.json
SPLIT_FORMAT = "clcli.split"
SPLIT_FORMAT_VERSION = 1
SPLIT_META_KEY = "clcli"  # the safetensors header entry that holds a file's manifest
# A --plain file's header: how its images must be prepared (timm does not know: 32 px, small stem, the data's mean and
# std) and its class names, for `clcli predict --model`; timm itself ignores it.
PLAIN_META_KEY = "clcli_plain"
PLAIN_KEYS = ("model", "kwargs", "stem", "input_size", "mean", "std", "class_names")


def _manifest(run, index: int, test_acc: float | None, weights: str = "last") -> dict:
    from clcli import mkb

    info, recipe, plan = run.info, run.recipe, run.plan
    probe_m = plan.models[index]
    halves = [h.to_dict() for h in mkb.half_plans(plan, index, run.fuse)] if run.with_mkb else []
    return {
        "format": SPLIT_FORMAT,
        "format_version": SPLIT_FORMAT_VERSION,
        "model": probe_m.name,
        "network": network_labels(plan.names)[index],
        "kwargs": dict(probe_m.kwargs, num_classes=len(info["class_names"])),
        "stem": probe_m.stem.to_dict() if probe_m.stem else None,
        "input_size": info["input_size"],
        "mean": info["mean"],
        "std": info["std"],
        "class_names": info["class_names"],
        "mkb_halves": halves,
        "method": info["method"],
        "cohort": plan.names,
        "recipe": recipe.to_dict(),
        "versions": info.get("versions", {}),
        "epochs_trained": int(run.state().get("epoch", 0)),
        "weights": weights,  # last, ema (moving average) or best (best epoch on the validation split)
        **({"best_epoch": run.best_epochs()[network_labels(plan.names)[index]]} if weights == "best" else {}),
        "test_acc": test_acc,
    }


def _tensors(state: dict) -> dict:
    # clone: the shared transfer's tensors are shared with the other networks; safetensors wants one owner each
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _measure(net, data) -> float:
    from clcli.evaluation import evaluate

    return evaluate(net, data.test_images, data.test_labels, data.mean, data.std)["top1"]


def _output_paths(names: list[str], out_dir: Path, plain: bool, hub_folder: bool, onnx: bool) -> list[Path]:
    """The files and folders an export writes into `out_dir` (checked before any is written)."""
    paths = [out_dir / f"{n}.safetensors" for n in names]
    if plain:
        paths += [out_dir / f"{n}.timm.safetensors" for n in names]
    if onnx:  # with the weights file a graph over 2 GiB keeps beside it (an earlier export's, too)
        paths += [path for n in names for path in (out_dir / f"{n}.onnx", _onnx.data_path(out_dir / f"{n}.onnx"))]
    if hub_folder:
        paths += [out_dir / f"{n}-hub" for n in names]
    return paths


def _earlier_entries(out_dir: Path) -> list[dict]:
    """The networks that manifest.json of the export folder already lists (read before anything is written)."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return []
    try:
        networks = files.read_json(path, "export manifest").get("networks", [])
    except ClcliError as e:
        raise ClcliError(f"{e}; move it away to export here") from None
    return [e for e in networks if isinstance(e, dict)] if isinstance(networks, list) else []


def export_run(run_dir: str | Path, out_dir: str | Path, *, plain: bool = False, hub_folder: bool = False,
               onnx: bool = False, measure: bool = True, force: bool = False, weights: str = "last",
               log: bool = False) -> dict:
    """Write one safetensors file per network of the run (and optionally timm-only files, Hub folders, ONNX files
    checked against ONNX Runtime): its last weights, their moving average (`weights="ema"`) or its best epoch's
    (`"best"`). With `log`, the files and manifest.json also go to the trackers the run logged to (its MLflow run,
    under `exported/`), checked before anything is exported.

    Nothing is written when any target exists and `force` is off. The folder's manifest.json lists every export
    in it (earlier exports of other networks stay listed), also the files written before a network failed to
    export. Returns this export's {run, method, networks, status, epochs_trained, epochs_planned, logged (the
    files logged)}."""
    import torch
    from safetensors.torch import save_file

    from clcli import tracking
    from clcli.version import __version__
    from clcli.data import load_data
    from clcli.run import Run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if onnx:
        _onnx.require("onnx", "onnxruntime", "onnxscript")
    files.check_output_dir(out_dir, "export folder")
    run = Run.open(run_dir)
    log_files = tracking.file_logger(run.info, "exported") if log else None
    info, cohort = run.info, run.cohort(weights)
    for target in [*_output_paths(cohort.labels, out_dir, plain, hub_folder, onnx), out_dir / "manifest.json"]:
        folder = target.name.endswith("-hub")
        if target.exists() and target.is_dir() != folder:
            raise ClcliError(f"{target} is a {'file' if folder else 'folder'}; move it away to export here")
        if target.exists() and not force and target.name != "manifest.json":
            raise ClcliError(f"{target} already exists; use --force to replace it")
    earlier = _earlier_entries(out_dir)
    data = load_data(run.recipe, torch.device("cpu")) if measure else None
    entries = []
    try:
        for i, (name, net) in enumerate(zip(cohort.labels, cohort.networks)):
            target = out_dir / f"{name}.safetensors"
            acc = _measure(net, data) if data is not None else info.get("test_acc", {}).get(name)
            manifest = _manifest(run, i, acc, weights)
            manifest["clcli_version"] = __version__
            with files.atomic_path(target) as tmp:
                save_file(_tensors(net.state_dict()), str(tmp), metadata={SPLIT_META_KEY: json.dumps(manifest)})
            entry = {"network": name, "model": cohort.names[i], "file": target.name, "sha256": _sha256(target),
                     "test_acc": acc, "run": str(run_dir), "method": info["method"], "weights": weights}
            entries.append(entry)
            if plain:
                entry.update(_export_plain(net, name, manifest, out_dir, data))
            if hub_folder:
                entry["hub_folder"] = _export_hub_folder(net, name, manifest, out_dir)
            if onnx:
                entry.update(_onnx.export_onnx(net, manifest, out_dir / f"{name}.onnx"))
    finally:  # what was written is listed, also when a later network fails to export
        if entries:
            written = {e["file"] for e in entries}
            kept = [e for e in earlier if e.get("file") not in written and (out_dir / str(e.get("file"))).is_file()]
            files.write_json(out_dir / "manifest.json", {"format": SPLIT_FORMAT,
                                                       "format_version": SPLIT_FORMAT_VERSION,
                                                       "networks": kept + entries})
    logged = []
    if log_files is not None:
        logged = [out_dir / e["file"] for e in entries] + [out_dir / "manifest.json"]
        log_files(logged)
    return {"run": str(run_dir), "method": info["method"], "networks": entries, "status": info.get("status"),
            "epochs_trained": int(run.state().get("epoch", 0)), "epochs_planned": run.recipe.train.epochs,
            "logged": [str(path) for path in logged]}


def _plain_state(net) -> dict:
    from clcli import mkb

    return {k: v for k, v in net.state_dict().items() if not k.startswith(mkb.PREFIX + ".")}


def _export_plain(net, name: str, manifest: dict, out_dir: Path, data) -> dict:
    """A timm-only file (the base network without its MKB halves), loadable by timm alone."""
    from safetensors.torch import save_file

    from clcli import models

    target = out_dir / f"{name}.timm.safetensors"
    with files.atomic_path(target) as tmp:
        preprocessing = {k: manifest[k] for k in PLAIN_KEYS}
        save_file(_tensors(_plain_state(net)), str(tmp),
                  metadata={"format": "pt", PLAIN_META_KEY: json.dumps(preprocessing)})
    entry = {"plain_file": target.name}
    if data is not None:
        bare = models.create(manifest["model"], manifest["kwargs"], stem=stem_change(manifest))
        bare.load_state_dict(_plain_state(net))
        entry["plain_test_acc"] = _measure(bare, data)
    return entry


def _export_hub_folder(net, name: str, manifest: dict, out_dir: Path) -> str:
    """A Hugging Face Hub-style folder: config.json + model.safetensors + README.md model card."""
    from safetensors.torch import save_file

    folder = out_dir / f"{name}-hub"
    config = {
        "architecture": manifest["model"],
        "num_classes": len(manifest["class_names"]),
        "num_features": getattr(net, "num_features", None),
        "label_names": manifest["class_names"],
        "pretrained_cfg": {"input_size": [3, *manifest["input_size"]], "mean": manifest["mean"],
                           "std": manifest["std"], "num_classes": len(manifest["class_names"])},
        "clcli": {k: manifest[k] for k in ("kwargs", "stem", "mkb_halves", "method", "cohort")},
    }
    files.write_json(folder / "config.json", config)
    with files.atomic_path(folder / "model.safetensors") as tmp:
        save_file(_tensors(net.state_dict()), str(tmp), metadata={SPLIT_META_KEY: json.dumps(manifest)})
    acc = manifest["test_acc"]
    others = [n for n in network_labels(manifest["cohort"]) if n != name]
    card = f"""---
library_name: clcli
tags: [image-classification, timm, collaborative-learning]
---
# {name} trained with clcli ({manifest['method']})

`{manifest['model']}` from timm, trained together with {', '.join(others)} by collaborative
learning with Mutual Knowledge Bases. This file keeps the network's own MKB half.

- test accuracy (measured at export): {f'{acc:.2f}%' if acc is not None else 'not measured'}
- classes: {', '.join(manifest['class_names'])}
- input: {manifest['input_size'][0]}x{manifest['input_size'][1]}, mean {manifest['mean']}, std {manifest['std']}

```python
import clcli
model = clcli.load("{name}-hub/model.safetensors")
```

Citation: L. Yao, et al., "Beyond Knowledge Distillation: Collaborative Learning for Bidirectional Model
Assistance", IEEE Access, 2018.
"""
    files.write_text(folder / "README.md", card)
    return folder.name


def stem_change(manifest: dict):
    from clcli.models import StemChange

    return StemChange(**manifest["stem"]) if manifest.get("stem") else None


def read_manifest(path: str | Path) -> dict:
    """The clcli manifest of an export file; one-line errors for corrupt, truncated, foreign or future files."""
    path = Path(path)
    return manifest_from_header(path, safetensors_header(path))


def safetensors_header(path: str | Path) -> dict:
    """The string metadata of a safetensors file's header (no tensor is read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ClcliError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        _raise_if_out_of_memory(path, e)
        raise ClcliError(f"{path} is not a readable safetensors file ({one_line(e)})") from None


def _raise_if_out_of_memory(path: Path, error: Exception) -> None:
    # safetensors maps the whole file: under a memory limit that fails like damage would, but the file is fine.
    if is_out_of_memory(error):
        raise ClcliError(f"not enough memory to read {path} ({path.stat().st_size / 2**30:.1f} GiB; "
                         f"{one_line(error)})") from None


def manifest_from_header(path: Path, meta: dict) -> dict:
    """The clcli manifest in a header read by `safetensors_header`, checked."""
    if SPLIT_META_KEY not in meta:
        raise ClcliError(f"{path} is not a clcli export (no '{SPLIT_META_KEY}' manifest in its header)")
    try:
        manifest = json.loads(meta[SPLIT_META_KEY])
    except json.JSONDecodeError:
        raise ClcliError(f"{path} has a corrupt clcli manifest") from None
    if not isinstance(manifest, dict):
        raise ClcliError(f"{path} has a corrupt clcli manifest (not a mapping)")
    if manifest.get("format") != SPLIT_FORMAT:
        raise ClcliError(f"{path} is not a clcli split export (format {manifest.get('format')!r})")
    if manifest.get("format_version") != SPLIT_FORMAT_VERSION:
        raise ClcliError(f"{path} has export format version {manifest.get('format_version')}; this clcli reads "
                         f"version {SPLIT_FORMAT_VERSION}")
    return manifest


def load(path: str | Path, *, device: str = "cpu"):
    """Rebuild an exported network (timm model + its MKB halves) and load its weights strictly."""
    from safetensors.torch import load_file

    from clcli import mkb, models
    manifest = read_manifest(path)
    net = models.create(manifest["model"], manifest["kwargs"], stem=stem_change(manifest))
    halves = [mkb.HalfPlan.from_dict(h) for h in manifest["mkb_halves"]]
    if halves:
        mkb.attach(net, halves)
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        _raise_if_out_of_memory(Path(path), e)
        raise ClcliError(f"{path} is damaged ({one_line(e)})") from None
    models.check_finite(state, str(path))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ClcliError(f"{path} does not match {manifest['model']} ({one_line(e)})") from None
    net.clcli_manifest = manifest
    return net.to(device).eval()


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def load_any(path: str | Path, *, device: str = "cpu"):
    """An export of either kind: a split export rebuilt in PyTorch (`load`), or an ONNX export run by ONNX Runtime
    (`load_onnx`); both carry their manifest as `clcli_manifest`."""
    return load_onnx(path, device=device) if is_onnx(path) else load(path, device=device)


def evaluate_export(path: str | Path, *, recipe: str | None = None, data: str | None = None) -> dict:
    """Test accuracy of an exported network on its own (a split export, or an ONNX export run by ONNX Runtime),
    labels matched to the export's classes by name, images decoded at the export's input size and normalised with
    its mean/std.

    Without `data`: the evaluation images of the recipe stored in the file (or `recipe`), chosen as training chose
    them (so a held-out part of the training images is the same part). With `data` (a folder or hub id): its test
    split, else its validation split, else all of it (a folder with one split is the evaluation set itself).
    Returns {file, model, top1[, top5], images, evaluation, recorded, class_names, per_class (accuracy % per class),
    confusion (rows: true class, columns: predicted)}."""
    import torch

    from clcli import recipes
    from clcli.data import SplitNotFound, evaluation_split, load_data, load_image_tensors, on_classes
    from clcli.evaluation import evaluate, per_class_accuracy

    net = load_any(path)
    manifest = net.clcli_manifest
    rec = recipes.load(recipe) if recipe else recipes.from_dict(manifest["recipe"], str(path))
    height, width = manifest["input_size"]
    if height == width:
        rec.input_size = height
    if data is not None and not rec.data.stream:
        common = dict(image_column=rec.data.image_column, label_column=rec.data.label_column,
                      image_size=rec.data.image_size or rec.input_size)
        try:
            test, split = evaluation_split(data, rec.data, **common)
            evaluation = f"split '{split}' of {data}"
        except SplitNotFound as e:
            if len(e.available) != 1:
                raise ClcliError(f"{data} has no '{rec.data.test_split}' or 'validation' split to evaluate on "
                                 f"(splits: {', '.join(e.available)})") from None
            test = load_image_tensors(data, e.available[0], config=rec.data.config, limit=rec.data.test_limit,
                                      **common)
            evaluation = f"all of {data}"
        images, labels, names = test.images, test.labels, list(test.class_names)
    else:
        if data is not None:
            rec.data.source = data
        loaded = load_data(rec, torch.device("cpu"))
        images, labels, names = loaded.test_images, loaded.test_labels, list(loaded.class_names)
        evaluation = loaded.evaluation
    labels = on_classes(labels, names, list(manifest["class_names"]), what=f"the evaluation images ({evaluation})",
                        lacking=f"{path} was not trained on")
    if hasattr(images, "labels"):  # a streamed split reads its labels from itself
        images.labels = labels
    classes = list(manifest["class_names"])
    acc = evaluate(net, images, labels, manifest["mean"], manifest["std"],
                   topk=(1, 5) if len(classes) > 5 else (1,), num_classes=len(classes))
    confusion = acc.pop("confusion")
    return {"file": str(path), "model": manifest["model"], **acc, "images": len(images), "evaluation": evaluation,
            "recorded": manifest.get("test_acc"), "class_names": classes,
            "per_class": per_class_accuracy(confusion), "confusion": confusion}


__all__ = ["export_run", "evaluate_export", "load", "load_any", "is_onnx", "read_manifest", "export_onnx",
           "load_onnx", "read_onnx_manifest", "onnx_tolerance", "SPLIT_FORMAT_VERSION", "SPLIT_META_KEY"]
