"""Long-tail protocol, samplers, digits source and batching."""

import importlib.machinery
import importlib.util
import time

import jax
import ml_collections
import numpy as np
import pytest

from imbal_jax.data import longtail, pipeline, readers, samplers, sources


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


def digits_config(**overrides):
  config = dict(dataset='digits', imbalance_ratio=10.0, seed=0, split_seed=0, val_fraction=0.1,
                test_fraction=0.2)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def test_digits_are_read_as_scikit_learn_reads_them():
  from sklearn.datasets import load_digits

  images, labels = readers.digits_arrays()
  reference = load_digits()
  np.testing.assert_array_equal(images, reference.images)
  np.testing.assert_array_equal(labels, reference.target)
  assert labels.dtype == np.int32


def test_digits_fall_back_to_scikit_learn_where_its_file_is_elsewhere(monkeypatch, tmp_path):
  spec = importlib.util.find_spec('sklearn')
  moved = importlib.machinery.ModuleSpec('sklearn', None, is_package=True)
  moved.submodule_search_locations = [str(tmp_path)]  # holds no datasets/data/digits.csv.gz
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: moved if name == 'sklearn' else spec)
  images, labels = readers.digits_arrays()
  assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
  with pytest.raises(sources.DataError, match='pip install scikit-learn'):
    readers.digits_arrays()


def test_digits_splits_balanced_disjoint_and_long_tailed():
  data = sources.load(digits_config())
  val, test, train = (data.class_counts(s) for s in ('val', 'test', 'train'))
  assert val.tolist() == [20] * 10 and test.tolist() == [40] * 10
  assert train.tolist() == [118, 91, 70, 54, 42, 32, 25, 19, 15, 11]
  assert data.image_shape == (8, 8, 1) and data.splits['train'].take([0]).dtype == np.uint8
  rows = {s: set(data.splits[s].index.tolist()) for s in ('train', 'val', 'test')}
  # The digits source hands over val and test as their own parts; train rows index the pool.
  assert data.spec['val']['part'] == 'val' and data.spec['test']['part'] == 'test'
  other = sources.load(digits_config(seed=1))
  np.testing.assert_array_equal(other.splits['test'].take(np.arange(400)),
                                data.splits['test'].take(np.arange(400)))
  assert rows['train'] != set(other.splits['train'].index.tolist())


def test_spec_roundtrip_rebuilds_the_same_splits():
  data = sources.load(digits_config(seed=3))
  again = sources.load(digits_config(seed=99), sources.spec_from_json(
      sources.spec_to_json(data.spec)))
  for split in sources.SPLITS:
    np.testing.assert_array_equal(again.splits[split].labels, data.splits[split].labels)
    np.testing.assert_array_equal(again.splits[split].index, data.splits[split].index)


def make_source(counts, balanced=False):
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  images = np.arange(len(labels), dtype=np.int64).astype(np.uint8).reshape(-1, 1, 1, 1)
  return sources.Source('toy', tuple(f'c{i}' for i in range(len(counts))),
                        {'train': sources.Split(images, labels)}, balanced=balanced)


def test_protocol_carves_stratified_disjoint_val_and_test():
  source = make_source([500, 200, 50, 10])
  spec = sources.make_spec(source, None, seed=0, split_seed=0, val_fraction=0.1,
                           test_fraction=0.2)
  data = sources.build(source, spec)
  assert data.class_counts('test').tolist() == [100, 40, 10, 2]
  assert data.class_counts('val').tolist() == [40, 16, 4, 1]
  assert data.class_counts('train').tolist() == [360, 144, 36, 7]
  all_rows = np.concatenate([spec[s]['rows'] for s in sources.SPLITS])
  assert len(np.unique(all_rows)) == len(all_rows) == 760  # disjoint, nothing dropped


def test_protocol_subsamples_natural_data_by_count_rank():
  source = make_source([40, 600, 120, 30])
  spec = sources.make_spec(source, 10.0, seed=0, split_seed=0, val_fraction=0.1,
                           test_fraction=0.2)
  train = sources.build(source, spec).class_counts('train')
  after_test = np.array([40, 600, 120, 30]) - np.round(0.2 * np.array([40, 600, 120, 30]))
  pool = (after_test - np.round(0.1 * after_test)).astype(int)  # [29, 432, 86, 22]
  assert train.tolist() == longtail.longtail_counts(pool, 10.0, order='count').tolist()
  assert train[1] == 432 and train[3] == 22  # the rarest class keeps all it has


def test_protocol_rejects_class_too_small_to_split():
  with pytest.raises(sources.DataError, match="class 'c2' has only 1 image\\(s\\): too few to "
                     'split off a test split'):
    sources.make_spec(make_source([50, 50, 1]), None, 0, 0, 0.1, 0.2)
  # Two images: the test split takes one, and the one left cannot give a val split too.
  with pytest.raises(sources.DataError, match="class 'c2' has only 1 image\\(s\\) left after "
                     'the test split: too few to split off a val split'):
    sources.make_spec(make_source([50, 50, 2]), None, 0, 0, 0.1, 0.2)


def test_build_rejects_class_without_training_image():
  source = make_source([50, 50, 5])
  spec = sources.make_spec(source, None, 0, 0, 0.1, 0.2)
  spec['train']['rows'] = spec['train']['rows'][source.parts['train'].labels[
      spec['train']['rows']] != 2]
  with pytest.raises(sources.DataError, match=r"no training image for class\(es\) \['c2'\]"):
    sources.build(source, spec)


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


def test_grain_iterator_yields_step_batches_and_starts_at_the_resumed_step():
  labels = np.repeat(np.arange(3), [20, 7, 3]).astype(np.int32)
  split = sources.Split(np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1), labels)
  batches = pipeline.TrainBatches(split, 3, batch_size=8, sampler='class_balanced', seed=0,
                                  num_epochs=3)
  iterator = pipeline.train_iterator(batches)
  seen = [next(iterator)['image'] for _ in range(batches.total_steps)]
  for step, images in enumerate(seen):
    np.testing.assert_array_equal(images[:, 0, 0, 0], batches.indices(step))
  with pytest.raises(StopIteration):
    next(iterator)
  resumed = pipeline.train_iterator(batches, start_step=5)
  np.testing.assert_array_equal(next(resumed)['image'], seen[5])


def test_two_processes_read_disjoint_slices_that_cover_the_global_batch(monkeypatch):
  import jax
  labels = np.repeat(np.arange(3), [20, 7, 3]).astype(np.int32)
  split = sources.Split(np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1), labels)
  batches = pipeline.TrainBatches(split, 3, batch_size=8, sampler='instance', seed=0,
                                  num_epochs=2)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  per_process = []
  for process in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
    per_process.append(pipeline.TrainBatches(split, 3, batch_size=8, sampler='instance', seed=0,
                                             num_epochs=2))
  for step in range(batches.total_steps):
    parts = [b.local_batch(step)['image'][:, 0, 0, 0] for b in per_process]
    assert len(parts[0]) == len(parts[1]) == 4
    np.testing.assert_array_equal(np.concatenate(parts), batches.indices(step))
  eval_rows = []
  for process in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
    for batch in pipeline.eval_batches(split, batch_size=8):
      eval_rows.append((process, batch['image'][:, 0, 0, 0][batch['mask'] > 0].tolist()))
  covered = sorted(v for _, rows in eval_rows for v in rows)
  assert covered == list(range(30))


@pytest.mark.parametrize('sampler', ['instance', 'class_balanced'])
def test_pairs_put_every_class_of_a_batch_at_least_twice(sampler):
  labels = np.repeat(np.arange(5), [200, 60, 20, 5, 1])  # class 4 has a single image
  batch = 16
  indices = samplers.epoch_indices(labels, 5, sampler, seed=3, epoch=2, length=batch * 40,
                                   pairs=True)
  assert len(indices) == batch * 40
  for rows in indices.reshape(-1, batch):
    classes, counts = np.unique(labels[rows], return_counts=True)
    assert counts.min() >= 2, (classes, counts)
  # Slots 2i and 2i+1 share a class, and are distinct images wherever the class allows.
  first, second = indices[0::2], indices[1::2]
  np.testing.assert_array_equal(labels[first], labels[second])
  assert np.all((first != second) | (labels[first] == 4))
  # The anchors are exactly the sampler's own draw, so class frequencies are unchanged.
  np.testing.assert_array_equal(
      first, samplers.epoch_indices(labels, 5, sampler, seed=3, epoch=2, length=batch * 20))
  again = samplers.epoch_indices(labels, 5, sampler, seed=3, epoch=2, length=batch * 40,
                                 pairs=True)
  np.testing.assert_array_equal(indices, again)


def test_pair_partners_are_uniform_over_the_other_members():
  labels = np.zeros(4, np.int64)
  anchors = np.zeros(30_000, np.int64)  # always image 0
  partners = samplers._partners(labels, anchors, np.random.default_rng(0))
  counts = np.bincount(partners, minlength=4)
  assert counts[0] == 0
  np.testing.assert_allclose(counts[1:] / len(anchors), 1 / 3, atol=0.015)


def test_batch_pairs_needs_an_even_batch():
  from imbal_jax import configuration
  from test_configuration import load_config
  config = load_config('stage1')
  config.update(batch_pairs=True, batch_size=33)
  with pytest.raises(configuration.ConfigError, match='config.batch_size'):
    configuration.resolve(config)


def test_worker_processes_deliver_the_same_batches_whatever_their_number():
  labels = np.repeat(np.arange(3), [20, 7, 3]).astype(np.int32)
  split = sources.Split(np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1), labels)
  batches = pipeline.TrainBatches(split, 3, batch_size=8, sampler='sqrt', seed=1, num_epochs=3)
  # A run started with 2 workers may resume with 3 (or none): the position is the step.
  for workers, start in ((2, 0), (3, 4)):
    iterator = pipeline.train_iterator(batches, num_workers=workers, start_step=start)
    for step in range(start, batches.total_steps):
      batch = next(iterator)
      np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batches.indices(step))
      np.testing.assert_array_equal(batch['label'], labels[batches.indices(step)])
    iterator.close()


def test_worker_processes_deliver_this_process_slice_of_the_global_batch(monkeypatch):
  from imbal_jax import feature_cache
  labels = np.repeat(np.arange(3), [20, 7, 3]).astype(np.int32)
  split = sources.Split(np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1), labels)
  # Process 1 of 2, as jax.distributed.initialize makes it in the main process only:
  # grain's spawned workers never see it, so the batches must carry it to them.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  batches = pipeline.TrainBatches(split, 3, batch_size=8, sampler='sqrt', seed=1, num_epochs=2)
  table = np.arange(2 * 30, dtype=np.float32).reshape(2, 30, 1)
  features = feature_cache.FeatureBatches(batches, table, seed=0)
  for source in (batches, features):
    for workers in (0, 1):
      iterator = pipeline.train_iterator(source, num_workers=workers)
      for step in range(batches.total_steps):
        batch = next(iterator)
        second_half = batches.indices(step)[4:]
        np.testing.assert_array_equal(batch['label'], labels[second_half])
        if source is batches:
          np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], second_half)
        else:
          np.testing.assert_array_equal(batch['feature'][:, 0] % 30, second_half)
      iterator.close()


def test_train_batches_refuse_a_process_index_outside_the_count():
  split = sources.Split(np.zeros((4, 1, 1, 1), np.uint8), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match='process_index=2'):
    pipeline.TrainBatches(split, 1, batch_size=4, sampler='instance', seed=0, num_epochs=1,
                          process_index=2, process_count=2)


def test_train_batches_are_right_when_threads_cross_epoch_boundaries():
  import concurrent.futures
  labels = np.repeat(np.arange(3), [20, 7, 3]).astype(np.int32)
  split = sources.Split(np.zeros((30, 1, 1, 1), np.uint8), labels)
  batches = pipeline.TrainBatches(split, 3, batch_size=8, sampler='instance', seed=0,
                                  num_epochs=40)
  # Alternate between the last step of one epoch and the first of the next.
  steps = [s for e in range(1, 40) for s in (4 * e - 1, 4 * e)] * 5
  expected = {s: pipeline.TrainBatches(split, 3, batch_size=8, sampler='instance', seed=0,
                                       num_epochs=40).indices(s) for s in set(steps)}
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(batches.indices, steps))
  for step, got in zip(steps, results):
    np.testing.assert_array_equal(got, expected[step])


def test_fingerprint_names_what_changed_in_the_source():
  source = make_source([50, 30, 10])
  saved = sources.source_fingerprint(source)
  assert sources.source_fingerprint(make_source([50, 30, 10])) == saved
  sources.check_fingerprint(saved, saved, 'toy', 'data.json')  # unchanged: accepted
  grown = sources.source_fingerprint(make_source([51, 30, 10]))
  with pytest.raises(sources.DataError, match=r'its images \(all of them, before the splits are '
                                             r'carved\) were 90, now 91'):
    sources.check_fingerprint(saved, grown, 'toy', 'data.json')
  # Same count, one image moved from class 1 to class 0: other labels at the same rows.
  with pytest.raises(sources.DataError, match='same 90 images but other labels or order'):
    sources.check_fingerprint(saved, sources.source_fingerprint(make_source([51, 29, 10])),
                              'toy', 'data.json')
  with_test = dict(saved, test={'images': 5, 'labels_sha256': '0' * 64})
  with pytest.raises(sources.DataError, match='has a test part it did not have'):
    sources.check_fingerprint(saved, with_test, 'toy', 'runs/a/data.json')


def test_load_refuses_a_source_that_no_longer_matches_its_saved_splits():
  data = sources.load(digits_config())
  assert set(data.fingerprint) == {'train', 'val', 'test'}  # digits ships three parts
  spec = sources.spec_from_json(sources.spec_to_json(data.spec))
  again = sources.load(digits_config(), spec, data.fingerprint)
  np.testing.assert_array_equal(again.splits['train'].index, data.splits['train'].index)
  tampered = dict(data.fingerprint, train=dict(data.fingerprint['train'], images=1))
  with pytest.raises(sources.DataError, match=r"config.dataset='digits' changed since "
                     r"runs/x/data.json was written: its train part had 1 images"):
    sources.load(digits_config(), spec, tampered, 'runs/x/data.json')


def test_each_process_reads_only_its_slice_of_an_evaluation_batch(monkeypatch):
  import jax
  read = []

  class CountingSplit(sources.Split):
    def take(self, rows):
      read.extend(np.asarray(rows).tolist())
      return super().take(rows)

  split = CountingSplit(np.arange(21, dtype=np.uint8).reshape(21, 1, 1, 1),
                        np.arange(21, dtype=np.int32))
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  for process in range(4):
    monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
    read.clear()
    batches = list(pipeline.eval_batches(split, batch_size=8))
    # The global batches [0..7], [8..15], [16..20 + 3 padding], sliced 2 per process.
    mine = [row for first in (0, 8, 16) for row in range(first + 2 * process,
                                                         first + 2 * process + 2) if row < 21]
    assert read == mine  # no row of another process is read
    for batch, first in zip(batches, (0, 8, 16)):
      rows = np.arange(first + 2 * process, first + 2 * process + 2)
      assert len(batch['label']) == 2 and batch['image'].shape == (2, 1, 1, 1)
      np.testing.assert_array_equal(batch['mask'], (rows < 21).astype(np.float32))
      np.testing.assert_array_equal(batch['label'], np.where(rows < 21, rows, 0))


def test_a_memory_mapped_split_pickles_as_its_path(tmp_path):
  import pickle
  images = np.random.default_rng(0).integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
  np.save(tmp_path / 'images.npy', images)
  mapped = np.load(tmp_path / 'images.npy', mmap_mode='r')
  split = sources.Split(mapped, np.arange(400, dtype=np.int32) % 3).subset(np.arange(0, 400, 7))
  payload = pickle.dumps(split)
  assert len(payload) < images.nbytes / 20  # the path and the labels, not the pixels
  again = pickle.loads(payload)
  assert isinstance(again.images, np.memmap)
  np.testing.assert_array_equal(again.take(np.arange(len(again))), images[::7])
  np.testing.assert_array_equal(again.labels, split.labels)
  # An in-memory split still pickles by value.
  plain = sources.Split(images[:10], np.zeros(10, np.int32))
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(plain)).images, images[:10])
  # A cache rewritten with another shape while in use is refused by name.
  np.save(tmp_path / 'images.npy', images[:5])
  with pytest.raises(sources.DataError, match='images.npy changed while the run'):
    pickle.loads(payload)


def test_grouped_split_keeps_each_group_on_one_side():
  rng = np.random.default_rng(0)
  # 3 classes; lesions of 1 to 4 images each, one diagnosis per lesion.
  sizes = rng.integers(1, 5, 120)
  group_labels = np.repeat(np.arange(3), [60, 40, 20])
  groups = np.repeat(np.arange(120), sizes)
  labels = np.repeat(group_labels, sizes)
  held, rest = sources.stratified_split(labels, 3, 0.2, seed=5, what='test', groups=groups)
  assert not set(groups[held]) & set(groups[rest])  # no group on both sides
  assert sorted(np.concatenate([held, rest]).tolist()) == list(range(len(labels)))
  for c in range(3):  # each class's share: the fewest groups reaching 20 % of its images
    n = np.sum(labels == c)
    got = np.sum(labels[held] == c)
    assert round(0.2 * n) <= got < round(0.2 * n) + 4, (c, got, n)
  again, _ = sources.stratified_split(labels, 3, 0.2, seed=5, what='test', groups=groups)
  np.testing.assert_array_equal(held, again)  # seeded


def test_grouped_split_refuses_mixed_groups_and_too_few_groups():
  labels = np.array([0, 0, 1, 1, 1, 0])
  with pytest.raises(sources.DataError, match=r"group 'L2' holds images of different classes"):
    sources.stratified_split(labels, 2, 0.2, 0, 'test',
                             np.array(['L1', 'L1', 'L2', 'L3', 'L3', 'L2']))
  with pytest.raises(sources.DataError, match=r'class 1 has only 1 group\(s\) \(3 images\)'):
    sources.stratified_split(labels, 2, 0.2, 0, 'test',
                             np.array(['a', 'b', 'c', 'c', 'c', 'd']))


def test_make_spec_splits_by_group_where_the_source_has_groups():
  source = make_source([60, 42, 21])
  groups = np.arange(123) // 3  # lesions of 3 images, within one class
  grouped = sources.Source(source.name, source.class_names, source.parts, groups=groups)
  data = sources.build(grouped, sources.make_spec(grouped, None, 0, 0, 0.1, 0.2))
  seen = {split: set(groups[data.splits[split].index].tolist()) for split in sources.SPLITS}
  assert not seen['train'] & seen['test'] and not seen['train'] & seen['val']
  assert not seen['val'] & seen['test']
  assert data.class_counts('test').tolist() == [12, 9, 6]  # whole lesions: 4, 3, 2 of them


def test_worker_processes_leave_ctrl_c_and_sigterm_to_the_main_process():
  import multiprocessing
  import os
  import signal
  labels = np.repeat(np.arange(3), [20, 7, 3]).astype(np.int32)
  split = sources.Split(np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1), labels)
  batches = pipeline.TrainBatches(split, 3, batch_size=8, sampler='sqrt', seed=1, num_epochs=4)
  iterator = pipeline.train_iterator(batches, num_workers=1)
  next(iterator)
  workers = multiprocessing.active_children()
  assert workers
  # A terminal's Ctrl-C, or scancel's SIGTERM, reaches every process of the group.
  for worker in workers:
    os.kill(worker.pid, signal.SIGINT)
    os.kill(worker.pid, signal.SIGTERM)
  time.sleep(1)
  assert all(worker.is_alive() for worker in workers)
  for step in range(1, batches.total_steps):  # the main process goes on to save and stop
    np.testing.assert_array_equal(next(iterator)['image'][:, 0, 0, 0], batches.indices(step))
  iterator.close()
