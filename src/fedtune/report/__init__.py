"""Everything fedtune writes for people to read: plots, reports, comparison tables.

Why a package: one run's report, the overlay of several runs and a `fedtune compare` study
share their reading of run folders (`folder`), their plotting helpers (`plots`) and their
documents and number format (`document`); `run` and `study` build on those. The names below
are what callers use (federation.py after every round, the CLI, tests).
"""

from fedtune.report.card import write_model_card
from fedtune.report.document import fmt
from fedtune.report.folder import best_row, load_rows, task_metrics
from fedtune.report.plots import write_plots
from fedtune.report.run import write_report
from fedtune.report.study import (
    comparison_dir,
    rewrite_study,
    study_markdown,
    study_plots,
    write_comparison,
    write_study,
)

__all__ = [
    "best_row",
    "comparison_dir",
    "fmt",
    "load_rows",
    "rewrite_study",
    "study_markdown",
    "study_plots",
    "task_metrics",
    "write_comparison",
    "write_model_card",
    "write_plots",
    "write_report",
    "write_study",
]
