"""PAMIQ-Core's trainer API."""

from shared.trainer.base import Trainer, TrainersDict

__all__ = ["Trainer", "TrainersDict"]
