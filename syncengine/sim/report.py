"""A self-contained HTML page per run: a timeline picture and the invariant table.

The picture (matplotlib, Agg backend, embedded as a base64 PNG) has one row per terminal
(link up/down and mode as coloured bands, payments taken as ticks), one panel with each
terminal's outstanding offline amount against its total limit, and one with forwarding
outcomes over time. Fault windows are shaded. Below it: the counters and a table with one
row per invariant, and the command that replays the run.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from pathlib import Path

from syncengine.sim import facts as f
from syncengine.sim.checker import DETAILS_MAX
from syncengine.sim.runner import RunResult

MODE_COLOURS = {
    "online": "#4caf50",
    "forwarding": "#8bc34a",
    "outage_detected": "#ffc107",
    "prompting": "#ff9800",
    "offline": "#f44336",
    "window_closed": "#7b1fa2",
    "disabled": "#9e9e9e",
    "down": "#000000",
}
HOUR_MS = 3_600_000


def timeline_png(result: RunResult) -> bytes:
    """Render the timeline picture of ``result`` as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = result.facts
    start = facts.start_ms
    tids = sorted(facts.terminals)
    fig, axes = plt.subplots(
        3,
        1,
        figsize=(12, 2.2 + 0.45 * len(tids) + 4.5),
        sharex=True,
        gridspec_kw={"height_ratios": [max(1.5, 0.45 * len(tids)), 2, 1.6]},
    )
    ax_modes, ax_out, ax_fwd = axes
    by_t: dict[str, list[tuple[float, str, bool, int]]] = {t: [] for t in tids}
    for s in result.samples:
        by_t[s.terminal].append(
            ((s.at_ms - start) / HOUR_MS, s.mode, s.link_up, s.outstanding_minor)
        )
    for row, tid in enumerate(tids):
        pts = by_t[tid]
        for (x0, mode, link, _), (x1, _m, _l, _o) in itertools.pairwise(pts):
            ax_modes.broken_barh(
                [(x0, x1 - x0)], (row - 0.35, 0.5), color=MODE_COLOURS.get(mode, "#607d8b")
            )
            if not link:
                ax_modes.broken_barh([(x0, x1 - x0)], (row + 0.18, 0.14), color="#212121")
        xs = [
            (e.at_ms - start) / HOUR_MS
            for e in facts.trace
            if e.terminal == tid and e.kind in (f.APPROVED_OFFLINE, f.APPROVED_ONLINE)
        ]
        ax_modes.plot(xs, [row + 0.3] * len(xs), "|", color="#1565c0", markersize=5)
        ax_out.step([p[0] for p in pts], [p[3] / 100 for p in pts], where="post", label=tid)
    ax_modes.set_yticks(range(len(tids)), tids)
    ax_modes.set_title(
        "mode per terminal (colour), link down (black bar), payments taken (blue ticks)"
    )
    limit = max((t.total_limit_minor for t in facts.terminals.values()), default=0)
    ax_out.axhline(limit / 100, color="red", linestyle="--", label="total limit")
    ax_out.set_ylabel(f"outstanding ({facts.currency})")
    ax_out.legend(loc="upper right", fontsize=7, ncol=4)
    for outcome, colour in (
        ("approved", "#2e7d32"),
        ("declined", "#c62828"),
        ("expired", "#6a1b9a"),
        ("unavailable", "#f9a825"),
        ("unknown", "#ef6c00"),
    ):
        xs = [
            (e.at_ms - start) / HOUR_MS
            for e in facts.trace
            if e.kind == f.FORWARD and e.detail == outcome
        ]
        if xs:
            ax_fwd.hist(xs, bins=60, histtype="step", color=colour, label=outcome)
    ax_fwd.set_ylabel("forwarder calls")
    ax_fwd.set_xlabel("hours since start (virtual)")
    ax_fwd.legend(loc="upper right", fontsize=7)
    for kind, t0, t1, _targets in result.fault_windows:
        for ax in axes:
            ax.axvspan((t0 - start) / HOUR_MS, (t1 - start) / HOUR_MS, color="#90a4ae", alpha=0.15)
        ax_modes.text((t0 - start) / HOUR_MS, len(tids) - 0.4, kind, fontsize=7, color="#37474f")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def render(result: RunResult, command: str = "") -> str:
    """The HTML page of one run."""
    png = base64.b64encode(timeline_png(result)).decode()
    esc = html.escape
    rows = []
    for inv in result.invariants:
        detail = "<br>".join(esc(v) for v in inv.violations[:DETAILS_MAX]) or ""
        more = (
            f" (+{len(inv.violations) - DETAILS_MAX} more)"
            if len(inv.violations) > DETAILS_MAX
            else ""
        )
        rows.append(
            f"<tr class={'ok' if inv.ok else 'bad'}><td>{esc(inv.name)}</td>"
            f"<td>{'holds' if inv.ok else 'VIOLATED'}</td><td>{detail}{more}</td></tr>"
        )
    for failure in result.expect_failures:
        rows.append(f"<tr class=bad><td>[expect]</td><td>FAILED</td><td>{esc(failure)}</td></tr>")
    counters = "".join(
        f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in sorted(result.counters.items())
    )
    sc = result.scenario
    verdict = "PASS" if result.ok else "FAIL"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>{esc(sc.name)} seed {result.seed}: {verdict}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}td{{padding:2px 8px;
vertical-align:top}}tr.ok td:nth-child(2){{color:#2e7d32}}tr.bad td:nth-child(2){{color:#c62828;
font-weight:bold}}table{{border-collapse:collapse}}tr{{border-bottom:1px solid #ddd}}</style>
</head><body>
<h1>{esc(sc.name)} &mdash; seed {result.seed} &mdash; {verdict}</h1>
<p>{esc(sc.description)}</p>
<p>Replay: <code>{esc(command or f"syncengine scenario run {sc.path} --seed {result.seed}")}</code><br>
{(result.facts.end_ms - result.facts.start_ms) / HOUR_MS:.1f} virtual hours in {result.wall_s:.2f} s,
{result.events_count} events; network {esc(str(result.network))}</p>
<img alt="timeline" style="max-width:100%" src="data:image/png;base64,{png}">
<h2>Invariants</h2><table>{"".join(rows)}</table>
<h2>Counters</h2><table>{counters}</table>
</body></html>
"""


def write(result: RunResult, directory: Path) -> Path:
    """Write the page for ``result`` into ``directory``; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.scenario.name}-seed{result.seed}.html"
    path.write_text(render(result), encoding="utf-8")
    return path
