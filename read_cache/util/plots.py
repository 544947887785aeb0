"""The one matplotlib setup every chart shares (sweep.png, curves.png, glue.png, the bench's figures).

    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    save(fig, path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: charts are files, drawn on headless machines and under torchrun alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    """Lay the figure out, write it as a 100-dpi PNG, and free it (figures otherwise live as long as pyplot)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
