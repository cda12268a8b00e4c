"""ONNX export of one network as deployed: the timm model with its own MKB halves inside the graph.

`export_onnx(net, manifest, target)` writes whatever network object it is given (the export path builds it: the
run's last weights today), so the file holds exactly what `clcli.load` rebuilds from the split export. The graph
comes from the dynamo exporter (`torch.onnx.export(dynamo=True)`, torch.export then onnxscript): the TorchScript
exporter is deprecated since torch 2.9, and torch.export sees through the MKB hooks and the fx-rewritten forward
alike. Opset 18, the exporter's own. The batch axis is dynamic; the input size is fixed (what the network was
trained at and what its position tables and MKB shapes are made for).

A graph over protobuf's 2 GiB (a large network's weights and the constants the exporter adds) is written with ONNX's
external data: the graph in `<name>.onnx`, its weights in `<name>.onnx.data` beside it, the two renamed into place
together (the data first).

Before the file appears, ONNX's checker runs on it and ONNX Runtime's outputs on a fixed batch are compared with
PyTorch's: a difference over the tolerance is an error and nothing is written.

The file's metadata (`metadata_props`) carries, as JSON strings, what a runtime needs to prepare images (`model`,
`input_size` [H, W], `mean`, `std`, `class_names`, `input_layout`) and, under `clcli`, the split export's manifest
(recipe, cohort, MKB halves, test accuracy) with this file's format and the check's numbers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from clcli import files
from clcli.errors import ClcliError, one_line

ONNX_FORMAT = "clcli.onnx"  # an ONNX export's manifest: its format name and version
ONNX_FORMAT_VERSION = 1
OPSET = 18
ONNX_META_KEY = "clcli"  # the metadata_props entry that holds the manifest
# Written beside the manifest for runtimes other than clcli; clcli reads them too (predict needs nothing else).
PREPROCESSING_KEYS = ("model", "input_size", "mean", "std", "class_names")
INPUT_LAYOUT = "NCHW float32, RGB (grayscale repeated), resized bilinear to input_size, (x/255 - mean) / std"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# ONNX Runtime against PyTorch, both float32 on the CPU: |ort - torch| <= ATOL + RTOL * max|torch| over the batch.
# Kernels differ in summation order and fusions: about 1e-6 of the largest logit (docs/results.md, the zoo sweep).
ATOL, RTOL = 1e-5, 1e-4
CHECK_BATCH, EXAMPLE_BATCH = 4, 2  # the check runs another batch size than the traced one: the axis is really free
PROTOBUF_LIMIT = 2**31 - 1  # bytes: the most one serialised protobuf message (an ONNX file without external data) holds
EXTERNAL_THRESHOLD = 1024  # bytes: with external data, every tensor from this size on goes to the .onnx.data file
PIP = "pip install 'clcli[onnx]'"


def tolerance() -> str:
    """The check's tolerance, in words."""
    return f"|ONNX Runtime - PyTorch| <= {ATOL:g} + {RTOL:g} x the largest |logit|"


def require(*modules: str) -> None:
    """One line with the pip command when an optional ONNX package is missing."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ClcliError(f"ONNX needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                         f"installed: {PIP}")


def export_onnx(net, manifest: dict, target: str | Path) -> dict:
    """Write `net` (a network with its MKB halves) to `target` as ONNX, checked against ONNX Runtime.

    `manifest`: the split export's manifest (at least model, input_size, mean, std, class_names).
    Returns {"onnx_file", "onnx_max_abs_error", "onnx_max_rel_error", "onnx_seconds"}; raises ClcliError with one
    line for a network that cannot be exported (naming the operator or construct) or whose ONNX outputs differ."""
    import torch

    require("onnx", "onnxruntime", "onnxscript")
    target = Path(target)
    start = time.perf_counter()
    was_training = net.training
    net.eval()
    try:
        height, width = manifest["input_size"]
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(EXAMPLE_BATCH, 3, height, width, generator=gen)
        proto = _graph(net, example, manifest["model"])
        batch = torch.randn(CHECK_BATCH, 3, height, width, generator=gen)
        with torch.no_grad():
            expected = net(batch).float().numpy()
    finally:
        net.train(was_training)
    # One file where the graph fits in one protobuf message; over that, ONNX's external data: the weights in
    # `<name>.onnx.data` beside it, which ONNX Runtime and onnx.load find by the path the graph records.
    del proto.metadata_props[:]  # the exporter's: clcli's are appended after the check (_write_metadata)
    serialised = _serialised(proto)  # once: these bytes are what the single file holds
    external = serialised is None
    data_file = data_path(target).name if external else None
    names = [target.name] if data_file is None else [data_file, target.name]
    with files.atomic_files(target.parent, names) as tmp:
        import onnx

        graph_path = tmp / target.name
        if not external:
            graph_path.write_bytes(serialised)
        else:
            onnx.save_model(proto, str(graph_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file, size_threshold=EXTERNAL_THRESHOLD, convert_attribute=True)
        del proto, serialised  # the weights are on disk now; the check loads them again
        errors = _check(graph_path, batch.numpy(), expected, manifest["model"])
        seconds = time.perf_counter() - start
        _write_metadata(graph_path, manifest, errors, seconds, data_file)
    if not external and data_path(target).is_file():  # an earlier export's weights (replaced with --force), orphaned
        data_path(target).unlink()
    result = {"onnx_file": target.name, "onnx_max_abs_error": errors["max_abs_error"],
              "onnx_max_rel_error": errors["max_rel_error"], "onnx_seconds": round(seconds, 2)}
    if data_file is not None:
        result["onnx_data_file"] = data_file
    return result


def data_path(target: str | Path) -> Path:
    """Where the ONNX file `target` keeps its weights when its graph is over 2 GiB (ONNX's external data)."""
    target = Path(target)
    return target.with_name(f"{target.name}.data")


def _serialised(proto) -> bytes | None:
    """The graph as one protobuf message; None where it cannot be one (over protobuf's 2 GiB, or protobuf short of
    memory: upb raises the same EncodeError), where external data, a smaller message, is the way to write it."""
    from google.protobuf.message import EncodeError

    try:
        data = proto.SerializeToString()
    except (EncodeError, ValueError):  # upb's EncodeError; the C++ backend's ValueError over 2 GiB
        return None
    return data if len(data) <= PROTOBUF_LIMIT else None


def _deployed(net):
    """`net` behind a forward with one named tensor argument: a spliced network's forward is a graph taking
    *args, which torch.export cannot give a dynamic batch axis by name."""
    import torch

    class Deployed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.net = inner

        def forward(self, image):
            return self.net(image)

    return Deployed(net).eval()


def _graph(net, example, model: str):
    """The ONNX graph of `net` (an onnx.ModelProto) traced on `example`, the batch axis dynamic."""
    import warnings

    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(_deployed(net), (example,), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={"image": {0: batch}}, external_data=False, optimize=True,
                                        verbose=False, report=False)
        except TimeoutError:  # a caller's time limit (SIGALRM), not the model's fault
            raise
        except Exception as e:  # noqa: BLE001 - torch.export and the ONNX translation raise many types
            raise ClcliError(f"{model} cannot be exported to ONNX: {unsupported(e)}") from None
    return program.model_proto


def unsupported(error: BaseException) -> str:
    """The operator or construct that stopped the exporter, in one line, from its long report."""
    import re

    text = str(error)
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    op = re.search(r"aten[.:]{1,2}[\w.]+", text) or re.search(r"aten[.:]{1,2}[\w.]+", str(root))
    summary = re.search(r"## Exception summary\s*\n\s*\n?(.+)", text)
    if summary:
        line = re.sub(r"^<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], summary.group(1).strip())
    else:
        line = one_line(root)
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if len(line) > 300:
        line = line[:300].rsplit(" ", 1)[0] + " ..."
    if op and op.group(0) not in line:
        return f"operator {op.group(0)} ({line})"
    return line


def _session(path, threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's optimiser notes are not the user's concern
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=list(providers))


def _check(path: Path, batch, expected, model: str) -> dict:
    """onnx.checker on the file, then ONNX Runtime against PyTorch on `batch`; raises on a mismatch."""
    import onnx
    import torch

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - the checker's ValidationError and shape-inference errors
        raise ClcliError(f"{model}: the exported ONNX graph fails onnx.checker ({one_line(e)})") from None
    try:
        got = _session(path, torch.get_num_threads()).run(None, {INPUT_NAME: batch})[0]
    except Exception as e:  # noqa: BLE001 - ORT raises its own types for graphs it cannot run
        raise ClcliError(f"{model}: ONNX Runtime cannot run the exported graph ({one_line(e)})") from None
    errors = compare(got, expected)
    if got.shape != expected.shape or not errors["within_tolerance"]:
        raise ClcliError(f"{model}: ONNX Runtime's outputs differ from PyTorch's on a fixed batch of {len(batch)} "
                         f"(shape {tuple(got.shape)} vs {tuple(expected.shape)}, max abs error "
                         f"{errors['max_abs_error']:.3g}, relative {errors['max_rel_error']:.3g}; tolerance: "
                         f"{tolerance()}); the file is not written")
    return errors


def compare(got, expected) -> dict:
    """Max abs error, relative error (to the largest output) and whether within ATOL + RTOL * max|expected|.
    NaN where PyTorch gives NaN counts as equal (a diverged network is refused before export, not here)."""
    import numpy as np

    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return {"max_abs_error": float("inf"), "max_rel_error": float("inf"), "within_tolerance": False}
    both_nan = np.isnan(got) & np.isnan(expected)
    diff = np.where(both_nan, 0.0, np.abs(got - expected))
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = float(np.max(np.abs(np.where(np.isnan(expected), 0.0, expected)), initial=0.0))
    max_abs = float(diff.max(initial=0.0))
    return {"max_abs_error": max_abs, "max_rel_error": max_abs / scale if scale > 0 else max_abs,
            "within_tolerance": bool(max_abs <= ATOL + RTOL * scale)}


def _write_metadata(path: Path, manifest: dict, errors: dict, seconds: float, data_file: str | None) -> None:
    import onnx
    import torch

    described = dict(manifest, format=ONNX_FORMAT, format_version=ONNX_FORMAT_VERSION,
                     onnx={"exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET, "torch": torch.__version__,
                           "onnx": onnx.__version__, "input": INPUT_NAME, "output": OUTPUT_NAME,
                           "external_data": data_file,
                           "check": {"batch": CHECK_BATCH, "max_abs_error": errors["max_abs_error"],
                                     "max_rel_error": errors["max_rel_error"], "atol": ATOL, "rtol": RTOL},
                           "seconds": round(seconds, 2)})
    props = {k: json.dumps(manifest[k]) for k in PREPROCESSING_KEYS}
    props.update(input_layout=INPUT_LAYOUT, **{ONNX_META_KEY: json.dumps(described)})
    # Appended, not loaded and saved again (a graph of up to 2 GiB): protobuf parses concatenated messages as one,
    # repeated fields (metadata_props) joined and the last producer_name winning.
    model = onnx.ModelProto(producer_name="clcli")
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with open(path, "ab") as f:
        f.write(model.SerializeToString())


def read_onnx_manifest(path: str | Path) -> dict:
    """The clcli manifest in an ONNX file's metadata; one-line errors for damaged, foreign or future files."""
    require("onnx")
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ClcliError(f"no such file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ClcliError(f"{path} is not a readable ONNX file ({one_line(e)})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if ONNX_META_KEY not in props:
        raise ClcliError(f"{path} is not a clcli ONNX export (no '{ONNX_META_KEY}' entry in its metadata); export it "
                         f"with `clcli export RUN --onnx`")
    try:
        manifest = json.loads(props[ONNX_META_KEY])
    except json.JSONDecodeError:
        raise ClcliError(f"{path} has a corrupt clcli manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ONNX_FORMAT:
        raise ClcliError(f"{path} is not a clcli ONNX export (format {manifest.get('format')!r})"
                         if isinstance(manifest, dict) else f"{path} has a corrupt clcli manifest (not a mapping)")
    if manifest.get("format_version") != ONNX_FORMAT_VERSION:
        raise ClcliError(f"{path} has ONNX export format version {manifest.get('format_version')}; this clcli reads "
                         f"version {ONNX_FORMAT_VERSION}")
    return manifest


def load_onnx(path: str | Path, *, device: str = "cpu"):
    """An ONNX export as a torch module running ONNX Runtime (no parameters; CPU tensors in and out, on the CPU or,
    with device cuda, ONNX Runtime's CUDA provider where installed), with `clcli_manifest` like `clcli.load`'s."""
    require("onnxruntime")
    manifest = read_onnx_manifest(path)
    data_file = (manifest.get("onnx") or {}).get("external_data")
    if data_file and not (Path(path).parent / data_file).is_file():
        raise ClcliError(f"{path} keeps its weights in {data_file} beside it, which is missing; copy the two files "
                         f"together")
    return _runtime_module(path, manifest, device)


def _runtime_module(path, manifest: dict, device: str):
    import onnxruntime as ort
    import torch

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    if str(device) != "cpu":
        wanted = {"cuda": "CUDAExecutionProvider"}.get(str(device).split(":")[0])
        if wanted is None or wanted not in ort.get_available_providers():
            raise ClcliError(f"ONNX Runtime here runs on {', '.join(ort.get_available_providers())} only; use "
                             f"--device cpu for {path}")
        providers = (wanted, *providers)
    try:
        session = _session(path, providers=providers)
    except Exception as e:  # noqa: BLE001
        raise ClcliError(f"ONNX Runtime cannot open {path} ({one_line(e)})") from None

    class OnnxRuntimeNetwork(torch.nn.Module):
        """Logits from ONNX Runtime for float image batches, as a module `evaluate` and `predict` can call."""

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.detach().to("cpu", torch.float32).contiguous().numpy()
            return torch.from_numpy(session.run(None, {INPUT_NAME: x})[0])

    net = OnnxRuntimeNetwork().eval()
    net.clcli_manifest = manifest
    return net


__all__ = ["export_onnx", "load_onnx", "read_onnx_manifest", "compare", "unsupported", "require", "tolerance",
           "ATOL", "RTOL", "OPSET"]
