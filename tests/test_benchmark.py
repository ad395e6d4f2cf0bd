"""The benchmark: records of both steps and the input pipeline, the peak table, the command."""

import importlib.util
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import NUM_DEVICES, ROOT, subprocess_env
from imbal_jax import benchmark, configuration, host_memory, sharding
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
  # The same program as the command's: XLA counts the same FLOPs.
  assert record['flops_per_step'] == command_records[1]['flops_per_step']
  # The count is the global step's, however many devices share it.
  one_device = benchmark.benchmark_step('stage2', config, steps=1, warmup=0,
                                        mesh=sharding.make_mesh(devices[:1]))
  assert one_device['flops_per_step'] == record['flops_per_step']
  inputs = benchmark.time_input_pipeline(config, steps=2, warmup=1)
  assert inputs['skipped'] is False and inputs['train_images'] > 0
  assert inputs['images_per_sec'] > 0 and inputs['batch_seconds_median'] > 0


def test_command_rejects_a_stage2_config():
  result = run_command('--config=configs/stage2.py', '--steps=1')
  assert result.returncode == 2 and 'stage-1 config' in result.stderr


def test_input_pipeline_skipped_without_data(tmp_path):
  config = stage1_config('ham10000', data_path=str(tmp_path / 'absent.npz'))
  record = benchmark.time_input_pipeline(config, steps=2, warmup=1)
  assert record['skipped'] is True and record['images_per_sec'] is None
  assert 'absent.npz' in record['note']


def test_peak_flops_table():
  assert benchmark.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert benchmark.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == 67e12
  assert benchmark.peak_flops('NVIDIA H200', 'bfloat16') == 989e12
  assert benchmark.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert benchmark.peak_flops('NVIDIA A100-SXM4-80GB', 'float32') == 19.5e12
  assert benchmark.peak_flops('TPU v4', 'bfloat16') == 275e12
  assert benchmark.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert benchmark.peak_flops('TPU v5', 'bfloat16') == 459e12
  assert benchmark.peak_flops('TPU v5', 'float32') is None
  assert benchmark.peak_flops('NVIDIA H100 NVL', 'bfloat16') is None
  assert benchmark.peak_flops('cpu', 'float32') is None


def test_image_shape_defaults():
  assert benchmark.image_shape(stage1_config()) == (8, 8, 1)
  assert benchmark.image_shape(stage1_config('ham10000')) == (28, 28, 3)
  assert benchmark.image_shape(stage1_config('ham10000'), image_size=64) == (64, 64, 3)
  assert benchmark.image_shape(stage1_config('fashion_mnist_lt')) == (28, 28, 1)
  assert benchmark.image_shape(stage1_config('cifar10_lt')) == (32, 32, 3)
  assert benchmark.image_shape(stage1_config('isic2019')) == (224, 224, 3)
  with pytest.raises(ValueError, match='--image_size'):
    benchmark.image_shape(stage1_config('isic2019', image_size=0))


def test_flops_of_accepts_dict_list_or_nothing():
  class Lowered:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      if isinstance(self.analysis, Exception):
        raise self.analysis
      return self.analysis

  assert benchmark.flops_of(Lowered({'flops': 12.0})) == 12.0
  assert benchmark.flops_of(Lowered([{'flops': 7.0}])) == 7.0
  assert benchmark.flops_of(Lowered([])) is None
  assert benchmark.flops_of(Lowered({'bytes accessed': 3.0})) is None
  assert benchmark.flops_of(Lowered(NotImplementedError())) is None


def test_flops_count_each_multiply_add_of_the_program_as_written():
  # One convolution without padding: 2 FLOPs per multiply-add, N*Ho*Wo*k*k*Cin*Cout of them.
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  lowered = conv.lower(jax.ShapeDtypeStruct((2, 9, 9, 3), jnp.float32),
                       jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32))
  assert benchmark.flops_of(lowered) == 2 * (2 * 7 * 7) * (3 * 3 * 3 * 5)
  # ResNet-50's forward pass at 224 px: He et al. (2016, table 1) give 3.8e9
  # multiply-adds, torchvision 4.09e9 (with the classifier); 2 FLOPs each.
  encoder = make_encoder('resnet50', 64, 224)
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), image)
  lowered = jax.jit(lambda v, x: encoder.apply(v, x, train=False)).lower(variables, image)
  assert 7.6e9 <= benchmark.flops_of(lowered) <= 8.2e9
