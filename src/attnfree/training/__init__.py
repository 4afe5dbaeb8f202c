"""Training: settings, recipes, and ``train`` (transformers.Trainer with our callbacks). Nothing in ``inference``
imports this package."""

from attnfree.training.recipes import RECIPES, recipe
from attnfree.training.settings import TrainSettings
from attnfree.training.trainer import RunResult, train, training_arguments

__all__ = ["RECIPES", "RunResult", "TrainSettings", "recipe", "train", "training_arguments"]
