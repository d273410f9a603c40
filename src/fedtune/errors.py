"""fedtune's own errors: the one family the CLI catches and prints as a single line.

Why one base class: a problem the user can fix (a bad key, a missing column, a hub that
cannot be reached) must reach the terminal as one sentence with the fix, while a bug in
fedtune must still show its traceback. Catching `ValueError` or `RuntimeError` would hide
the second kind behind the first.
"""

from __future__ import annotations


class FedtuneError(Exception):
    """Base class; `exit_code` is what `fedtune` exits with (2: bad input, 1: a run failed)."""

    exit_code = 2


class ConfigError(FedtuneError):
    """A recipe or override is wrong; the message names every bad key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"invalid config: {self.problems[0]}")
        else:
            super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


class DataError(FedtuneError):
    """The data does not fit the recipe (missing column, empty partition, unreadable file)."""


class ModelError(FedtuneError):
    """The model cannot be loaded or adapted as the recipe asks."""


class KDError(FedtuneError):
    """Knowledge distillation cannot work with this teacher/student pair."""


class RunError(FedtuneError):
    """A run started but could not finish (e.g. too few clients replied, after retries)."""

    exit_code = 1


class DeployError(RunError):
    """A deployment process failed or the run did not complete."""


class HubModelError(ModelError):
    """A hub model id that cannot be fetched (no network, HF_HUB_OFFLINE=1, no such repo)."""


class HubDataError(DataError):
    """A hub dataset id that cannot be fetched."""
