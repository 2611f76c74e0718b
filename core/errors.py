"""Exceptions every stage raises; the CLI maps them to exit codes and the gateway to HTTP statuses."""

from __future__ import annotations


class TuneopsError(Exception):
    """Base of all errors a user can act on: bad input, not a bug. Exit status 2."""

    exit_code = 2


class ConfigError(TuneopsError):
    """One or more problems in a job or settings file; each names its path and line."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


class DataError(TuneopsError):
    """Training or evaluation data that cannot be used (missing, empty, malformed)."""


class ModelError(TuneopsError):
    """A base model that cannot be found, converted or loaded."""


class RegistryError(TuneopsError):
    """A model reference, alias or version that the MLflow registry does not have, or an unreachable store."""


class GateError(TuneopsError):
    """A promotion refused because gates failed or no evaluation exists."""
