"""The standard table on HAM10000 at 28 px (../shared/data/ham10000_28.npz,
7 classes, its natural imbalance), with configs/stage1.py:ham10000.

  python -m imbal_jax.experiment --preset=ham10000 --seeds=3 --workdir=runs/table_ham10000

Every run is a full 30-epoch stage 1 (plus 10 epochs of stage 2): on a CPU,
select methods with --methods or shorten with --override=num_epochs=N; on an
accelerator run the whole table. Writes comparison.md / .csv / .png and
experiment.json in the workdir; rerun the same command to resume.

The methods are standard.py's table (this file defines no get_methods(); a
preset that does lists its own).
"""
