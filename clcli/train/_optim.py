"""The optimiser, its schedule, gradient clipping and mixed precision, built with timm's factories
(`timm.optim.create_optimizer_v2`, `timm.scheduler.create_scheduler_v2`, `timm.utils.dispatch_clip_grad`): what
timm's own train.py does, over the parameter groups of a cohort."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from clcli import mkb
from clcli import run as run_folder
from clcli.cohort import Cohort
from clcli.errors import ClcliError, one_line

from ._callbacks import Callback

SGD_FAMILY = ("sgd", "nesterov", "momentum")
MKB_GROUP = "shared"  # the MKB halves, space transfers, verification heads and methods' own heads


def _network_groups(net: nn.Module, cfg, lr: float, weight_decay: float, name: str) -> list[dict]:
    """Network `net`'s own parameter groups (its MKB half excluded): one group, or timm's groups without weight
    decay on norms and biases (`filter_bias_and_bn`), or timm's layer-decay groups (`layer_decay`, an lr_scale per
    depth that timm's schedulers apply) for a model that defines its layers (timm's `group_matcher`; one that does
    not trains without layer decay, as timm's own factory does)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = set(getattr(net, "no_weight_decay", lambda: set())())
    if cfg.layer_decay is not None and hasattr(net, "group_matcher"):
        groups = param_groups_layer_decay(net, weight_decay=weight_decay, layer_decay=cfg.layer_decay,
                                          no_weight_decay_list=no_decay,
                                          weight_decay_exclude_1d=cfg.filter_bias_and_bn)
    elif cfg.filter_bias_and_bn:
        groups = param_groups_weight_decay(net, weight_decay=weight_decay, no_weight_decay_list=no_decay)
    else:
        groups = [{"params": list(net.parameters()), "weight_decay": weight_decay}]
    mkb_params = {id(p) for n, p in net.named_parameters() if n.startswith(mkb.PREFIX + ".")}
    out = []
    for g in groups:
        params = [p for p in g["params"] if id(p) not in mkb_params]
        if params:
            out.append({**{k: v for k, v in g.items() if k not in ("params", "param_names")}, "params": params,
                        "lr": lr, "name": name})
    return out


def param_groups(method: nn.Module, recipe) -> list[dict]:
    """The optimiser's parameter groups: each network's own weights (its lr and weight decay from
    `train.network_lr` / `train.network_weight_decay`, split by timm's weight-decay or layer-decay grouping when
    asked), then one group named 'shared' at the base lr and weight decay, without layer decay, for everything else
    the method trains: the MKB halves, the shared space transfers, the verification heads, FitNets regressors, WEL
    heads."""
    cfg = recipe.train
    cohort: Cohort = method.cohort
    unknown = sorted((set(cfg.network_lr) | set(cfg.network_weight_decay)) - set(cohort.labels))
    if unknown:
        raise ClcliError(f"train.network_lr / train.network_weight_decay name '{unknown[0]}', which is not a network "
                         f"of this cohort ({', '.join(cohort.labels)})")
    groups: list[dict] = []
    for net, name in zip(cohort.networks, cohort.labels):
        groups += _network_groups(net, cfg, cfg.network_lr.get(name, cfg.lr),
                                  cfg.network_weight_decay.get(name, cfg.weight_decay), name)
    seen = {id(p) for g in groups for p in g["params"]}
    shared = [p for p in method.parameters() if id(p) not in seen]
    if shared:
        groups.append({"params": shared, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": MKB_GROUP})
    return groups


def create_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """timm's optimiser `train.opt` over `groups` (each with its own lr and weight decay)."""
    from timm.optim import create_optimizer_v2, get_optimizer_info

    info = get_optimizer_info(cfg.opt)
    kwargs: dict = {}
    if cfg.opt.lower().split("_")[-1] in SGD_FAMILY:
        kwargs["nesterov"] = cfg.nesterov and cfg.momentum > 0  # the recipe decides, not the optimiser's name
    if cfg.opt_eps is not None and info.has_eps:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None and info.has_betas:
        kwargs["betas"] = tuple(cfg.opt_betas)
    try:
        return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **kwargs)
    except (ValueError, TypeError, ImportError) as e:
        raise ClcliError(f"train.opt {cfg.opt}: {one_line(e)}") from None


def create_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int):
    """timm's schedule `train.schedule`, stepped per update (`step_update`); 'plateau' steps per epoch on the
    evaluation accuracy (mode max), as timm's plateau schedule only can."""
    from timm.scheduler import create_scheduler_v2

    epochs, decay_epochs = cfg.epochs, cfg.decay_epochs
    if decay_epochs is None:
        decay_epochs = max(epochs / 3, 1)
    milestones = list(cfg.decay_milestones) or [int(epochs * 0.5), int(epochs * 0.75)]
    # timm's epoch count is the schedule's length with the cool-down after it: the run's epochs include both.
    # timm warns that its plateau schedule's own state_dict leaves out the metric's state: `Optimisation.state`
    # saves that state (the wrapped torch scheduler's) itself, so a resumed plateau run is exact.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.schedule, num_epochs=max(epochs - cfg.cooldown_epochs, 1),
            decay_epochs=decay_epochs, decay_milestones=milestones, cooldown_epochs=cfg.cooldown_epochs,
            patience_epochs=cfg.plateau_patience, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, plateau_mode="max",
            step_on_epochs=cfg.schedule == "plateau", updates_per_epoch=steps_per_epoch)
    return scheduler


def mixed_precision(device: torch.device, enabled: bool):
    """(autocast on?, its dtype, GradScaler or None): bf16 autocast on CUDA where the GPU computes bf16 natively
    (Ampere and later), else fp16 with a gradient scaler; nothing on other devices. torch counts emulated bf16 as
    supported by default: a V100 or T4 would get it, slow and without the scaler's overflow checks."""
    amp = device.type == "cuda" and enabled
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return amp, dtype, torch.amp.GradScaler("cuda") if amp and dtype == torch.float16 else None


def speed_settings(device: torch.device) -> None:
    """What a GPU user expects of training on CUDA (process-wide; nothing on other devices): cuDNN times its
    convolution kernels for the batch's fixed shapes once and keeps the fastest (`cudnn.benchmark`), and float32
    matmuls and convolutions (what autocast leaves in float32, or everything with train.amp off) run on TF32 tensor
    cores (Ampere and later)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


class Optimisation:
    """timm's optimiser over the method's parameter groups, timm's schedule, gradient clipping, mixed precision;
    restored from a checkpoint on resume."""

    def __init__(self, method, recipe, steps_per_epoch: int, device: torch.device):
        cfg = self.cfg = recipe.train
        groups = param_groups(method, recipe)
        self.optimizer = create_optimizer(groups, cfg)
        self.scheduler = create_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.on_metric = cfg.schedule == "plateau"  # stepped per epoch on the evaluation accuracy
        speed_settings(device)
        amp, amp_dtype, self.scaler = mixed_precision(device, cfg.amp)
        self.autocast = (amp, amp_dtype)
        # Each network's own parameters, its MKB half included (its MKB half trains in the 'shared' lr group).
        own = {name: [p for n, p in net.named_parameters() if not mkb.is_shared(n)]
               for net, name in zip(method.cohort.networks, method.cohort.labels)}
        owned = {id(p) for params in own.values() for p in params}
        # What the networks share (space transfers, verification heads, methods' own heads), summed over the
        # processes under per-network placement; frozen parameters (mkb-solo's verification heads) have no gradient.
        self.shared = [p for p in method.parameters() if p.requires_grad and id(p) not in owned]
        # Clipping is per network, its MKB half included, and once for the shared parameters, as timm clips one
        # model: one network's large gradients never shrink another's, and per-network placement clips exactly what
        # one process would.
        self.clip_sets = [*own.values(), self.shared]

    @property
    def lr(self) -> float:
        """The largest lr of the groups (with layer decay, the head's: lower layers have a fraction of it)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def before_step(self, global_step: int) -> None:
        """The schedule's lr for update `global_step` (from the update count alone, so a resumed run gets the same)."""
        if not self.on_metric:
            self.scheduler.step_update(num_updates=global_step)

    def clip(self) -> None:
        """timm's gradient clipping (train.clip_grad, train.clip_mode) of each network's parameters and of the shared
        group, on unscaled gradients under fp16."""
        if self.cfg.clip_grad is None:
            return
        from timm.utils import dispatch_clip_grad

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        for params in self.clip_sets:
            dispatch_clip_grad([p for p in params if p.grad is not None], value=self.cfg.clip_grad,
                               mode=self.cfg.clip_mode)

    def restore(self, method, state: dict | None) -> int:
        """Load a checkpoint into the method and the optimiser; returns the epoch to start from."""
        if state is None:
            return 0
        method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.on_metric and "plateau" in state:
            self.scheduler.lr_scheduler.load_state_dict(state["plateau"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        method.load_task_state(state)
        return int(state["epoch"])

    def state(self, method, epoch: int) -> dict:
        return {"version": run_folder.RUN_FORMAT, "epoch": epoch, "method": method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                **({"plateau": self.scheduler.lr_scheduler.state_dict()} if self.on_metric else {}),
                **method.task_state()}


class PlateauSchedule(Callback):
    """train.schedule plateau: stepped at each epoch's end on the accuracy the evaluation parts watch (mean over the
    networks; validation where a validation split is kept)."""

    def on_epoch_end(self, loop, end) -> None:
        loop.optimisation.scheduler.step(end.epoch + 1, end.watched)
