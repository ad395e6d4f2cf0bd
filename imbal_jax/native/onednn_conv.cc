// 2-D convolutions for XLA's CPU backend through oneDNN, as XLA FFI handlers.
//
// XLA's CPU backend runs convolutions through Eigen, which on this project's
// CPU step took about twice as long as oneDNN's kernels (docs/performance.md).
// These three handlers compute a convolution, its input gradient and its filter
// gradient with oneDNN; imbal_jax/cpu_conv.py registers them and wraps them in a
// custom VJP. Layouts are Flax's: activations NHWC, filters HWIO (float32).
//
// Each call takes its geometry from the buffers' shapes and the attributes
// (strides, low and high padding, filter dilation). oneDNN's primitives for a
// geometry are created once and cached; filters are reordered to the blocked
// layout the chosen kernel wants on every call (they are small). Scratchpads
// are allocated per call, so concurrent calls share no mutable state.

#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "dnnl_version.h"

// oneDNN 2.x builds a primitive descriptor from an op::desc, 3.x (which removed
// op::desc) from the same arguments directly: Create() has both. Others are refused;
// imbal_jax/cpu_conv.py reads this message as an unsupported oneDNN, not a failed build.
#if DNNL_VERSION_MAJOR != 2 && DNNL_VERSION_MAJOR != 3
#error "imbal_jax needs oneDNN 2.x or 3.x (found another major version)"
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Geometry: N, H, W, Ci, KH, KW, Co, OH, OW, sh, sw, plh, plw, prh, prw, dh, dw.
using Key = std::vector<int64_t>;

struct Primitives {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc data_pd;
  dnnl::convolution_backward_weights::primitive_desc filter_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data data;
  dnnl::convolution_backward_weights filter;
  memory::desc src, dst, user_weights;
};

std::unique_ptr<Primitives> Create(const Key& k) {
  const memory::dims src_dims{k[0], k[3], k[1], k[2]};
  const memory::dims weight_dims{k[6], k[3], k[4], k[5]};
  const memory::dims dst_dims{k[0], k[6], k[7], k[8]};
  const memory::dims strides{k[9], k[10]}, pad_l{k[11], k[12]}, pad_r{k[13], k[14]};
  // oneDNN counts dilation from 0 (no dilation), XLA from 1.
  const memory::dims dilation{k[15] - 1, k[16] - 1};
  auto p = std::make_unique<Primitives>();
  p->src = memory::desc(src_dims, Dt::f32, Tag::nhwc);
  p->dst = memory::desc(dst_dims, Dt::f32, Tag::nhwc);
  p->user_weights = memory::desc(weight_dims, Dt::f32, Tag::hwio);
  const memory::desc any_weights(weight_dims, Dt::f32, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algo = dnnl::algorithm::convolution_direct;
#if DNNL_VERSION_MAJOR >= 3
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, algo, p->src, any_weights, p->dst, strides,
      dilation, pad_l, pad_r, attr);
  p->data_pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), algo, p->src, any_weights, p->dst, strides, dilation, pad_l, pad_r, p->fwd_pd,
      attr);
  p->filter_pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), algo, p->src, any_weights, p->dst, strides, dilation, pad_l, pad_r, p->fwd_pd,
      attr);
#else
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algo, p->src,
                                      any_weights, p->dst, strides, dilation, pad_l, pad_r),
      attr, Engine());
  p->data_pd = dnnl::convolution_backward_data::primitive_desc(
      dnnl::convolution_backward_data::desc(algo, p->src, any_weights, p->dst, strides,
                                            dilation, pad_l, pad_r),
      attr, Engine(), p->fwd_pd);
  p->filter_pd = dnnl::convolution_backward_weights::primitive_desc(
      dnnl::convolution_backward_weights::desc(algo, p->src, any_weights, p->dst, strides,
                                               dilation, pad_l, pad_r),
      attr, Engine(), p->fwd_pd);
#endif
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->data = dnnl::convolution_backward_data(p->data_pd);
  p->filter = dnnl::convolution_backward_weights(p->filter_pd);
  return p;
}

const Primitives& Get(const Key& key) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[key];
  if (!entry) entry = Create(key);
  return *entry;
}

struct Geometry {
  Key key;
  std::string error;
};

// The cache key from the activation, filter and output dimensions and the attributes.
Geometry MakeKey(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                 ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                 ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi,
                 ffi::Span<const int64_t> dilation) {
  Geometry g;
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      pad_lo.size() != 2 || pad_hi.size() != 2 || dilation.size() != 2) {
    g.error = "imbal_jax oneDNN convolution: expected NHWC/HWIO arrays and 2-D attributes";
    return g;
  }
  if (w[2] != x[3] || w[3] != y[3] || x[0] != y[0]) {
    g.error = "imbal_jax oneDNN convolution: inconsistent channel or batch sizes";
    return g;
  }
  g.key = {x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], strides[0], strides[1],
           pad_lo[0], pad_lo[1], pad_hi[0], pad_hi[1], dilation[0], dilation[1]};
  return g;
}

void Run(const dnnl::primitive& primitive, const dnnl::primitive_desc_base& pd,
         std::unordered_map<int, memory> args) {
  dnnl::stream stream(Engine());
  const memory::desc scratch_desc = pd.scratchpad_desc();
  // Left uninitialised: the primitive writes what it reads.
  std::unique_ptr<uint8_t[]> scratch(new uint8_t[scratch_desc.get_size() + 1]);
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratch_desc, Engine(), scratch.get()));
  primitive.execute(stream, args);
  stream.wait();
}

void Reorder(memory& from, memory& to) {
  dnnl::stream stream(Engine());
  dnnl::reorder(from, to).execute(stream, from, to);
  stream.wait();
}

// A filter in HWIO, as the primitive wants it (reordered when its layout differs).
memory Weights(const Primitives& p, const memory::desc& wanted, const float* data) {
  memory user(p.user_weights, Engine(), const_cast<float*>(data));
  if (wanted == p.user_weights) return user;
  memory reordered(wanted, Engine());
  Reorder(user, reordered);
  return reordered;
}

using Attr = ffi::Span<const int64_t>;

// Runs `body` on the primitives of a checked geometry; errors become FFI errors.
template <typename Body>
ffi::Error WithPrimitives(const Geometry& g, Body body) {
  if (!g.error.empty()) return ffi::Error::InvalidArgument(g.error);
  try {
    body(Get(g.key));
  } catch (const std::exception& e) {  // oneDNN's errors, or memory exhausted
    return ffi::Error::Internal(std::string("imbal_jax oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, Attr strides, Attr pad_lo, Attr pad_hi,
                   Attr dilation) {
  return WithPrimitives(
      MakeKey(x.dimensions(), w.dimensions(), y->dimensions(), strides, pad_lo, pad_hi,
              dilation),
      [&](const Primitives& p) {
        Run(p.fwd, p.fwd_pd,
            {{DNNL_ARG_SRC, memory(p.src, Engine(), x.typed_data())},
             {DNNL_ARG_WEIGHTS, Weights(p, p.fwd_pd.weights_desc(), w.typed_data())},
             {DNNL_ARG_DST, memory(p.dst, Engine(), y->typed_data())}});
      });
}

ffi::Error InputGradient(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> dx, Attr strides, Attr pad_lo,
                         Attr pad_hi, Attr dilation) {
  return WithPrimitives(
      MakeKey(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, pad_lo, pad_hi,
              dilation),
      [&](const Primitives& p) {
        Run(p.data, p.data_pd,
            {{DNNL_ARG_DIFF_DST, memory(p.dst, Engine(), dy.typed_data())},
             {DNNL_ARG_WEIGHTS, Weights(p, p.data_pd.weights_desc(), w.typed_data())},
             {DNNL_ARG_DIFF_SRC, memory(p.src, Engine(), dx->typed_data())}});
      });
}

ffi::Error FilterGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, Attr strides, Attr pad_lo,
                          Attr pad_hi, Attr dilation) {
  return WithPrimitives(
      MakeKey(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, pad_lo, pad_hi,
              dilation),
      [&](const Primitives& p) {
        const memory::desc wanted = p.filter_pd.diff_weights_desc();
        memory user(p.user_weights, Engine(), dw->typed_data());
        memory out = wanted == p.user_weights ? user : memory(wanted, Engine());
        Run(p.filter, p.filter_pd,
            {{DNNL_ARG_SRC, memory(p.src, Engine(), x.typed_data())},
             {DNNL_ARG_DIFF_DST, memory(p.dst, Engine(), dy.typed_data())},
             {DNNL_ARG_DIFF_WEIGHTS, out}});
        if (!(wanted == p.user_weights)) Reorder(out, user);
      });
}

}  // namespace

#define IMBAL_BIND()                                      \
  ffi::Ffi::Bind()                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Arg<ffi::Buffer<ffi::F32>>()                       \
      .Ret<ffi::Buffer<ffi::F32>>()                       \
      .Attr<Attr>("strides")                              \
      .Attr<Attr>("pad_lo")                               \
      .Attr<Attr>("pad_hi")                               \
      .Attr<Attr>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImbalConvForward, Forward, IMBAL_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImbalConvInputGradient, InputGradient, IMBAL_BIND());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImbalConvFilterGradient, FilterGradient, IMBAL_BIND());
