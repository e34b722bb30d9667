"""The one interface every inference backend implements."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Generic, Mapping, Protocol, TypeVar

import numpy as np

T = TypeVar("T")


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


class ModelCache(Generic[T]):
    """What an in-process backend loads per model (`load(model, path of its model.onnx)`), loaded
    once on first use, also when several threads ask at once."""

    def __init__(self, repository: Path | str, load: Callable[[str, Path], T]) -> None:
        self.repository = Path(repository)
        self._load = load
        self._items: dict[str, T] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> T:
        item = self._items.get(model)
        if item is not None:
            return item
        with self._lock:
            item = self._items.get(model)
            if item is None:
                path = self.repository / model / "1" / "model.onnx"
                if not path.is_file():
                    raise BackendError(f"model {model!r} not found at {path}; run `python -m server models build`")
                item = self._items[model] = self._load(model, path)
        return item

    def clear(self) -> None:
        self._items.clear()
