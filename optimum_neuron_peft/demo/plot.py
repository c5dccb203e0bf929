"""Loss-curve PNG for the demo (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def plot_loss_curves(curves: Mapping[str, Sequence[float]], path: str | Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the demo extra is not installed: skip the picture, keep the numbers
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
