"""Reference networks and the LightningModule that trains them."""

from lightning_prune.models.classifier import ImageClassifier
from lightning_prune.models.cnn import SmallCNN
from lightning_prune.models.mlp import MLP

__all__ = ["MLP", "ImageClassifier", "SmallCNN"]
