"""Train one stage: python -m imbal_jax.main --config=configs/stage1.py --workdir=DIR.

Stage 2: --config=configs/stage2.py --workdir=DIR2 --config.init_from=DIR.
Rerunning a command resumes from the latest checkpoint in its workdir.
Several hosts: the same command in every process, which join before training
(imbal_jax/distributed.py: --coordinator_address, --num_processes, --process_id,
or detected under SLURM, Open MPI and on Cloud TPU).
"""

import os
import pathlib
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imbal_jax import launch_flags

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the report.')
config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/stage1.py[:preset].',
                                lock_config=True)
flags.DEFINE_bool('force', False, 'Continue a workdir whose saved config differs from --config.')
launch_flags.define()
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors come back before JAX starts.
  from imbal_jax import (checkpoint, configuration, cpu_conv, distributed, host_memory, train,
                         workdir)
  from imbal_jax.data.sources import DataError

  if not FLAGS['verbosity'].present:
    # Checkpointing logs several INFO lines per save; keep the terminal for the progress bar.
    logging.set_verbosity(logging.WARNING)

  # Expected failures: one line naming the problem and the fix, no traceback.
  expected = (
      (distributed.LaunchError, 'launch error: ', 2),
      (configuration.ConfigError, 'config error: ', 2),
      (cpu_conv.CpuConvError, 'config error: ', 2),
      (DataError, 'data error: ', 2),
      (workdir.WorkdirError, 'workdir error: ', 2),
      (checkpoint.CheckpointError, 'checkpoint error: ', 2),
      (workdir.Preempted, '', None),  # its own exit code: 143 (SIGTERM) or 130 (Ctrl-C)
      (FloatingPointError, 'training stopped: ', 3),
  )
  try:
    # Before anything starts JAX's backends: the allocator's settings (CPU only), then
    # the processes of a multi-process run join.
    host_memory.retain_freed_memory()
    cpu_conv.available()  # IMBAL_JAX_CPU_CONV checked before any work
    if not distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id):
      distributed.use_cpu_cores(distributed.config_batch_sizes(FLAGS.config),
                                float32=FLAGS.config.get('dtype', 'float32') == 'float32')
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, force=FLAGS.force)
  except tuple(kind for kind, _, _ in expected) as error:
    _, label, code = next(entry for entry in expected if isinstance(error, entry[0]))
    print(f'imbal_jax: {label}{error}', file=sys.stderr)
    sys.exit(code if code is not None else error.exit_code)
  except KeyboardInterrupt:  # Ctrl-C before the training loop, or a second one within it
    print('imbal_jax: interrupted (Ctrl-C); rerun the same command to continue from the last '
          'complete checkpoint, if any.', file=sys.stderr)
    sys.exit(workdir.INTERRUPTED_EXIT_CODE)


# How None is written for configuration.NULLABLE_FIELDS on the command line; absl would
# parse it as a float and fail, so parse_flags sets these fields itself.
NONE_SPELLINGS = ('None', 'none', 'null', '')


def _config_error(message: str):
  print(f'imbal_jax: config error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with a plain message for `--config.FIELD` naming no field, a bad
  value or config file, and `--config.FIELD=None` for the fields where None means
  something (imbalance_ratio=None keeps the data's own imbalance)."""
  set_to_none, kept = [], []
  for arg in argv:
    name, sep, value = arg.partition('=')
    if sep and name.startswith('--config.') and value in NONE_SPELLINGS:
      from imbal_jax.configuration import NULLABLE_FIELDS  # imports JAX, starts no backend
      if name[len('--config.'):] in NULLABLE_FIELDS:
        set_to_none.append(name[len('--config.'):])
        continue
    kept.append(arg)
  # --config=PATH or --config PATH, as absl takes both.
  config_path = next((a.partition('=')[2] if a.startswith('--config=') else after
                      for a, after in zip(argv, list(argv[1:]) + [None])
                      if a.startswith('--config=') or (a == '--config' and after)), None)
  if config_path and not os.path.isfile(config_path.split(':')[0]):
    configs = pathlib.Path(__file__).resolve().parents[1] / 'configs'
    _config_error(f'--config={config_path}: {config_path.split(":")[0]} is not a file (relative '
                  f'to the current directory {os.getcwd()}); name {configs / "stage1.py"} or '
                  f'{configs / "stage2.py"} (a preset after a colon), or run from {configs.parent}.')
  try:
    remaining = FLAGS(kept)
  except flags.IllegalFlagValueError as error:
    # A failing config file's message comes with its traceback as text: keep its last line.
    if 'Traceback' in str(error):
      last = str(error).strip().splitlines()[-1]
      _config_error(f'--config={config_path}: {re.sub(r"^[A-Za-z]*Error: ", "", last)}')
    _config_error(str(error))
  except (AttributeError, KeyError) as error:
    raw = str(error)
    fields = [arg.split('=')[0][len('--config.'):] for arg in argv[1:]
              if arg.startswith('--config.')]
    unknown = [f for f in fields if f.split('.')[-1] in raw] or fields
    hint = re.search(r'Did you mean "([^"]+)"', raw)
    message = f'imbal_jax: config error: --config.{unknown[0]} is not a config field'
    message += f'; did you mean --config.{hint.group(1)}?' if hint else (
        '; the config file lists the fields (check the spelling).')
    print(message, file=sys.stderr)
    sys.exit(2)
  for field in set_to_none:
    FLAGS.config[field] = None
  overridden = set(config_flags.get_override_values(FLAGS['config'])) | set(set_to_none)
  config_path = config_flags.get_config_filename(FLAGS['config'])
  if config_path and 'dataset' in overridden and FLAGS.config.get('stage') == 'stage1':
    from imbal_jax import configuration
    path, _, preset = config_path.partition(':')
    preset_config = configuration.load_config_file(
        pathlib.Path(path), 'imbal_jax_preset').get_config(preset or None)
    note = configuration.keep_ratio_for_its_data(FLAGS.config, preset_config.dataset,
                                                  overridden)
    if note:
      print(f'note: {note}')
  return remaining


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
