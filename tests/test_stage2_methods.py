"""Stage-2 classifiers (config.stage2_method) and cached features, on one tiny stage-1 run.

Every closed-form classifier is checked against NumPy on the stage-1 model's
own features and logits (computed on the host with plain model.apply), through
predict.py on the run's best/, so rebuilding each method's model is checked too.
"""

import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT
from imbal_jax import (checkpoint, classifiers, comparison, configuration, feature_cache,
                       predict, reporting, sharding, stages, train)
from imbal_jax.data import pipeline, sources
from imbal_jax.models import Stage1Net, encoder_variables, make_encoder

# ResNet-18 (8 blocks) traces in about half the time of ResNet-32 (15 blocks).
TINY = dict(model='resnet18', width=4, num_epochs=1, warmup_epochs=0, batch_size=32,
            eval_batch_size=64, log_every_steps=5)
DEFAULT_GRID = [round(0.1 * i, 1) for i in range(21)]
NUM_STEPS = 8  # of the cached-features comparison


def load_config(name):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def stage2_config(stage1_dir, **overrides):
  config = load_config('stage2')
  config.update(TINY)
  config.init_from = str(stage1_dir)
  config.update(overrides)
  return config


def softmax(logits):
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def balanced_accuracy(labels, logits):
  predictions = np.argmax(logits, axis=-1)
  return np.mean([np.mean(predictions[labels == c] == c) for c in np.unique(labels)])


def restore_raw(run_dir):
  """best/'s variables as plain NumPy arrays, without a target structure."""
  (step_dir,) = [p for p in (run_dir / 'best').iterdir() if p.name.isdigit()]
  return ocp.StandardCheckpointer().restore(step_dir.absolute() / 'variables')


@pytest.fixture(scope='module', autouse=True)
def no_pictures():
  """Runs here skip their PNGs (most of a tiny run's time; test_plots.py draws them)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(reporting, 'write_run_outputs', lambda workdir, report, calibration, *_: [])
    yield


@pytest.fixture(scope='module')
def stage1(tmp_path_factory):
  config = load_config('stage1')
  config.update(TINY)
  run_dir = tmp_path_factory.mktemp('stage2_methods') / 'stage1'
  train.train_and_evaluate(config, str(run_dir))
  return run_dir


@pytest.fixture(scope='module')
def reference(stage1):
  """The stage-1 run on the host: each split's images, labels, features and logits."""
  config = json.loads((stage1 / 'config.json').read_text())
  data = json.loads((stage1 / 'data.json').read_text())
  dataset = sources.load(ml_collections.ConfigDict(config),
                         sources.spec_from_json(data['spec']))
  image_shape = tuple(data['image_shape'])
  encoder = make_encoder(config['model'], config['width'], image_shape[0])
  model = Stage1Net(encoder=encoder, num_classes=10, projection_dim=config['projection_dim'])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      jax.eval_shape(lambda: model.init(jax.random.key(1),
                                                        jnp.zeros((1,) + image_shape),
                                                        train=False)))
  variables, _ = checkpoint.restore_best(stage1, like)
  dense = jax.device_get(variables['params']['classifier']['dense'])
  kernel, bias = np.float64(dense['kernel']), np.float64(dense['bias'])
  frozen = encoder_variables(variables['params'], variables['batch_stats'])
  names = list(dataset.splits)
  images = [dataset.splits[n].take(np.arange(len(dataset.splits[n]))) for n in names]
  x = (np.concatenate(images) / 255.0 - np.asarray(data['pixel_mean'])) / np.asarray(
      data['pixel_std'])
  features = np.split(np.float64(encoder.apply(frozen, jnp.asarray(x, jnp.float32), train=False)),
                      np.cumsum([len(i) for i in images])[:-1])
  splits = {name: {'images': i, 'labels': dataset.splits[name].labels, 'features': f,
                   'logits': f @ kernel + bias}
            for name, i, f in zip(names, images, features)}
  return {'kernel': kernel, 'bias': bias, 'train_counts': np.asarray(data['counts']['train']),
          'dataset': dataset, **splits}


def predicted(run_dir, images):
  return predict.load_model(run_dir).probabilities(images)


def check_tau_choice(report, val, logits_for_tau):
  """The run's tau is the grid's best by NumPy's balanced accuracy; the scores agree."""
  expected = {tau: balanced_accuracy(val['labels'], logits_for_tau(tau)) for tau in DEFAULT_GRID}
  chosen = report['stage2']['tau']
  best = max(expected.values())
  # Ties (to rounding) go to the smallest tau.
  assert chosen == min(tau for tau, score in expected.items() if abs(score - best) < 1e-9)
  assert list(report['stage2']['val_scores']) == [f'{tau:g}' for tau in DEFAULT_GRID]
  np.testing.assert_allclose(list(report['stage2']['val_scores'].values()),
                             list(expected.values()), atol=1e-12)
  assert report['selection'] == pytest.approx(
      {'step': 0, 'epoch': 0, 'split': 'val', 'metric': 'balanced_accuracy',
       'score': expected[chosen]})
  return chosen


def test_tau_norm_with_tau_zero_is_the_stage1_classifier(stage1, reference):
  config = configuration.resolve(stage2_config(stage1, stage2_method='tau_norm',
                                               tau_grid_max=0.0))
  dataset = reference['dataset']
  data_info = json.loads((stage1 / 'data.json').read_text())
  mesh = sharding.make_mesh()
  stage = stages.build_stage2(config, dataset, data_info, mesh, steps_per_epoch=1)
  assert stage.state is None and stage.train_step is None
  val = reference['val']
  state, score = stage.fit(lambda p: balanced_accuracy(val['labels'], p))
  assert stage.extra_report['stage2']['tau'] == 0.0
  assert score == balanced_accuracy(val['labels'], val['logits'])
  x = (reference['test']['images'] / 255.0 - np.asarray(data_info['pixel_mean'])) / np.asarray(
      data_info['pixel_std'])
  logits = jax.jit(stage.logits_fn)(stage.eval_variables(state), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(logits), reference['test']['logits'], atol=1e-5)


def test_tau_norm_picks_the_best_tau_on_validation(stage1, reference, tmp_path):
  report = train.train_and_evaluate(stage2_config(stage1, stage2_method='tau_norm'),
                                    str(tmp_path / 'tau_norm'))
  norms = np.linalg.norm(reference['kernel'], axis=0)

  def logits(split, tau):
    return (split['features'] @ reference['kernel'] + reference['bias']) / norms**tau

  tau = check_tau_choice(report, reference['val'], lambda t: logits(reference['val'], t))
  assert report['stage2']['method'] == 'tau_norm'
  assert not list((tmp_path / 'tau_norm' / 'checkpoints').iterdir())  # no training steps
  assert not (tmp_path / 'tau_norm' / 'metrics.jsonl').exists()
  probabilities = predicted(tmp_path / 'tau_norm', reference['test']['images'])
  np.testing.assert_allclose(probabilities, softmax(logits(reference['test'], tau)), atol=1e-5)
  accuracy = np.mean(probabilities.argmax(-1) == reference['test']['labels'])
  assert accuracy == pytest.approx(report['test']['accuracy'])


def test_posthoc_logit_adjustment_subtracts_tau_log_prior(stage1, reference, tmp_path):
  report = train.train_and_evaluate(stage2_config(stage1, stage2_method='posthoc_la'),
                                    str(tmp_path / 'posthoc_la'))
  counts = reference['train_counts']
  assert counts.min() > 0
  log_prior = np.log(counts / counts.sum())
  tau = check_tau_choice(report, reference['val'],
                         lambda t: reference['val']['logits'] - t * log_prior)
  probabilities = predicted(tmp_path / 'posthoc_la', reference['test']['images'])
  np.testing.assert_allclose(probabilities,
                             softmax(reference['test']['logits'] - tau * log_prior), atol=1e-5)
  # Rerun with --force and a grid holding only tau = 0: the new fit is the model saved
  # and evaluated, not the first run's.
  assert tau > 0
  rerun = train.train_and_evaluate(stage2_config(stage1, stage2_method='posthoc_la',
                                                 tau_grid_max=0.0),
                                   str(tmp_path / 'posthoc_la'), force=True)
  assert rerun['stage2']['tau'] == 0.0
  np.testing.assert_allclose(predicted(tmp_path / 'posthoc_la', reference['test']['images']),
                             softmax(reference['test']['logits']), atol=1e-5)
  assert rerun['test']['accuracy'] == pytest.approx(
      np.mean(reference['test']['logits'].argmax(-1) == reference['test']['labels']))


def test_ncm_is_cosine_to_the_normalised_class_means(stage1, reference, tmp_path, capsys):
  # cache_features (as an experiment may set for every method) changes nothing here: said.
  report = train.train_and_evaluate(stage2_config(stage1, stage2_method='ncm',
                                                  cache_features=True), str(tmp_path / 'ncm'))
  assert 'note: config.cache_features and config.feature_views apply to the trained heads' \
      in capsys.readouterr().out
  assert report['stage2'] == {'method': 'ncm', 'scale': classifiers.NCM_SCALE}
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  train_split = reference['train']
  means = unit(np.stack([unit(train_split['features'][train_split['labels'] == c]).mean(0)
                         for c in range(10)]))
  logits = classifiers.NCM_SCALE * unit(reference['test']['features']) @ means.T
  probabilities = predicted(tmp_path / 'ncm', reference['test']['images'])
  np.testing.assert_allclose(probabilities, softmax(logits), atol=1e-5)
  assert report['test']['accuracy'] == pytest.approx(
      np.mean(logits.argmax(-1) == reference['test']['labels']))


def test_lws_trains_only_the_class_scales(stage1, reference, tmp_path):
  # Through the loop on cached features (equal to the image path: see below).
  report = train.train_and_evaluate(
      stage2_config(stage1, stage2_method='lws', cache_features=True), str(tmp_path / 'lws'))
  assert report['stage2'] == {'method': 'lws'}
  stage1_raw, lws_raw = restore_raw(stage1), restore_raw(tmp_path / 'lws')
  frozen = {'params': {'encoder': stage1_raw['params']['encoder'],
                       'classifier': stage1_raw['params']['classifier']},
            'batch_stats': {'encoder': stage1_raw['batch_stats']['encoder']}}
  expected, got = jax.tree.leaves_with_path(frozen), jax.tree.leaves_with_path(lws_raw['encoder'])
  assert [path for path, _ in got] == [path for path, _ in expected]
  for (_, a), (_, b) in zip(expected, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  scale = np.asarray(lws_raw['head']['params']['scale'])
  assert set(lws_raw['head']['params']) == {'scale'} and scale.shape == (10,)
  assert not np.allclose(scale, 1.0)
  probabilities = predicted(tmp_path / 'lws', reference['test']['images'])
  np.testing.assert_allclose(probabilities, softmax(reference['test']['logits'] * scale),
                             atol=1e-5)


def test_cached_features_train_the_head_as_images_without_augmentation(stage1, reference):
  # LWS: its trunk (encoder + stage-1 classifier) is the more involved; cRT's cached
  # path differs only in the head, and its image path is test_end_to_end's.
  method = 'lws'
  data_info = json.loads((stage1 / 'data.json').read_text())
  mesh = sharding.make_mesh()

  def head_params(cache_features):
    config = configuration.resolve(stage2_config(
        stage1, stage2_method=method, augment='none', cache_features=cache_features))
    dataset = reference['dataset']
    batches = pipeline.TrainBatches(dataset.splits['train'], 10, config.batch_size,
                                    config.sampler, config.seed, config.num_epochs)
    stage = stages.build_stage2(config, dataset, data_info, mesh, batches.steps_per_epoch)
    source = stage.batch_source(batches) if stage.batch_source else batches
    assert (stage.batch_source is not None) == cache_features
    state, rng = stage.state, jax.random.key(config.seed + 1)
    initial = jax.device_get(state.params)
    for step in range(NUM_STEPS):
      state, _ = stage.train_step(state, sharding.put_global_batch(source.local_batch(step),
                                                                   mesh), rng)
    return initial, jax.device_get(state.params)

  initial, from_images = head_params(False)
  _, from_features = head_params(True)
  for a, b, start in zip(jax.tree.leaves(from_images), jax.tree.leaves(from_features),
                         jax.tree.leaves(initial)):
    assert np.abs(a - start).max() > 1e-3  # the steps did move the head
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_feature_batches_gather_the_sampled_rows_of_one_view_each(reference):
  train_split = reference['dataset'].splits['train']
  batches = pipeline.TrainBatches(train_split, 10, 32, 'class_balanced', 0, 2)
  views, examples = 3, len(train_split)
  # Row i of view v holds (v, i): what was gathered names where it came from.
  table = np.zeros((views, examples, 2), np.float32)
  table[..., 0] = np.arange(views)[:, None]
  table[..., 1] = np.arange(examples)[None, :]
  source = feature_cache.FeatureBatches(batches, table, seed=0)
  assert source.total_steps == batches.total_steps
  drawn = []
  for step in (0, 1, batches.steps_per_epoch + 3):
    batch = source.local_batch(step)
    indices = batches.indices(step)
    np.testing.assert_array_equal(batch['feature'][:, 1], indices)
    np.testing.assert_array_equal(batch['label'], train_split.labels[indices])
    np.testing.assert_array_equal(batch['feature'], source.local_batch(step)['feature'])
    drawn.append(batch['feature'][:, 0])
  assert set(np.concatenate(drawn)) == {0, 1, 2}


class Pixels(nn.Module):
  """A trunk whose features are the preprocessed pixels: what was cached is visible."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    return images.reshape(images.shape[0], -1)


def test_cached_views_are_the_plain_images_then_augmented_ones(reference):
  split = reference['dataset'].splits['val']
  mesh = sharding.make_mesh()
  outputs_fn = feature_cache.trunk_fn(Pixels(), mesh, ((0.5,), (0.25,)), augment='crop+flip',
                                      crop_padding=1)
  table = feature_cache.compute_features(outputs_fn, {}, split, batch_size=64, mesh=mesh,
                                         views=3, seed=0)
  images = reference['val']['images']
  assert table.shape == (3, len(split), images[0].size)
  np.testing.assert_allclose(table[0], ((images / 255.0 - 0.5) / 0.25).reshape(len(split), -1),
                             atol=1e-6)
  changed = lambda a, b: np.mean(np.any(np.abs(a - b) > 1e-6, axis=-1))
  assert changed(table[1], table[0]) > 0.5 and changed(table[2], table[1]) > 0.5
  again = feature_cache.compute_features(outputs_fn, {}, split, batch_size=64, mesh=mesh,
                                         views=3, seed=0)
  np.testing.assert_array_equal(again, table)  # fixed seeds: a resumed run caches the same


def test_config_errors_name_the_field(stage1):
  cases = [({'stage2_method': 'tau'}, 'stage2_method'),
           ({'feature_views': 0}, 'feature_views'),
           ({'feature_views': 2}, 'cache_features=True'),
           ({'feature_views': 2, 'cache_features': True, 'augment': 'none'}, "augment='none'"),
           ({'tau_grid_step': 0.0}, 'tau_grid_step')]
  for overrides, message in cases:
    with pytest.raises(configuration.ConfigError, match=message):
      configuration.resolve(stage2_config(stage1, **overrides))


def test_comparison_names_each_stage2_method():
  settings = {'stage': 'stage2', 'stage1.contrastive_weight': 0.5}
  assert comparison.method_name(settings) == 'stage2 (cRT) lambda=0.5'
  names = [comparison.method_name({**settings, 'stage2_method': m}) for m in classifiers.METHODS]
  assert names == ['stage2 (cRT) lambda=0.5', 'stage2 (LWS) lambda=0.5',
                   'stage2 (tau-norm) lambda=0.5', 'stage2 (post-hoc LA) lambda=0.5',
                   'stage2 (NCM) lambda=0.5']


def test_tau_ties_in_exact_arithmetic_go_to_the_smaller_tau():
  # Balanced accuracy sums per-class recalls; two taus whose recalls are a permutation of
  # each other score the same, up to the last bit. Here the larger tau is a bit ahead.
  grid = [0.0, 0.5, 1.0, 1.5]
  tied = [0.86, np.nextafter(0.86, 1.0), np.nextafter(np.nextafter(0.86, 1.0), 1.0), 0.5]
  scores_in_grid_order = iter(tied)

  def linear(tau):
    return np.eye(3, dtype=np.float32), np.full(3, tau, np.float32)

  best, scores = classifiers.choose_tau(linear, np.eye(3, dtype=np.float32),
                                        lambda probabilities: next(scores_in_grid_order), grid)
  assert scores == dict(zip(grid, tied)) and scores[1.0] > scores[0.5] > scores[0.0]
  assert best == 0.0
  # A real difference still wins.
  scores_in_grid_order = iter([0.5, 0.86, 0.855, 0.86])
  assert classifiers.choose_tau(linear, np.eye(3, dtype=np.float32),
                                lambda probabilities: next(scores_in_grid_order), grid)[0] == 0.5
