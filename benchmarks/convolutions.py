"""The 3x3 convolutions of the `cifar10_lt` ResNet-32, one at a time, in JAX and PyTorch.

  python benchmarks/convolutions.py [--batch=128] [--repeats=15] [--torch_python=PATH]

Times, for each shape of ResNet-32 width 16's stride-1 3x3 convolutions
(32x32x16, 16x16x32 and 8x8x64, NHWC), the forward convolution, its input
gradient and its filter gradient: in JAX on one CPU device, as imbal_jax's
ResNets compute them (oneDNN's kernels where `make` built them, else XLA's;
`IMBAL_JAX_CPU_CONV=xla` forces XLA's), compiled with imbal_jax's CPU compiler
options and freed host memory kept mapped as the benchmark command does; then in eager PyTorch (channels-last tensors,
`aten.convolution_backward` for each gradient alone) in a separate process of
`--torch_python` (default: this interpreter). Each time is the median of
`--repeats` calls after one warm-up call.

Prints one JSON line per framework and shape, then a summary: per shape and
operation the ratio of JAX's time to PyTorch's, and the per-step totals, each
shape weighted by how often the network runs it (10, 9 and 9 times; the stem
and the two stride-2 convolutions are left out). Without PyTorch the summary
says so and the script exits 0. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

# (height = width, channels, how many times one ResNet-32 forward pass runs the shape).
SHAPES = ((32, 16, 10), (16, 32, 9), (8, 64, 9))
OPERATIONS = ('forward', 'input_gradient', 'filter_gradient')


def median_ms(call: Callable[[], Any], repeats: int) -> float:
  call()  # warm-up (and, in JAX, compilation already done)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return round(1e3 * statistics.median(times), 3)


def jax_records(batch: int, repeats: int, retain_host_memory: bool = True) -> list[dict[str, Any]]:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if retain_host_memory:  # as the benchmark command does, before JAX starts its threads
    from imbal_jax import host_memory
    host_memory.retain_freed_memory()
  import jax
  import numpy as np
  from imbal_jax import cpu_conv, sharding

  options = dict(sharding.CPU_COMPILER_OPTIONS)
  device = jax.devices()[0]

  def conv(x, w):
    # As imbal_jax's ResNets call it: oneDNN's convolutions where they are built
    # (IMBAL_JAX_CPU_CONV=xla for XLA's own), the record says which.
    return cpu_conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  programs = {
      'forward': lambda x, w, g: conv(x, w),
      'input_gradient': lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
      'filter_gradient': lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
  }
  rng = np.random.default_rng(0)
  records = []
  for size, channels, count in SHAPES:
    x, g = (jax.device_put(rng.standard_normal((batch, size, size, channels), np.float32), device)
            for _ in range(2))
    w = jax.device_put(0.1 * rng.standard_normal((3, 3, channels, channels), np.float32), device)
    record = {'framework': 'jax', 'jax': jax.__version__, 'device': device.device_kind,
              'convolutions': cpu_conv.backend(),
              'batch': batch, 'size': size, 'channels': channels, 'count': count}
    for name, program in programs.items():
      compiled = jax.jit(program).lower(x, w, g).compile(options)
      record[f'{name}_ms'] = median_ms(lambda: compiled(x, w, g).block_until_ready(), repeats)
    records.append(record)
  return records


def torch_records(batch: int, repeats: int) -> list[dict[str, Any]]:
  import torch

  records = []
  for size, channels, count in SHAPES:
    def tensor(*shape, scale=1.0):
      return (scale * torch.randn(*shape)).to(memory_format=torch.channels_last)
    x, g = tensor(batch, channels, size, size), tensor(batch, channels, size, size)
    w = tensor(channels, channels, 3, 3, scale=0.1)

    def backward(mask):
      return lambda: torch.ops.aten.convolution_backward(
          g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    calls = {'forward': lambda: torch.nn.functional.conv2d(x, w, padding=1),
             'input_gradient': backward([True, False, False]),
             'filter_gradient': backward([False, True, False])}
    record = {'framework': 'pytorch', 'torch': torch.__version__,
              'threads': torch.get_num_threads(), 'batch': batch, 'size': size,
              'channels': channels, 'count': count}
    with torch.no_grad():
      for name, call in calls.items():
        record[f'{name}_ms'] = median_ms(call, repeats)
    records.append(record)
  return records


def summarise(jax_rows: Sequence[dict[str, Any]],
              torch_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Ratios JAX / PyTorch per shape and operation, and count-weighted per-step totals."""
  ratios, totals = {}, {'jax': {}, 'pytorch': {}}
  for ours, theirs in zip(jax_rows, torch_rows, strict=True):
    shape = f"{ours['size']}x{ours['size']}x{ours['channels']}"
    ratios[shape] = {op: round(ours[f'{op}_ms'] / theirs[f'{op}_ms'], 3) for op in OPERATIONS}
  for framework, rows in (('jax', jax_rows), ('pytorch', torch_rows)):
    for op in OPERATIONS:
      totals[framework][f'{op}_ms'] = round(sum(r['count'] * r[f'{op}_ms'] for r in rows), 2)
    totals[framework]['all_ms'] = round(sum(totals[framework].values()), 2)
  return {'summary': True, 'ratio_jax_over_pytorch': ratios, 'per_step_ms': totals,
          'ratio_per_step': round(totals['jax']['all_ms'] / totals['pytorch']['all_ms'], 3)}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--torch_python', default=sys.executable)
  parser.add_argument('--framework', choices=('both', 'jax', 'pytorch'), default='both',
                      help='pytorch: only the PyTorch half, in this process (used by "both")')
  args = parser.parse_args(argv)
  if args.framework == 'pytorch':
    for record in torch_records(args.batch, args.repeats):
      print(json.dumps(record), flush=True)
    return 0
  jax_rows = jax_records(args.batch, args.repeats)
  for record in jax_rows:
    print(json.dumps(record), flush=True)
  if args.framework == 'jax':
    return 0
  if subprocess.run([args.torch_python, '-c', 'import torch'], capture_output=True).returncode:
    print(json.dumps({'summary': True, 'skipped': True,
                      'note': f'PyTorch cannot be imported by {args.torch_python}; '
                              'pass --torch_python=PATH of an interpreter that has it'}))
    return 0
  result = subprocess.run([args.torch_python, __file__, '--framework=pytorch',
                           f'--batch={args.batch}', f'--repeats={args.repeats}'],
                          capture_output=True, text=True, check=True)
  torch_rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  for record in torch_rows:
    print(json.dumps(record), flush=True)
  print(json.dumps(summarise(jax_rows, torch_rows)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
