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


class NonFiniteStateError(CheckpointError):
    """A checkpoint was not written: an array to be saved holds NaN or inf. ``last_finite``
    is the newest checkpoint already on disk (all of them are finite), or None."""

    def __init__(self, array: str, file: str, last_finite: str | None):
        self.array, self.file, self.last_finite = array, file, last_finite
        where = (
            f"the last finite checkpoint is {last_finite}"
            if last_finite
            else "there is no earlier checkpoint"
        )
        super().__init__(
            f"checkpoint not written: non-finite values (NaN or inf) in {array!r} of {file}; "
            + where
        )


class NonFiniteLossError(KdError):
    """Training met a non-finite number: a loss term (``term``), the gradients
    (``term == "gradients"``) or the parameters (``term == "parameters"``).

    ``checkpoint`` is the state before the failing step when it could be saved; when the
    parameters were already non-finite nothing is saved and ``resume_from`` names the last
    finite checkpoint (None: there is none)."""

    def __init__(
        self,
        step: int,
        term: str,
        value: float,
        checkpoint: str | None,
        resume_from: str | None = None,
    ):
        self.step, self.term, self.value, self.checkpoint = step, term, value, checkpoint
        self.resume_from = checkpoint or resume_from
        if term == "gradients":
            what = f"the gradients are non-finite at step {step} (every loss term is finite)"
        elif term == "parameters":
            what = f"the parameters are non-finite after step {step}"
        else:
            what = f"loss term {term!r} is {value} at step {step}"
        if checkpoint:
            tail = f"; state before this step saved to {checkpoint}: resume from it with --resume"
        elif resume_from:
            tail = (
                "; the parameters were already non-finite, so no checkpoint was written: "
                f"resume from {resume_from}, the last finite checkpoint, with --resume"
            )
        else:
            tail = (
                "; the parameters were already non-finite and no finite checkpoint exists: "
                "start the run again"
            )
        super().__init__(what + tail)


class RunInterrupted(KdError):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; ``exit_code`` is
    the shell's 128 + signal number."""

    def __init__(self, step: int, checkpoint: str | None, output: str, signum: int):
        import signal

        self.step, self.checkpoint, self.output, self.signum = step, checkpoint, output, signum
        self.exit_code = 128 + signum
        self.signal_name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint}" if checkpoint else f"the checkpoints in {output}"
        super().__init__(
            f"{self.signal_name}: training stopped at step {step}; continue from {saved} "
            f"with --resume --output {output}"
        )


class ServerError(KdError):
    """A served teacher failed: the server at ``server`` (its address, never its token) did
    not answer within the stated wait, or answered what the run cannot use (``reason``).

    Raised inside training, the loop saves the state before the failing step and raises it
    again with ``step``, ``checkpoint`` and ``output`` set; the message then says how to
    resume."""

    def __init__(
        self,
        server: str,
        reason: str,
        *,
        step: int | None = None,
        checkpoint: str | None = None,
        output: str | None = None,
    ):
        self.server, self.reason = server, reason
        self.step, self.checkpoint, self.output = step, checkpoint, output
        message = f"teacher server {server}: {reason}"
        if output is not None:
            saved = f"state saved to {checkpoint}" if checkpoint else f"the checkpoints in {output}"
            message += (
                f"; training stopped at step {step}, {saved}: once the server answers, "
                f"continue with --resume --output {output}"
            )
        super().__init__(message)

    def stopped(self, step: int, checkpoint: str | None, output: str) -> ServerError:
        """This error, for a run that stopped at ``step`` with ``checkpoint`` saved."""
        return ServerError(
            self.server, self.reason, step=step, checkpoint=checkpoint, output=output
        )
