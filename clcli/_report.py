"""Rich tables for the CLI."""
from __future__ import annotations


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def print_plan(console, plan) -> None:
    from rich.table import Table

    h, w = plan.input_size
    console.print(f"input {h}x{w}, stem [bold]{plan.stem}[/]")
    for m in plan.models:
        stem = ""
        if m.stem:
            changed = ([f"stride 1 at {', '.join(m.stem.convs)}"] if m.stem.convs else []) + \
                ([f"{m.stem.pool} removed"] if m.stem.pool else [])
            stem = f", small stem: {', '.join(changed)}"
        table = Table(title=f"{m.name}  ({_fmt_int(m.params)} params, {_fmt_int(m.macs)} MACs, traced with "
                            f"{m.tracer}{stem})", title_justify="left")
        for col in ("tap", "layout", "C", "H x W", "stage", "depth", "module output"):
            table.add_column(col, overflow="fold")
        for t in m.stage_taps:
            table.add_row(t.module or t.node, t.layout, str(t.channels), f"{t.height}x{t.width}", str(t.stage),
                          f"{t.depth:.2f}", "yes" if t.is_module_output else "no (fx rewrite)")
        console.print(table)
    for note in (n for m in plan.models for n in m.notes):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if plan.models and any(m.tracer == "export" for m in plan.models):
        console.print("[yellow]note:[/] fx could not trace some models; torch.export analysed them instead")
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    # One row per network and site, so that a narrow terminal never has to wrap a number.
    table = Table(title="MKB sites, best first (* = planned; --site N or cl.sites plans site N); each network's MKB "
                        "half: params, % of the network, MACs per image", title_justify="left")
    for col in ("#", "size", "network", "tap", "code", "emb", "params", "%", "MACs"):
        table.add_column(col, overflow="fold", no_wrap=col in ("size", "code", "params", "MACs"))
    for number, s in enumerate(plan.candidates, 1):
        mark = f"{number}{'*' if any(s.taps is c.taps for c in plan.sites) else ''}"
        spec = s.mkb
        budget = "" if spec.within_budget else " [red]over budget[/]"
        for i, (name, tap, half) in enumerate(zip(plan.names, s.taps, spec.halves)):
            first = i == 0
            table.add_row(mark if first else "", f"{s.size[0]}x{s.size[1]}" if first else "", name,
                          tap.module or tap.node,
                          f"{spec.code_channels}x{spec.code_height}x{spec.code_width}" if first else "",
                          str(spec.embedding) if first else "", _fmt_int(half.params),
                          f"{100 * half.fraction:.1f}{budget}", _fmt_int(half.macs),
                          end_section=i == len(s.taps) - 1)
    console.print(table)


def plan_text(plan, width: int = 120) -> str:
    """The plan as `clcli probe` prints it, in plain text (what the trackers show as the run's MKB summary)."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    print_plan(console, plan)
    return console.export_text()


def results_markdown(info: dict) -> str:
    """A finished run's results (run.json) as a markdown table: per network its test accuracy (top-5, EMA and best
    epoch where the run has them), then each class's accuracy per network (`per_class`)."""
    names = list(info["test_acc"])
    columns = [("test acc (%)", {n: f"{v:.2f}" for n, v in info["test_acc"].items()})]
    for key, title in (("test_top5", "top-5 (%)"), ("ema_test_acc", "EMA (%)")):
        if key in info:
            columns.append((title, {n: f"{v:.2f}" for n, v in info[key].items()}))
    if "best" in info:
        columns.append(("best epoch (%)", {n: f"{b['test_acc']:.2f} (ep {b['epoch']})"
                                           for n, b in info["best"].items()}))
    lines = ["| network | " + " | ".join(t for t, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(c[n] for _, c in columns) + " |" for n in names]
    per_class = info.get("per_class")
    if per_class:
        lines += ["", "| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for k, cls in enumerate(info["class_names"]):
            cells = [per_class[n]["accuracy"][k] for n in names]
            lines.append(f"| {cls} | " + " | ".join("-" if a is None else f"{a:.2f}" for a in cells) + " |")
    return "\n".join(lines) + "\n"
