"""Pictures: the probe plan (`clcli probe --plot`), a run's training curves (`curves.png` in every run folder,
`clcli report`) and compare's accuracy curves. matplotlib (Agg backend) is imported only when a picture is drawn,
so `clcli --help` stays fast.

    probe_png(plan, "probe.png")                        # tap points of each network, MKB sites joined across them
    run_curves_png(["runs/q/il", "runs/q/cl"], "q.png") # per network: train loss parts and test accuracy per epoch
    report(["runs/q"], out=None)                        # the same for `clcli report`: folders expanded, path chosen
    per_class_png(["runs/q/il", "runs/q/cl"], "p.png")  # confusion matrices, per-class accuracy CL minus IL

Every function returns the path written and the picture's (width, height) in pixels.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from clcli import files
from clcli.errors import ClcliError

DPI = 100
WIDTH_IN = 10.0                 # every picture is 1000 px wide
PROBE_ROW_IN, PROBE_TOP_IN = 1.75, 1.0    # inches exact in binary: the picture's height is a whole number of pixels
CURVES_ROW_IN, CURVES_TOP_IN = 2.5, 0.5
# How each loss part is drawn (the part names the methods log: metrics.jsonl "<network index>/<part>").
# Any other part (kd, kl, hint, wel, soft, ...) is drawn dash-dotted.
PART_STYLE = {"cls": "-", "metric": "--", "verification": ":"}
PART_LABEL = {"cls": "classification", "metric": "metric (MKB)", "verification": "verification (MKB)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> tuple[Path, tuple[int, int]]:
    """Write `fig` atomically as PNG at a fixed size (no tight bbox: the size is the figure's)."""
    from PIL import Image

    plt = _pyplot()
    path = Path(path)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
        with Image.open(tmp) as written:
            size = written.size
    plt.close(fig)
    return path, size


# --- the probe plan --------------------------------------------------------------------------------------------

def _site_text(site) -> str:
    spec = site.mkb
    share = " / ".join(f"{100 * h.fraction:.1f}%" for h in spec.halves)
    return (f"MKB {site.size[0]}x{site.size[1]}: code {spec.code_channels}x{spec.code_height}x{spec.code_width} "
            f"(embedding {spec.embedding}), +{share} params")


def probe_png(plan, path: str | Path) -> tuple[Path, tuple[int, int]]:
    """One row per network: its tap points as spatial size against relative depth (0 = input, 1 = head), every cut
    point as a small dot and each stage's tap labelled with its channels. The planned MKB sites are joined across the
    networks in colour, labelled with the MKB's size; the sites ranked lower are joined faintly."""
    plt = _pyplot()
    from matplotlib.patches import ConnectionPatch

    n = len(plan.models)
    fig, axes = plt.subplots(n, 1, sharex=True, squeeze=False,
                             figsize=(WIDTH_IN, PROBE_TOP_IN + PROBE_ROW_IN * n))
    axes = axes[:, 0]
    sizes = sorted({t.height for m in plan.models for t in (m.taps or m.stage_taps)})
    for ax, model in zip(axes, plan.models):
        every = model.taps or model.stage_taps
        ax.scatter([t.depth for t in every], [t.height for t in every], s=6, color="0.75", zorder=1)
        stage = model.stage_taps
        ax.plot([t.depth for t in stage], [t.height for t in stage], "o-", color="0.35", markersize=5, zorder=2)
        for t in stage:
            ax.annotate(f"{t.channels}ch", (t.depth, t.height), textcoords="offset points", xytext=(4, 5),
                        fontsize=7, color="0.25")
        ax.set_yscale("log", base=2)
        ax.set_yticks(sizes, [str(s) for s in sizes], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(min(sizes) / 1.6, max(sizes) * 1.6)
        ax.set_ylabel("size (px)", fontsize=8)
        stem = " (small stem)" if model.stem else ""
        ax.set_title(f"{model.name}{stem}", fontsize=9, loc="left")
        ax.grid(alpha=0.25)
    axes[-1].set_xlim(-0.02, 1.02)
    axes[-1].set_xlabel("relative depth (0 = input, 1 = head)")
    chosen = [id(s.taps) for s in plan.sites]
    colours = plt.get_cmap("tab10")
    handles = []
    for site in reversed(plan.candidates or plan.sites):  # faint first, so the planned sites are drawn on top
        planned = id(site.taps) in chosen
        style = dict(color=colours(chosen.index(id(site.taps))), linewidth=2.2, alpha=0.9, zorder=4) if planned \
            else dict(color="0.5", linewidth=1.0, alpha=0.5, linestyle="--", zorder=3)
        for ax, tap in zip(axes, site.taps):
            ax.scatter([tap.depth], [tap.height], s=60 if planned else 20, facecolors="none",
                       edgecolors=style["color"], alpha=style["alpha"], zorder=style["zorder"])
        for (top, a), (bottom, b) in zip(zip(axes, site.taps), zip(axes[1:], site.taps[1:])):
            fig.add_artist(ConnectionPatch((a.depth, a.height), (b.depth, b.height), "data", "data", axesA=top,
                                           axesB=bottom, **style))
        if planned:
            handles.append(plt.Line2D([], [], color=style["color"], linewidth=2.2, label=_site_text(site)))
    if len(plan.candidates) > len(plan.sites):
        handles.append(plt.Line2D([], [], color="0.55", linestyle="--", alpha=0.5,
                                  label=f"{len(plan.candidates) - len(plan.sites)} site(s) ranked lower"))
    h, w = plan.input_size
    fig.suptitle(f"MKB plan: input {h}x{w}, stem {plan.stem}", x=0.01, ha="left", fontsize=11)
    fig.legend(handles=handles, loc="upper right", fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.75 / fig.get_figheight(),
                        top=1 - PROBE_TOP_IN / fig.get_figheight(), hspace=0.45)
    return _save(fig, path)


# --- training curves of run folders ----------------------------------------------------------------------------

def _run_series(run_dir: Path) -> dict:
    """{method, networks, epochs: {network: [epoch numbers]}, acc: {network: [...]}, parts: {network: {part: [...]}}}
    from a run folder's run.json and metrics.jsonl. A step record holds each part's mean over the epoch so far, so the
    last step record of an epoch holds the epoch's mean."""
    from clcli.models import network_labels
    from clcli.run import Run

    run = Run.open(run_dir)
    info = run.info
    names = network_labels(list(info["models"]))
    last_step: dict[int, dict] = {}
    epochs = []
    for record in run.metrics():
        if record.get("type") == "step":
            last_step[int(record["epoch"])] = record
        elif record.get("type") == "epoch":
            epochs.append(record)
    acc = {n: [float(r["test_acc"][n]) for r in epochs] for n in names}
    # train.ema_decay: the moving average's test accuracy beside the live weights' (epochs that recorded it)
    ema = {n: [(int(r["epoch"]) + 1, float(r["ema_test_acc"][n])) for r in epochs if "ema_test_acc" in r]
           for n in names}
    parts: dict[str, dict[str, list[tuple[int, float]]]] = {n: {} for n in names}
    for epoch, record in sorted(last_step.items()):
        for key, value in record.items():
            index, sep, part = key.partition("/")
            if sep and index.isdigit() and int(index) < len(names) and part != "train_acc":
                parts[names[int(index)]].setdefault(part, []).append((epoch + 1, float(value)))
    return {"method": info.get("method", "?"), "networks": names, "acc_epochs": [int(r["epoch"]) + 1 for r in epochs],
            "acc": acc, "ema": ema, "parts": parts}


def _run_labels(run_dirs: list[Path], series: list[dict]) -> list[str]:
    """A short name per run: its method, with the folder's name where that tells runs apart."""
    methods = [s["method"] for s in series]
    labels = []
    for run_dir, method in zip(run_dirs, methods):
        if methods.count(method) == 1:
            labels.append(method)
        else:
            parent = run_dir.parent.name if run_dir.name == method else run_dir.name
            labels.append(f"{method} ({parent or run_dir.name})")
    return labels


def run_curves_png(run_dirs: list[str | Path], path: str | Path) -> tuple[Path, tuple[int, int]]:
    """One row per network (of all the runs): its training loss parts per epoch (classification solid; CL's metric
    and verification terms dashed and dotted) on the left, its test accuracy per epoch on the right; one colour per
    run, so several runs (IL and CL of one seed) sit in the same panels; a run with EMA weights (train.ema_decay)
    has their accuracy dashed beside the live weights'."""
    plt = _pyplot()

    run_dirs = [Path(r) for r in run_dirs]
    series = [_run_series(r) for r in run_dirs]
    labels = _run_labels(run_dirs, series)
    networks = list(dict.fromkeys(n for s in series for n in s["networks"]))
    fig, axes = plt.subplots(len(networks), 2, squeeze=False,
                             figsize=(WIDTH_IN, CURVES_TOP_IN + CURVES_ROW_IN * len(networks)))
    colours = plt.get_cmap("tab10")
    for row, network in zip(axes, networks):
        loss_ax, acc_ax = row
        for k, (s, label) in enumerate(zip(series, labels)):
            if network not in s["networks"]:
                continue
            colour = colours(k % 10)
            for part, points in s["parts"][network].items():
                xs, ys = zip(*points)
                loss_ax.plot(xs, ys, PART_STYLE.get(part, "-."), color=colour, marker="o", markersize=3,
                             label=f"{label}: {PART_LABEL.get(part, part)}")
            if s["acc"][network]:
                acc_ax.plot(s["acc_epochs"], s["acc"][network], "-", color=colour, marker="o", markersize=3,
                            label=label)
            if s["ema"][network]:
                xs, ys = zip(*s["ema"][network])
                acc_ax.plot(xs, ys, "--", color=colour, marker="s", markersize=3, label=f"{label} (EMA)")
        loss_ax.set_title(f"{network}: training loss", fontsize=9, loc="left")
        acc_ax.set_title(f"{network}: test accuracy (%)", fontsize=9, loc="left")
        for ax in row:
            ax.set_xlabel("epoch", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def per_class_png(run_dirs: list[str | Path], path: str | Path) -> tuple[Path, tuple[int, int]] | None:
    """One row per network: each run's confusion matrix on its last evaluation (run.json's `per_class`; each row
    as % of the true class's images), and with several runs each run's per-class accuracy minus the reference run's
    (the IL run where there is one, else the first): which classes CL helped or hurt. None when no run recorded
    per-class results (runs from before they were kept)."""
    from clcli.models import network_labels
    from clcli.run import Run

    runs = [Run.open(r) for r in run_dirs]
    runs = [r for r in runs if r.info.get("per_class")]
    if not runs:
        return None
    plt = _pyplot()
    reference = next((k for k, r in enumerate(runs) if r.method == "il"), 0)
    runs.insert(0, runs.pop(reference))  # the reference first: its matrix, then the others'
    labels = _run_labels([r.path for r in runs], [{"method": r.method} for r in runs])
    classes = list(runs[0].info["class_names"])
    networks = list(dict.fromkeys(n for r in runs for n in network_labels(list(r.info["models"]))))
    columns = len(runs) + (len(runs) > 1)
    fig, axes = plt.subplots(len(networks), columns, squeeze=False, layout="constrained",
                             figsize=(WIDTH_IN, CURVES_TOP_IN + 3.5 * len(networks)))
    ticks = list(range(len(classes))) if len(classes) <= 20 else []
    names = [classes[k] for k in ticks]
    for row, network in zip(axes, networks):
        for ax, run, label in zip(row, runs, labels):
            per_class = run.info["per_class"].get(network)
            ax.set_title(f"{network}: {label}", fontsize=9, loc="left")
            if per_class is None:
                ax.axis("off")
                continue
            shares = [[100.0 * v / max(sum(r), 1) for v in r] for r in per_class["confusion"]]
            ax.imshow(shares, cmap="Blues", vmin=0, vmax=100)
            ax.set_xlabel("answer", fontsize=8)
            ax.set_ylabel("true class", fontsize=8)
            ax.set_xticks(ticks, names, rotation=90, fontsize=6)
            ax.set_yticks(ticks, names, fontsize=6)
        if len(runs) > 1:
            ax = row[-1]
            base = runs[0].info["per_class"].get(network, {}).get("accuracy")
            width = 0.8 / (len(runs) - 1)
            for k, (run, label) in enumerate(zip(runs[1:], labels[1:])):
                accuracy = run.info["per_class"].get(network, {}).get("accuracy")
                if base is None or accuracy is None:
                    continue
                diff = [(a or 0.0) - (b or 0.0) for a, b in zip(accuracy, base)]
                ax.barh([i + k * width for i in range(len(classes))], diff, height=width, label=label)
            ax.axvline(0, color="gray", linewidth=1)
            ax.invert_yaxis()
            ax.set_yticks(ticks, names, fontsize=6)
            ax.set_xlabel(f"accuracy minus {labels[0]}'s (points)", fontsize=8)
            ax.set_title(f"{network}: per class", fontsize=9, loc="left")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, axis="x")
            if ax.patches:
                ax.legend(fontsize=7)
    fig.suptitle("confusion matrices on the last evaluation (each row: % of the true class's images, 0 white, "
                 "100 dark blue)", x=0.01, ha="left", fontsize=9)
    return _save(fig, path)


def report(runs: list[str | Path], out: str | Path | None = None) -> tuple[Path, tuple[int, int], list[Path],
                                                                           Path | None]:
    """`clcli report`: the run folders (a multi-method folder gives each method's run) drawn together. Default
    picture: `<RUN>/curves.png` for one folder, else the first free `report.png`, `report-2.png`, ... here; beside
    it `<name>-per-class.png`, the confusion matrices and per-class differences (`per_class_png`).
    Returns (path, size in pixels, the run folders drawn, the per-class picture or None)."""
    from clcli.run import Run

    if not runs:
        raise ClcliError("give at least one run folder")
    run_dirs = [run.path for r in runs for run in Run.children(r)]
    if not any((r / "metrics.jsonl").is_file() for r in run_dirs):
        raise ClcliError(f"no metrics.jsonl in {', '.join(map(str, run_dirs))}: nothing to draw")
    if out is None:
        out = Path(runs[0]) / "curves.png" if len(runs) == 1 else _free_name(Path("report.png"))
    out = Path(out)
    files.check_output_file(out, "picture", force=True)  # a picture is redrawn in place; a bad path fails first
    path, size = run_curves_png(run_dirs, out)
    per_class = per_class_png(run_dirs, out.with_name(f"{out.stem}-per-class.png"))
    return path, size, run_dirs, per_class[0] if per_class else None


def _free_name(path: Path) -> Path:
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


# --- compare ---------------------------------------------------------------------------------------------------

def compare_curves_png(path: str | Path, curves: dict[str, list[list[tuple[int, list[float]]]]],
                       labels: dict[str, str], names: list[str], il_final: list[float]) -> tuple[Path, tuple[int, int]]:
    """compare's curves.png: per network, test accuracy against iterations, mean over the seeds, one line per method
    (`curves[method]`: one [(iteration, accuracy per network)] list per seed), IL's final accuracy dashed."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        for method, per_seed in curves.items():
            per_seed = [c for c in per_seed if c]
            if not per_seed:
                continue
            n = min(len(c) for c in per_seed)
            steps = [per_seed[0][k][0] for k in range(n)]
            mean = [statistics.mean(c[k][1][i] for c in per_seed) for k in range(n)]
            ax.plot(steps, mean, marker="o" if n < 30 else None, markersize=3, label=labels.get(method, method))
        ax.axhline(il_final[i], color="gray", linestyle="--", linewidth=1, label="IL final")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["probe_png", "run_curves_png", "per_class_png", "report", "compare_curves_png"]
