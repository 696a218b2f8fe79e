"""Tiny stand-in models for the engine's failure paths, saved as joblib artifacts by the tests."""

from __future__ import annotations

import time

import numpy as np


class ConstantModel:
    """Predicts the same probabilities for every row, with a chosen dtype."""

    def __init__(self, probabilities: list[float], dtype: str = "float64") -> None:
        self.probabilities = probabilities
        self.dtype = dtype

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        return np.tile(np.asarray(self.probabilities, dtype=self.dtype), (matrix.shape[0], 1))


class RaisingModel:
    """Raises on every call."""

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        raise RuntimeError("this model always fails")


class RowRaisingModel:
    """Raises when any row's features add up past a threshold, so one request can fail a whole batch."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        if np.any(matrix.sum(axis=1) > self.threshold):
            raise ValueError("row over the threshold")
        return np.tile([0.25, 0.75], (matrix.shape[0], 1))


class SleepingModel:
    """Sleeps past any reasonable time budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return np.tile([0.5, 0.5], (matrix.shape[0], 1))


class AllocatingModel:
    """Allocates far more memory than the pool process may use."""

    def __init__(self, megabytes: int) -> None:
        self.megabytes = megabytes

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        block = np.ones(self.megabytes * 1024 * 1024 // 8)
        return np.tile([block[0] / 2, block[-1] / 2], (matrix.shape[0], 1))


class NaNModel:
    """Returns NaN probabilities."""

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        return np.full((matrix.shape[0], 2), np.nan)
