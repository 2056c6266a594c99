// One LSTM layer's recurrence over a training window, forward and backward (lm/kernels/train_lstm.py's
// autograd Function calls these; it does the window-wide products itself), and the training loop's
// dropout.
//
// Time-major throughout: xproj (T, B, 4H) holds every step's input projection x W_ih^T, gates
// ordered i, f, g, o as in nn.LSTM; the bias b_ih + b_hh comes separately, in fp32. Each step is one
// oneDNN product on W_hh packed once per window (mkldnn::_linear_pointwise, with the step's input
// projection added in the same call), then one fused pass over the step's gates: the bias, the
// activations, the cell and the output, each element read and written once. torch's sigmoid and
// tanh alone cost more than the whole cell pass here (docs/TRAINING.md, "The training kernel").
//
// The forward keeps what the backward needs: the activated gates, c and tanh(c) of every step in
// fp32 (in bf16, a forget gate of 0.9995 would be stored as 1: its gradient f (1 - f) would vanish
// and the cell gradient would cross the window undamped), and the outputs in the products' dtype,
// which also feed the next step's product. The backward walks the window in reverse: one fused pass turns dh and dc into the four
// gate gradients and sums the bias gradient, then one product with W_hh (packed transposed) gives the
// previous step's dh, with that step's output gradient added in the same call. The weight gradient
// is one product over the whole window, done by the caller.

// Unlike int8_step.cpp, nothing here must match another implementation to the bit: let the compiler
// fuse multiplies and adds.
#pragma GCC optimize("fp-contract=fast")

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// The cell passes work on 8 floats at a time with GCC/Clang vector extensions (AVX2 registers on x86,
// two NEON registers on arm64), and on single floats for the tail of a row: the same code for both,
// through the overloads below.
using V8 = float __attribute__((vector_size(32)));
using V8i = int32_t __attribute__((vector_size(32)));
using V8u = uint32_t __attribute__((vector_size(32)));
using V8h = uint16_t __attribute__((vector_size(16)));

inline float vmin(float a, float b) { return a < b ? a : b; }
inline float vmax(float a, float b) { return a > b ? a : b; }
inline V8 vmin(V8 a, V8 b) { return a < b ? a : b; }
inline V8 vmax(V8 a, V8 b) { return a > b ? a : b; }
inline float vfloor(float x) { return std::floor(x); }
inline V8 vfloor(V8 x) {  // |x| < 2^31 here
  V8 t = __builtin_convertvector(__builtin_convertvector(x, V8i), V8);
  return t - (t > x ? V8{} + 1.0f : V8{});
}
inline float exp2i(float n) {  // 2^n for an integral n in the normal range
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline V8 exp2i(V8 n) { return reinterpret_cast<V8>((__builtin_convertvector(n, V8i) + 127) << 23); }

// exp for the gate activations: Cephes' expf (range reduction to |r| <= ln2/2, a polynomial in r, the
// exponent put in by hand), branch-free. Inputs are clamped to where expf is finite and normal. Full
// precision is Cephes' degree-6 polynomial, about 2 ulp; Coarse, for bfloat16 training, is the
// degree-4 Taylor polynomial, relative error under 5e-5, a hundredth of a bfloat16 ulp.
template <bool Coarse, typename V>
inline V fast_exp(V x) {
  x = vmin(vmax(x, V{} - 87.0f), V{} + 88.0f);
  V n = vfloor(x * 1.44269504088896341f + 0.5f);
  V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p;
  if constexpr (Coarse) {
    p = V{} + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
  } else {
    p = V{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
  }
  p = p * r * r + r + 1.0f;
  return p * exp2i(n);
}

// 1 / x: on x86 the 12-bit hardware estimate and one Newton step (about 23 bits, a third of the cost of
// a vector division on the CPUs measured); elsewhere, and for the scalar tail, the division.
inline float recip(float x) { return 1.0f / x; }
inline V8 recip(V8 x) {
#if defined(__AVX__)
  V8 r = __builtin_ia32_rcpps256(x);
  return r * (2.0f - x * r);
#else
  return 1.0f / x;
#endif
}

template <bool Coarse, typename V>
inline V sigmoid(V x) {
  return recip(1.0f + fast_exp<Coarse, V>(-x));
}
template <bool Coarse, typename V>
inline V tanh_(V x) {
  return 2.0f * recip(1.0f + fast_exp<Coarse, V>(-2.0f * x)) - 1.0f;
}

// Loads and stores of float32 and bfloat16 rows, as float or V8. bfloat16 -> float is exact; float ->
// bfloat16 rounds to nearest even, as torch's casts (NaN aside: training stops on a non-finite loss).
template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
inline V load(const at::BFloat16* p) {
  if constexpr (sizeof(V) == sizeof(float)) {
    uint32_t bits = static_cast<uint32_t>(p->x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  } else {
    V8h h;
    std::memcpy(&h, p, sizeof h);
    return reinterpret_cast<V8>(__builtin_convertvector(h, V8u) << 16);
  }
}
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, V8 v) { std::memcpy(p, &v, sizeof v); }
inline void store(at::BFloat16* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  p->x = static_cast<uint16_t>(bits >> 16);
}
inline void store(at::BFloat16* p, V8 v) {
  V8u bits = reinterpret_cast<V8u>(v);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  V8h h = __builtin_convertvector(bits >> 16, V8h);
  std::memcpy(p, &h, sizeof h);
}

using LinearBinary = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, c10::string_view);

// x W^T + other, W packed by mkldnn::_reorder_linear_weight: the op torch's own compiler emits for
// a linear followed by an add on CPU.
at::Tensor linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                       .typed<LinearBinary>();
  return op.call(x, other, packed, std::nullopt, "add");
}

// The forward cell of one step at columns [j, j + width of V) of one row.
template <typename V, typename T>
inline void cell_forward_at(const T* g, const float* bias, const float* cp, float* a, float* c, float* tc, T* h, int64_t H,
                            int64_t j) {
  constexpr bool kCoarse = std::is_same_v<T, at::BFloat16>;
  V i = sigmoid<kCoarse, V>(load<V>(g + j) + load<V>(bias + j));
  V f = sigmoid<kCoarse, V>(load<V>(g + H + j) + load<V>(bias + H + j));
  V gg = tanh_<kCoarse, V>(load<V>(g + 2 * H + j) + load<V>(bias + 2 * H + j));
  V o = sigmoid<kCoarse, V>(load<V>(g + 3 * H + j) + load<V>(bias + 3 * H + j));
  V cn = f * load<V>(cp + j) + i * gg;
  V t = tanh_<kCoarse, V>(cn);
  store(a + j, i);
  store(a + H + j, f);
  store(a + 2 * H + j, gg);
  store(a + 3 * H + j, o);
  store(c + j, cn);
  store(tc + j, t);
  store(h + j, o * t);
}

// The forward cell of one step, rows [begin, end): gates (B, 4H) before the bias and the activations,
// c_prev (B, H); writes the activations, c, tanh(c) and h of the step.
template <typename T>
void cell_forward(const T* gates, const float* bias, const float* c_prev, float* acts, float* c, float* tc, T* h, int64_t H,
                  int64_t begin, int64_t end) {
  constexpr int64_t kWidth = sizeof(V8) / sizeof(float);
  for (int64_t b = begin; b < end; ++b) {
    const T* g = gates + b * 4 * H;
    float* a = acts + b * 4 * H;
    const float* cp = c_prev + b * H;
    float* cr = c + b * H;
    float* tr = tc + b * H;
    T* hr = h + b * H;
    int64_t j = 0;
    for (; j + kWidth <= H; j += kWidth) cell_forward_at<V8>(g, bias, cp, a, cr, tr, hr, H, j);
    for (; j < H; ++j) cell_forward_at<float>(g, bias, cp, a, cr, tr, hr, H, j);
  }
}

// The backward cell at columns [j, j + width of V) of one row; adds the gate gradients to db.
template <typename V, typename T>
inline void cell_backward_at(const T* dh, const float* a, const float* tc, const float* cp, float* dc, T* dg, float* db,
                             int64_t H, int64_t j) {
  V i = load<V>(a + j), f = load<V>(a + H + j), g = load<V>(a + 2 * H + j), o = load<V>(a + 3 * H + j);
  V t = load<V>(tc + j);
  V d = load<V>(dh + j);
  V dcn = load<V>(dc + j) + d * o * (1.0f - t * t);
  V di = dcn * g * i * (1.0f - i);
  V df = dcn * load<V>(cp + j) * f * (1.0f - f);
  V dgg = dcn * i * (1.0f - g * g);
  V dout = d * t * o * (1.0f - o);
  store(dg + j, di);
  store(dg + H + j, df);
  store(dg + 2 * H + j, dgg);
  store(dg + 3 * H + j, dout);
  store(db + j, load<V>(db + j) + di);
  store(db + H + j, load<V>(db + H + j) + df);
  store(db + 2 * H + j, load<V>(db + 2 * H + j) + dgg);
  store(db + 3 * H + j, load<V>(db + 3 * H + j) + dout);
  store(dc + j, dcn * f);
}

// The backward cell of one step, rows [begin, end): dh (B, H) is the output's whole gradient at this
// step; dc (B, H) comes in as the next step's cell gradient and leaves as this step's; db (B, 4H)
// sums each row's gate gradients over the steps (rows are summed at the end: no two threads share one).
template <typename T>
void cell_backward(const T* dh, const float* acts, const float* tc, const float* c_prev, float* dc, T* dgates, float* db,
                   int64_t H, int64_t begin, int64_t end) {
  constexpr int64_t kWidth = sizeof(V8) / sizeof(float);
  for (int64_t b = begin; b < end; ++b) {
    const T* dhr = dh + b * H;
    const float* a = acts + b * 4 * H;
    const float* tr = tc + b * H;
    const float* cp = c_prev + b * H;
    float* dcr = dc + b * H;
    T* dg = dgates + b * 4 * H;
    float* dbr = db + b * 4 * H;
    int64_t j = 0;
    for (; j + kWidth <= H; j += kWidth) cell_backward_at<V8>(dhr, a, tr, cp, dcr, dg, dbr, H, j);
    for (; j < H; ++j) cell_backward_at<float>(dhr, a, tr, cp, dcr, dg, dbr, H, j);
  }
}

// A buffer for a window's saved activations or gradients, handed out again once nothing holds it.
// These are tens of MB per layer and step: fresh ones come from mmap and are paid for again in page
// faults on every step, as much time as the cell passes themselves. A buffer is free when the pool's
// tensor is the only holder of its storage (autograd has released what it saved, the caller has let
// go of the gradient); callers get an alias, so autograd never attaches anything to the pool's own.
at::Tensor workspace(at::IntArrayRef shape, at::ScalarType dtype) {
  static std::mutex mutex;
  static std::vector<at::Tensor> pool;
  constexpr size_t kMaxHeld = 32;  // layers x (3 saved + 1 gradient) for up to 8 layers
  std::lock_guard<std::mutex> lock(mutex);
  for (const at::Tensor& held : pool) {
    if (held.scalar_type() == dtype && held.sizes() == shape && held.storage().use_count() == 1) {
      return held.alias();
    }
  }
  at::Tensor fresh = at::empty(shape, at::TensorOptions().dtype(dtype));
  if (pool.size() >= kMaxHeld) {  // drop a free one (shapes changed), else hand this one out unpooled
    auto free = std::find_if(pool.begin(), pool.end(), [](const at::Tensor& t) { return t.storage().use_count() == 1; });
    if (free == pool.end()) return fresh;
    pool.erase(free);
  }
  pool.push_back(fresh);
  return fresh.alias();
}

// fn(float()) or fn(at::BFloat16()): the two dtypes the products run in.
template <typename Fn>
void dispatch(at::ScalarType dtype, Fn fn) {
  if (dtype == at::kBFloat16) {
    fn(at::BFloat16());
  } else {
    TORCH_CHECK(dtype == at::kFloat, "the fused LSTM runs in float32 or bfloat16, not ", dtype);
    fn(0.0f);
  }
}

void check_inputs(const at::Tensor& xproj, const at::Tensor& bias, const at::Tensor& h0, const at::Tensor& c0) {
  TORCH_CHECK(xproj.dim() == 3 && xproj.is_contiguous(), "xproj must be a contiguous (T, B, 4H) tensor");
  TORCH_CHECK(xproj.size(0) > 0 && xproj.size(2) % 4 == 0, "xproj must be (T, B, 4H) with T > 0");
  int64_t B = xproj.size(1), H = xproj.size(2) / 4;
  TORCH_CHECK(bias.sizes() == at::IntArrayRef({4 * H}) && bias.scalar_type() == at::kFloat && bias.is_contiguous(),
              "bias must be a contiguous float32 (4H,) tensor");
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({B, H}) && h0.scalar_type() == xproj.scalar_type() && h0.is_contiguous(),
              "h0 must be a contiguous (B, H) tensor of xproj's dtype");
  TORCH_CHECK(c0.sizes() == at::IntArrayRef({B, H}) && c0.scalar_type() == at::kFloat && c0.is_contiguous(),
              "c0 must be a contiguous float32 (B, H) tensor");
}

// Rows per task of a cell pass: enough work per task to be worth a thread.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / (4 * H)); }

// xproj (T, B, 4H): x W_ih^T of every step, without bias; bias (4H,) = b_ih + b_hh in float32.
// -> (y (T, B, H) in xproj's dtype, acts (T, B, 4H), c (T, B, H), tanh(c) (T, B, H) in float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& xproj, const at::Tensor& w_packed,
                                                                   const at::Tensor& bias, const at::Tensor& h0,
                                                                   const at::Tensor& c0) {
  check_inputs(xproj, bias, h0, c0);
  const int64_t T = xproj.size(0), B = xproj.size(1), H = xproj.size(2) / 4;
  const at::ScalarType dtype = xproj.scalar_type();
  at::Tensor y = at::empty({T, B, H}, xproj.options());
  at::Tensor acts = workspace({T, B, 4 * H}, at::kFloat);
  at::Tensor c = workspace({T, B, H}, at::kFloat);
  at::Tensor tc = workspace({T, B, H}, at::kFloat);
  dispatch(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    const float* b = bias.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor gates = linear_add(t == 0 ? h0 : y[t - 1], xproj[t], w_packed);
      TORCH_CHECK(gates.is_contiguous() && gates.scalar_type() == dtype, "unexpected product layout");
      const scalar_t* g = gates.data_ptr<scalar_t>();
      const float* cp = t == 0 ? c0.data_ptr<float>() : c.data_ptr<float>() + (t - 1) * B * H;
      float* a = acts.data_ptr<float>() + t * B * 4 * H;
      float* cn = c.data_ptr<float>() + t * B * H;
      float* tn = tc.data_ptr<float>() + t * B * H;
      scalar_t* h = y.data_ptr<scalar_t>() + t * B * H;
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        cell_forward<scalar_t>(g, b, cp, a, cn, tn, h, H, begin, end);
      });
    }
  });
  return {y, acts, c, tc};
}

// dy (T, B, H) in the products' dtype: the gradient of every output; dh_last and dc_last (B, H): the
// gradients of the final state. -> (dgates (T, B, 4H) in dy's dtype, dbias (4H,), dh0 (B, H),
// dc0 (B, H)), the last three in float32; without state_grads (the initial state is a constant, as
// when truncated BPTT detaches it) dh0 and dc0 are undefined and the last step's product is skipped.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy, const at::Tensor& dh_last,
                                                                    const at::Tensor& dc_last,
                                                                    const at::Tensor& wt_packed, const at::Tensor& acts,
                                                                    const at::Tensor& c, const at::Tensor& tc,
                                                                    const at::Tensor& c0, bool state_grads) {
  TORCH_CHECK(dy.dim() == 3 && dy.is_contiguous() && dy.size(0) > 0, "dy must be a contiguous (T, B, H) tensor");
  const int64_t T = dy.size(0), B = dy.size(1), H = dy.size(2);
  TORCH_CHECK(acts.sizes() == at::IntArrayRef({T, B, 4 * H}) && c.sizes() == dy.sizes() && tc.sizes() == dy.sizes(),
              "saved tensors do not match dy");
  TORCH_CHECK(acts.scalar_type() == at::kFloat && tc.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
              "the saved activations and cells must be float32");
  TORCH_CHECK(c0.sizes() == at::IntArrayRef({B, H}) && c0.scalar_type() == at::kFloat && c0.is_contiguous(),
              "c0 must be a contiguous float32 (B, H) tensor");
  at::Tensor dgates = workspace({T, B, 4 * H}, dy.scalar_type());
  at::Tensor db = at::zeros({B, 4 * H}, dy.options().dtype(at::kFloat));
  at::Tensor dc = dc_last.to(at::kFloat).contiguous().clone();
  at::Tensor dh = (dy[T - 1].to(at::kFloat) + dh_last.to(at::kFloat)).to(dy.scalar_type()).contiguous();
  dispatch(dy.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    float* dcp = dc.data_ptr<float>();
    float* dbp = db.data_ptr<float>();
    for (int64_t t = T - 1; t >= 0; --t) {
      const scalar_t* dhp = dh.data_ptr<scalar_t>();
      const float* a = acts.data_ptr<float>() + t * B * 4 * H;
      const float* tn = tc.data_ptr<float>() + t * B * H;
      const float* cp = t == 0 ? c0.data_ptr<float>() : c.data_ptr<float>() + (t - 1) * B * H;
      scalar_t* dg = dgates.data_ptr<scalar_t>() + t * B * 4 * H;
      at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
        cell_backward<scalar_t>(dhp, a, tn, cp, dcp, dg, dbp, H, begin, end);
      });
      if (t > 0) {
        dh = linear_add(dgates[t], dy[t - 1], wt_packed);
      } else if (state_grads) {
        dh = linear_add(dgates[0], at::zeros({B, H}, dy.options()), wt_packed);
      }
    }
  });
  if (!state_grads) return {dgates, db.sum(0), at::Tensor(), at::Tensor()};
  return {dgates, db.sum(0), dh.to(at::kFloat), dc};
}

// Dropout with a mask that is a pure function of (seed, element index): a 32-bit integer hash
// (Wellons' lowbias32, run twice with the seed mixed in), so the backward recomputes the mask instead
// of storing it, and the whole pass is a few vector integer ops per 8 elements, not the per-element
// Mersenne Twister draws of torch's bernoulli_ (a tenth of a training step, measured). out = x * keep /
// (1 - p), where keep is hash >= p * 2^32.
template <typename V>
inline V lowbias32(V x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

template <typename T>
void dropout_rows(const T* x, T* out, int64_t begin, int64_t end, uint32_t threshold, float scale, uint32_t seed_a,
                  uint32_t seed_b) {
  int64_t i = begin;
  const V8u lanes = {0, 1, 2, 3, 4, 5, 6, 7};
  for (; i + 8 <= end; i += 8) {
    V8u h = lowbias32<V8u>(lowbias32<V8u>((static_cast<uint32_t>(i) + lanes) ^ seed_a) ^ seed_b);
    V8 keep = reinterpret_cast<V8>(h >= threshold ? V8i{} - 1 : V8i{});
    V8 v = load<V8>(x + i) * scale;
    store(out + i, reinterpret_cast<V8>(reinterpret_cast<V8i>(v) & reinterpret_cast<V8i>(keep)));
  }
  for (; i < end; ++i) {
    uint32_t h = lowbias32<uint32_t>(lowbias32<uint32_t>(static_cast<uint32_t>(i) ^ seed_a) ^ seed_b);
    store(out + i, h >= threshold ? load<float>(x + i) * scale : 0.0f);
  }
}

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(x.is_contiguous(), "dropout needs a contiguous tensor");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  TORCH_CHECK(x.numel() < (int64_t{1} << 32), "dropout's element counter is 32 bits");
  at::Tensor out = at::empty_like(x);
  const uint32_t threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const uint32_t seed_a = static_cast<uint32_t>(seed), seed_b = static_cast<uint32_t>(seed >> 32);
  dispatch(x.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      // an element's mask depends on its index alone, however the range is split
      dropout_rows<scalar_t>(src, dst, begin, end, threshold, scale, seed_a, seed_b);
    });
  });
  return out;
}

}  // namespace

void bind_lstm_train(py::module_& m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("lstm_forward", &forward, release(), "one LSTM layer's forward over a window (lm/kernels/train_lstm.py)");
  m.def("lstm_backward", &backward, release(), "one LSTM layer's backward over a window (lm/kernels/train_lstm.py)");
  m.def("dropout", &dropout, release(), "x * keep / (1 - p), keep a function of (seed, index) (lm/kernels/train_lstm.py)");
}
