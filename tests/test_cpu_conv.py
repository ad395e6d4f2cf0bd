"""oneDNN's convolutions on CPU (imbal_jax.cpu_conv): values and gradients against a
float64 NumPy convolution, when they are used and when XLA's are, the FLOP count, and
the errors of a missing library or compiler."""

import os
import pathlib
import shutil
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import ROOT, TEST_XLA_FLAGS
from imbal_jax import cpu_conv, flops
from imbal_jax.models import make_encoder

built = pytest.mark.skipif(
    not cpu_conv.LIBRARY.exists(),
    reason=f'{cpu_conv.LIBRARY.name} is not built (make builds it where g++ and libdnnl-dev '
           'are installed; .ci/run installs them)')
NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture
def onednn(monkeypatch):
  """oneDNN on, whatever the device count (the suite forces 8 CPU devices)."""
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'onednn')


def numpy_conv(x, w, strides, padding, dilation, g):
  """y = conv(x, w) and, for the loss sum(y * g), dL/dx and dL/dw, in float64 by loops
  over the filter taps: y[n, i, j, o] = sum over (a, b, c) of
  xpad[n, i*s + a*d, j*s + b*d, c] * w[a, b, c, o]."""
  x, w, g = (np.asarray(v, np.float64) for v in (x, w, g))
  (sh, sw), ((top, bottom), (left, right)), (dh, dw_) = strides, padding, dilation
  xpad = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  kh, kw = w.shape[:2]
  out_h = (xpad.shape[1] - (dh * (kh - 1) + 1)) // sh + 1
  out_w = (xpad.shape[2] - (dw_ * (kw - 1) + 1)) // sw + 1
  y = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
  dxpad = np.zeros_like(xpad)
  dw = np.zeros_like(w)
  for a in range(kh):
    for b in range(kw):
      rows = slice(a * dh, a * dh + sh * (out_h - 1) + 1, sh)
      cols = slice(b * dw_, b * dw_ + sw * (out_w - 1) + 1, sw)
      patch = xpad[:, rows, cols, :]
      y += patch @ w[a, b]
      dw[a, b] = np.einsum('nijc,nijo->co', patch, g)
      dxpad[:, rows, cols, :] += g @ w[a, b].T
  dx = dxpad[:, top:top + x.shape[1], left:left + x.shape[2], :]
  return y, dx, dw


GEOMETRIES = [
    # (batch, height, width, in, out, kernel, strides, padding, filter dilation)
    (3, 9, 9, 3, 5, (3, 3), (1, 1), 'SAME', (1, 1)),
    (2, 8, 8, 4, 6, (3, 3), (2, 2), 'SAME', (1, 1)),  # ResNet downsampling: pads (0, 1)
    (2, 7, 6, 5, 4, (1, 1), (2, 2), 'VALID', (1, 1)),  # a projection shortcut
    (2, 11, 10, 3, 4, (7, 7), (2, 2), ((3, 3), (2, 3)), (1, 1)),  # a stem, uneven padding
    (2, 10, 10, 3, 4, (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),  # dilated
    (1, 5, 9, 2, 3, (3, 2), (1, 2), 'VALID', (1, 1)),  # rectangular
    (2, 9, 8, 3, 2, (3, 3), (2, 2), 'SAME', (2, 3)),  # 'SAME' with dilation and strides
]


@built
@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_onednn_convolution_and_gradients_match_a_numpy_convolution(onednn, geometry):
  n, h, w_, c, o, kernel, strides, padding, dilation = geometry
  rng = np.random.default_rng(zlib.crc32(repr(geometry).encode()))
  x = rng.normal(size=(n, h, w_, c)).astype(np.float32)
  w = rng.normal(size=(*kernel, c, o)).astype(np.float32)

  def conv(x, w):
    return cpu_conv.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                         dimension_numbers=NHWC)

  explicit = padding if not isinstance(padding, str) else lax.padtype_to_pads(
      (h, w_), [d * (k - 1) + 1 for d, k in zip(dilation, kernel)], strides, padding)
  y_shape = jax.eval_shape(conv, x, w).shape
  g = rng.normal(size=y_shape).astype(np.float32)
  y, vjp = jax.vjp(jax.jit(conv), x, w)
  dx, dw = vjp(jnp.asarray(g))
  ref_y, ref_dx, ref_dw = numpy_conv(x, w, strides, explicit, dilation, g)
  for got, want in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  # It was oneDNN: the traced program calls the three handlers.
  jaxpr = str(jax.make_jaxpr(lambda x, w: jax.vjp(conv, x, w)[1](g))(x, w))
  for target in cpu_conv.TARGETS:
    assert target in jaxpr


def _calls_onednn(fn, *args) -> bool:
  return 'imbal_onednn_conv' in str(jax.make_jaxpr(fn)(*args))


@built
def test_what_onednn_does_not_compute_goes_to_xla(onednn):
  x = jnp.ones((2, 6, 6, 4), jnp.float32)
  w = jnp.ones((3, 3, 4, 4), jnp.float32)
  conv = cpu_conv.conv_general_dilated
  assert _calls_onednn(lambda x, w: conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC), x, w)
  others = {
      'bfloat16': lambda x, w: conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1),
                                    'SAME', dimension_numbers=NHWC),
      'NCHW': lambda x, w: conv(x.transpose(0, 3, 1, 2), w, (1, 1), 'SAME',
                                dimension_numbers=('NCHW', 'HWIO', 'NCHW')),
      'groups': lambda x, w: conv(x, w[:, :, :2], (1, 1), 'SAME', dimension_numbers=NHWC,
                                  feature_group_count=2),
      'input dilation': lambda x, w: conv(x, w, (1, 1), ((1, 1), (1, 1)),
                                          lhs_dilation=(2, 2), dimension_numbers=NHWC),
  }
  for name, fn in others.items():
    assert not _calls_onednn(fn, x, w), name
    expected = {'bfloat16': lambda: lax.conv_general_dilated(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), 'SAME',
        dimension_numbers=NHWC)}.get(name)
    if expected is not None:
      np.testing.assert_array_equal(np.asarray(fn(x, w), np.float32),
                                    np.asarray(expected(), np.float32))


@built
def test_crops_and_empty_arrays_go_to_xla(onednn):
  """oneDNN takes no negative padding and no empty input or output; XLA computes those."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 6, 2)), jnp.float32)
  empty_channels = (jnp.ones((1, 4, 4, 0), jnp.float32), jnp.ones((3, 3, 0, 2), jnp.float32))
  fn = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
  assert not _calls_onednn(fn, *empty_channels)
  np.testing.assert_array_equal(fn(*empty_channels), np.zeros((1, 4, 4, 2)))
  for padding, size in ((((-1, 1), (1, 1)), 6), (((0, 0), (0, 0)), 2)):
    for kernel in ((3, 3), (5, 5)):
      xs, ws = x[:, :size, :size], jnp.ones((*kernel, 2, 2), jnp.float32)
      fn = lambda x, w, padding=padding: cpu_conv.conv_general_dilated(
          x, w, (2, 2), padding, dimension_numbers=NHWC)
      expected = lax.conv_general_dilated(xs, ws, (2, 2), padding, dimension_numbers=NHWC)
      np.testing.assert_allclose(fn(xs, ws), expected, rtol=1e-6)
      empty = min(expected.shape) == 0
      assert _calls_onednn(fn, xs, ws) == (min(p for pair in padding for p in pair) >= 0
                                           and not empty), (padding, kernel)


def test_other_backends_never_reach_the_handlers(monkeypatch):
  """On a GPU or TPU the convolution is lax's, whatever IMBAL_JAX_CPU_CONV says."""
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'onednn')
  monkeypatch.setattr(cpu_conv.jax, 'default_backend', lambda: 'gpu')
  x = jnp.ones((2, 6, 6, 4), jnp.float32)
  w = jnp.ones((3, 3, 4, 4), jnp.float32)
  fn = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
  assert not cpu_conv.active() and cpu_conv.backend() is None
  assert not _calls_onednn(fn, x, w)


@built
def test_auto_leaves_a_several_device_process_and_xla_choice_to_xla(monkeypatch, devices):
  x = jnp.ones((2, 6, 6, 4), jnp.float32)
  w = jnp.ones((3, 3, 4, 4), jnp.float32)
  # A new function each time: JAX caches a function's trace, and the choice is made
  # when it is traced.
  fn = lambda: lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                          dimension_numbers=NHWC)
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'auto')
  assert len(devices) > 1 and not _calls_onednn(fn(), x, w) and cpu_conv.backend() == 'xla'
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'xla')
  assert not _calls_onednn(fn(), x, w)
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'onednn')
  assert _calls_onednn(fn(), x, w) and cpu_conv.backend() == 'onednn'


@built
@pytest.mark.parametrize('name, size', [('resnet32', 16), ('resnet18', 64)])
def test_a_resnet_with_onednn_matches_xla(monkeypatch, name, size):
  """The whole encoder, forward and gradients, both ways: ResNet-32's small stem and
  padding shortcuts, ResNet-18's 7x7/2 stem and projection shortcuts (width 4)."""
  model = make_encoder(name, width=4, image_size=size)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, size, size, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images)
  features, _ = model.apply(variables, images, mutable=['batch_stats'])
  target = jnp.asarray(rng.normal(size=features.shape), jnp.float32)

  results, counts = {}, {}
  for choice in ('onednn', 'xla'):
    monkeypatch.setenv(cpu_conv.ENV_SWITCH, choice)

    def loss(params):  # a new function for each choice: JAX caches a function's trace
      features, _ = model.apply({**variables, 'params': params}, images,
                                mutable=['batch_stats'])
      return jnp.sum((features - target) ** 2)

    assert _calls_onednn(jax.grad(loss), variables['params']) == (choice == 'onednn')
    counts[choice] = flops.matmul_flops(jax.make_jaxpr(jax.grad(loss))(variables['params']).jaxpr)
    results[choice] = jax.jit(jax.value_and_grad(loss))(variables['params'])
  # The same FLOPs: the oneDNN VJP's input gradient of the first convolution, which
  # nothing reads (the images take no gradient), is not counted.
  assert counts['onednn'] == counts['xla'] > 0
  (value, grads), (ref_value, ref_grads) = results['onednn'], results['xla']
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@built
def test_a_batch_sharded_program_with_onednn_forced_is_still_right(onednn, devices):
  """Over several devices XLA gathers the batch for the custom call: slower, not wrong."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(devices[:4]), ('data',))
  rng = np.random.default_rng(1)
  x = jax.device_put(rng.normal(size=(8, 6, 6, 3)).astype(np.float32),
                     NamedSharding(mesh, P('data')))
  w = jax.device_put(rng.normal(size=(3, 3, 3, 4)).astype(np.float32), NamedSharding(mesh, P()))

  def loss(w, x):
    return jnp.sum(cpu_conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=NHWC) ** 2)

  grad = jax.jit(jax.grad(loss))(w, x)
  y, _, ref = numpy_conv(np.asarray(x), np.asarray(w), (1, 1), ((1, 1), (1, 1)), (1, 1),
                         np.zeros((8, 6, 6, 4)))
  _, _, ref = numpy_conv(np.asarray(x), np.asarray(w), (1, 1), ((1, 1), (1, 1)), (1, 1), 2 * y)
  np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-5, atol=1e-3)


@built
@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_flops_count_onednn_calls_as_xla_convolutions(onednn, strides):
  x = jnp.ones((2, 8, 8, 3), jnp.float32)
  w = jnp.ones((3, 3, 3, 4), jnp.float32)

  def counted(conv):
    loss = lambda x, w: jnp.sum(conv(x, w, strides, 'SAME', dimension_numbers=NHWC) ** 2)
    return flops.matmul_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr)

  out_pixels = 2 * (8 // strides[0]) ** 2
  forward = 2 * out_pixels * 4 * 3 * 3 * 3
  assert counted(cpu_conv.conv_general_dilated) == counted(lax.conv_general_dilated) \
      == 3 * forward


def test_a_bad_choice_and_a_missing_library_are_errors_that_say_what_to_do(monkeypatch,
                                                                          tmp_path):
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'mkl')
  with pytest.raises(cpu_conv.CpuConvError, match='auto, onednn, xla'):
    cpu_conv.available()
  monkeypatch.setattr(cpu_conv, 'LIBRARY', tmp_path / 'missing.so')
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'onednn')
  with pytest.raises(cpu_conv.CpuConvError, match='not built; run `make`'):
    cpu_conv.available()
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'auto')
  assert cpu_conv.available() is False
  (tmp_path / 'broken.so').write_text('not a library')
  (tmp_path / 'broken.so.jaxlib').write_text(cpu_conv._jaxlib_version())
  monkeypatch.setattr(cpu_conv, 'LIBRARY', tmp_path / 'broken.so')
  assert cpu_conv.available() is False
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'onednn')
  with pytest.raises(cpu_conv.CpuConvError, match='does not load'):
    cpu_conv.available()


def test_a_library_built_for_another_jaxlib_is_not_used(monkeypatch, tmp_path, capsys):
  """XLA's FFI headers change between releases: a stale build is rebuilt, not run."""
  library = tmp_path / 'lib.so'
  library.write_text('built earlier')
  (tmp_path / 'lib.so.jaxlib').write_text('0.0.1')
  monkeypatch.setattr(cpu_conv, 'LIBRARY', library)
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'auto')
  assert cpu_conv.available() is False
  assert 'built for jaxlib 0.0.1' in capsys.readouterr().err
  monkeypatch.setenv(cpu_conv.ENV_SWITCH, 'onednn')
  with pytest.raises(cpu_conv.CpuConvError, match='rebuild it with `make`'):
    cpu_conv.available()


def test_building_without_a_compiler_says_what_to_install(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  with pytest.raises(cpu_conv.MissingDependency, match='no C.. compiler .*install one'):
    cpu_conv.build(tmp_path / 'lib.so')
  monkeypatch.setattr(cpu_conv, 'LIBRARY', tmp_path / 'lib.so')
  assert cpu_conv.main(['cpu_conv', 'build', '--if-possible']) == 0
  assert "CPU runs use XLA's" in capsys.readouterr().err
  assert cpu_conv.main(['cpu_conv', 'build']) == 1
  assert cpu_conv.main(['cpu_conv', 'bild']) == 2
  assert not (tmp_path / 'lib.so').exists()


def test_the_compiler_may_come_with_arguments(monkeypatch, tmp_path):
  monkeypatch.setenv('CXX', 'ccache g++ -march=native')
  assert cpu_conv.build_command(tmp_path / 'lib.so')[:3] == ['ccache', 'g++', '-march=native']


needs_gxx = pytest.mark.skipif(shutil.which('g++') is None, reason='no g++')


@needs_gxx
def test_a_source_that_does_not_compile_fails_even_if_possible(monkeypatch, tmp_path):
  """A compiler error is not a missing oneDNN: it fails make, keeps an earlier
  library in place and shows the compiler's messages."""
  earlier = tmp_path / 'lib.so'
  earlier.write_bytes(b'earlier')
  broken = tmp_path / 'broken.cc'
  broken.write_text('this is not C++\n')
  monkeypatch.setattr(cpu_conv, 'SOURCE', broken)
  with pytest.raises(cpu_conv.CpuConvError, match='failed') as raised:
    cpu_conv.build(earlier, quiet=True)
  assert not isinstance(raised.value, cpu_conv.MissingDependency)
  assert earlier.read_bytes() == b'earlier'
  monkeypatch.setattr(cpu_conv, 'LIBRARY', earlier)
  assert cpu_conv.main(['cpu_conv', 'build', '--if-possible']) == 1


@needs_gxx
def test_a_missing_onednn_header_is_a_missing_dependency(monkeypatch, tmp_path):
  source = tmp_path / 'needs_dnnl.cc'
  source.write_text('#include "dnnl.hpp"\n')
  monkeypatch.setattr(cpu_conv, 'SOURCE', source)
  monkeypatch.setenv('CPATH', '')
  monkeypatch.setenv('CXX', 'g++ -nostdinc')  # no system include folders: no dnnl.hpp
  with pytest.raises(cpu_conv.MissingDependency, match='libdnnl-dev'):
    cpu_conv.build(tmp_path / 'lib.so', quiet=True, prefix=None)  # not the environment's


def test_needs_build_when_missing_stale_for_another_jaxlib_or_unloadable(monkeypatch,
                                                                         tmp_path):
  source = tmp_path / 'src.cc'
  source.write_text('// source\n')
  monkeypatch.setattr(cpu_conv, 'SOURCE', source)

  def load(path):  # stands in for ctypes.CDLL: these test files are not libraries
    if pathlib.Path(path).read_bytes() != b'loads':
      raise OSError(f'{path}: cannot open shared object file')

  monkeypatch.setattr(cpu_conv.ctypes, 'CDLL', load)
  library = tmp_path / 'lib.so'
  assert cpu_conv.needs_build(library)
  library.write_bytes(b'loads')
  sidecar = tmp_path / 'lib.so.jaxlib'
  sidecar.write_text(cpu_conv._jaxlib_version())
  os.utime(source, (1_000_000, 1_000_000))
  assert not cpu_conv.needs_build(library)
  monkeypatch.setattr(cpu_conv, 'LIBRARY', library)
  monkeypatch.setattr(cpu_conv, 'build', lambda *a, **k: pytest.fail('built a fresh library'))
  assert cpu_conv.main(['cpu_conv', 'build', '--if-needed']) == 0
  library.write_bytes(b'oneDNN gone')  # e.g. libdnnl removed since the build
  assert cpu_conv.needs_build(library)
  library.write_bytes(b'loads')
  sidecar.write_text('0.0.1')
  assert cpu_conv.needs_build(library)
  sidecar.write_text(cpu_conv._jaxlib_version())
  os.utime(source, (library.stat().st_mtime + 10,) * 2)
  assert cpu_conv.needs_build(library)


@pytest.mark.parametrize('message', [
    "onednn_conv.cc:24:10: fatal error: dnnl.hpp: No such file or directory",  # GCC
    "onednn_conv.cc:24:10: fatal error: 'dnnl.hpp' file not found",  # Clang
    "/usr/bin/ld: cannot find -ldnnl: No such file or directory",  # GNU ld
    "ld.lld: error: unable to find library -ldnnl",  # lld
    "ld: library not found for -ldnnl",  # Apple's ld
    '#error "imbal_jax needs oneDNN 2.x or 3.x (found another major version)"',  # oneDNN 4
])
def test_compiler_messages_of_a_missing_onednn_are_recognised(message):
  assert cpu_conv._MISSING_ONEDNN.search(message)
  assert not cpu_conv._MISSING_ONEDNN.search("onednn_conv.cc:80:3: error: 'x' was not declared")


def test_a_read_only_folder_names_the_variable_to_set(monkeypatch, tmp_path):
  access = os.access  # (root may write anywhere: the check itself is stood in for)
  monkeypatch.setattr(cpu_conv.os, 'access',
                      lambda path, mode: pathlib.Path(path) != tmp_path and access(path, mode))
  with pytest.raises(cpu_conv.CpuConvError, match=cpu_conv.ENV_DIR):
    cpu_conv.build(tmp_path / 'lib.so', quiet=True)


def test_a_cpu_run_without_the_library_says_how_to_build_it(monkeypatch, tmp_path, capsys):
  """Once, and only where oneDNN would have computed the convolution: a float32
  one on a single CPU device under `auto`."""
  monkeypatch.setattr(cpu_conv, 'LIBRARY', tmp_path / 'missing.so')
  x = jnp.ones((2, 6, 6, 4), jnp.float32)
  w = jnp.ones((3, 3, 4, 4), jnp.float32)

  def note(dtype=jnp.float32, choice='auto', device_count=1):
    monkeypatch.setenv(cpu_conv.ENV_SWITCH, choice)
    monkeypatch.setattr(cpu_conv.jax, 'device_count', lambda: device_count)
    cpu_conv._warn_once.cache_clear()
    jax.make_jaxpr(lambda x, w: cpu_conv.conv_general_dilated(
        x.astype(dtype), w.astype(dtype), (1, 1), 'SAME', dimension_numbers=NHWC))(x, w)
    return capsys.readouterr().err

  assert "oneDNN's convolutions are not built" in note()
  assert note(dtype=jnp.bfloat16) == ''  # oneDNN would not compute it either
  assert note(choice='xla') == ''
  assert note(device_count=8) == ''  # auto keeps XLA's on several devices anyway


def test_the_report_records_xla_convolutions_for_a_bfloat16_run(onednn):
  from imbal_jax import train
  assert train._environment('bfloat16')['cpu_convolutions'] == 'xla'
  assert train._environment('float32')['cpu_convolutions'] == cpu_conv.backend()


SYSTEM_ONEDNN = any((pathlib.Path(folder) / 'dnnl.hpp').exists()
                    for folder in ('/usr/include', '/usr/local/include'))
ONEDNN_INSTALLED = shutil.which('g++') is not None and (
    SYSTEM_ONEDNN or cpu_conv.onednn_prefix() is not None)


@pytest.mark.skipif(not ONEDNN_INSTALLED, reason='g++ or oneDNN headers not installed')
def test_where_onednn_is_installed_make_built_the_library():
  """So that CI, which installs them, cannot skip every test above unnoticed."""
  assert cpu_conv.LIBRARY.exists(), f'{cpu_conv.LIBRARY} missing: make did not build it'
  assert not cpu_conv.needs_build()


CHECK_BUILD = """
import jax, jax.numpy as jnp, numpy as np
from imbal_jax import cpu_conv
x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 7, 3)), jnp.float32)
w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4)), jnp.float32)
conv = lambda c: lambda x, w: jnp.sum(c(x, w, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2)
assert 'imbal_onednn' in str(jax.make_jaxpr(jax.grad(conv(cpu_conv.conv_general_dilated)))(x, w))
for a, b in zip(jax.grad(conv(cpu_conv.conv_general_dilated), (0, 1))(x, w),
                jax.grad(conv(jax.lax.conv_general_dilated), (0, 1))(x, w)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
print('ok', cpu_conv.LIBRARY)
"""


@needs_gxx
@pytest.mark.skipif(not SYSTEM_ONEDNN or cpu_conv.onednn_prefix() is None,
                    reason="needs both a system oneDNN and the environment's (the cpu extra)")
def test_the_source_builds_and_computes_with_the_system_onednn_too(tmp_path):
  """make builds against the environment's oneDNN (3.x from the cpu extra); a
  system one (Debian 12's is 2.6) takes the source's other API branch."""
  cpu_conv.build(tmp_path / cpu_conv.LIBRARY.name, quiet=True, prefix=None)
  env = dict(os.environ, JAX_PLATFORMS='cpu', IMBAL_JAX_NATIVE_DIR=str(tmp_path),
             IMBAL_JAX_CPU_CONV='onednn', XLA_FLAGS=TEST_XLA_FLAGS)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  result = subprocess.run([sys.executable, '-c', CHECK_BUILD], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['ok', str(tmp_path / cpu_conv.LIBRARY.name)]
  linked = subprocess.run(['ldd', str(tmp_path / cpu_conv.LIBRARY.name)], capture_output=True,
                          text=True).stdout
  assert str(cpu_conv.onednn_prefix()) not in linked  # the system's, not the environment's


@built
@pytest.mark.parametrize('choice, float32, expected', [
    ('auto', True, ['1', '1']),
    ('xla', True, ['4', '4']),
    ('auto', False, ['4', '4']),  # bfloat16: XLA's convolutions, one device per core
])
def test_a_cpu_command_with_onednn_uses_one_device(choice, float32, expected):
  probe = ('import jax\nfrom imbal_jax import distributed\n'
           f'print(distributed.use_cpu_cores([128], cores=4, float32={float32}), '
           'jax.device_count())')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=TEST_XLA_FLAGS)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  env[cpu_conv.ENV_SWITCH] = choice
  result = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == expected
