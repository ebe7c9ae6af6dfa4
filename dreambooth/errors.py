"""Typed errors: each carries a message for the user and what to do about it."""

from __future__ import annotations


class DreamBoothError(Exception):
    """Base of every error we raise on purpose; ``str()`` gives message and advice together."""

    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.advice = advice

    def __str__(self) -> str:
        return f"{self.message} {self.advice}".strip()


class ConfigError(DreamBoothError):
    """A setting is missing, of the wrong type, out of range or unknown."""


class DatasetError(DreamBoothError):
    """An image folder or an image cannot be used for training."""


class ModelFormatError(DreamBoothError):
    """A checkpoint is not a model we can read, or of a family we do not support yet."""


class OutOfMemoryAdvice(DreamBoothError):
    """The accelerator ran out of memory; the advice lists settings that need less."""


class DiskFullError(DreamBoothError):
    """A file could not be written because the disk is full; nothing half-written was left behind."""


class Cancelled(DreamBoothError):
    """The user asked the run to stop."""
