"""The table's ratios as a PNG bar chart (matplotlib, Agg backend): speedups in one panel, memory
fractions in the other, each bar coloured by its target (met, not met, none) and the target marked."""
from __future__ import annotations

from .report import Row

_COLOURS = {True: "#2a9d5c", False: "#d1495b", None: "#8d99ae"}


def _panel(ax, rows: list[Row], title: str, xlabel: str):
    labels = [f"{r.case} · {r.metric}" for r in rows]
    values = [r.ratio for r in rows]
    ys = range(len(rows))
    ax.barh(list(ys), values, color=[_COLOURS[r.met] for r in rows])
    for y, r in zip(ys, rows):
        if r.target_value is not None:
            ax.plot([r.target_value, r.target_value], [y - 0.4, y + 0.4], color="black", linewidth=1.5)
        ax.text(r.ratio, y, f" {r.ratio:.2f}x", va="center", fontsize=7)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)   # first row on top, no empty margin
    ax.set_xscale("log")
    span = values + [r.target_value for r in rows if r.target_value] + [1.0]
    ax.set_xlim(min(span) / 1.6, max(span) * 2.2)   # room for the labels right of the bars
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)


def draw(rows: list[Row], path: str, title: str = "quantload vs the alternative") -> str | None:
    """Write the chart; returns None, or why no chart was drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    # a kernel's bytes-moved ratio is its elements/s ratio again: drawn once
    speed = [r for r in rows if r.ratio is not None and r.unit not in ("bytes", "gb_per_s")]
    memory = [r for r in rows if r.ratio is not None and r.unit == "bytes"]
    panels = [(p, t, x) for p, t, x in ((speed, "speed: quantload vs alternative (higher is better)", "speedup"),
                                        (memory, "memory: quantload / alternative (lower is better)", "fraction"))
              if p]
    if not panels:
        return "no ratios to draw (no case has figures from both sides)"
    heights = [max(1.5, 0.28 * len(p) + 0.8) for p, _, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (p, t, x) in zip(axes[:, 0], panels):
        _panel(ax, p, t, x)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (sum(heights) + 0.6)))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
