"""How tokenfx's results read: the recovered structure, a pipeline's pass reports and the pass
catalogue as terminal tables, and a pass report's JSON form.

Shared by the ``tokenfx`` command (:mod:`tokenfx.cli`) and ``tokenfx demo``
(:mod:`tokenfx.demo`); it imports neither, so both can import it. ``rich`` is imported where a
table is drawn, keeping ``--json`` runs free of it.
"""

from __future__ import annotations


def terminal(stderr: bool = False):
    """A ``rich`` console on stdout (or stderr); 120 columns when piped or captured, so a table
    is not squeezed into the default 80."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=120)
    return console


def render_structure(console, data: dict, title: str) -> None:
    """The ModelMap's JSON form (``graph.structure.to_json()``): a summary line, then one row per block."""
    from rich.table import Table

    console.print(f"[bold]{title}[/bold]  family [cyan]{data['family']}[/cyan] · {data['num_blocks']} blocks · "
                  f"hidden {data['hidden_size']} · position [cyan]{data['position']}[/cyan] · "
                  f"token axis {data['token_axis']}")
    console.print(f"embeddings: {', '.join(data['embeddings']) or '—'} · final norm: {data['final_norm'] or '—'} · "
                  f"head: {data['head'] or '—'}")
    table = Table(show_edge=False, header_style="bold")
    for col in ("block", "norm", "placement", "core", "heads", "kv heads", "head dim", "causal", "mlp proj"):
        table.add_column(col)
    for b in data["blocks"]:
        a = b["attention"]
        table.add_row(b["name"], b["norm"], b["norm_placement"], a["core"], str(a["heads"]), str(a["kv_heads"]),
                      str(a["head_dim"]), "yes" if a["causal"] else "no", str(b["mlp_projections"]))
    console.print(table)


def render_passes(console, passes) -> None:
    """One row per :class:`~tokenfx.passes.base.PassReport`, then each refusal with its reason."""
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for col in ("pass", "contract", "time", "nodes", "matched", "refused", "max |error|"):
        table.add_column(col)
    for p in passes:
        err = "—" if p.max_abs_error is None else f"{p.max_abs_error:.2e} (tol {p.tolerance:.1e})"
        table.add_row(p.description, p.contract, f"{p.seconds * 1000:.0f} ms", f"+{p.nodes_added} −{p.nodes_removed}",
                      str(len(p.matched)), str(len(p.refused)), err)
    console.print(table)
    for p in passes:
        for where, why in p.refused:
            console.print(f"  [yellow]{p.name} refused[/yellow] {where}: {why}")


def pass_json(p) -> dict:
    """A :class:`~tokenfx.passes.base.PassReport` as plain JSON data (``tokenfx rewrite --json``)."""
    return {"name": p.name, "options": p.description, "contract": p.contract, "seconds": round(p.seconds, 4),
            "nodes_added": p.nodes_added, "nodes_removed": p.nodes_removed, "matched": p.matched,
            "refused": [{"where": w, "why": y} for w, y in p.refused], "max_abs_error": p.max_abs_error,
            "tolerance": p.tolerance, "stats": p.stats}


def render_catalogue(console, catalogue: list[dict]) -> None:
    """``tokenfx passes``: one row per registered pass with its options and their defaults."""
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for col in ("pass", "contract", "options", "what it does"):
        table.add_column(col)
    for p in catalogue:
        opts = ", ".join(f"{o['name']}: {o['type']} = {o['default']!r}" for o in p["options"]) or "—"
        table.add_row(p["name"], p["contract"], opts, p["summary"])
    console.print(table)
