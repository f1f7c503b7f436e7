"""Optional PNG output: every plot kilnlm writes (loss curves, the scaling sweep) goes through
these two functions, and a missing matplotlib means no PNG, never an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any | None:
    """matplotlib's pyplot on the file-only Agg backend (a cluster node has no display), or None
    when matplotlib is not installed: every plot is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG and free it (figures stay alive in pyplot until closed)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
