"""The `fedtune` logger's one terminal handler: "[fedtune] message" lines on stderr.

Why a module of its own: the CLI sets it up first thing (before any heavy import, so
`fedtune keys` stays fast), every module then logs through `logging.getLogger(__name__)`
(children of `fedtune`), and a run's file log (results.py) finds this handler instead of
adding a second one. Processes the CLI did not start (Flower's apps in a deployment) get it
from results.py when their run folder opens.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "fedtune"


class _Terminal(logging.StreamHandler):
    """Writes to sys.stderr as it is at each message, so a replaced stream (pytest's capture,
    contextlib.redirect_stderr) is used and a closed earlier one never is."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def to_terminal() -> logging.Logger:
    """The `fedtune` logger at INFO with its terminal handler (added once); its records do
    not go on to the root logger, so other libraries' logging setup cannot double them."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, _Terminal) for h in logger.handlers):
        handler = _Terminal()
        handler.setFormatter(logging.Formatter("[fedtune] %(message)s"))
        logger.addHandler(handler)
    return logger


# Flower lines about what fedtune chose or reports itself (`fedtune --verbose` keeps them):
# centralized evaluation only (fraction_evaluate = 0), Ray actors stopped at the end, the
# clients sampled (fedtune's "round k/N: n clients training").
FLOWER_NOISE = (
    "fraction_evaluate is set to 0.0",
    "Manually terminating",
    "configure_train: Sampled",
)


def quiet_flower() -> None:
    """Flower's logger in this process (the CLI's, a Ray actor's, a ClientApp's): no colour
    codes when stderr is not a terminal, no FLOWER_NOISE unless FEDTUNE_VERBOSE=1."""
    flower = logging.getLogger("flwr")  # Flower's logger, by its public name
    flower.propagate = False  # it has its own handler; a root handler (Ray's) would double it
    for handler in flower.handlers:
        if hasattr(handler, "colored"):  # Flower's ConsoleHandler
            handler.colored = sys.stderr.isatty()
    if os.environ.get("FEDTUNE_VERBOSE") != "1" and not any(
        getattr(f, "fedtune", False) for f in flower.filters
    ):

        def keep(record) -> bool:
            return not str(record.msg).startswith(FLOWER_NOISE)

        keep.fedtune = True
        flower.addFilter(keep)
