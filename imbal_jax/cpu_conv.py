"""oneDNN's convolutions for programs that run on CPU (XLA FFI custom calls).

XLA's CPU backend computes convolutions with Eigen. On this project's 2-core
development machine those took about twice as long as oneDNN's (the library
behind PyTorch's CPU convolutions), the filter gradients 2.3-5x, which was the
whole gap between imbal_jax's CPU step and eager PyTorch's (docs/performance.md).
`imbal_jax/native/onednn_conv.cc` computes a 2-D convolution, its input gradient
and its filter gradient with oneDNN as three XLA FFI handlers; this module builds
that library, registers the handlers and exposes `conv_general_dilated`, which
Flax's `nn.Conv` calls in place of `lax.conv_general_dilated`.

`conv_general_dilated` sends a convolution to oneDNN only where all of these hold,
and to `lax.conv_general_dilated` otherwise, so a model compiles everywhere:
- the library is built and loaded (`make` builds it where a C++ compiler is
  installed, against the oneDNN that the `cpu` extra installs into the
  environment on x86-64 Linux, or a system one such as Debian's libdnnl-dev);
- `IMBAL_JAX_CPU_CONV` is not `xla` (`onednn` demands the library, `auto`, the
  default, uses it where it is built);
- JAX's default backend is the CPU (a GPU or TPU run never calls it);
- float32 NHWC activations and an HWIO filter, 2-D, no input dilation, one
  feature group, no negative padding, no empty array (every convolution of
  imbal_jax's ResNets).

Its gradients are oneDNN's too (a custom VJP: first-order reverse mode only, which
is all imbal_jax's steps take; `jax.jvp` or a second derivative through it fails,
so use `IMBAL_JAX_CPU_CONV=xla` for those). oneDNN parallelises each call
over the cores itself (OpenMP), so with it a CPU run uses one JAX device
(`distributed.use_cpu_cores`), and `auto` leaves programs of a process with
several devices (a count the user forced, a multi-process run) to XLA: see
`active`. Results agree with XLA's convolutions to float32
rounding, not bit for bit, so `report.json` and the benchmark record which ran.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax import lax

ENV_SWITCH = 'IMBAL_JAX_CPU_CONV'
CHOICES = ('auto', 'onednn', 'xla')
# Where the library is built and looked for: next to its source (in the package),
# or in the folder this names (for an install whose package folder is read-only).
ENV_DIR = 'IMBAL_JAX_NATIVE_DIR'
SOURCE = Path(__file__).resolve().parent / 'native' / 'onednn_conv.cc'
LIBRARY = Path(os.environ.get(ENV_DIR) or SOURCE.parent) / 'libimbal_onednn_conv.so'
TARGETS = {
    'imbal_onednn_conv_forward': 'ImbalConvForward',
    'imbal_onednn_conv_input_gradient': 'ImbalConvInputGradient',
    'imbal_onednn_conv_filter_gradient': 'ImbalConvFilterGradient',
}
NHWC = ('NHWC', 'HWIO', 'NHWC')


class CpuConvError(RuntimeError):
  """The oneDNN convolutions were asked for and cannot be built or loaded."""


def choice() -> str:
  value = os.environ.get(ENV_SWITCH, 'auto').strip().lower() or 'auto'
  if value not in CHOICES:
    raise CpuConvError(f'{ENV_SWITCH}={value!r} is not one of {", ".join(CHOICES)}.')
  return value


class MissingDependency(CpuConvError):
  """No C++ compiler, or no oneDNN headers or library: the build cannot start."""


def onednn_prefix() -> Path | None:
  """This environment's own oneDNN, where pip installed one (the `cpu` extra:
  onednn-cpu-gomp and onednn-devel-cpu-gomp put lib/ and include/ under sys.prefix);
  None: the compiler's default folders (a system oneDNN, e.g. Debian's libdnnl-dev)."""
  prefix = Path(sys.prefix)
  if ((prefix / 'include' / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists()
      and any((prefix / 'lib').glob('libdnnl.so*'))):
    return prefix
  return None


def build_command(output: Path, prefix: Path | None = None) -> list[str]:
  """The compiler command; with `prefix`, oneDNN's headers and library from there
  (found again at run time through the library's rpath)."""
  compiler = shlex.split(os.environ.get('CXX') or 'g++')
  onednn = ([f'-I{prefix / "include"}', f'-L{prefix / "lib"}',
             f'-Wl,-rpath,{prefix / "lib"}'] if prefix else [])
  return [*compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', *onednn,
          f'-I{jax.ffi.include_dir()}', str(SOURCE), '-ldnnl', '-o', str(output)]


# The compiler's words (in the C locale) for oneDNN's missing header or library (GCC,
# Clang; GNU ld, lld, Apple's ld), or a oneDNN of another major version (the source's
# #error).
_MISSING_ONEDNN = re.compile(r"dnnl\.hpp'?:? (?:No such file|file not found)|"
                             r"cannot find -ldnnl|unable to find library -ldnnl|"
                             r"library not found for -ldnnl|needs oneDNN 2\.x or 3\.x")


_DEFAULT = object()


def build(output: Path | None = None, quiet: bool = False, prefix=_DEFAULT) -> Path:
  """Compiles the oneDNN handlers into `output` (default LIBRARY), against the oneDNN
  under `prefix` (default `onednn_prefix()`; None: the system's).

  MissingDependency where the compiler or oneDNN is not installed; CpuConvError,
  with the compiler's messages, where the source does not compile. An earlier
  library at `output` stays until the new one is complete.
  """
  output = LIBRARY if output is None else output
  command = build_command(output, onednn_prefix() if prefix is _DEFAULT else prefix)
  if shutil.which(command[0]) is None:
    raise MissingDependency(f'no C++ compiler {command[0]!r} found; install one (Debian/Ubuntu: '
                            f'apt-get install g++) or set CXX.')
  if output.parent.exists() and not os.access(output.parent, os.W_OK):
    raise CpuConvError(f'{output.parent} is not writable; set {ENV_DIR} to a folder that is, '
                       'for the build and for the runs.')
  output.parent.mkdir(parents=True, exist_ok=True)
  partial = output.with_name(output.name + '.partial')
  command[-1] = str(partial)
  # The C locale: _MISSING_ONEDNN reads the compiler's English messages.
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, 'LC_ALL': 'C'})
  if result.returncode:
    if 'needs oneDNN 2.x or 3.x' in result.stderr:
      raise MissingDependency('the installed oneDNN is neither 2.x nor 3.x, whose APIs '
                              'imbal_jax/native/onednn_conv.cc uses.')
    if _MISSING_ONEDNN.search(result.stderr):
      raise MissingDependency("oneDNN is not installed: pip install 'imbal_jax[cpu]' "
                              '(x86-64 Linux), or apt-get install libdnnl-dev (Debian/Ubuntu), '
                              f'or put its headers and library where {command[0]} finds them.')
    raise CpuConvError(f'building {output.name} failed:\n{result.stderr[-2000:]}')
  os.replace(partial, output)
  _built_for(output).write_text(_jaxlib_version())
  if not quiet:
    print(f'imbal_jax: built {output}', file=sys.stderr)
  return output


def _jaxlib_version() -> str:
  import jaxlib
  return jaxlib.__version__


def _built_for(library: Path) -> Path:
  """The file next to `library` naming the jaxlib whose FFI headers it was built with."""
  return library.with_name(library.name + '.jaxlib')


def _built_for_version(library: Path) -> str | None:
  """The jaxlib `library` was built for; None where that is not recorded."""
  built_for = _built_for(library)
  return built_for.read_text().strip() if built_for.exists() else None


@functools.cache
def _load(path: str) -> bool:
  library = ctypes.cdll.LoadLibrary(path)
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return True


def needs_build(library: Path | None = None) -> bool:
  """Whether `library` (default LIBRARY) is missing, older than its source, built
  for another jaxlib, or does not load."""
  library = LIBRARY if library is None else library
  if (not library.exists() or _built_for_version(library) != _jaxlib_version()
      or library.stat().st_mtime < SOURCE.stat().st_mtime):
    return True
  try:  # e.g. oneDNN's shared library removed or replaced since the build
    ctypes.CDLL(str(library))
  except OSError:
    return True
  return False


@functools.cache
def _warn_once(message: str) -> None:
  print(f'imbal_jax: {message}', file=sys.stderr)


def available() -> bool:
  """Whether the oneDNN convolutions are on: chosen (or `auto`) and the library loads.

  With `IMBAL_JAX_CPU_CONV=onednn` a missing or unloadable library is an error
  that says how to build it; with `auto` it means XLA's convolutions.
  """
  wanted = choice()
  if wanted == 'xla':
    return False
  if not LIBRARY.exists():
    if wanted == 'onednn':
      raise CpuConvError(
          f'{ENV_SWITCH}=onednn but {LIBRARY} is not built; run `make` (or '
          f'`python -m imbal_jax.cpu_conv build`), which needs g++ and oneDNN (the cpu '
          f'extra, or a system libdnnl-dev).')
    return False
  built_for = _built_for_version(LIBRARY) or 'an unknown version'
  if built_for != _jaxlib_version():
    # XLA's FFI headers change between releases: a stale build could fail inside a step.
    message = (f'{LIBRARY.name} was built for jaxlib {built_for}, this is jaxlib '
               f'{_jaxlib_version()}; rebuild it with `make` (or `python -m imbal_jax.cpu_conv '
               f'build`).')
    if wanted == 'onednn':
      raise CpuConvError(message)
    _warn_once(message + " Until then CPU runs use XLA's convolutions.")
    return False
  try:
    return _load(str(LIBRARY))
  except OSError as error:
    message = (f'{LIBRARY} does not load ({error}); rebuild it with `make` (or '
               f'`python -m imbal_jax.cpu_conv build`).')
    if wanted == 'onednn':
      raise CpuConvError(message) from error
    _warn_once(message + " Until then CPU runs use XLA's convolutions.")
    return False


def active() -> bool:
  """Whether float32 convolutions traced now go to oneDNN.

  On the CPU backend, where the library is on and, unless `IMBAL_JAX_CPU_CONV=onednn`,
  the run has a single JAX device. XLA cannot split a custom call along a sharded
  batch: on several devices it gathers the whole batch onto each of them and every
  device computes every convolution (correct, but no faster than XLA's own), and
  oneDNN already spreads one call over all cores.
  """
  if jax.default_backend() != 'cpu' or not available():
    return False
  return choice() == 'onednn' or jax.device_count() == 1


def _note_if_not_built() -> None:
  """Once per process: a note where a single-device CPU run would use oneDNN had the
  library been built."""
  if (choice() == 'auto' and not LIBRARY.exists() and jax.default_backend() == 'cpu'
      and jax.device_count() == 1):
    _warn_once("oneDNN's convolutions are not built, so this CPU run uses XLA's, about "
               'half as fast; `make` (or `python -m imbal_jax.cpu_conv build`) builds them '
               "where g++ is installed (and oneDNN: the cpu extra, or a system libdnnl-dev).")


def backend(dtype: str = 'float32') -> str | None:
  """'onednn' or 'xla': which computes the convolutions of a CPU program traced now
  that computes in `dtype` (oneDNN's handlers are float32 only); None where JAX's
  default backend is not the CPU."""
  if jax.default_backend() != 'cpu':
    return None
  return 'onednn' if dtype == 'float32' and active() else 'xla'


def _attributes(strides, padding, dilation) -> dict[str, np.ndarray]:
  return {'strides': np.asarray(strides, np.int64),
          'pad_lo': np.asarray([low for low, _ in padding], np.int64),
          'pad_hi': np.asarray([high for _, high in padding], np.int64),
          'dilation': np.asarray(dilation, np.int64)}


def _call(target: str, shape, *operands, geometry):
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, np.float32),
                          vmap_method='sequential')(*operands, **_attributes(*geometry))


def output_shape(x_shape, w_shape, strides, padding, dilation) -> tuple[int, ...]:
  spatial = []
  for size, window, stride, (low, high), rate in zip(
      x_shape[1:3], w_shape[:2], strides, padding, dilation):
    spatial.append((size + low + high - (rate * (window - 1) + 1)) // stride + 1)
  return (x_shape[0], *spatial, w_shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def onednn_conv(x, w, geometry):
  """NHWC x HWIO -> NHWC; geometry = (strides, ((low, high), ...), filter dilation)."""
  return _call('imbal_onednn_conv_forward', output_shape(x.shape, w.shape, *geometry), x, w,
               geometry=geometry)


def _forward(x, w, geometry):
  return onednn_conv(x, w, geometry), (x, w)


def _backward(geometry, residuals, grad):
  x, w = residuals
  dx = _call('imbal_onednn_conv_input_gradient', x.shape, grad, w, geometry=geometry)
  dw = _call('imbal_onednn_conv_filter_gradient', w.shape, x, grad, geometry=geometry)
  return dx, dw


onednn_conv.defvjp(_forward, _backward)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers(
        (1, 1, 1, 1), (1, 1, 1, 1), NHWC)
  return tuple(dimension_numbers) == NHWC


def supported(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count,
              batch_group_count, preferred_element_type) -> bool:
  """Whether oneDNN's handlers compute this convolution (see the module's list)."""
  return (lhs.ndim == 4 and rhs.ndim == 4
          and lhs.dtype == np.float32 and rhs.dtype == np.float32
          and preferred_element_type in (None, np.float32)
          and _is_nhwc(dimension_numbers)
          and all(rate == 1 for rate in (lhs_dilation or (1, 1)))
          and feature_group_count == 1 and batch_group_count == 1)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding: Any,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with oneDNN computing it where `supported` and `active`."""
  use_onednn = supported(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count,
                         batch_group_count, preferred_element_type)
  if use_onednn and not active():
    _note_if_not_built()
    use_onednn = False
  if use_onednn:
    dilation = tuple(rhs_dilation or (1, 1))
    if isinstance(padding, str):
      dilated = [rate * (size - 1) + 1 for rate, size in zip(dilation, rhs.shape[:2])]
      padding = lax.padtype_to_pads(lhs.shape[1:3], dilated, window_strides, padding)
    geometry = (tuple(int(s) for s in window_strides),
                tuple((int(low), int(high)) for low, high in padding),
                tuple(int(rate) for rate in dilation))
    # oneDNN takes no negative padding (a crop) and no empty array: XLA does those.
    if (min(min(pair) for pair in geometry[1]) >= 0
        and min(lhs.shape) > 0 and min(rhs.shape) > 0
        and min(output_shape(lhs.shape, rhs.shape, *geometry)) > 0):
      return onednn_conv(lhs, rhs, geometry)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


USAGE = 'usage: python -m imbal_jax.cpu_conv build [--if-needed] [--if-possible]'


def main(argv: Sequence[str]) -> int:
  """`python -m imbal_jax.cpu_conv build`: compile the library.

  --if-needed: only where `needs_build` (missing, stale, or for another jaxlib).
  --if-possible: a missing compiler or oneDNN is a note, not a failure (make's
  default); a source that does not compile fails either way.
  """
  args = list(argv[1:])
  if not args or args[0] != 'build' or set(args[1:]) - {'--if-possible', '--if-needed'}:
    print(USAGE, file=sys.stderr)
    return 2
  if '--if-needed' in args and not needs_build():
    return 0
  try:
    build()
  except MissingDependency as error:
    if '--if-possible' in args:
      print(f"imbal_jax: oneDNN's convolutions not built, CPU runs use XLA's ({error})",
            file=sys.stderr)
      return 0
    print(f'imbal_jax: {error}', file=sys.stderr)
    return 1
  except CpuConvError as error:
    print(f'imbal_jax: {error}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
