"""Tracing compiled steps for TensorBoard / XProf, and the operations that took longest.

Used by `python -m imbal_jax.benchmark --profile_dir=DIR` (docs/performance.md,
How to look).
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
from typing import Any

import jax

# The flag that makes XLA's CPU runtime record one trace event per operation
# (thunk); without it a CPU trace shows only whole executions.
CPU_TRACE_FLAG = '--xla_cpu_enable_xprof_traceme=true'
PROFILE_STEPS = 3


def profile_compiled(compiled, args, trace_dir: str, top: int = 12) -> dict[str, Any]:
  """Traces PROFILE_STEPS steps into `trace_dir` (for TensorBoard / XProf).

  Returns the trace directory and the `top` operations of the compiled program
  that took longest: [name without its numeric suffix, milliseconds per step
  summed over devices and over the operations of that name]. The list is empty
  where the trace has no per-operation events (on CPU, without CPU_TRACE_FLAG in
  XLA_FLAGS when the backend started).
  """
  state, rest = args[0], args[1:]
  with jax.profiler.trace(trace_dir):
    for _ in range(PROFILE_STEPS):
      state, measurements = compiled(state, *rest)
      jax.block_until_ready(measurements)
  names = set(re.findall(r'^\s+(?:ROOT )?%?([\w.\-]+) = ', compiled.as_text(), re.MULTILINE))
  totals = collections.Counter()
  traces = sorted(pathlib.Path(trace_dir).glob('**/*.xplane.pb'), key=os.path.getmtime)
  if traces and hasattr(jax.profiler, 'ProfileData'):
    profile = jax.profiler.ProfileData.from_file(str(traces[-1]))
    for plane in profile.planes:
      for line in plane.lines:
        for event in line.events:
          if event.name in names:
            totals[re.sub(r'\.\d+$', '', event.name)] += event.duration_ns / 1e6 / PROFILE_STEPS
  return {'trace_dir': str(trace_dir),
          'top_ops_ms_per_step': [[name, round(ms, 2)] for name, ms in totals.most_common(top)]}
