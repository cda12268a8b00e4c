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
            stem = f", small stem: stride 1 at {m.stem.conv}" + (f", {m.stem.pool} removed" if m.stem.pool else "")
        table = Table(title=f"{m.name}  ({_fmt_int(m.params)} params, {_fmt_int(m.macs)} MACs, traced with "
                            f"{m.tracer}{stem})", title_justify="left")
        for col in ("tap", "layout", "C", "H x W", "stage", "depth", "module output"):
            table.add_column(col)
        for t in m.stage_taps:
            table.add_row(t.module or t.node, t.layout, str(t.channels), f"{t.height}x{t.width}", str(t.stage),
                          f"{t.depth:.2f}", "yes" if t.is_module_output else "no (fx rewrite)")
        console.print(table)
    if plan.models and any(m.tracer == "export" for m in plan.models):
        console.print("[yellow]note:[/] fx could not trace some models; torch.export analysed them instead")
    if plan.resized:
        console.print("[yellow]note:[/] no equal spatial size: sites pair sizes in a ratio of 2, bridged by a resize")
    table = Table(title="MKB sites, best first (* = planned)", title_justify="left")
    for col in ("", "size", *plan.names, "code C x h x w", "embedding", "MKB half params (% of net)", "MKB MACs"):
        table.add_column(col)
    for s in plan.candidates:
        mark = "*" if any(s.taps is c.taps for c in plan.sites) else ""
        spec = s.mkb
        halves = " / ".join(f"{_fmt_int(x.params)} ({100 * x.fraction:.1f}%)" for x in spec.halves)
        macs = " / ".join(_fmt_int(x.macs) for x in spec.halves)
        budget = "" if spec.within_budget else " [red]over budget[/]"
        table.add_row(mark, f"{s.size[0]}x{s.size[1]}", *[t.module or t.node for t in s.taps],
                      f"{spec.code_channels}x{spec.code_height}x{spec.code_width}", str(spec.embedding),
                      halves + budget, macs)
    console.print(table)
