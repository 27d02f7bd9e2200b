"""A PNG of training loss and test accuracy by step; matplotlib is the optional `plot` extra."""

from __future__ import annotations


def plot(records: list[dict], path, say) -> bool:
    """Write the plot to `path`; without matplotlib, say so in one line and return False."""
    try:
        import matplotlib
    except ImportError:
        say(f"plot: matplotlib is not installed (pip install 'rescompile[plot]'); "
            f"{path} not written")
        return False
    matplotlib.use("Agg")  # files only: no display needed
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
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True
