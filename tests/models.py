"""Small models the tests define, loadable as `tests/models.py:mlp`, `:cnn` and `:regressor`,
and tiny Hugging Face image classifiers written as folders (`vit_folder`, `resnet_folder`).

Each factory returns `(module, example_inputs)`, the contract of a mahir model factory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, features: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.GELU(),
            nn.Dropout(0.5),  # a wrong training flag would show as a fidelity loss
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).flatten(1))


def mlp() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return MLP(), {"x": torch.randn(4, 32)}


def cnn() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = CNN()
    # Non-trivial BatchNorm statistics, so eval and train modes give different answers.
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model, {"image": torch.randn(2, 3, 32, 32)}


class Noisy(nn.Module):
    """Dropout forced on: no export of it can agree with its own reference."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.linear(x), 0.5, training=True)


def noisy() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    return Noisy(), {"x": torch.randn(2, 16)}


class Regressor(nn.Module):
    """Two inputs, two real-valued targets: a 2-column output that is no classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(4, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(features) + self.b(context)))


def regressor() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return Regressor(), {"features": torch.randn(4, 8), "context": torch.randn(4, 4)}


LABELS = ("cat", "dog", "fox", "owl", "yak")
"""The tiny ViT's classes, by index."""


def vit_folder(folder: Path) -> Path:
    """A tiny ViT image classifier (32x32 images, 8x8 patches, 2 layers, 5 named classes) with
    random weights and its image processor, saved as a Hugging Face folder."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        initializer_range=1.0,  # logits far apart: generated images fall into several classes
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    processor = _pil_processor("ViTImageProcessor")
    processor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def resnet_folder(folder: Path) -> Path:
    """A tiny ResNet image classifier (4 classes) with random weights and ConvNeXt's image
    processor (resize the short side, crop the centre), as ResNet checkpoints ship."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4
    )
    model = transformers.ResNetForImageClassification(config)
    # Non-trivial BatchNorm statistics, so eval and train modes give different answers.
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(folder)
    processor = _pil_processor("ConvNextImageProcessor")
    processor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return folder


def _pil_processor(name: str) -> Any:
    """transformers 5's PIL implementation of an image processor (the default one needs
    torchvision, which is not installed), else the class itself."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


DECODERS = ("llama", "qwen2", "gpt2")
"""Architectures of the tiny causal LMs (`decoder_folder`)."""


def decoder_folder(folder: Path, arch: str, tokenizer: Any, *, heads: int = 4) -> Path:
    """A tiny causal LM of `arch` (2 layers, width 64 in `heads` heads, half as many key/value
    heads, 256 positions) with random weights and
    `tokenizer` (the default LLM's, chat template and all), as a Hugging Face folder. Weights
    are drawn wide (initializer_range 0.3): greedy choices are then far from ties and
    generations vary instead of repeating one token."""
    import transformers

    torch.manual_seed(0)
    ids = {"bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.3}
    vocab = len(tokenizer)
    if arch == "gpt2":
        config: Any = transformers.GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=heads, **ids
        )
        model: Any = transformers.GPT2LMHeadModel(config)
    else:
        classes = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }
        config_class, model_class = classes[arch]
        config = config_class(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **ids,
        )
        model = model_class(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
