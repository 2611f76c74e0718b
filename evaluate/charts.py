"""Grouped bar charts (a bar per subject per group), drawn without pyplot so no global backend is touched."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLOURS = {"model": "#1f77b4", "base": "#aaaaaa", "production": "#ff7f0e"}


def grouped_bars(title: str, data: dict[str, dict[str, float]]) -> Figure:
    """data: group -> subject -> value."""
    from matplotlib.figure import Figure

    groups = list(data)
    subjects = sorted(
        {s for values in data.values() for s in values},
        key=lambda s: list(COLOURS).index(s) if s in COLOURS else 99,
    )
    width = 0.8 / max(1, len(subjects))
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(subjects)) / 2 + 2), 4.0), dpi=100)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for k, subject in enumerate(subjects):
        values = [data[g].get(subject, np.nan) for g in groups]
        ax.bar(
            x + (k - (len(subjects) - 1) / 2) * width,
            values,
            width,
            label=subject,
            color=COLOURS.get(subject),
        )
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_title(title, fontsize=10)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def slug(title: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "_" for c in title.split(" (")[0])
    return "_".join(p for p in keep.split("_") if p)
