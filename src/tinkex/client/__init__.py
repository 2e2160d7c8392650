"""The tinkex client: ServiceClient, TrainingClient, SamplingClient, RestClient and APIFuture."""

import logging as _logging
import os as _os

from . import auth
from ._custom_loss import CustomLossFnV1, LossHandle, PerDatumLossFn
from ._futures import APIFuture, AwaitableConcurrentFuture, RetryableException
from .admin_client import AdminClient
from .rest_client import ExperimentalWarning, RestClient
from .sampling_client import BackcompatSamplingClientFuture, RetryConfig, SamplingClient
from .service_client import ServiceClient
from .training_client import BackcompatTrainingClientFuture, TrainingClient

__all__ = [
    "APIFuture",
    "AdminClient",
    "AwaitableConcurrentFuture",
    "BackcompatSamplingClientFuture",
    "BackcompatTrainingClientFuture",
    "CustomLossFnV1",
    "ExperimentalWarning",
    "LossHandle",
    "PerDatumLossFn",
    "RestClient",
    "RetryConfig",
    "RetryableException",
    "SamplingClient",
    "ServiceClient",
    "TrainingClient",
    "auth",
]


def _setup_logging() -> None:
    # The server signals backpressure with 4xx answers; httpx would log every one at INFO.
    level = _os.environ.get("TINKER_LOG", "").lower()
    if level in ("debug", "info"):
        _logging.getLogger("tinkex").setLevel(level.upper())
        _logging.getLogger("httpx").setLevel(level.upper())
    else:
        _logging.getLogger("httpx").setLevel(_logging.WARNING)


_setup_logging()
