"""The standard table on long-tailed Fashion-MNIST (imbalance ratio 100; the
IDX files of Debian's dataset-fashion-mnist package), with
configs/stage1.py:fashion_mnist_lt.

  python -m imbal_jax.experiment --preset=fashion_mnist_lt --seeds=3 \
      --workdir=runs/table_fashion_mnist

Writes comparison.md / .csv / .png and experiment.json in the workdir; rerun
the same command to resume. Point at other IDX files with
--override=data_path=DIR.

The methods are standard.py's table (this file defines no get_methods(); a
preset that does lists its own).
"""
