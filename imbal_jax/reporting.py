"""Run outputs: metrics.jsonl, report.json and the printed tables.

Files are written atomically (temporary file, then rename), so a crash never
leaves half a report.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def write_json(path: str | pathlib.Path, payload: Any) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile('w', dir=path.parent, prefix=f'.{path.name}.',
                                   delete=False) as handle:
    json.dump(payload, handle, indent=2, sort_keys=False)
    handle.write('\n')
    temporary = handle.name
  os.replace(temporary, path)


class MetricsLog:
  """Appends one JSON object per logged step to metrics.jsonl."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)

  def write(self, record: dict[str, Any]) -> None:
    with self.path.open('a') as handle:
      handle.write(json.dumps(record) + '\n')
      handle.flush()


def _pct(value: float) -> str:
  return f'{100 * value:5.1f}'


def format_report(report: dict[str, Any]) -> str:
  """A human-readable table: summary per split, then per-class recall."""
  splits = [s for s in ('val', 'test') if s in report]
  lines = [f"{report['stage']} on {report['dataset']}: model selected on "
           f"{report['selection']['split']} {report['selection']['metric']} at step "
           f"{report['selection']['step']} (epoch {report['selection']['epoch']})", '']
  header = f"{'':18}" + ''.join(f'{s:>10}' for s in splits)
  lines.append(header)
  for metric in ('accuracy', 'balanced_accuracy', 'macro_f1'):
    lines.append(f'{metric:18}' + ''.join(f'{_pct(report[s][metric]):>10}' for s in splits))
  lines += ['', f"{'class':>12}{'train n':>9}" + ''.join(f'{s + " recall":>13}' for s in splits)]
  for index, name in enumerate(report['class_names']):
    row = f"{name[:12]:>12}{report['train_counts'][index]:>9}"
    row += ''.join(f"{_pct(report[s]['per_class'][index]['recall']):>13}" for s in splits)
    lines.append(row)
  return '\n'.join(lines)
