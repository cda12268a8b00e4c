"""The frozen teacher of kd and fitnets: network 0's weights from an IL run folder, its checkpoint.pt, or a
`clcli export` file (`kd.teacher`)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clcli import methods
from clcli.errors import ClcliError, one_line


def teacher_state(source: str, name: str) -> dict[str, torch.Tensor]:
    """Weights of network 0 (`name`) from an IL run folder, its checkpoint.pt, or a `clcli export` file."""
    from clcli.run import CHECKPOINT, Run, load_checkpoint

    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        from clcli import load

        net = load(str(path))
        manifest = net.clcli_manifest
        if manifest["mkb_halves"]:
            raise ClcliError(f"teacher {path} carries MKB halves; export the teacher from an IL run")
        if manifest["model"] != name:
            raise ClcliError(f"teacher {path} is a {manifest['model']}, network 0 of this cohort is {name}")
        return net.state_dict()
    run_dir = path if path.is_dir() else path.parent
    ckpt = path if path.is_file() else path / CHECKPOINT
    if (run_dir / "run.json").is_file():
        run = Run.open(run_dir)
        if run.method not in methods.METHODS or methods.uses_mkb(run.method):
            raise ClcliError(f"teacher run {run_dir} is a '{run.method}' run; the teacher must be an IL run")
        if not run.finished:
            raise ClcliError(f"teacher run {run_dir} is not finished ({run.status}); resume it first")
        if run.info["models"][0] != name:
            raise ClcliError(f"teacher run {run_dir} trained {run.info['models'][0]} as network 0, this cohort has "
                             f"{name}")
    elif not path.exists():
        raise ClcliError(f"teacher {path} not found (give an IL run folder, its checkpoint.pt or an exported file)")
    prefix = "cohort.networks.0."
    state = load_checkpoint(ckpt)["method"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_teacher(net: nn.Module, source: str | None, name: str, method: str) -> None:
    """Load the teacher's weights into `net` (network 0 of a method that `needs_teacher`, which freezes it)."""
    if not source:
        raise ClcliError(f"{method} needs a trained teacher for network 0 ({name}): train IL first "
                         f"(clcli train --method il) and pass --set kd.teacher=<that run folder>, or use "
                         f"clcli compare, which does both")
    try:
        net.load_state_dict(teacher_state(source, name), strict=True)
    except RuntimeError as e:
        raise ClcliError(f"teacher {source} does not fit network 0 ({name}): {one_line(e)}") from None
