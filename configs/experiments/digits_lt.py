"""The standard table on the embedded digits data (long-tailed, ratio 10): for
tests and CPU demos, no download.

  python -m imbal_jax.experiment --preset=digits_lt --seeds=3 --workdir=runs/table_digits

Trains each distinct stage-1 config and each stage-2 run once per seed with
configs/stage1.py:digits_lt and configs/stage2.py:digits_lt, then writes
comparison.md / .csv / .png and experiment.json in the workdir. Shorten it
with e.g. `--methods=CE,CE+cRT,CE+0.5SupCon+cRT --override=num_epochs=5
--override=stage1.warmup_epochs=1`.

The methods are standard.py's table (this file defines no get_methods(); a
preset that does lists its own).
"""
