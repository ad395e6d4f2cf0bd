"""Long-tail protocol, samplers, digits source and batching."""

import numpy as np
import pytest

from imbal_jax.data import longtail, pipeline, samplers, sources


def test_longtail_counts_follow_cao_formula_on_cifar10_sizes():
  counts = longtail.longtail_counts(np.full(10, 5000), 100)
  expected = [int(5000 * 100 ** (-c / 9)) for c in range(10)]
  assert counts.tolist() == expected
  assert counts[0] == 5000 and counts[-1] == 50


def test_longtail_counts_by_count_keep_head_and_never_exceed_available():
  available = np.array([30, 400, 90, 12])
  counts = longtail.longtail_counts(available, 10, order='count')
  # Ranks by count: class 1 (head), 2, 0, 3.
  assert counts[1] == 400
  assert counts.tolist() == [min(30, int(400 * 10 ** (-2 / 3))), 400,
                             min(90, int(400 * 10 ** (-1 / 3))), min(12, int(400 / 10))]
  assert np.all(counts <= available)


def test_longtail_rejects_ratio_below_one():
  with pytest.raises(ValueError, match='imbalance_ratio'):
    longtail.longtail_counts(np.full(3, 10), 0.5)


def test_longtail_indices_are_seeded_and_exact():
  labels = np.repeat(np.arange(5), 100)
  first = longtail.longtail_indices(labels, 5, 20, seed=0)
  again = longtail.longtail_indices(labels, 5, 20, seed=0)
  other = longtail.longtail_indices(labels, 5, 20, seed=1)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert np.bincount(labels[first]).tolist() == longtail.longtail_counts(
      np.full(5, 100), 20).tolist()
  assert len(np.unique(first)) == len(first)


def test_digits_splits_balanced_disjoint_and_long_tailed():
  data = sources.load_digits_lt(imbalance_ratio=10, seed=0)
  val, test, train = (data.class_counts(s) for s in ('val', 'test', 'train'))
  assert val.tolist() == [20] * 10 and test.tolist() == [40] * 10
  assert train[0] / train[-1] == pytest.approx(10, rel=0.1)
  assert np.all(np.diff(train) <= 0)
  assert data.image_shape == (8, 8, 1) and data.splits['train'].images.dtype == np.uint8
  # Disjoint: no image appears in two splits (digits has a few exact duplicate images,
  # so compare by source index via the seeded hold-out instead of pixels).
  other = sources.load_digits_lt(imbalance_ratio=10, seed=1)
  np.testing.assert_array_equal(other.splits['test'].images, data.splits['test'].images)
  assert not np.array_equal(other.train_indices, data.train_indices)


def test_digits_holdouts_do_not_overlap_train():
  labels = np.repeat(np.arange(3), 50)
  held, rest = longtail.balanced_holdout(labels, 3, 10, seed=0)
  assert len(np.intersect1d(held, rest)) == 0
  assert len(held) + len(rest) == len(labels)
  assert np.bincount(labels[held]).tolist() == [10, 10, 10]


@pytest.mark.parametrize('sampler,power', [('class_balanced', 0.0), ('sqrt', 0.5),
                                           ('instance', 1.0)])
def test_sampler_class_frequencies_follow_n_to_the_q(sampler, power):
  counts = np.array([500, 120, 40, 10])
  labels = np.repeat(np.arange(4), counts)
  drawn = np.concatenate([samplers.epoch_indices(labels, 4, sampler, seed=0, epoch=e,
                                                 length=len(labels)) for e in range(40)])
  frequency = np.bincount(labels[drawn], minlength=4) / len(drawn)
  expected = counts ** power / np.sum(counts ** power)
  np.testing.assert_allclose(frequency, expected, rtol=0.05)


def test_progressive_sampler_moves_from_instance_to_balanced():
  counts = np.array([90, 10])
  first = samplers.class_probabilities(counts, 'progressive', epoch=0, num_epochs=10)
  late = samplers.class_probabilities(counts, 'progressive', epoch=9, num_epochs=10)
  np.testing.assert_allclose(first, [0.9, 0.1])
  np.testing.assert_allclose(late, 0.1 * np.array([0.9, 0.1]) + 0.9 * np.array([0.5, 0.5]))


def test_unknown_sampler_is_rejected():
  with pytest.raises(ValueError, match='config.sampler'):
    samplers.class_probabilities(np.array([1, 2]), 'uniform')


def test_train_batches_are_deterministic_and_cover_every_example_each_epoch():
  labels = np.repeat(np.arange(3), [20, 7, 3]).astype(np.int32)
  split = sources.Split(np.zeros((30, 2, 2, 1), np.uint8), labels)
  batches = pipeline.TrainBatches(split, 3, batch_size=8, sampler='instance', seed=0,
                                  num_epochs=2)
  assert batches.steps_per_epoch == 4 and batches.total_steps == 8
  epoch0 = np.concatenate([batches.indices(s) for s in range(4)])
  assert set(epoch0.tolist()) == set(range(30))  # nothing dropped
  fresh = pipeline.TrainBatches(split, 3, batch_size=8, sampler='instance', seed=0, num_epochs=2)
  np.testing.assert_array_equal(fresh.indices(5), batches.indices(5))


def test_eval_batches_pad_and_mask_every_example_once():
  split = sources.Split(np.arange(13, dtype=np.uint8).reshape(13, 1, 1, 1),
                        np.arange(13, dtype=np.int32))
  seen = []
  for batch in pipeline.eval_batches(split, batch_size=8):
    assert len(batch['label']) == 8
    seen += batch['label'][batch['mask'] > 0].tolist()
  assert seen == list(range(13))
