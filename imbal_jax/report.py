"""Compare runs: python -m imbal_jax.report RUN_DIR... [--output=DIR] [--group_by=FIELD,...].

Each RUN_DIR is the workdir of a finished run (it holds report.json). Runs
whose configs differ only in the seed form one method ('stage1 lambda=0.5',
'stage2 (cRT) lambda=0.5'); the command prints the Markdown table of test
metrics (mean ± sample std over seeds) and writes comparison.md,
comparison.csv, per_class_recall.csv and comparison.png to --output.
"""

import sys

from absl import app, flags

from imbal_jax import comparison

flags.DEFINE_string('output', None, 'Directory for the comparison files; default: the '
                    'directory that holds all the run directories.')
flags.DEFINE_list('group_by', None, 'Config fields that define a method, e.g. '
                  'stage,contrastive_weight (stage1.FIELD reads a stage-2 run\'s stage-1 '
                  'config). Default: every field except the seed and bookkeeping fields.')
FLAGS = flags.FLAGS


def main(argv):
  run_dirs = argv[1:]
  if not run_dirs:
    raise app.UsageError('name one or more run directories, each holding a report.json')
  try:
    methods, paths = comparison.compare(run_dirs, FLAGS.output, FLAGS.group_by)
  except comparison.ComparisonError as error:
    print(f'imbal_jax.report: {error}', file=sys.stderr)
    sys.exit(2)
  print(comparison.format_table(methods))
  print(f'\nWritten: {", ".join(str(path) for path in paths)}')


if __name__ == '__main__':
  app.run(main)
