"""Small custom classifiers for conversion tests (importable, so export can load them by path)."""

from __future__ import annotations

import torch
from torch import nn


def padding_free_2d() -> nn.Module:
    """Conv/pool features and a two-layer head, through nn.Flatten in an nn.Sequential."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 32),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(32, 5),
    ).eval()  # 16x16 window, stride 4


def relu6_2d() -> nn.Module:
    """:func:`padding_free_2d` with MobileNet's ReLU6: a Clip whose bounds are constant scalars."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU6(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU6(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 5),
    ).eval()  # 16x16 window, stride 4


def padding_free_1d() -> nn.Module:
    """A Conv1d network over time, dense along its one axis."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 8, 5, stride=2),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    ).eval()  # window 31: (31-5)/2+1 = 14, (14-3)/2+1 = 6


class PooledHead(nn.Module):
    """Adaptive pooling to 2x2 (not global), a view-based flatten and BatchNorm1d in the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2))
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc1 = nn.Linear(6 * 2 * 2, 12)
        self.norm = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 3)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.norm(self.fc1(x))))  # window 15: 13 -> 6 -> pool 3


class LayerNormHead(nn.Module):
    """A head with LayerNorm after the first Linear: mixes features, so it cannot be a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.fc(torch.flatten(self.conv(x), 1))))


class MeanHead(nn.Module):
    """Pooling and flatten in one ``x.mean((-2, -1))`` before the Linear layers, as ShuffleNet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU()
        )
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean((-2, -1))  # window 13: 11 -> 5
        return self.fc2(torch.relu(self.fc1(pooled)))


class FullyConvolutional(nn.Module):
    """No fully-connected layer: class maps averaged over the whole window (torch.mean)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean(self.conv(x), dim=[2, 3])  # window 8: 6x6 maps


class NoHead(nn.Module):
    """No fully-connected head and no pooling the conversion knows (a maximum over the map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).amax(dim=(2, 3))


class UnevenPool(nn.Module):
    """Adaptive pooling from 5x5 to 2x2: windows overlap, no fixed-window equivalent."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


class ChannelsLastBlocks(nn.Module):
    """ConvNeXt's shape, padding-free: per-position Linear layers on a channels-last map in the
    features, and a LayerNorm over the pooled map's channels (as LayerNorm2d) before the flatten."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.expand = nn.Linear(8, 16)
        self.project = nn.Linear(16, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.stem(x)).permute(0, 2, 3, 1)  # window 12: 6 -> 4
        x = self.project(nn.functional.gelu(self.expand(self.norm(x))))
        x = self.pool(torch.permute(x, (0, 3, 1, 2)))
        x = self.head_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(torch.flatten(x, 1))


class LinearOverWidth(nn.Module):
    """A Linear over a map's last axis, which is its width: it cannot take a wider map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.mix = nn.Linear(6, 6)
        self.fc = nn.Linear(2 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.mix(self.conv(x)), 1))


class ChannelsLastFlatten(nn.Module):
    """Flattens the pooled map in channels-last order (as a TensorFlow port might)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).permute(0, 2, 3, 1).flatten(1))


class ChannelsLast1d(nn.Module):
    """A 1-D map normalised over its channels after pooling: (0, 2, 1) permutes both ways."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 4, 3)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.pool(self.conv(x)).permute(0, 2, 1)).permute(0, 2, 1)
        return self.fc(torch.flatten(x, 1))  # window 9: 7 -> 1


class LinearOverLength(nn.Module):
    """A Linear over a 1-D map's length, between two permutes: it cannot take a longer map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.mix = nn.Linear(6, 6)
        self.fc = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 1).permute(0, 2, 1)
        return self.fc(torch.flatten(self.mix(x), 1))


class ChannelsLastMean(nn.Module):
    """A mean over axes 2 and 3 of a channels-last map: width and channels, not space."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).permute(0, 2, 3, 1).mean((2, 3)))
