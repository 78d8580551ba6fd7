"""Errors a user can act on: each names the problem and the fix."""

from __future__ import annotations


class QloraError(Exception):
    """Base class: the message is shown to the user as is, without a stack trace."""

    exit_code = 2


class ConfigError(QloraError):
    """params.yaml or an override is invalid."""


class DataError(QloraError):
    """Raw data is missing, empty, unreadable or too broken to use."""


class ModelError(QloraError):
    """The base model cannot be found, downloaded or loaded."""


class RegistryError(QloraError):
    """The MLflow tracking server or model registry refused or cannot be reached."""


class MergeError(QloraError):
    """The merged model does not reproduce the adapter model within tolerance."""


class TransientError(RegistryError):
    """A tracking server or registry that failed in a way worth retrying later (down, 5xx)."""

    exit_code = 75  # sysexits.h EX_TEMPFAIL: orchestrators retry on it


class DistributedError(QloraError):
    """A rank of a training on several ranks (torchrun) failed; the message names the rank."""


class TrainingDivergedError(QloraError):
    """Training produced a non-finite loss, gradient or LoRA weight; nothing was saved."""


class NonFiniteMetricError(QloraError):
    """A metric is NaN or infinite: it cannot be written, compared or promoted on."""
