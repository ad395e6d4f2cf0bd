"""imbal_jax's stage-1 step against eager PyTorch's, alternated, as one ratio.

  python benchmarks/versus_pytorch.py [--rounds=5] [--steps=15] [--torch_python=PATH]

Each round runs, in fresh processes and one after the other,
`python -m imbal_jax.benchmark --config=configs/stage1.py:cifar10_lt --stages=stage1`
and `benchmarks/pytorch_step.py` (the same step in eager PyTorch), and takes
the images/s of each. On a shared machine the speed of one command drifts by
a third within an hour, so only commands run side by side are compared: the
ratio of each round, and their median. Prints one JSON line per round and one
summary line. PyTorch is not a dependency of imbal_jax; `--torch_python` names
an interpreter that has it (default: this one). Without PyTorch the script
prints a summary saying so and exits 0.

`--jax_devices=N` sets JAX_NUM_CPU_DEVICES=N for imbal_jax (default: its own
choice, one CPU device per core). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESET = 'cifar10_lt'  # ResNet-32 width 16, 32x32x3, global batch 128: pytorch_step's defaults


class CommandError(RuntimeError):
  """A benchmark command failed or printed no record."""


def last_json(stdout: str, key: str, value: str) -> dict[str, Any]:
  """The last JSON line of `stdout` whose `key` is `value`."""
  for line in reversed(stdout.splitlines()):
    line = line.strip()
    if line.startswith('{'):
      record = json.loads(line)
      if record.get(key) == value:
        return record
  raise CommandError(f'no JSON line with {key}={value!r} in the output:\n{stdout[-2000:]}')


def run(command: Sequence[str], env: dict[str, str] | None = None) -> str:
  result = subprocess.run(list(command), cwd=ROOT, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    raise CommandError(f'{" ".join(command)} exited {result.returncode}:\n'
                       f'{result.stderr[-3000:]}')
  return result.stdout


def jax_round(steps: int, devices: int | None) -> dict[str, Any]:
  env = dict(os.environ)
  if devices:
    env['JAX_NUM_CPU_DEVICES'] = str(devices)
  stdout = run([sys.executable, '-m', 'imbal_jax.benchmark',
                f'--config=configs/stage1.py:{PRESET}', '--stages=stage1', f'--steps={steps}'], env)
  return last_json(stdout, 'stage', 'stage1')


def torch_round(python: str, steps: int) -> dict[str, Any]:
  stdout = run([python, str(ROOT / 'benchmarks' / 'pytorch_step.py'), f'--steps={steps}'])
  return last_json(stdout, 'framework', 'pytorch')


def summarise(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
  """Medians and per-round ratios of (imbal_jax, PyTorch) images/s pairs."""
  if not pairs:
    raise ValueError('no rounds to summarise')
  ratios = [jax_ips / torch_ips for jax_ips, torch_ips in pairs]
  return {'rounds': len(pairs),
          'imbal_jax_images_per_sec': [round(j, 1) for j, _ in pairs],
          'pytorch_images_per_sec': [round(t, 1) for _, t in pairs],
          'ratios': [round(r, 3) for r in ratios],
          'median_ratio': round(statistics.median(ratios), 3),
          'min_ratio': round(min(ratios), 3), 'max_ratio': round(max(ratios), 3),
          'rounds_imbal_jax_not_slower': sum(r >= 1 for r in ratios)}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=15, help='timed steps of each command')
  parser.add_argument('--torch_python', default=sys.executable,
                      help='a Python interpreter with PyTorch installed')
  parser.add_argument('--jax_devices', type=int, default=None,
                      help='JAX CPU devices for imbal_jax (default: one per core)')
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.steps < 1:
    parser.error(f'--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}')
  probe = subprocess.run([args.torch_python, '-c', 'import torch'], capture_output=True)
  if probe.returncode != 0:
    print(json.dumps({'skipped': True, 'note': f'{args.torch_python} cannot import torch; '
                      'pass --torch_python=PATH of an interpreter that has PyTorch'}))
    return 0
  pairs = []
  for index in range(args.rounds):
    try:
      ours = jax_round(args.steps, args.jax_devices)
      theirs = torch_round(args.torch_python, args.steps)
    except CommandError as error:
      print(f'versus_pytorch: round {index}: {error}', file=sys.stderr)
      return 1
    pairs.append((ours['images_per_sec'], theirs['images_per_sec']))
    print(json.dumps({'round': index, 'imbal_jax_devices': ours['device_count'],
                      # 'onednn' or 'xla' (imbal_jax.cpu_conv); None in older records
                      'imbal_jax_convolutions': ours.get('cpu_convolutions'),
                      'imbal_jax_images_per_sec': round(pairs[-1][0], 1),
                      'pytorch_images_per_sec': round(pairs[-1][1], 1),
                      'pytorch_threads': theirs.get('threads'), 'torch': theirs.get('torch'),
                      'ratio': round(pairs[-1][0] / pairs[-1][1], 3)}), flush=True)
  print(json.dumps({'summary': True, 'preset': PRESET, **summarise(pairs)}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
