"""The one interface every inference backend implements."""
from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np


class BackendError(RuntimeError):
    """Inference failed for a reason that is not the caller's input."""


class Backend(Protocol):
    """Runs one model of the model repository on a batch.

    `inputs` maps the model's input names to arrays whose first axis is the batch;
    the result maps every output name to an array with the same first axis.
    Implementations must be safe to call from several threads at once.
    """

    name: str

    def run(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
