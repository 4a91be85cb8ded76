// oneDNN convolutions as XLA:CPU FFI handlers, run on XLA's own intra-op thread pool.
//
// Built at first use by geco_jax/ops/onednn.py (g++, C++17) against jaxlib's FFI
// headers and an OpenMP build of oneDNN (PyPI: onednn-cpu-gomp, onednn-devel-cpu-gomp).
//
// Convolution: x [n, h, w, c] (NHWC) with kernel [kh, kw, c, f] (HWIO) to
// y [n, oh, ow, f], float32. Three handlers without attributes: stride 1, SAME
// padding (low (k - 1) / 2, high k / 2 per side, as XLA pads). Three more take the
// strides and the padding as attributes (stride_h, stride_w, pad_top, pad_bottom,
// pad_left, pad_right): oh = (h + pad_top + pad_bottom - kh) / stride_h + 1, and so
// for ow. Each set: forward (y = x * w), backward data (dx from dy and w) and
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
#include <stdexcept>
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

// The window: strides and padding (low and high, per spatial axis).
struct Window {
  int64_t sh = 1, sw = 1, pt = 0, pb = 0, pl = 0, pr = 0;
  auto tie() const { return std::tie(sh, sw, pt, pb, pl, pr); }
};

struct Shape {
  int64_t n, h, w, c, f, kh, kw;
  Window win;
  int64_t oh() const { return (h + win.pt + win.pb - kh) / win.sh + 1; }
  int64_t ow() const { return (w + win.pl + win.pr - kw) / win.sw + 1; }
};

// XLA's SAME padding at stride 1.
Window Same(int64_t kh, int64_t kw) {
  return Window{1, 1, (kh - 1) / 2, kh / 2, (kw - 1) / 2, kw / 2};
}

struct Key {
  int op;
  int64_t n, h, w, c, f, kh, kw, layout_of;  // layout_of: 0, or the batch whose weights layout is imposed
  Window win;
  bool operator<(const Key& o) const {
    return std::tuple_cat(std::tie(op, n, h, w, c, f, kh, kw, layout_of), win.tie()) <
           std::tuple_cat(std::tie(o.op, o.n, o.h, o.w, o.c, o.f, o.kh, o.kw, o.layout_of),
                          o.win.tie());
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
  Key key{op, n, s.h, s.w, s.c, s.f, s.kh, s.kw, weights_layout ? layout_of : 0, s.win};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  OneOpenMPThread();
  auto& engine = Engine();
  memory::desc user_weights({s.f, s.c, s.kh, s.kw}, dt::f32, tag::hwio);
  memory::desc src({n, s.c, s.h, s.w}, dt::f32, tag::nhwc);
  memory::desc dst({n, s.f, s.oh(), s.ow()}, dt::f32, tag::nhwc);
  memory::desc weights = weights_layout ? weights_layout->weights
                                        : memory::desc({s.f, s.c, s.kh, s.kw}, dt::f32, tag::any);
  memory::dims strides{s.win.sh, s.win.sw}, pad_low{s.win.pt, s.win.pl},
      pad_high{s.win.pb, s.win.pr};
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

// What both kinds of call share: the chunks, the first error, the future's promise.
struct ChunkedCall {
  int64_t chunks = 1;
  std::atomic<int64_t> left{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
  ffi::Promise promise;

  void Fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (!failed.exchange(true)) error = message;
  }
};

// Runs run(call, i) for every chunk i as a task on XLA's pool; the last task to end
// calls finish(call), which makes the future ready.
template <typename CallT>
void ScheduleChunks(ffi::ThreadPool pool, const std::shared_ptr<CallT>& call,
                    void (*run)(CallT&, int64_t), void (*finish)(CallT&)) {
  call->left = call->chunks;
  for (int64_t i = 0; i < call->chunks; ++i) {
    pool.Schedule([call, i, run, finish]() {
      try {
        run(*call, i);
      } catch (const std::exception& e) {
        call->Fail(e.what());
      }
      if (call->left.fetch_sub(1, std::memory_order_acq_rel) == 1) finish(*call);
    });
  }
}

struct Call : ChunkedCall {
  Op op;
  Shape s;
  const float* a;  // x (forward, backward weights) or dy (backward data)
  const float* b;  // w (forward, backward data) or dy (backward weights)
  float* out;
  std::shared_ptr<Primitive> first;  // the first chunk's primitive: its weights layout is the call's
  memory user_weights, weights;      // the kernel (or its gradient) in the user's and the primitive's layout
  std::vector<std::vector<float>> partial;  // backward weights: each chunk's kernel gradient
  size_t weights_size = 0;

  int64_t Start(int64_t i) const {
    int64_t base = s.n / chunks, extra = s.n % chunks;
    return i * base + std::min(i, extra);
  }
  int64_t Size(int64_t i) const { return s.n / chunks + (i < s.n % chunks ? 1 : 0); }
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
  int64_t pixels = s.h * s.w, out_pixels = s.oh() * s.ow();
  if (call.op == kForward) {
    memory x(p->src, engine, const_cast<float*>(call.a) + start * pixels * s.c);
    memory y(p->dst, engine, call.out + start * out_pixels * s.f);
    p->primitive.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, call.weights},
                                  {DNNL_ARG_DST, y}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (call.op == kBackwardData) {
    memory dy(p->dst, engine, const_cast<float*>(call.a) + start * out_pixels * s.f);
    memory dx(p->src, engine, call.out + start * pixels * s.c);
    p->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, call.weights},
                                  {DNNL_ARG_DIFF_SRC, dx}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    memory x(p->src, engine, const_cast<float*>(call.a) + start * pixels * s.c);
    memory dy(p->dst, engine, const_cast<float*>(call.b) + start * out_pixels * s.f);
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

// `win` null: stride 1, SAME.
ffi::Future Convolve(Op op, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                     ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                     const Window* win = nullptr) {
  auto call = std::make_shared<Call>();
  ffi::Future future(call->promise);
  // x's dimensions: a's, except in backward data (a is dy), where they are the result's.
  auto xd = op == kBackwardData ? out->dimensions() : a.dimensions();
  auto kernel = op == kBackwardWeights ? out->dimensions() : b.dimensions();
  call->op = op;
  call->s = Shape{xd[0], xd[1], xd[2], kernel[2], kernel[3], kernel[0], kernel[1],
                  win ? *win : Same(kernel[0], kernel[1])};
  // The other operand must be the window's output, and the channels the kernel's: the
  // Python caller makes them so, and they are checked here too (a mismatch would read or
  // write out of bounds).
  auto yd = op == kForward ? out->dimensions() : (op == kBackwardData ? a.dimensions()
                                                                       : b.dimensions());
  if (call->s.win.sh < 1 || call->s.win.sw < 1 || yd[1] != call->s.oh() ||
      yd[2] != call->s.ow() || yd[0] != xd[0] || xd[3] != kernel[2] || yd[3] != kernel[3]) {
    call->promise.SetError(ffi::Error(ffi::ErrorCode::kInvalidArgument,
                                      "oneDNN convolution: the output's shape does not match "
                                      "the input's, the kernel's and the window's"));
    return future;
  }
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
  ScheduleChunks(pool, call, RunChunk, Finish);
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

// The same with the strides and padding as attributes.
#define GECO_WINDOW_PARAMS                                                          \
  int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left, \
      int64_t pad_right
#define GECO_WINDOW Window{stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right}

ffi::Future WindowForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y, GECO_WINDOW_PARAMS) {
  Window win = GECO_WINDOW;
  return Convolve(kForward, pool, x, w, y, &win);
}
ffi::Future WindowBackwardData(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                               ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                               GECO_WINDOW_PARAMS) {
  Window win = GECO_WINDOW;
  return Convolve(kBackwardData, pool, dy, w, dx, &win);
}
ffi::Future WindowBackwardWeights(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                                  GECO_WINDOW_PARAMS) {
  Window win = GECO_WINDOW;
  return Convolve(kBackwardWeights, pool, x, dy, dw, &win);
}

// ---------------------------------------------------------------------------------------
// Winograd F(2x2, 3x3) (Lavin & Gray, 2016) for 3x3 kernels: the same convolution with
// 16 multiplications per 2x2 output tile and channel pair instead of 36. Per tile,
//   y = A^T [(G g G^T) . (B^T d B)] A
// with d the tile's 4x4 input window, g the 3x3 kernel, and
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// Over channels the elementwise product is a sum, so for each of the 16 positions p the
// tiles' products are one matrix product M_p = V_p U_p (tiles x c by c x f), done by
// oneDNN's sgemm (single-threaded: the chunks are the parallelism, as above). Tiles are
// transformed a block at a time so that the block's V and M stay in the core's cache.
// The kernel's transform U = G g G^T [16][c][f] is the caller's (geco_jax.ops.onednn
// computes it in JAX, once per kernel however many calls use it); so the handlers take U:
// - forward: y from x and U;
// - backward data: dx is the same convolution of dy with the kernel turned by 180
//   degrees and its channels swapped (SAME padding of a 3x3 kernel is symmetric). Since
//   G J = P G (J reverses the taps, P swaps rows 0 and 3), the turned kernel's transform
//   is U'_{ij} = U_{P(i) P(j)}^T: the same U, positions permuted, matrices transposed;
// - backward weights: dU_p = sum over tiles of V_p^T dM_p, with dM = A dy A^T (the
//   output transform's transpose); the caller's JAX turns dU into dg = G^T dU G.
// Images whose height or width is odd get a last half tile (reads beyond the image are
// zeros, writes beyond it are dropped).

namespace wino {

struct Dims {
  int64_t n, h, w, cin, cout;        // the convolution's input and output channels
  int64_t th() const { return (h + 1) / 2; }
  int64_t tw() const { return (w + 1) / 2; }
  int64_t tiles() const { return n * th() * tw(); }
};

// The transforms below are one pass per tile: each reads its tile's rows of x, M or dy in
// place (a row of zeros stands for a pixel outside the image; a scratch row takes the
// writes beyond it) and combines them channel by channel, with no copy of the window in
// between. The channel loops are vectorised (ivdep: GCC cannot prove that 20 rows do not
// overlap, and without it left the loops scalar), and GCC compiles each transform for
// AVX-512, AVX2 and plain x86-64, the loader picking the widest that the CPU has
// (target_clones), so the build stays portable. Against the earlier copy-and-two-passes
// form, compiled for plain x86-64: ConvDraw's gate convolutions 1.4-1.55x faster one by one
// (docs/performance.md, lever 40).
// (Defined empty, -DGECO_WINOGRAD_CLONES=, the build has the plain x86-64 form alone:
// tests/test_onednn.py checks that form too, which an AVX-512 machine never runs.)
#ifndef GECO_WINOGRAD_CLONES
#define GECO_WINOGRAD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

// V [16][count][c] = B^T d B for tiles first .. first + count of x [n][h][w][c].
GECO_WINOGRAD_CLONES
void InputTransform(const float* x, const Dims& s, int64_t c, int64_t first, int64_t count,
                    float* V, std::vector<float>& scratch) {
  scratch.assign(c, 0.f);
  const float* zeros = scratch.data();
  const int64_t th = s.th(), tw = s.tw();
  for (int64_t k = 0; k < count; ++k) {
    const int64_t tile = first + k, n = tile / (th * tw), ty = tile / tw % th, tx = tile % tw;
    const float* d[16];  // the 4x4 window's rows of channels
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t yy = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
        d[i * 4 + j] = (yy < 0 || yy >= s.h || xx < 0 || xx >= s.w)
                           ? zeros : x + ((n * s.h + yy) * s.w + xx) * c;
      }
    float* v[16];
    for (int p = 0; p < 16; ++p) v[p] = V + (p * count + k) * c;
#pragma GCC ivdep  // the rows read and written never overlap
    for (int64_t e = 0; e < c; ++e) {
      float t[4][4];  // B^T d
      for (int j = 0; j < 4; ++j) {
        const float d0 = d[j][e], d1 = d[4 + j][e], d2 = d[8 + j][e], d3 = d[12 + j][e];
        t[0][j] = d0 - d2;
        t[1][j] = d1 + d2;
        t[2][j] = d2 - d1;
        t[3][j] = d1 - d3;
      }
      for (int i = 0; i < 4; ++i) {  // (B^T d) B
        v[i * 4 + 0][e] = t[i][0] - t[i][2];
        v[i * 4 + 1][e] = t[i][1] + t[i][2];
        v[i * 4 + 2][e] = t[i][2] - t[i][1];
        v[i * 4 + 3][e] = t[i][1] - t[i][3];
      }
    }
  }
}

// y's tiles first .. first + count = A^T M A, for M [16][count][f]; y [n][h][w][f].
GECO_WINOGRAD_CLONES
void OutputTransform(const float* M, const Dims& s, int64_t f, int64_t first, int64_t count,
                     float* y, std::vector<float>& scratch) {
  scratch.resize(f);
  float* dropped = scratch.data();  // takes the writes beyond the image
  const int64_t th = s.th(), tw = s.tw();
  for (int64_t k = 0; k < count; ++k) {
    const int64_t tile = first + k, n = tile / (th * tw), ty = tile / tw % th, tx = tile % tw;
    const float* m[16];
    for (int p = 0; p < 16; ++p) m[p] = M + (p * count + k) * f;
    float* o[4];  // the 2x2 output tile's rows of channels
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        const int64_t yy = 2 * ty + a, xx = 2 * tx + b;
        o[a * 2 + b] = (yy < s.h && xx < s.w) ? y + ((n * s.h + yy) * s.w + xx) * f : dropped;
      }
#pragma GCC ivdep  // the rows read and written never overlap
    for (int64_t e = 0; e < f; ++e) {
      float t[2][4];  // A^T M
      for (int j = 0; j < 4; ++j) {
        const float m0 = m[j][e], m1 = m[4 + j][e], m2 = m[8 + j][e], m3 = m[12 + j][e];
        t[0][j] = m0 + m1 + m2;
        t[1][j] = m1 - m2 - m3;
      }
      for (int a = 0; a < 2; ++a) {  // (A^T M) A
        o[a * 2][e] = t[a][0] + t[a][1] + t[a][2];
        o[a * 2 + 1][e] = t[a][1] - t[a][2] - t[a][3];
      }
    }
  }
}

// dM [16][count][f] = A dy A^T for tiles first .. first + count of dy [n][h][w][f].
GECO_WINOGRAD_CLONES
void OutputGradientTransform(const float* dy, const Dims& s, int64_t f, int64_t first,
                             int64_t count, float* dM, std::vector<float>& scratch) {
  scratch.assign(f, 0.f);
  const float* zeros = scratch.data();
  const int64_t th = s.th(), tw = s.tw();
  for (int64_t k = 0; k < count; ++k) {
    const int64_t tile = first + k, n = tile / (th * tw), ty = tile / tw % th, tx = tile % tw;
    const float* g[4];  // the 2x2 gradient tile's rows of channels
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        const int64_t yy = 2 * ty + a, xx = 2 * tx + b;
        g[a * 2 + b] = (yy >= s.h || xx >= s.w) ? zeros : dy + ((n * s.h + yy) * s.w + xx) * f;
      }
    float* m[16];
    for (int p = 0; p < 16; ++p) m[p] = dM + (p * count + k) * f;
#pragma GCC ivdep  // the rows read and written never overlap
    for (int64_t e = 0; e < f; ++e) {
      float r[4][2];  // A dy: r[i][b] = sum_a A^T[a][i] dy[a][b]
      for (int b = 0; b < 2; ++b) {
        const float g0 = g[b][e], g1 = g[2 + b][e];
        r[0][b] = g0;
        r[1][b] = g0 + g1;
        r[2][b] = g0 - g1;
        r[3][b] = -g1;
      }
      for (int i = 0; i < 4; ++i) {  // (A dy) A^T
        m[i * 4 + 0][e] = r[i][0];
        m[i * 4 + 1][e] = r[i][0] + r[i][1];
        m[i * 4 + 2][e] = r[i][0] - r[i][1];
        m[i * 4 + 3][e] = -r[i][1];
      }
    }
  }
}

// Tiles per block: the block's V and M (or dM) about 1.5 MB, at least 16 tiles.
int64_t BlockTiles(int64_t cin, int64_t cout) {
  return std::max<int64_t>(16, std::min<int64_t>(512, (3 << 19) / (64 * (cin + cout))));
}

void Check(dnnl_status_t status) {
  if (status != dnnl_success) throw std::runtime_error("sgemm failed (status " + std::to_string(status) + ")");
}

// The position whose U serves position p for the turned kernel: P swaps 0 and 3 of each
// of p's two coordinates.
int Turned(int p) {
  static const int P[4] = {3, 1, 2, 0};
  return P[p / 4] * 4 + P[p % 4];
}

// y = x * g over tiles first .. last, U = G g G^T [16][cin][cout]; or with `turned`,
// the convolution with g turned (U [16][cout][cin], used transposed and permuted).
void Convolve(const float* x, const float* U, bool turned, const Dims& s, int64_t first,
              int64_t last, float* y) {
  thread_local std::vector<float> V, M, scratch;
  const int64_t block = BlockTiles(s.cin, s.cout);
  V.resize(16 * block * s.cin);
  M.resize(16 * block * s.cout);
  for (int64_t t0 = first; t0 < last; t0 += block) {
    const int64_t count = std::min(block, last - t0);
    InputTransform(x, s, s.cin, t0, count, V.data(), scratch);
    for (int p = 0; p < 16; ++p) {
      const float* v = V.data() + p * count * s.cin;
      float* m = M.data() + p * count * s.cout;
      if (turned) {
        Check(dnnl_sgemm('N', 'T', count, s.cout, s.cin, 1.f, v, s.cin,
                         U + Turned(p) * s.cin * s.cout, s.cin, 0.f, m, s.cout));
      } else {
        Check(dnnl_sgemm('N', 'N', count, s.cout, s.cin, 1.f, v, s.cin,
                         U + p * s.cin * s.cout, s.cout, 0.f, m, s.cout));
      }
    }
    OutputTransform(M.data(), s, s.cout, t0, count, y, scratch);
  }
}

// dU [16][cin][cout] = sum over tiles first .. last of V_p^T dM_p.
void KernelGradient(const float* x, const float* dy, const Dims& s, int64_t first, int64_t last,
                    float* dU) {
  thread_local std::vector<float> V, dM, scratch;
  const int64_t block = BlockTiles(s.cin, s.cout);
  V.resize(16 * block * s.cin);
  dM.resize(16 * block * s.cout);
  std::fill(dU, dU + 16 * s.cin * s.cout, 0.f);
  for (int64_t t0 = first; t0 < last; t0 += block) {
    const int64_t count = std::min(block, last - t0);
    InputTransform(x, s, s.cin, t0, count, V.data(), scratch);
    OutputGradientTransform(dy, s, s.cout, t0, count, dM.data(), scratch);
    for (int p = 0; p < 16; ++p)
      Check(dnnl_sgemm('T', 'N', s.cin, s.cout, count, 1.f, V.data() + p * count * s.cin, s.cin,
                       dM.data() + p * count * s.cout, s.cout, 1.f, dU + p * s.cin * s.cout,
                       s.cout));
  }
}

struct Call : ChunkedCall {
  Op op;
  Dims s;  // for backward data: the convolution of dy (cin = f) into dx (cout = c)
  const float* a;  // x (forward, backward weights) or dy (backward data)
  const float* b;  // U (forward, backward data) or dy (backward weights)
  float* out;
  std::vector<std::vector<float>> partial;  // backward weights: each chunk's dU

  int64_t Start(int64_t i) const {
    const int64_t tiles = s.tiles(), base = tiles / chunks, extra = tiles % chunks;
    return i * base + std::min(i, extra);
  }
};

void RunChunk(Call& call, int64_t i) {
  OneOpenMPThread();
  const int64_t first = call.Start(i), last = call.Start(i + 1);
  if (call.op == kBackwardWeights) {
    KernelGradient(call.a, call.b, call.s, first, last, call.partial[i].data());
  } else {
    Convolve(call.a, call.b, call.op == kBackwardData, call.s, first, last, call.out);
  }
}

void Finish(Call& call) {
  if (call.op == kBackwardWeights && !call.failed) {
    float* sum = call.partial[0].data();
    const size_t size = call.partial[0].size();
    for (int64_t i = 1; i < call.chunks; ++i) {
      const float* part = call.partial[i].data();
      for (size_t e = 0; e < size; ++e) sum[e] += part[e];
    }
    std::memcpy(call.out, sum, size * sizeof(float));
  }
  if (call.failed) {
    call.promise.SetError(ffi::Error(ffi::ErrorCode::kInternal, "Winograd convolution: " + call.error));
  } else {
    call.promise.SetAvailable();
  }
}

ffi::Future Run(Op op, ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> out) {
  auto call = std::make_shared<Call>();
  ffi::Future future(call->promise);
  auto ad = a.dimensions();
  auto u = op == kBackwardWeights ? out->dimensions() : b.dimensions();  // U: [16][c][f]
  if (u.size() != 3 || u[0] != 16) {
    call->promise.SetError(ffi::Error(ffi::ErrorCode::kInvalidArgument,
                                      "Winograd convolution: the kernel's transform must be [16, c, f]"));
    return future;
  }
  // The convolution computed: forward and backward weights x (c) -> y (f); backward
  // data dy (f) -> dx (c) with the turned kernel.
  const int64_t c = u[1], f = u[2];
  call->op = op;
  call->s = op == kBackwardData ? Dims{ad[0], ad[1], ad[2], f, c} : Dims{ad[0], ad[1], ad[2], c, f};
  call->a = a.typed_data();
  call->b = b.typed_data();
  call->out = out->typed_data();
  call->chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), call->s.tiles() / 16));
  if (op == kBackwardWeights) {
    try {
      call->partial.assign(call->chunks, std::vector<float>(16 * c * f));
    } catch (const std::exception& e) {
      call->promise.SetError(ffi::Error(ffi::ErrorCode::kInternal,
                                        std::string("Winograd convolution: ") + e.what()));
      return future;
    }
  }
  ScheduleChunks(pool, call, RunChunk, Finish);
  return future;
}

}  // namespace wino

ffi::Future WinogradForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  return wino::Run(kForward, pool, x, w, y);
}
ffi::Future WinogradBackwardData(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                                 ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx) {
  return wino::Run(kBackwardData, pool, dy, w, dx);
}
ffi::Future WinogradBackwardWeights(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  return wino::Run(kBackwardWeights, pool, x, dy, dw);
}

}  // namespace

#define GECO_CONV_BINDING                                                      \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<    \
      ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnConvForward, Forward, GECO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnConvBackwardData, BackwardData, GECO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnConvBackwardWeights, BackwardWeights, GECO_CONV_BINDING);

#define GECO_WINDOW_BINDING                                                               \
  GECO_CONV_BINDING.Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>(   \
      "pad_top").Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnWindowConvForward, WindowForward, GECO_WINDOW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnWindowConvBackwardData, WindowBackwardData,
                              GECO_WINDOW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoOnednnWindowConvBackwardWeights, WindowBackwardWeights,
                              GECO_WINDOW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoWinogradConvForward, WinogradForward, GECO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoWinogradConvBackwardData, WinogradBackwardData, GECO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GecoWinogradConvBackwardWeights, WinogradBackwardWeights, GECO_CONV_BINDING);

extern "C" int GecoOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
