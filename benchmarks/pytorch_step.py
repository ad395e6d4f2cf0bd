"""The stage-1 training step in eager PyTorch, for a CPU speed comparison.

  python benchmarks/pytorch_step.py [--steps=20] [--batch_size=128] [--image_size=32]

Not part of imbal_jax (PyTorch is not a dependency): it exists so that
`python -m imbal_jax.benchmark --config=configs/stage1.py:cifar10_lt` can be
compared with what people run today. It prints one JSON line shaped like the
imbal_jax benchmark's 'stage1' record. Without PyTorch it says so and exits 0.

The step matches imbal_jax's stage-1 step on the cifar10_lt preset as closely
as eager PyTorch allows: ResNet-32 width 16 with zero-padding ("option A")
shortcuts and zero-initialised last batch-norm scales; a linear classifier and
an MLP projection head (64 -> 512 -> 128, L2-normalised); cross-entropy +
0.5 * supervised contrastive loss (temperature 0.1) over the batch; SGD with
momentum 0.9 and weight decay 5e-4 on kernels only; random padded crop (4 px)
and horizontal flip of uint8 images inside the timed step, as imbal_jax does
them on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def build(torch, nn, F, image_size: int, channels: int, num_classes: int, width: int):
  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      nn.init.zeros_(self.bn2.weight)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      shortcut = x
      if self.stride != 1 or self.extra:
        shortcut = x[:, :, ::self.stride, ::self.stride]
        shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return F.relu(shortcut + y)

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                                nn.BatchNorm2d(width), nn.ReLU())
      blocks, cin = [], width
      for stage in range(3):
        for index in range(5):
          cout = width * 2**stage
          blocks.append(Block(cin, cout, 2 if stage and index == 0 else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.classifier = nn.Linear(cin, num_classes)
      self.projection = nn.Sequential(nn.Linear(cin, 512), nn.ReLU(), nn.Linear(512, 128))

    def forward(self, x):
      features = self.blocks(self.stem(x)).mean(dim=(2, 3))
      return self.classifier(features), F.normalize(self.projection(features), dim=-1)

  return Net()


def supcon(torch, z, labels, temperature=0.1):
  logits = z @ z.T / temperature
  n = len(labels)
  self_mask = torch.eye(n, dtype=torch.bool)
  logits = logits.masked_fill(self_mask, float('-inf'))
  log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
  positives = (labels[:, None] == labels[None, :]) & ~self_mask
  counts = positives.sum(1)
  per_anchor = -(log_prob.masked_fill(~positives, 0).sum(1)) / counts.clamp(min=1)
  has = counts > 0
  return per_anchor[has].mean()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--num_classes', type=int, default=10)
  parser.add_argument('--width', type=int, default=16)
  parser.add_argument('--channels_last', action='store_true',
                      help='NHWC memory format (sometimes faster on CPU).')
  args = parser.parse_args()
  try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
  except ImportError:
    print(json.dumps({'framework': 'pytorch', 'skipped': True,
                      'note': 'PyTorch is not installed; pip install torch to compare'}))
    return 0
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  net = build(torch, nn, F, args.image_size, args.channels, args.num_classes, args.width)
  decay = [p for name, p in net.named_parameters() if p.ndim > 1]
  no_decay = [p for name, p in net.named_parameters() if p.ndim <= 1]
  optimizer = torch.optim.SGD([{'params': decay, 'weight_decay': 5e-4},
                               {'params': no_decay, 'weight_decay': 0.0}],
                              lr=0.1, momentum=0.9)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  net = net.to(memory_format=memory_format)
  generator = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (args.batch_size, args.image_size, args.image_size,
                                  args.channels), dtype=torch.uint8, generator=generator)
  labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
  mean, std = 0.5, 0.25
  pad = 4

  def step():
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = x[:, :, dy:dy + args.image_size, dx:dx + args.image_size]
    flip = torch.rand(args.batch_size, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x = ((x - mean) / std).contiguous(memory_format=memory_format)
    logits, z = net(x)
    loss = F.cross_entropy(logits, labels) + 0.5 * supcon(torch, z, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()  # synchronises, as imbal_jax's benchmark blocks on the step

  times = []
  for index in range(args.warmup + args.steps):
    start = time.perf_counter()
    step()
    if index >= args.warmup:
      times.append(time.perf_counter() - start)
  median = statistics.median(times)
  print(json.dumps({
      'framework': 'pytorch', 'torch': torch.__version__, 'threads': torch.get_num_threads(),
      'machine': platform.machine(), 'cpu_count': os.cpu_count(), 'model': 'resnet32',
      'width': args.width, 'image_size': args.image_size, 'global_batch': args.batch_size,
      'channels_last': args.channels_last, 'step_seconds_median': median,
      'images_per_sec': args.batch_size / median}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
