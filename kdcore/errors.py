"""Exceptions the core raises; each message names the place of the problem."""

from __future__ import annotations


class KdError(Exception):
    """Base of every error kdcore reports to a user."""


class SpecError(KdError):
    """A spec is wrong. ``problems`` holds one ``message @ $.path`` line per problem."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "\n".join(self.problems))


class RegistryError(KdError):
    """Plugins disagree (a name registered twice) or a plugin failed to load."""


class CheckpointError(KdError):
    """A checkpoint or cache is missing, corrupt or does not match the run."""


class NonFiniteLossError(KdError):
    """A loss term became NaN or infinite during training."""

    def __init__(self, step: int, term: str, value: float, checkpoint: str | None):
        self.step, self.term, self.value, self.checkpoint = step, term, value, checkpoint
        saved = f"; state before this step saved to {checkpoint}" if checkpoint else ""
        super().__init__(f"loss term {term!r} is {value} at step {step}{saved}")
