// oneDNN convolutions as XLA:CPU FFI handlers, run on XLA's own intra-op thread pool.
//
// Built at first use by geco_jax/ops/onednn.py (g++, C++17) against jaxlib's FFI
// headers and an OpenMP build of oneDNN (PyPI: onednn-cpu-gomp, onednn-devel-cpu-gomp).
//
// Convolution: x [n, h, w, c] (NHWC) with kernel [kh, kw, c, f] (HWIO), stride 1,
// SAME padding (low (k - 1) / 2, high k / 2 per side, as XLA pads), float32.
// Three handlers: forward (y = x * w), backward data (dx from dy and w) and
// backward weights (dw from x and dy).
//
// Why this shape (docs/performance.md, levers 31 and 32): oneDNN run with its own
// threads contends with XLA's pool for the cores, which made ConvDraw's step slower
// although each convolution alone ran faster. Here each call splits its batch into
// one chunk per pool thread, each chunk is one single-threaded oneDNN primitive, the
// chunks are tasks on XLA's pool, and the handler returns a future at once: no
// thread of our own, and the calling thread goes back to XLA's other work. The
// kernel gradient sums the chunks' partial gradients. Each chunk passes its own
// scratchpad (the library's shared one is not safe for concurrent primitives).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using dt = memory::data_type;
using tag = memory::format_tag;

enum Op { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// oneDNN's OpenMP build runs omp_get_max_threads() threads per primitive; on XLA's
// threads it must run one (the chunks are the parallelism).
void OneOpenMPThread() {
  thread_local bool done = false;
  if (!done) {
    omp_set_num_threads(1);
    done = true;
  }
}

struct Shape {
  int64_t n, h, w, c, f, kh, kw;
};

struct Key {
  int op;
  int64_t n, h, w, c, f, kh, kw, layout_of;  // layout_of: 0, or the batch whose weights layout is imposed
  bool operator<(const Key& o) const {
    return std::tie(op, n, h, w, c, f, kh, kw, layout_of) <
           std::tie(o.op, o.n, o.h, o.w, o.c, o.f, o.kh, o.kw, o.layout_of);
  }
};

struct Primitive {
  dnnl::primitive primitive;
  memory::desc src, weights, dst, user_weights, scratchpad;
  bool reorder = false;
  dnnl::primitive to_primitive_layout, to_user_layout;
};

std::mutex cache_mutex;
std::map<Key, std::shared_ptr<Primitive>> cache;

// The primitive for one chunk of `n` images. With `weights_layout` null oneDNN picks the
// weights layout (tag::any); otherwise the chunk uses that layout, so that every chunk of
// a call shares one reordered kernel (or one layout of partial kernel gradients).
std::shared_ptr<Primitive> GetPrimitive(Op op, const Shape& s, int64_t n,
                                        const std::shared_ptr<Primitive>& weights_layout,
                                        int64_t layout_of) {
  Key key{op, n, s.h, s.w, s.c, s.f, s.kh, s.kw, weights_layout ? layout_of : 0};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  OneOpenMPThread();
  auto& engine = Engine();
  memory::desc user_weights({s.f, s.c, s.kh, s.kw}, dt::f32, tag::hwio);
  memory::desc src({n, s.c, s.h, s.w}, dt::f32, tag::nhwc);
  memory::desc dst({n, s.f, s.h, s.w}, dt::f32, tag::nhwc);
  memory::desc weights = weights_layout ? weights_layout->weights
                                        : memory::desc({s.f, s.c, s.kh, s.kw}, dt::f32, tag::any);
  memory::dims strides{1, 1}, pad_low{(s.kh - 1) / 2, (s.kw - 1) / 2}, pad_high{s.kh / 2, s.kw / 2};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto forward = dnnl::convolution_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
      weights, dst, strides, pad_low, pad_high, attr);
  auto p = std::make_shared<Primitive>();
  p->src = src;
  p->dst = dst;
  p->user_weights = user_weights;
  if (op == kForward) {
    p->primitive = dnnl::convolution_forward(forward);
    p->weights = forward.weights_desc();
    p->scratchpad = forward.scratchpad_desc();
  } else if (op == kBackwardData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, src, weights, dst, strides, pad_low,
        pad_high, forward, attr);
    p->primitive = dnnl::convolution_backward_data(pd);
    p->weights = pd.weights_desc();
    p->scratchpad = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, src, weights, dst, strides, pad_low,
        pad_high, forward, attr);
    p->primitive = dnnl::convolution_backward_weights(pd);
    p->weights = pd.diff_weights_desc();
    p->scratchpad = pd.scratchpad_desc();
  }
  if (p->weights != user_weights) {
    p->reorder = true;
    if (op == kBackwardWeights) {
      p->to_user_layout = dnnl::reorder(dnnl::reorder::primitive_desc(engine, p->weights, engine, user_weights));
    } else {
      p->to_primitive_layout = dnnl::reorder(dnnl::reorder::primitive_desc(engine, user_weights, engine, p->weights));
    }
  }
  cache[key] = p;
  return p;
}

struct Call {
  Op op;
  Shape s;
  int64_t chunks;
  const float* a;  // x (forward, backward weights) or dy (backward data)
  const float* b;  // w (forward, backward data) or dy (backward weights)
  float* out;
  std::shared_ptr<Primitive> first;  // the first chunk's primitive: its weights layout is the call's
  memory user_weights, weights;      // the kernel (or its gradient) in the user's and the primitive's layout
  std::vector<std::vector<float>> partial;  // backward weights: each chunk's kernel gradient
  size_t weights_size = 0;
  std::atomic<int64_t> left{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
  ffi::Promise promise;

  int64_t Start(int64_t i) const {
    int64_t base = s.n / chunks, extra = s.n % chunks;
    return i * base + std::min(i, extra);
  }
  int64_t Size(int64_t i) const { return s.n / chunks + (i < s.n % chunks ? 1 : 0); }
  void Fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (!failed.exchange(true)) error = message;
  }
};

void RunChunk(Call& call, int64_t i) {
  OneOpenMPThread();
  const Shape& s = call.s;
  int64_t start = call.Start(i), n = call.Size(i);
  auto p = n == call.Size(0) ? call.first
                             : GetPrimitive(call.op, s, n, call.first, call.Size(0));
  auto& engine = Engine();
  auto& stream = Stream();
  thread_local std::vector<char> scratch;
  if (scratch.size() < p->scratchpad.get_size()) scratch.resize(p->scratchpad.get_size());
  memory scratchpad(p->scratchpad, engine, scratch.data());
  int64_t pixels = s.h * s.w;
  if (call.op == kForward) {
    memory x(p->src, engine, const_cast<float*>(call.a) + start * pixels * s.c);
    memory y(p->dst, engine, call.out + start * pixels * s.f);
    p->primitive.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, call.weights},
                                  {DNNL_ARG_DST, y}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (call.op == kBackwardData) {
    memory dy(p->dst, engine, const_cast<float*>(call.a) + start * pixels * s.f);
    memory dx(p->src, engine, call.out + start * pixels * s.c);
    p->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, call.weights},
                                  {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    memory x(p->src, engine, const_cast<float*>(call.a) + start * pixels * s.c);
    memory dy(p->dst, engine, const_cast<float*>(call.b) + start * pixels * s.f);
    memory dw(p->weights, engine, call.partial[i].data());
    p->primitive.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy},
                                  {DNNL_ARG_DIFF_WEIGHTS, dw}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  }
  stream.wait();
}

// After the last chunk: the kernel gradient's sum and layout; then the future is ready.
void Finish(Call& call) {
  if (call.op == kBackwardWeights && !call.failed) {
    try {
      float* sum = call.partial[0].data();
      for (int64_t i = 1; i < call.chunks; ++i) {
        const float* part = call.partial[i].data();
        for (size_t e = 0; e < call.weights_size; ++e) sum[e] += part[e];
      }
      if (call.first->reorder) {
        OneOpenMPThread();
        memory summed(call.first->weights, Engine(), sum);
        call.first->to_user_layout.execute(
            Stream(), {{DNNL_ARG_FROM, summed}, {DNNL_ARG_TO, call.user_weights}});
        Stream().wait();
      } else {
        std::memcpy(call.out, sum, call.weights_size * sizeof(float));
      }
    } catch (const std::exception& e) {
      call.Fail(e.what());
    }
  }
  if (call.failed) {
    call.promise.SetError(ffi::Error(ffi::ErrorCode::kInternal, "oneDNN convolution: " + call.error));
  } else {
    call.promise.SetAvailable();
  }
}

ffi::Future Convolve(Op op, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                     ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  auto call = std::make_shared<Call>();
  ffi::Future future(call->promise);
  auto ad = a.dimensions();
  auto kernel = op == kBackwardWeights ? out->dimensions() : b.dimensions();
  call->op = op;
  call->s = Shape{ad[0], ad[1], ad[2], kernel[2], kernel[3], kernel[0], kernel[1]};
  call->chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), call->s.n));
  call->a = a.typed_data();
  call->b = b.typed_data();
  call->out = out->typed_data();
  try {
    auto& engine = Engine();
    call->first = GetPrimitive(op, call->s, call->Size(0), nullptr, 0);
    void* user = op == kBackwardWeights ? static_cast<void*>(call->out)
                                        : const_cast<float*>(call->b);
    call->user_weights = memory(call->first->user_weights, engine, user);
    call->weights = call->user_weights;
    call->weights_size = call->first->weights.get_size() / sizeof(float);
    if (op == kBackwardWeights) {
      call->partial.assign(call->chunks, std::vector<float>(call->weights_size));
    } else if (call->first->reorder) {
      OneOpenMPThread();
      call->weights = memory(call->first->weights, engine);
      call->first->to_primitive_layout.execute(
          Stream(), {{DNNL_ARG_FROM, call->user_weights}, {DNNL_ARG_TO, call->weights}});
      Stream().wait();
    }
  } catch (const std::exception& e) {
    call->promise.SetError(ffi::Error(ffi::ErrorCode::kInternal,
                                      std::string("oneDNN convolution: ") + e.what()));
    return future;
  }
  call->left = call->chunks;
  for (int64_t i = 0; i < call->chunks; ++i) {
    pool.Schedule([call, i]() {
      try {
        RunChunk(*call, i);
      } catch (const std::exception& e) {
        call->Fail(e.what());
      }
      if (call->left.fetch_sub(1, std::memory_order_acq_rel) == 1) Finish(*call);
    });
  }
  return future;
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  return Convolve(kForward, pool, x, w, y);
}
ffi::Future BackwardData(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> dx) {
  return Convolve(kBackwardData, pool, dy, w, dx);
}
ffi::Future BackwardWeights(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                            ffi::ResultBuffer<ffi::F32> dw) {
  return Convolve(kBackwardWeights, pool, x, dy, dw);
}

}  // namespace

#define GECO_CONV_BINDING                                                      \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<    \
      ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnConvForward, Forward, GECO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnConvBackwardData, BackwardData, GECO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnConvBackwardWeights, BackwardWeights, GECO_CONV_BINDING);

extern "C" int GecoOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
