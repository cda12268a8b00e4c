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
    table = Table(title="MKB sites, best first (* = planned); each network's MKB half: params, % of the network, "
                        "MACs per image", title_justify="left")
    for col in ("", "size", "network", "tap", "code", "emb", "params", "%", "MACs"):
        table.add_column(col, overflow="fold", no_wrap=col in ("size", "code", "params", "MACs"))
    for s in plan.candidates:
        mark = "*" if any(s.taps is c.taps for c in plan.sites) else ""
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
