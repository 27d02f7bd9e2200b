"""Training from the command line or from Python: the loop, its checkpoint directory,
progress display, metrics log and plot.

    config.py       TrainConfig, defaults, and how --resume reconciles them with a checkpoint
    session.py      checks everything, builds the run, trains, plots
    agreement.py    every rank of a data-parallel job runs rank 0's configuration
    loop.py         steps, periodic evaluation and checkpoints, checkpoint on Ctrl-C
    checkpoints.py  step-000123.npz + .json pairs, newest, pruning, loading against a spec
    evaluate.py     accuracy and confusion matrix of an inference executable
    progress.py     the progress line on stderr
    metrics.py      the JSONL metrics log
    plot.py         loss and accuracy PNG (optional matplotlib)
"""

from .checkpoints import CheckpointDir, data_record, load_for_spec, resolve
from .config import TrainConfig, default_backend
from .evaluate import Evaluation, confusion_table, evaluate
from .session import train

__all__ = ["CheckpointDir", "Evaluation", "TrainConfig", "confusion_table", "data_record",
           "default_backend", "evaluate", "load_for_spec", "resolve", "train"]
