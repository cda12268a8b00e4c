"""KD: knowledge distillation (Hinton et al. 2015), the paper's DL(1 -> 2). Network 0 is the teacher, trained
before (an IL run) and frozen here; every other network is a student:

    L_i = (1 - w) * CE(z_i, y) + w * T^2 * KL(softmax(z_0 / T) || softmax(z_i / T))

The teacher runs in eval mode without gradients, so its weights and BN statistics stay exactly as loaded and its
test accuracy row is the IL one. The loop never sets `batch.active` for methods without MKBs (siamese input only).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clcli.errors import ClcliError, one_line

from ._base import Batch, Method, register


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), F.softmax(teacher.float() / t, dim=1),
                    reduction="batchmean") * (t * t)


def teacher_state(source: str, name: str) -> dict[str, torch.Tensor]:
    """Weights of network 0 (`name`) from an IL run folder, its checkpoint.pt, or a `clcli export` file."""
    from clcli import methods
    from clcli.train import _run

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
    ckpt = path if path.is_file() else path / _run.CHECKPOINT
    if (run_dir / "run.json").is_file():
        info = _run.read_json(run_dir / "run.json")
        if info["method"] not in methods.METHODS or methods.uses_mkb(info["method"]):
            raise ClcliError(f"teacher run {run_dir} is a '{info['method']}' run; the teacher must be an IL run")
        if info.get("status") != "finished":
            raise ClcliError(f"teacher run {run_dir} is not finished ({info.get('status')}); resume it first")
        if info["models"][0] != name:
            raise ClcliError(f"teacher run {run_dir} trained {info['models'][0]} as network 0, this cohort has {name}")
    elif not path.exists():
        raise ClcliError(f"teacher {path} not found (give an IL run folder, its checkpoint.pt or an exported file)")
    prefix = "cohort.networks.0."
    state = _run.load_checkpoint(ckpt)["method"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_teacher(net: nn.Module, source: str | None, name: str, method: str) -> None:
    """Load the teacher's weights into `net` and freeze it (no gradients; eval mode is kept by the method)."""
    if not source:
        raise ClcliError(f"{method} needs a trained teacher for network 0 ({name}): train IL first "
                         f"(clcli train --method il) and pass --set kd.teacher=<that run folder>, or use "
                         f"clcli compare, which does both")
    try:
        net.load_state_dict(teacher_state(source, name), strict=True)
    except RuntimeError as e:
        raise ClcliError(f"teacher {source} does not fit network 0 ({name}): {one_line(e)}") from None
    net.requires_grad_(False)
    net.eval()


@register("kd")
class KnowledgeDistillation(Method):
    recipe_sections = ("kd",)

    def __init__(self, cohort, recipe):
        super().__init__(cohort, recipe)
        if len(cohort.networks) < 2:
            raise ClcliError(f"{self.name} needs a teacher and at least one student: give 2 or more models")
        if not 0.0 <= recipe.kd.weight <= 1.0:
            raise ClcliError(f"kd.weight must be between 0 and 1, got {recipe.kd.weight}")
        load_teacher(cohort.networks[0], recipe.kd.teacher, cohort.names[0], self.name)

    @property
    def teacher(self) -> nn.Module:
        return self.cohort.networks[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: BN statistics never move
        return self

    def forward(self, batch: Batch) -> dict:
        cfg = self.recipe.kd
        self.teacher.eval()
        with torch.no_grad():
            t = self.teacher(batch.images[0])
        logits = [t] + [net(x) for net, x in zip(self.cohort.networks[1:], batch.images[1:])]
        parts: dict[str, torch.Tensor] = {"0/cls": F.cross_entropy(t, batch.targets[0])}
        total = 0.0
        for i in range(1, len(logits)):
            cls = F.cross_entropy(logits[i], batch.targets[i])
            kd = distillation_loss(logits[i], t, cfg.temperature)
            parts[f"{i}/cls"], parts[f"{i}/kd"] = cls, kd
            total = total + (1.0 - cfg.weight) * cls + cfg.weight * kd
        return {"loss": total, "logits": logits, "parts": parts}
