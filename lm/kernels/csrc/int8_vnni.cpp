// The int8 step's products for a few rows, with AVX-512 VNNI: the exact integer sums of the h codes
// times the weight codes, read from weights laid out once for the instruction (vpdpbusd).
//
// Why: at one to a few rows a product reads every weight once per token, so its speed is the speed at
// which the weights stream through the core. oneDNN's int8 GEMV (torch._int_mm) reaches 10-14 GB/s on
// the 2-core Xeon of docs/PERFORMANCE.md; this loop streams them at 40-110 GB/s on one core, and
// splits the output rows across the cores (so that each core's share stays in its own L2) when the
// plan asks for more than one thread (lm/decode/tune.py measures which is faster here).
//
// The sums are the same integers as torch._int_mm's, so the step computes the same bits whichever
// product it uses: vpdpbusd multiplies unsigned bytes by signed bytes and adds groups of four into
// 32-bit lanes without saturating, so the h codes go in shifted by 128 (0..255) and 128 times each
// row's weight sum comes off again. |sum| <= 1024 * 255 * 127 for the widest layer: far inside int32.
//
// Layout: output rows in tiles of 16 (one 512-bit register of int32 sums), inputs in groups of 4
// (one 32-bit lane of bytes): tile t, group g holds 16 rows x 4 codes in 64 contiguous bytes, so one
// load feeds one vpdpbusd. Rows and inputs are padded with zero weights to those multiples.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>

#include "int8_vnni.h"

namespace textgen {

namespace {

constexpr int64_t kTile = 16;   // output rows per register
constexpr int64_t kGroup = 4;   // input codes per 32-bit lane

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// R rows of x times T tiles of weights, from tile `t0`: x rows at x + r * x_stride (uint8, padded to
// K), sums into y + r * y_stride + tile * 16 (int32), less comp (128 x the row's weight sum).
template <int R, int T>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void block(const uint8_t* x, int64_t x_stride,
                                                                           const int8_t* w, const int32_t* comp,
                                                                           int32_t* y, int64_t y_stride,
                                                                           int64_t t0, int64_t groups) {
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  const int8_t* tiles = w + t0 * groups * 64;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i xs[R];
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * x_stride + g * kGroup, sizeof quad);
      xs[r] = _mm512_set1_epi32(quad);
    }
    for (int t = 0; t < T; ++t) {
      const __m512i wv = _mm512_loadu_si512(tiles + (t * groups + g) * 64);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], xs[r], wv);
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512i c = _mm512_loadu_si512(comp + (t0 + t) * kTile);
    for (int r = 0; r < R; ++r) _mm512_storeu_si512(y + r * y_stride + (t0 + t) * kTile, _mm512_sub_epi32(acc[r][t], c));
  }
}

// Rows [0, R) of x against tiles [t_begin, t_end), T tiles at a time.
template <int R, int T>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_against_tiles(const uint8_t* x, int64_t x_stride,
                                                                                const VnniWeights& w, int32_t* y,
                                                                                int64_t y_stride, int64_t t_begin,
                                                                                int64_t t_end) {
  const int64_t groups = w.padded_in / kGroup;
  const int8_t* codes = w.codes.data_ptr<int8_t>();
  const int32_t* comp = w.compensation.data_ptr<int32_t>();
  int64_t t = t_begin;
  for (; t + T <= t_end; t += T) block<R, T>(x, x_stride, codes, comp, y, y_stride, t, groups);
  for (; t < t_end; ++t) block<R, 1>(x, x_stride, codes, comp, y, y_stride, t, groups);
}

// All rows of x against tiles [t_begin, t_end): groups of 4 rows, then the rest. More rows at a time
// read each weight once for more rows; the register file bounds rows x tiles (at most 32 registers).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void product(const uint8_t* x, int64_t rows, int64_t x_stride,
                                                                     const VnniWeights& w, int32_t* y,
                                                                     int64_t y_stride, int64_t t_begin,
                                                                     int64_t t_end) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) rows_against_tiles<4, 4>(x + r * x_stride, x_stride, w, y + r * y_stride, y_stride, t_begin, t_end);
  switch (rows - r) {
    case 3: rows_against_tiles<3, 6>(x + r * x_stride, x_stride, w, y + r * y_stride, y_stride, t_begin, t_end); break;
    case 2: rows_against_tiles<2, 8>(x + r * x_stride, x_stride, w, y + r * y_stride, y_stride, t_begin, t_end); break;
    case 1: rows_against_tiles<1, 8>(x + r * x_stride, x_stride, w, y + r * y_stride, y_stride, t_begin, t_end); break;
    default: break;
  }
}

// Sum of every 64-byte line of [begin, end) as int32 lanes: a pure streaming read (bench/decode_step.py's roof).
__attribute__((target("avx512f"))) int32_t read_lines(const int8_t* begin, const int8_t* end) {
  __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512(), c = _mm512_setzero_si512(),
          d = _mm512_setzero_si512();
  const int8_t* p = begin;
  for (; p + 256 <= end; p += 256) {
    a = _mm512_add_epi32(a, _mm512_loadu_si512(p));
    b = _mm512_add_epi32(b, _mm512_loadu_si512(p + 64));
    c = _mm512_add_epi32(c, _mm512_loadu_si512(p + 128));
    d = _mm512_add_epi32(d, _mm512_loadu_si512(p + 192));
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a, b), _mm512_add_epi32(c, d)));
}

}  // namespace

double read_seconds(const at::Tensor& buffer, int64_t reps, int64_t threads) {
  TORCH_CHECK(buffer.is_contiguous() && reps > 0 && threads > 0, "a contiguous buffer, reps and threads > 0");
  const int8_t* data = static_cast<const int8_t*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * buffer.element_size();
  const int64_t share = (bytes / threads) / 256 * 256;
  volatile int32_t sink = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) {
    if (threads == 1) {
      sink = sink + read_lines(data, data + bytes);
    } else {
      at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) sink = sink + read_lines(data + part * share, data + (part + 1) * share);
      });
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / static_cast<double>(reps);
}

bool vnni_supported() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

VnniWeights vnni_pack(const at::Tensor& weights) {
  TORCH_CHECK(weights.scalar_type() == at::kChar && weights.dim() == 2, "weights must be int8 (out, in)");
  const at::Tensor w = weights.contiguous();
  const int64_t out = w.size(0), in = w.size(1);
  VnniWeights packed;
  packed.out = out;
  packed.in = in;
  packed.padded_out = round_up(out, kTile);
  packed.padded_in = round_up(in, kGroup);
  packed.codes = at::zeros({packed.padded_out * packed.padded_in}, w.options());
  packed.compensation = at::zeros({packed.padded_out}, w.options().dtype(at::kInt));
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed.codes.data_ptr<int8_t>();
  int32_t* comp = packed.compensation.data_ptr<int32_t>();
  const int64_t groups = packed.padded_in / kGroup;
  for (int64_t row = 0; row < out; ++row) {
    const int64_t tile = row / kTile, lane = row % kTile;
    int32_t sum = 0;
    for (int64_t k = 0; k < in; ++k) {
      const int8_t code = src[row * in + k];
      sum += code;
      dst[((tile * groups) + k / kGroup) * 64 + lane * kGroup + k % kGroup] = code;
    }
    comp[row] = 128 * sum;
  }
  return packed;
}

void vnni_product(const uint8_t* x, int64_t rows, int64_t x_stride, const VnniWeights& w, int32_t* y, int64_t threads) {
  const int64_t tiles = w.padded_out / kTile;
  if (threads <= 1 || tiles < 2) {
    product(x, rows, x_stride, w, y, w.padded_out, 0, tiles);
    return;
  }
  // Each thread takes a contiguous share of the output rows, and so of the weights: with the same
  // share every call, each core's weights stay in its own cache.
  const int64_t share = (tiles + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t t0 = part * share, t1 = std::min(tiles, t0 + share);
      if (t0 < t1) product(x, rows, x_stride, w, y, w.padded_out, t0, t1);
    }
  });
}

}  // namespace textgen
