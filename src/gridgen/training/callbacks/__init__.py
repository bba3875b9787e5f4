"""Lightning callbacks of a training run, one concern per module: the alpha ramp (``alpha``), the run's clock
(``timing``), progress bar and log lines (``progress``), throughput/MFU (``throughput``), ``summary.json``
(``summary``), the LoRA or transformer export (``export``) and its EMA (``ema``), validation sample grids
(``samples``)."""

from gridgen.training.callbacks.alpha import ALPHA_SHAPES, AlphaSchedule, alpha_at
from gridgen.training.callbacks.export import LoraExport, TransformerExport
from gridgen.training.callbacks.progress import GridProgressBar, ProgressLog
from gridgen.training.callbacks.summary import RunSummary
from gridgen.training.callbacks.throughput import GridThroughput
from gridgen.training.callbacks.timing import StepTimer, step_timer

__all__ = ["ALPHA_SHAPES", "AlphaSchedule", "GridProgressBar", "GridThroughput", "LoraExport", "ProgressLog",
           "RunSummary", "StepTimer", "TransformerExport", "alpha_at", "step_timer"]
