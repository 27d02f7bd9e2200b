"""Two PyTorch ResNet layouts written here with torch.nn alone (torchvision's wheel does not
import beside the CPU torch): torchvision's ResNets, whose state dicts are key for key what
torchvision's resnet18(), resnet34(), resnet50() and wide_resnet50_2() give, and the common
CIFAR pre-activation bottleneck ResNet. Their BN statistics and affine parameters are drawn
away from identity."""

import torch
from torch import nn


def _downsample(inplanes, out, stride):
    return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck: the stride on the 3x3 conv (ResNet v1.5); its
    inner width is planes * width_per_group / 64 (wide_resnet50_2: twice ResNet-50's)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride, project, width_per_group=64):
        super().__init__()
        width = planes * width_per_group // 64
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * 4, stride) if project else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: two 3x3 convs, the stride on the first."""
    expansion = 1

    def __init__(self, inplanes, planes, stride, project, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride) if project else None

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class TorchvisionResNet(nn.Module):
    """torchvision.models.resnet.ResNet: resnet18 is (BasicBlock, (2, 2, 2, 2)), resnet34
    (BasicBlock, (3, 4, 6, 3)), resnet50 (Bottleneck, (3, 4, 6, 3)), wide_resnet50_2 the
    last with width_per_group=128."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000, base=64, block=Bottleneck,
                 width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = base
        for s, units in enumerate(layers, start=1):
            planes = base * 2 ** (s - 1)
            blocks = []
            for u in range(units):
                stride = 2 if s > 1 and u == 0 else 1
                project = stride != 1 or inplanes != planes * block.expansion
                blocks.append(block(inplanes, planes, stride, project, width_per_group))
                inplanes = planes * block.expansion
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.stages = len(layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, self.stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActBottleneck(nn.Module):
    def __init__(self, inplanes, width, stride, project):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        if project:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, width * 4, 1, stride, bias=False))

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        return out + shortcut


def resnet18(**kw):
    return TorchvisionResNet((2, 2, 2, 2), block=BasicBlock, **kw)


def resnet34(**kw):
    return TorchvisionResNet((3, 4, 6, 3), block=BasicBlock, **kw)


def wide_resnet50_2(**kw):
    return TorchvisionResNet((3, 4, 6, 3), width_per_group=128, **kw)


class PreActResNet(nn.Module):
    def __init__(self, layers=(2, 2), num_classes=10, base=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 3, 1, 1, bias=False)
        inplanes = base
        for s, units in enumerate(layers, start=1):
            width = base * 2 ** (s - 1)
            blocks = [PreActBottleneck(inplanes if u == 0 else width * 4, width,
                                       2 if s > 1 and u == 0 else 1, u == 0)
                      for u in range(units)]
            inplanes = width * 4
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(inplanes)
        self.linear = nn.Linear(inplanes, num_classes)
        self.stages = len(layers)

    def forward(self, x):
        x = self.conv1(x)
        for s in range(1, self.stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.linear(torch.relu(self.bn(x)).mean(dim=(2, 3)))


def randomized(module, seed=0):
    """Non-trivial BN statistics and affine parameters, then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return module.eval()
