"""FLOP counts and peak FLOP rates for the benchmark's achieved FLOP/s and MFU."""

from __future__ import annotations

import math

from jax.extend.core import Var

# Dense (no sparsity) peak FLOP/s per JAX device, matched by substring of
# jax.devices()[0].device_kind (case-insensitive, first match wins; None: unknown).
# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5: BF16/FP16 1,979 TFLOPS with
# sparsity = 989 dense, FP32 67; PCIe: 1,513 / 2 = 756, FP32 51); NVIDIA H200 datasheet
# (SXM: same compute as H100 SXM); NVIDIA A100 datasheet (BF16/FP16 312, FP32 19.5,
# SXM and PCIe alike); Google Cloud TPU system architecture pages, per chip (one JAX
# device per chip on v4/v5e/v5p): v4 275, v5e 197, v5p 459 BF16 TFLOPS.
# With float32, XLA on A100/H100 may run convolutions and matmuls on TF32 tensor
# cores (jax_default_matmul_precision), so an MFU against the FP32 peak can exceed 1.
_GPU_16BIT = ('bfloat16', 'float16')
_PEAK_FLOPS = (
    ('H100 PCIe', {**dict.fromkeys(_GPU_16BIT, 756e12), 'float32': 51e12}),
    ('NVL', None),  # H100 NVL / H200 NVL: lower clocks and power, not in this table
    ('H100', {**dict.fromkeys(_GPU_16BIT, 989e12), 'float32': 67e12}),
    ('H200', {**dict.fromkeys(_GPU_16BIT, 989e12), 'float32': 67e12}),
    ('A100', {**dict.fromkeys(_GPU_16BIT, 312e12), 'float32': 19.5e12}),
    ('TPU v4 lite', None),  # the v4i inference chip
    ('TPU v4', {'bfloat16': 275e12}),
    ('TPU v5 lite', {'bfloat16': 197e12}),  # v5e reports itself as 'TPU v5 lite'
    ('TPU v5e', {'bfloat16': 197e12}),
    ('TPU v5', {'bfloat16': 459e12}),  # v5p reports 'TPU v5' (or 'TPU v5p')
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one device of `device_kind` in `dtype`; None when not known."""
  kind = device_kind.lower()
  for substring, peaks in _PEAK_FLOPS:
    if substring.lower() in kind:
      return None if peaks is None else peaks.get(dtype)
  return None


def _sub_jaxprs(value):
  """The jaxprs held by one parameter of a jaxpr equation (a jaxpr, a closed one, or tuples)."""
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


# imbal_jax.cpu_conv's FFI targets -> (the forward convolution's NHWC output shape,
# its HWIO filter shape), from the operands and result of the call.
_ONEDNN_SHAPES = {
    'imbal_onednn_conv_forward':  # (x, w) -> y
        lambda eqn: (eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape),
    'imbal_onednn_conv_input_gradient':  # (dy, w) -> dx
        lambda eqn: (eqn.invars[0].aval.shape, eqn.invars[1].aval.shape),
    'imbal_onednn_conv_filter_gradient':  # (x, dy) -> dw
        lambda eqn: (eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape),
}


def _live_eqns(jaxpr) -> list:
  """The equations of `jaxpr` whose results are used (or that have effects): the
  compiler removes the others. One such is the input gradient of a network's first
  convolution, which the oneDNN convolution's VJP returns and nothing reads."""
  used = {var for var in jaxpr.outvars if isinstance(var, Var)}
  live = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(var in used for var in eqn.outvars):
      live.append(eqn)
      used.update(var for var in eqn.invars if isinstance(var, Var))
  return live[::-1]


def matmul_flops(jaxpr) -> float:
  """FLOPs of the convolutions and matrix products of `jaxpr`, 2 per multiply-add.

  Counted from the program as traced, before any compiler sees it, so that the
  count is the same on every platform and device count: each convolution as
  2 * output elements * (kernel elements / output features), taps over padding
  included (the convention of published ResNet FLOP counts), divided by the
  input dilation (the zeros a strided convolution's input gradient inserts are
  not work), and each oneDNN call of imbal_jax.cpu_conv as its forward
  convolution; each dot_general as 2 * output elements * contracted size. Other
  operations (batch norm, activations, the optimizer) are left out, as in the
  usual model-FLOP definition of MFU. Equations whose results nothing uses are
  left out, as the compiler removes them. A scan counts its body `length` times, a
  cond its costliest branch, a while loop its body once.

  XLA's own cost analysis is not used: on GPU and TPU (PJRT plugins) it is not
  available before compilation, and after compilation it counts GPU convolutions,
  which XLA hands to cuDNN, as zero (measured on an H100: 132 GFLOP for a
  ResNet-50 224 px stage-1 step at batch 256, which this count puts at 6.25
  TFLOP and XLA's CPU analysis of the same program at 6.11).
  """
  total = 0.0
  for eqn in _live_eqns(jaxpr):
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      out, kernel = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
      out_features = kernel[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += (2 * math.prod(out) * math.prod(kernel) / out_features
                / math.prod(eqn.params['lhs_dilation']))
    elif name == 'ffi_call' and eqn.params['target_name'] in _ONEDNN_SHAPES:
      # imbal_jax.cpu_conv's oneDNN convolution, input gradient or filter gradient:
      # each the work of its forward convolution, as XLA's three are counted above.
      out, kernel = _ONEDNN_SHAPES[eqn.params['target_name']](eqn)
      total += 2 * math.prod(out) * math.prod(kernel) / kernel[3]
    elif name == 'dot_general':
      (lhs_contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += (2 * math.prod(eqn.outvars[0].aval.shape)
                * math.prod(lhs[d] for d in lhs_contracting))
    inner = [matmul_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value)]
    if inner:
      if name == 'cond':
        total += max(inner)
      elif name == 'scan':
        total += eqn.params['length'] * sum(inner)
      else:
        total += sum(inner)
  return total


def step_flops(jitted, args) -> float:
  """matmul_flops of one call of `jitted` on `args`: the global step, all devices together."""
  return matmul_flops(jitted.trace(*args).jaxpr.jaxpr)
