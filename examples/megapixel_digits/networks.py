"""PyTorch networks of the paper-scale Megapixel digits experiment (channels-first, ``ats.torch``).

- :class:`AttentionSamplingNet`: attention on the low-resolution view, patches
  sampled from it and read from the uint8 full-resolution image, a feature
  network per patch, the expectation estimator, a linear classifier.
- :func:`attention_network` and :func:`feature_network`, in two versions:
  ``"2019"`` (the 2019 ``scripts/mnist.py`` networks: attention 3x3 convs of
  8, 8 and 1 channels with tanh; features 7x7 then three 3x3 convs of 32
  channels, global max pooling, L2 normalization) and ``"fast"`` (the same
  attention network; a feature network with max pooling between its convs,
  about 7x fewer multiply-adds per 50x50 patch: 7 M instead of 47 M, and no
  L2 normalization: unit-norm features bound the classifier's logits by its
  weight norm, which Adam at 1e-3 takes hundreds of steps to grow).
- :class:`LowResolutionCNN` and :class:`DenseCNN`: the baselines.

The ATS model can add an *ink prior* to the attention logits: ``w`` times the
3x3 local mean of the low-resolution view, ``w`` a learned scalar (initial
value ``ink_prior``). With a uniform start the 10 patches of 50x50 land on
one of the five 28x28 digits of a 1500x1500 image about 1% of the time, so
the classifier hardly ever sees a digit and the attention gets no signal;
the prior starts the attention on inked cells (digits and noise strokes),
which it then learns to tell apart.
"""

from __future__ import annotations

import torch
from torch import nn

from ats.torch import functional as F


class L2Normalize(nn.Module):
    """Rows scaled to unit L2 norm (the 2019 ``ats.utils.layers.L2Normalize``)."""

    def forward(self, x):
        return nn.functional.normalize(x, dim=-1)


def attention_network(net: str = "2019") -> nn.Module:
    """Logits ``(B, 1, L, L)`` of the attention over the ``(B, 1, L, L)`` low-resolution view."""
    if net not in ("2019", "fast"):
        raise ValueError(f"net must be '2019' or 'fast', got {net!r}")
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
        nn.Conv2d(8, 1, 3, padding=1),
    )


def feature_network(net: str = "fast") -> tuple[nn.Module, int]:
    """The per-patch feature network and its feature width."""
    if net == "2019":
        return nn.Sequential(
            nn.Conv2d(1, 32, 7), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), L2Normalize(),
        ), 32
    if net == "fast":
        return nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        ), 64
    raise ValueError(f"net must be '2019' or 'fast', got {net!r}")


class AttentionSamplingNet(nn.Module):
    """Attention sampling on ``(x_low float (B, 1, L, L), x_high uint8 (B, 1, H, W))``.

    ``forward(x_low, x_high, key)`` returns ``(logits, attention, offsets)``:
    class logits ``(B, 10)``, the attention map ``(B, L, L)`` and the sampled
    patches' first pixels ``(B, K, 2)``. ``key`` seeds the draw
    (``ats.torch.sample``); ``deterministic=True`` takes the top-k cells.
    """

    def __init__(self, net="fast", n_patches=10, patch_size=50, ink_prior=0.0, smooth=1e-5, replace=False, classes=10):
        super().__init__()
        self.attention = attention_network(net)
        self.feature, width = feature_network(net)
        self.classifier = nn.Linear(width, classes)
        self.ink = nn.Parameter(torch.tensor(float(ink_prior))) if ink_prior else None
        self.n_patches = n_patches
        self.patch_size = patch_size
        self.smooth = smooth
        self.replace = replace

    def attention_map(self, x_low):
        logits = self.attention(x_low)
        if self.ink is not None:
            logits = logits + self.ink * nn.functional.avg_pool2d(x_low, 3, stride=1, padding=1, count_include_pad=False)
        return F.sample_softmax(logits, smooth=self.smooth).squeeze(1)

    def forward(self, x_low, x_high, key=None, deterministic=False):
        attention = self.attention_map(x_low)
        indices, sampled = F.sample(attention, self.n_patches, replace=self.replace, key=key, deterministic=deterministic)
        offsets = F.patch_offsets(indices, attention.shape[1:], x_high.shape[2:], self.patch_size)
        patches = F.extract_patches(x_high, offsets, self.patch_size)  # uint8 (B, K, 1, P, P): a quarter of the bytes
        patches = patches.to(x_low.dtype) / 255
        batch, k = patches.shape[:2]
        flat = patches.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        features = self.feature(flat).unflatten(0, (batch, k))
        pooled = F.expectation(features, sampled, replace=self.replace)
        return self.classifier(pooled), attention, offsets


class LowResolutionCNN(nn.Module):
    """Baseline: a CNN on the low-resolution view alone (``(B, 1, L, L)`` float)."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(64, classes)

    def forward(self, x_low):
        return self.classifier(self.body(x_low))


class DenseCNN(nn.Module):
    """Baseline: a CNN over the whole full-resolution image (uint8 ``(B, 1, H, W)``), strided to stay affordable."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 7, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(64, classes)

    def forward(self, x_high):
        return self.classifier(self.body(x_high.float() / 255))
