"""The standard table on long-tailed Fashion-MNIST (imbalance ratio 100; the
IDX files of Debian's dataset-fashion-mnist package), with
configs/stage1.py:fashion_mnist_lt.

  python -m imbal_jax.experiment --preset=fashion_mnist_lt --seeds=3 \
      --workdir=runs/table_fashion_mnist

Writes comparison.md / .csv / .png and experiment.json in the workdir; rerun
the same command to resume. Point at other IDX files with
--override=data_path=DIR.
"""

import importlib.util
import pathlib

# Config files are loaded by path, not as a package.
_spec = importlib.util.spec_from_file_location(
    'imbal_jax_experiments_standard', pathlib.Path(__file__).with_name('standard.py'))
standard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standard)


def get_methods() -> list[dict]:
  return standard.standard_methods()
