"""Reference networks and the LightningModule that trains them.

Every network here is a plain ``nn.Module`` with random initialisation (nothing is downloaded). The image
classifiers defined in this package name their final classifier ``head``; torchvision's keep their own names.
``GPT`` is a small Llama-style language model, trained by ``LanguageModel``.
"""

from lightning_prune.models.classifier import ImageClassifier
from lightning_prune.models.cnn import SmallCNN
from lightning_prune.models.gpt import GPT, GPTConfig
from lightning_prune.models.language import LanguageModel, evaluate_perplexity
from lightning_prune.models.lenet import LeNet5
from lightning_prune.models.mlp import MLP
from lightning_prune.models.resnet import BasicBlock, CifarResNet, resnet20, resnet56
from lightning_prune.models.vgg import VGG, VGG_PRESETS, vgg11, vgg16
from lightning_prune.models.zoo import TORCHVISION_MODELS, torchvision_model

__all__ = [
    "GPT",
    "MLP",
    "TORCHVISION_MODELS",
    "VGG",
    "VGG_PRESETS",
    "BasicBlock",
    "CifarResNet",
    "GPTConfig",
    "ImageClassifier",
    "LanguageModel",
    "LeNet5",
    "SmallCNN",
    "evaluate_perplexity",
    "resnet20",
    "resnet56",
    "torchvision_model",
    "vgg11",
    "vgg16",
]
