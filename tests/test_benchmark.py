"""The benchmark: records of both steps and the input pipeline, the peak table, the command."""

import functools
import importlib.util
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import NUM_DEVICES, ROOT, subprocess_env
from imbal_jax import benchmark, configuration, flops, host_memory, sharding
from imbal_jax.models import make_encoder
from test_host_memory import GLIBC

# One tiny config for the in-process run and the command, so that the command
# finds the compiled programs in the persistent cache.
TINY = {'width': 4, 'batch_size': 32}
STEP_KEYS = {'stage', 'device_kind', 'device_count', 'process_count', 'model', 'width',
             'image_size', 'channels', 'global_batch', 'dtype', 'compile_seconds',
             'step_seconds_median', 'step_seconds_p90', 'images_per_sec', 'flops_per_step',
             'achieved_flops_per_sec', 'peak_flops_per_sec', 'mfu', 'host_memory_retained'}


def stage1_config(preset='digits_lt', **overrides):
  spec = importlib.util.spec_from_file_location('cfg_stage1', ROOT / 'configs' / 'stage1.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset)
  config.update(overrides)
  return config


def run_command(*args):
  return subprocess.run([sys.executable, '-m', 'imbal_jax.benchmark', *args], cwd=ROOT,
                        env=subprocess_env(NUM_DEVICES),
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def profile_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('profile')


@pytest.fixture(scope='module')
def command_records(profile_dir):
  # The whole command once: both steps compile here, and the in-process test
  # below then finds the stage-2 programs in the persistent cache.
  result = run_command('--config=configs/stage1.py:digits_lt', f'--config.width={TINY["width"]}',
                       f'--batch_size={TINY["batch_size"]}', '--steps=2', '--warmup=1',
                       f'--profile_dir={profile_dir}')
  assert result.returncode == 0, result.stderr[-4000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


def check_step_record(record, stage):
  assert STEP_KEYS <= set(record), STEP_KEYS - set(record)
  assert record['stage'] == stage and record['device_kind'] == 'cpu'
  assert record['device_count'] == NUM_DEVICES and record['process_count'] == 1
  assert (record['model'], record['width'], record['dtype']) == ('resnet32', 4, 'float32')
  assert (record['image_size'], record['channels'], record['global_batch']) == (8, 1, 32)
  for key in ('compile_seconds', 'step_seconds_median', 'step_seconds_p90'):
    assert record[key] > 0, key
  assert record['step_seconds_p90'] >= record['step_seconds_median']
  assert record['images_per_sec'] == pytest.approx(32 / record['step_seconds_median'])
  # XLA's CPU backend reports FLOPs; the peak of a CPU is not in the table.
  assert record['flops_per_step'] > 0
  assert record['achieved_flops_per_sec'] == pytest.approx(
      record['flops_per_step'] / record['step_seconds_median'])
  assert record['peak_flops_per_sec'] is None and record['mfu'] is None
  json.dumps(record, allow_nan=False)


def test_command_prints_one_json_line_per_stage(command_records):
  assert [r['stage'] for r in command_records] == ['stage1', 'stage2', 'input_pipeline']
  stage1, stage2, inputs = command_records
  check_step_record(stage1, 'stage1')
  check_step_record(stage2, 'stage2')
  # The command keeps freed host buffers mapped on CPU (glibc's Linux; test_host_memory).
  assert stage1['host_memory_retained'] is stage2['host_memory_retained'] is GLIBC
  # Stage 2 runs the frozen encoder forward only: fewer FLOPs than stage 1.
  assert stage2['flops_per_step'] < stage1['flops_per_step']
  assert inputs['skipped'] is False and inputs['dataset'] == 'digits'
  assert inputs['data_workers'] == 0 and inputs['global_batch'] == 32
  assert inputs['images_per_sec'] > 0
  # The steps ran on the shape of the data, which the command loaded.
  assert stage1['image_shape_from'] == stage2['image_shape_from'] == 'data'


def test_the_steps_run_on_the_shape_of_the_data_when_it_is_at_hand(tmp_path, devices):
  import numpy as np
  # A grey 12 px MedMNIST-layout file, where the medmnist preset assumes 28 px RGB.
  rng = np.random.default_rng(0)
  arrays = {}
  for part, count in (('train', 40), ('val', 10), ('test', 10)):
    arrays[f'{part}_images'] = rng.integers(0, 256, (count, 12, 12), dtype=np.uint8)
    arrays[f'{part}_labels'] = (np.arange(count) % 4).reshape(-1, 1)
  np.savez(tmp_path / 'grey12.npz', **arrays)
  config = stage1_config('dermamnist', width=4, batch_size=8, model='resnet32',
                         data_path=str(tmp_path / 'grey12.npz'), imbalance_ratio=None)
  [record] = benchmark.run(config, steps=1, warmup=0, stages=['stage2'])
  assert (record['image_size'], record['channels']) == (12, 1)
  assert record['image_shape_from'] == 'data'
  config.data_path = str(tmp_path / 'absent.npz')  # no data: the preset's shape
  [record] = benchmark.run(config, steps=1, warmup=0, stages=['stage2'])
  assert (record['image_size'], record['channels'], record['image_shape_from']) == (28, 3,
                                                                                    'preset')


def test_model_flops_leave_out_the_gradient_cache_recomputation(devices):
  config = configuration.resolve(stage1_config(**TINY))
  mesh = sharding.make_mesh()
  shape = (8, 8, 1)
  counts = {}
  for accum in (1, 2, 4):
    config.grad_accum_steps = accum
    jitted, args = benchmark.build_step('stage1', config, shape, 10, mesh)
    counts[accum] = benchmark.model_flops('stage1', config, shape, 10, mesh, 'float32',
                                          jitted.trace(*args))
  model, executed = counts[1]
  assert model == executed
  for accum in (2, 4):  # the same model FLOPs; each micro-batch's forward pass runs twice
    assert counts[accum][0] == model
    assert counts[accum][1] > model


def test_input_pipeline_times_the_paired_batches_training_uses(devices, monkeypatch):
  made = []
  original = benchmark.pipeline.TrainBatches

  def recording(*args, **kwargs):
    made.append(kwargs.get('pairs'))
    return original(*args, **kwargs)

  monkeypatch.setattr(benchmark.pipeline, 'TrainBatches', recording)
  config = configuration.resolve(stage1_config(**TINY, batch_pairs=True))
  assert benchmark.time_input_pipeline(config, steps=1, warmup=0)['skipped'] is False
  assert made == [True]


def test_command_takes_the_multi_process_flags():
  result = run_command('--config=configs/stage1.py', '--num_processes=2', '--process_id=0')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      'imbal_jax: launch error: --process_id and --num_processes need --coordinator_address')


def test_profile_dir_holds_a_trace_and_the_slowest_operations(command_records, profile_dir):
  for record in command_records[:2]:
    profile = record['profile']
    assert profile['trace_dir'] == str(profile_dir / record['stage'])
    assert list((profile_dir / record['stage']).glob('**/*.xplane.pb'))
    top = profile['top_ops_ms_per_step']
    assert top, 'no per-operation events: was the CPU trace flag set?'
    times = [ms for _, ms in top]
    assert all(ms >= 0 for ms in times) and times == sorted(times, reverse=True)
    # Names of the compiled program's operations, numeric suffixes dropped.
    names = [name for name, _ in top]
    assert len(set(names)) == len(names) and not any(re.search(r'\.\d+$', n) for n in names)
  # A stage-1 step computes convolution gradients and all-reduces them across the devices.
  stage1_names = {name for name, _ in command_records[0]['profile']['top_ops_ms_per_step']}
  assert 'all-reduce' in stage1_names
  assert stage1_names & {'convolution', 'ynn_fusion'}


def test_benchmark_functions_in_process(command_records, devices):
  config = configuration.resolve(stage1_config(**TINY))
  record = benchmark.benchmark_step('stage2', config, steps=2, warmup=1)
  check_step_record(record, 'stage2')
  # Whatever this test process's allocator is (an earlier in-process command may have
  # set it before the backends started), the record reports it.
  assert record['host_memory_retained'] is host_memory.retained()
  # The same program as the command's: the same FLOP count.
  assert record['flops_per_step'] == command_records[1]['flops_per_step']
  # The count is the global step's, however many devices share it.
  one_device = benchmark.benchmark_step('stage2', config, steps=1, warmup=0,
                                        mesh=sharding.make_mesh(devices[:1]))
  assert one_device['flops_per_step'] == record['flops_per_step']
  inputs = benchmark.time_input_pipeline(config, steps=2, warmup=1)
  assert inputs['skipped'] is False and inputs['train_images'] > 0
  assert inputs['images_per_sec'] > 0 and inputs['batch_seconds_median'] > 0


def test_run_times_only_the_stages_asked_for(command_records, devices):
  config = stage1_config(**TINY)
  records = benchmark.run(config, steps=1, warmup=0, stages=['input_pipeline', 'stage2'])
  # In RECORDS' order whatever the order asked; stage 1 is not compiled at all.
  assert [r['stage'] for r in records] == ['stage2', 'input_pipeline']
  assert records[0]['flops_per_step'] == command_records[1]['flops_per_step']
  for stages in (['stage3'], [], ['stage1', 'Stage2']):
    with pytest.raises(benchmark.BenchmarkError, match='choose one or more of stage1,stage2'):
      benchmark.run(config, stages=stages)


def test_command_rejects_a_stage2_config():
  result = run_command('--config=configs/stage2.py', '--steps=1')
  assert result.returncode == 2 and 'stage-1 config' in result.stderr


def test_input_pipeline_skipped_without_data(tmp_path):
  config = stage1_config('ham10000', data_path=str(tmp_path / 'absent.npz'))
  record = benchmark.time_input_pipeline(config, steps=2, warmup=1)
  assert record['skipped'] is True and record['images_per_sec'] is None
  assert 'absent.npz' in record['note']


def test_peak_flops_table():
  assert flops.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert flops.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == 67e12
  assert flops.peak_flops('NVIDIA H200', 'bfloat16') == 989e12
  assert flops.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert flops.peak_flops('NVIDIA A100-SXM4-80GB', 'float32') == 19.5e12
  assert flops.peak_flops('TPU v4', 'bfloat16') == 275e12
  assert flops.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert flops.peak_flops('TPU v5', 'bfloat16') == 459e12
  assert flops.peak_flops('TPU v5', 'float32') is None
  assert flops.peak_flops('NVIDIA H100 NVL', 'bfloat16') is None
  assert flops.peak_flops('cpu', 'float32') is None


def test_image_shape_defaults():
  assert benchmark.image_shape(stage1_config()) == (8, 8, 1)
  assert benchmark.image_shape(stage1_config('ham10000')) == (28, 28, 3)
  assert benchmark.image_shape(stage1_config('ham10000'), image_size=64) == (64, 64, 3)
  assert benchmark.image_shape(stage1_config('fashion_mnist_lt')) == (28, 28, 1)
  assert benchmark.image_shape(stage1_config('cifar10_lt')) == (32, 32, 3)
  assert benchmark.image_shape(stage1_config('isic2019')) == (224, 224, 3)
  with pytest.raises(ValueError, match='--image_size'):
    benchmark.image_shape(stage1_config('isic2019', image_size=0))


def test_matmul_flops_of_convolutions_and_their_gradients():
  def conv(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  x = jax.ShapeDtypeStruct((2, 9, 9, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
  # 2 FLOPs per multiply-add, N*Ho*Wo*k*k*Cin*Cout of them.
  valid = jax.jit(functools.partial(conv, strides=(1, 1), padding='VALID'))
  assert flops.step_flops(valid, (x, w)) == 2 * (2 * 7 * 7) * (3 * 3 * 3 * 5)
  # Taps over the padding count (as in published ResNet counts).
  same = jax.jit(functools.partial(conv, strides=(1, 1), padding='SAME'))
  assert flops.step_flops(same, (x, w)) == 2 * (2 * 9 * 9) * (3 * 3 * 3 * 5)
  # A stride-2 convolution and both its gradients: the input gradient dilates its
  # input with zeros, which are not work, so each gradient costs what the forward does.
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  strided = functools.partial(conv, strides=(2, 2), padding='SAME')
  forward = 2 * (2 * 4 * 4) * (3 * 3 * 3 * 5)
  assert flops.step_flops(jax.jit(strided), (x, w)) == forward
  gradients = jax.jit(jax.grad(lambda x, w: jnp.sum(strided(x, w) ** 2), argnums=(0, 1)))
  assert flops.step_flops(gradients, (x, w)) == 3 * forward


def test_matmul_flops_of_products_inside_scans_and_conds():
  a = jax.ShapeDtypeStruct((4, 6), jnp.float32)
  b = jax.ShapeDtypeStruct((6, 5), jnp.float32)
  assert flops.step_flops(jax.jit(jnp.matmul), (a, b)) == 2 * 4 * 6 * 5
  batched = jax.ShapeDtypeStruct((3, 4, 6), jnp.float32)
  assert flops.step_flops(jax.jit(lambda x, y: jnp.einsum('bij,jk->bik', x, y)),
                              (batched, b)) == 3 * 2 * 4 * 6 * 5

  def scanned(x, y):
    return jax.lax.scan(lambda carry, _: (carry, carry @ y), x, None, length=7)[1]

  assert flops.step_flops(jax.jit(scanned), (a, b)) == 7 * 2 * 4 * 6 * 5
  square = jax.ShapeDtypeStruct((6, 6), jnp.float32)

  def branches(p, x, y):  # one product, or three: the costliest branch counts
    return jax.lax.cond(p, lambda: x @ y, lambda: x @ y @ y @ y)

  assert flops.step_flops(jax.jit(branches), (True, square, square)) == 3 * 2 * 6 ** 3


def test_matmul_flops_leave_out_products_whose_results_nothing_uses():
  a = jax.ShapeDtypeStruct((4, 6), jnp.float32)
  b = jax.ShapeDtypeStruct((6, 5), jnp.float32)

  def one_used(x, y):
    unused = x @ y @ y.T  # the compiler removes both products
    del unused
    return x @ y

  assert flops.step_flops(jax.jit(one_used), (a, b)) == 2 * 4 * 6 * 5


def test_matmul_flops_of_resnet50_match_published_counts():
  # ResNet-50's forward pass at 224 px, without the classifier: torchvision gives
  # 4.09e9 multiply-adds with its 2048x1000 classifier (2.0e6), 2 FLOPs each.
  encoder = make_encoder('resnet50', 64, 224)
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), image)
  forward = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
  count = flops.step_flops(forward, (variables, image))
  assert 2 * 4.08e9 <= count <= 2 * 4.10e9
  # XLA's cost analysis of the same program counts taps over padding out and
  # elementwise operations in: close, not equal. (None through GPU and TPU plugins.)
  xla = forward.lower(variables, image).cost_analysis()
  if jax.default_backend() == 'cpu':
    assert 0.95 < xla['flops'] / count < 1.0


def load_benchmark_script(name):
  """benchmarks/NAME.py as a module (the folder is not a package)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_versus_pytorch():
  return load_benchmark_script('versus_pytorch')


def fake_python(tmp_path, body):
  path = tmp_path / 'python'
  path.write_text(f'#!/bin/sh\n{body}\n')
  path.chmod(0o755)
  return str(path)


def test_versus_pytorch_summary_against_plain_arithmetic():
  versus = load_versus_pytorch()
  pairs = [(150.0, 200.0), (210.0, 200.0), (90.0, 100.0), (100.0, 100.0)]
  summary = versus.summarise(pairs)
  assert summary['ratios'] == [0.75, 1.05, 0.9, 1.0]
  assert summary['median_ratio'] == pytest.approx((0.9 + 1.0) / 2)
  assert (summary['min_ratio'], summary['max_ratio']) == (0.75, 1.05)
  assert summary['rounds'] == 4 and summary['rounds_imbal_jax_not_slower'] == 2
  with pytest.raises(ValueError):
    versus.summarise([])


def test_versus_pytorch_reads_the_last_matching_record():
  versus = load_versus_pytorch()
  stdout = '\n'.join(['W0000 a log line', json.dumps({'stage': 'stage1', 'images_per_sec': 1}),
                      json.dumps({'stage': 'stage2'}), json.dumps({'stage': 'stage1', 'n': 2})])
  assert versus.last_json(stdout, 'stage', 'stage1') == {'stage': 'stage1', 'n': 2}
  with pytest.raises(versus.CommandError, match='no JSON line with framework'):
    versus.last_json(stdout, 'framework', 'pytorch')


def test_versus_pytorch_without_torch_says_so(tmp_path, capsys):
  versus = load_versus_pytorch()
  assert versus.main(['--torch_python', fake_python(tmp_path, 'exit 1')]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record['skipped'] is True and '--torch_python' in record['note']


def test_versus_pytorch_alternates_and_summarises(tmp_path, capsys, monkeypatch):
  versus = load_versus_pytorch()
  # A stand-in for an interpreter with PyTorch: imports succeed, the step prints a record.
  torch = fake_python(tmp_path, 'echo "{\\"framework\\": \\"pytorch\\", \\"images_per_sec\\": '
                                '200.0, \\"threads\\": 2, \\"torch\\": \\"fake\\"}"')
  speeds = iter([180.0, 220.0, 200.0])
  calls = []

  def jax_round(steps, devices):
    calls.append((steps, devices))
    return {'stage': 'stage1', 'images_per_sec': next(speeds), 'device_count': devices}

  monkeypatch.setattr(versus, 'jax_round', jax_round)
  assert versus.main(['--torch_python', torch, '--rounds=3', '--steps=4',
                      '--jax_devices=1']) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert calls == [(4, 1)] * 3
  assert [line['ratio'] for line in lines[:3]] == [0.9, 1.1, 1.0]
  assert lines[3]['summary'] is True and lines[3]['median_ratio'] == 1.0
  assert lines[3]['rounds_imbal_jax_not_slower'] == 2


def load_convolutions():
  return load_benchmark_script('convolutions')


def convolution_rows(framework, times):
  """Records as the script prints them: (forward, input, filter) ms for each shape."""
  return [{'framework': framework, 'size': size, 'channels': channels, 'count': count,
           'forward_ms': f, 'input_gradient_ms': i, 'filter_gradient_ms': w}
          for (size, channels, count), (f, i, w) in zip(load_convolutions().SHAPES, times)]


def test_convolutions_summary_against_plain_arithmetic():
  convolutions = load_convolutions()
  assert [count for _, _, count in convolutions.SHAPES] == [10, 9, 9]
  ours = convolution_rows('jax', [(6.0, 4.0, 12.0), (3.0, 3.0, 6.0), (2.0, 2.0, 3.0)])
  theirs = convolution_rows('pytorch', [(3.0, 4.0, 3.0), (3.0, 2.0, 3.0), (2.0, 1.0, 3.0)])
  summary = convolutions.summarise(ours, theirs)
  assert summary['ratio_jax_over_pytorch']['32x32x16'] == {
      'forward': 2.0, 'input_gradient': 1.0, 'filter_gradient': 4.0}
  assert summary['ratio_jax_over_pytorch']['8x8x64']['input_gradient'] == 2.0
  jax_total = 10 * (6 + 4 + 12) + 9 * (3 + 3 + 6) + 9 * (2 + 2 + 3)
  torch_total = 10 * (3 + 4 + 3) + 9 * (3 + 2 + 3) + 9 * (2 + 1 + 3)
  assert summary['per_step_ms']['jax']['filter_gradient_ms'] == 10 * 12 + 9 * 6 + 9 * 3
  assert summary['per_step_ms']['jax']['all_ms'] == jax_total
  assert summary['per_step_ms']['pytorch']['all_ms'] == torch_total
  assert summary['ratio_per_step'] == round(jax_total / torch_total, 3)


def test_convolutions_times_jax_and_says_when_torch_is_absent(tmp_path, capsys, devices):
  convolutions = load_convolutions()
  # Tiny batch, one timed call: the records' form, not their speed.
  assert convolutions.main(['--batch=2', '--repeats=1',
                            '--torch_python', fake_python(tmp_path, 'exit 1')]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r['size'], r['channels']) for r in lines[:3]] == [(32, 16), (16, 32), (8, 64)]
  for record in lines[:3]:
    assert record['framework'] == 'jax' and record['batch'] == 2
    assert all(record[f'{op}_ms'] > 0 for op in convolutions.OPERATIONS)
  assert lines[3]['skipped'] is True and '--torch_python' in lines[3]['note']
  assert len(lines) == 4


def test_convolutions_runs_torch_half_in_the_given_interpreter(tmp_path, capsys, monkeypatch):
  convolutions = load_convolutions()
  ours = convolution_rows('jax', [(2.0, 2.0, 8.0)] * 3)
  theirs = convolution_rows('pytorch', [(1.0, 1.0, 2.0)] * 3)
  # A stand-in for an interpreter with PyTorch: imports succeed, the half prints its records.
  lines = '\n'.join(f"echo '{json.dumps(row)}'" for row in theirs)
  torch = fake_python(tmp_path, f'echo "$@" > {tmp_path / "args"}\n{lines}')
  monkeypatch.setattr(convolutions, 'jax_records', lambda batch, repeats: ours)
  assert convolutions.main(['--batch=4', '--repeats=3', '--torch_python', torch]) == 0
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert printed[:6] == ours + theirs
  assert printed[6]['ratio_jax_over_pytorch']['16x16x32'] == {
      'forward': 2.0, 'input_gradient': 2.0, 'filter_gradient': 4.0}
  assert printed[6]['ratio_per_step'] == 3.0
  assert (tmp_path / 'args').read_text().split()[1:] == ['--framework=pytorch', '--batch=4',
                                                         '--repeats=3']
