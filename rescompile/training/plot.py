"""A plot of training loss and test accuracy by step; matplotlib is the optional `plot`
extra. The file's format (from its suffix) is checked before training, so a name matplotlib
cannot write is refused before the run, not after it; the plot is written atomically."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..fileio import atomic_write


def plot_format(path, say) -> str | None:
    """The format `path` asks for, checked now: one matplotlib writes, or a UsageError. None,
    said in one line, without matplotlib: the run goes on without a plot."""
    try:
        import matplotlib
    except ImportError:
        say(f"plot: matplotlib is not installed (pip install 'rescompile[plot]'); "
            f"{path} will not be written")
        return None
    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib.figure import Figure
    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise UsageError(f"--plot {path}: the name must end in one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    return suffix


def plot(records: list[dict], path, fmt: str) -> None:
    """Write the plot of `records` to `path` in format `fmt` (from `plot_format`)."""
    from matplotlib import pyplot

    figure, (loss_axes, accuracy_axes) = pyplot.subplots(2, 1, sharex=True, figsize=(7, 6))
    loss_axes.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=0.8)
    loss_axes.set_ylabel("training loss")
    evaluated = [r for r in records if "accuracy" in r]
    accuracy_axes.plot([r["step"] for r in evaluated], [r["accuracy"] for r in evaluated],
                       marker="o", markersize=3)
    accuracy_axes.set_ylabel("test accuracy")
    accuracy_axes.set_xlabel("step")
    figure.tight_layout()
    try:
        atomic_write(path, lambda f: figure.savefig(f, format=fmt, dpi=100))
    finally:
        pyplot.close(figure)
