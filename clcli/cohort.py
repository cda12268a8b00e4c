"""The cohort: the networks trained together, their MKB halves (hooked inside each network) and the
training-only verification heads."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from clcli import mkb, models


class Cohort(nn.Module):
    def __init__(self, networks: list[nn.Module], names: list[str], verifiers: nn.ModuleDict | None = None,
                 plan=None):
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.names = names  # timm model names
        self.labels = models.network_labels(names)  # unique, even when a model appears twice
        self.verifiers = verifiers if verifiers is not None else nn.ModuleDict()
        self.plan = plan  # the probe plan the cohort was built from (methods such as FitNets read its taps)
        # train.placement per-network: the one network this process runs (its rank); None: all of them.
        self.local: int | None = None

    @property
    def indices(self) -> list[int]:
        """The networks this process runs: all, or its own one (train.placement: per-network)."""
        return list(range(len(self.networks))) if self.local is None else [self.local]

    def forward(self, images: list[torch.Tensor], active: int | None = None) -> list[torch.Tensor | None]:
        """Logits of every network (None for a network another process runs). In iterative training only `active`
        builds a graph; the frozen networks run without gradients and with their BN statistics restored afterwards,
        so that the step leaves them as they were."""
        out: list[torch.Tensor | None] = []
        for i, (net, x) in enumerate(zip(self.networks, images)):
            if self.local is not None and i != self.local:
                out.append(None)
            elif active is None or active == i:
                out.append(net(x))
            else:
                with torch.no_grad(), _frozen_buffers(net):
                    out.append(net(x))
        return out

    def embeddings(self) -> dict[str, list[torch.Tensor]]:
        """{site: [embedding of each network]} from the last forward. With one network per process the others'
        come from their processes (an all_gather that back-propagates to each owner)."""
        if self.local is not None:
            from torch.distributed.nn.functional import all_gather

            return {site: list(all_gather(e)) for site, e in mkb.embeddings(self.networks[self.local]).items()}
        per_net = [mkb.embeddings(net) for net in self.networks]
        return {site: [e[site] for e in per_net] for site in (per_net[0] if per_net else {})}


def _blank_image(cohort: Cohort, i: int, device) -> torch.Tensor:
    """One all-zero image of network i's input size and channels."""
    return torch.zeros(1, cohort.plan.models[i].kwargs.get("in_chans", 3), *cohort.plan.input_size, device=device)


def _eval_forward(net: nn.Module, x: torch.Tensor) -> None:
    """One forward in eval mode without gradients, the network's mode restored: no statistics or random state
    change."""
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        net.train(was_training)


def check_networks_run(cohort: Cohort, device) -> None:
    """Each network once on a blank image before any training: a model that fails at this input size (a position
    table indexed past its end, which the meta-device probe cannot see) is a one-line error, not a traceback from
    inside the first step."""
    import traceback
    from pathlib import Path

    clcli_root = Path(__file__).resolve().parent
    input_size, stem = tuple(cohort.plan.input_size), cohort.plan.stem
    for i in cohort.indices:
        try:
            _eval_forward(cohort.networks[i], _blank_image(cohort, i, device))
        except Exception as e:  # noqa: BLE001 - the model's own failure, quoted; clcli's own bugs are re-raised
            where = traceback.extract_tb(e.__traceback__)[-1]
            if Path(where.filename).resolve().is_relative_to(clcli_root):
                raise
            raise models.input_size_error(cohort.names[i], input_size, e, stem=stem,
                                          where=f"{Path(where.filename).name}:{where.lineno}") from None


def enable_grad_checkpointing(cohort: Cohort, device="cpu") -> None:
    """timm's gradient checkpointing in every network (train.grad_checkpointing): blocks keep only their inputs and
    run again in the backward pass, so activation memory drops for about a third more compute. The MKB and recorder
    hooks run again with them; a BatchNorm inside a re-run block updates its running statistics twice (as in timm).
    Called after the method has hooked in what it records: a model whose checkpointing would skip a hooked module
    (it calls blocks directly, not the module holding the hook) is refused, never trained without its MKB."""
    from clcli.errors import ClcliError, one_line
    from clcli.tracing import is_spliced

    for i in cohort.indices:
        name, net = cohort.names[i], cohort.networks[i]
        if is_spliced(net):
            # The spliced graph was traced without checkpointing: the flag would change nothing.
            raise ClcliError(f"{name}: train.grad_checkpointing does not apply to a network whose MKBs are spliced "
                             "into its graph (fx); use train.accumulate to save memory instead")
        x = _blank_image(cohort, i, device)
        before = _hooked_modules_run(net, x)
        try:
            net.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as e:
            raise ClcliError(f"{name} does not support train.grad_checkpointing ({one_line(e)}); "
                             "use train.accumulate to save memory instead") from None
        skipped = sorted(before - _hooked_modules_run(net, x))
        if skipped:
            net.set_grad_checkpointing(False)
            raise ClcliError(f"{name}: with train.grad_checkpointing the model no longer runs {skipped[0]}, where "
                             "clcli hooks in; use train.accumulate to save memory instead")


def _hooked_modules_run(net: nn.Module, x: torch.Tensor) -> set[str]:
    """The names of the modules with forward hooks that one eval-mode forward of `x` runs."""
    ran: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda *_, name=name: ran.add(name))
               for name, m in net.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    try:
        _eval_forward(net, x)
    finally:
        for h in handles:
            h.remove()
    return ran


def compile_networks(cohort: Cohort) -> None:
    """torch.compile each network in place (train.compile), its MKB halves inside the compiled forward.

    Dynamo does not guard on module hooks by default, and the MKB halves are hooks: a CL network would reuse the
    graph captured for an IL network of the same class in the same process (IL then CL, as `clcli train` runs a
    recipe's methods), without its MKB. Guarding on hooks makes each differently hooked network its own graph."""
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    for net in cohort.networks:
        net.compile()


def _own_buffers(net: nn.Module) -> list[torch.Tensor]:
    # The shared space transfer is updated by the active network too, so its statistics are not the frozen one's.
    return [b for name, b in net.named_buffers() if not mkb.is_shared(name)]


@contextmanager
def _frozen_buffers(net: nn.Module):
    saved = [b.clone() for b in _own_buffers(net)]
    try:
        yield
    finally:
        for b, s in zip(_own_buffers(net), saved):
            b.copy_(s)


def build_cohort(plan, *, num_classes: int, seed: int, with_mkb: bool, fuse: str = "mul",
                 shared_transfer: bool = True, pretrained: bool = False, weights: dict | None = None) -> Cohort:
    """Build every network of `plan` (the same initial weights for a given seed, with or without MKBs), then the
    MKBs (from their own seed, so IL and CL start from identical networks). `shared_transfer=False` gives each
    network its own space transfer (the paper's "MKB w/o CL" baseline). Starting weights: `weights[name]` (a local
    file), else timm's pretrained weights when `pretrained`, else random (see `models.create`)."""
    networks = []
    for i, probe in enumerate(plan.models):
        torch.manual_seed(seed * 1000 + i)
        kwargs = dict(probe.kwargs, num_classes=num_classes)
        networks.append(models.create(probe.name, kwargs, stem=probe.stem, pretrained=pretrained,
                                      weights_file=(weights or {}).get(probe.name)))
    verifiers = nn.ModuleDict()
    if with_mkb:
        torch.manual_seed(seed * 1000 + 999)
        transfers: dict = {}
        for i, net in enumerate(networks):
            mkb.attach(net, mkb.half_plans(plan, i, fuse), transfers if shared_transfer else {})
        for i, site in enumerate(plan.sites):
            verifiers[mkb.site_name(i)] = nn.Linear(site.mkb.embedding, num_classes)
    return Cohort(networks, [m.name for m in plan.models], verifiers, plan)
