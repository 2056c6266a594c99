// The int8 decode step of lm/decode/fused.py (`FusedStep(int8=True)`), with its loops in C++; and, at the end,
// the per-row draws of lm/batch_sampler.py.
//
// The same arithmetic as the Python methods named at each function, to the bit (tests/lm/test_native.py
// compares them): the int8 products and sigmoids are the same ATen ops, integer sums are exact in any
// order, and the elementwise steps in between are written out here with the roundings ATen's kernels
// make (its addcmul is one fused multiply-add). What changes is who runs the loop: a 200-token prompt
// is one call instead of thousands of Python-level op dispatches, most elementwise ops are fused into
// one pass, and every call runs with the GIL released, so a prompt's prefill on the engine's prefill
// thread does not compete with the engine thread and the event loop for the interpreter.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "int8_vnni.h"

namespace {

constexpr float kHScale = 127.0f;  // lm.decode.quantize.H_SCALE: the int8 code of h is round(127 h), |h| <= 1
constexpr int64_t kLayerBlockRows = 512;  // rows of one input product in Int8Step::layer_by_layer_ (x 4H int32 sums)

// lm.decode.quantize.quantize_h on the row [a, b] (b may be empty): round half to even, as torch.round.
template <typename Code>
void quantize(Code* out, const float* a, int64_t na, const float* b, int64_t nb, int offset) {
  for (int64_t j = 0; j < na; ++j) out[j] = static_cast<Code>(std::nearbyint(a[j] * kHScale) + offset);
  for (int64_t j = 0; j < nb; ++j) out[na + j] = static_cast<Code>(std::nearbyint(b[j] * kHScale) + offset);
}

// FusedStep._gates (int8): torch.addcmul(base, acc, scale), one fused multiply-add in ATen's kernel.
template <typename Acc>
void gates_into(float* out, const float* base, const Acc* acc, const float* scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::fma(static_cast<float>(acc[j]), scale[j], base[j]);
}

// FusedStep._cell: gates (N, 4H) contiguous, ordered i, f, o, 2g; row r's h and c at h + r * h_row,
// c + r * c_row, updated in place. The sigmoids are ATen's (its vectorized exp); the rest is
//   g = 2 s_g - 1;  c = fma(i, g, c * f)  (addcmul_);  h = o * (2 sigmoid(2c) - 1)
void cell(at::Tensor& gates, float* h, int64_t h_row, float* c, int64_t c_row, int64_t H) {
  const int64_t N = gates.size(0);
  gates.sigmoid_();
  const float* s = gates.data_ptr<float>();
  at::Tensor doubled = at::empty({N, H}, gates.options());  // 2c, then sigmoid(2c)
  float* t = doubled.data_ptr<float>();
  for (int64_t r = 0; r < N; ++r) {
    const float* sr = s + r * 4 * H;
    float* cr = c + r * c_row;
    float* tr = t + r * H;
    for (int64_t k = 0; k < H; ++k) {
      const float g = sr[3 * H + k] * 2.0f - 1.0f;
      const float cn = std::fma(sr[k], g, cr[k] * sr[H + k]);
      cr[k] = cn;
      tr[k] = cn * 2.0f;
    }
  }
  doubled.sigmoid_();
  for (int64_t r = 0; r < N; ++r) {
    const float* o = s + r * 4 * H + 2 * H;
    const float* tr = t + r * H;
    float* hr = h + r * h_row;
    for (int64_t k = 0; k < H; ++k) hr[k] = o[k] * (tr[k] * 2.0f - 1.0f);
  }
}

void check_state(const at::Tensor& x, int64_t layers, int64_t hidden) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(0) == layers && x.size(2) == hidden,
              "a state must be fp32 (layers, rows, hidden)");
  TORCH_CHECK(x.stride(2) == 1, "a state's rows must be contiguous");
}

class Int8Step {
 public:
  // The tensors of a built `FusedStep(int8=True)`: layer 0's (V, 4H) input table, per layer its bias
  // (1, 4H), gate scales (1, 4H) and weight codes as a transposed (in, 4H) view, and its oneDNN-packed
  // weights (None where the step multiplies with `_int_mm` alone); the fp32 head (H, V) and (V,).
  Int8Step(int64_t hidden, at::Tensor table, std::vector<at::Tensor> bias, std::vector<at::Tensor> scale,
           std::vector<at::Tensor> w_t, std::vector<std::optional<at::Tensor>> packed, at::Tensor ones,
           at::Tensor zeros, at::Tensor head_w, at::Tensor head_b)
      : hidden_(hidden),
        layers_(static_cast<int64_t>(w_t.size())),
        table_(table.contiguous()),
        bias_(std::move(bias)),
        scale_(std::move(scale)),
        w_t_(std::move(w_t)),
        packed_(std::move(packed)),
        ones_(std::move(ones)),
        zeros_(std::move(zeros)),
        head_w_(std::move(head_w)),
        head_b_(std::move(head_b)),
        qlinear_(c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "")) {
    TORCH_CHECK(layers_ > 0 && bias_.size() == w_t_.size() && scale_.size() == w_t_.size() &&
                    packed_.size() == w_t_.size(),
                "one bias, scale and weight per layer");
    TORCH_CHECK(table_.dim() == 2 && table_.size(1) == 4 * hidden_, "the table must be (V, 4H)");
    for (int64_t l = 0; l < layers_; ++l) {
      bias_[l] = bias_[l].contiguous();
      scale_[l] = scale_[l].contiguous();
      TORCH_CHECK(scale_[l].numel() == 4 * hidden_ && (l == 0 || bias_[l].numel() == 4 * hidden_));
    }
    if (textgen::vnni_supported()) {
      for (int64_t l = 0; l < layers_; ++l) {
        const at::Tensor codes = w_t_[l].t();  // (4H, in): layer 0 W_hh; above [W_ih | W_hh]
        vnni_.push_back(textgen::vnni_pack(codes));
        vnni_input_.push_back(l == 0 ? textgen::VnniWeights{} : textgen::vnni_pack(codes.narrow(1, 0, hidden_)));
        vnni_recurrent_.push_back(l == 0 ? vnni_.back() : textgen::vnni_pack(codes.narrow(1, hidden_, hidden_)));
      }
    }
  }

  // Which product the step uses: the VNNI loops for at most `vnni_rows` rows (0: never), split over
  // `threads` cores; oneDNN's otherwise. Every product gives the same integer sums, so the plan
  // changes the speed and never the bits (lm/decode/tune.py measures the plan).
  void set_plan(int64_t vnni_rows, int64_t threads) {
    TORCH_CHECK(vnni_rows == 0 || !vnni_.empty(), "this CPU has no AVX-512 VNNI: the plan cannot use it");
    TORCH_CHECK(threads >= 1, "threads must be >= 1");
    vnni_rows_ = vnni_rows;
    vnni_threads_ = threads;
  }

  static bool vnni_available() { return textgen::vnni_supported(); }

  // FusedStep.advance: tokens (B,) int64; h, c (layers, B, H) updated in place.
  void advance(const at::Tensor& tokens, at::Tensor h, at::Tensor c) const {
    c10::InferenceMode guard;
    check_tokens(tokens, 1);
    check_rows(tokens.size(0), h, c);
    advance_(tokens.data_ptr<int64_t>(), tokens.stride(0), h, c);
  }

  // FusedStep.__call__ -> logits (B, V).
  at::Tensor step(const at::Tensor& tokens, at::Tensor h, at::Tensor c) const {
    advance(tokens, h, c);
    c10::InferenceMode guard;
    return at::addmm(head_b_, h[layers_ - 1], head_w_);
  }

  // FusedStep.steps: ids (k, n) -> n steps of k sequences, the head on the last only -> logits (k, V).
  at::Tensor steps(const at::Tensor& ids, at::Tensor h, at::Tensor c) const {
    c10::InferenceMode guard;
    check_tokens(ids, 2);
    TORCH_CHECK(ids.size(1) > 0, "ids must be (sequences, positions)");
    check_rows(ids.size(0), h, c);
    if (ids.size(0) <= vnni_rows_) {  // a few prompts: layer by layer with the VNNI products, as one prompt
      return layer_by_layer_(ids.data_ptr<int64_t>(), ids.stride(0), ids.stride(1), ids.size(0), ids.size(1), h, c);
    }
    for (int64_t t = 0; t < ids.size(1); ++t) {
      advance_(ids.data_ptr<int64_t>() + t * ids.stride(1), ids.stride(0), h, c);
    }
    return at::addmm(head_b_, h[layers_ - 1], head_w_);
  }

  // FusedStep.prefill (int8): tokens (T,); h, c (layers, 1, H) -> logits (V,) of the last position, layer
  // by layer (layer_by_layer_).
  at::Tensor prefill(const at::Tensor& tokens, at::Tensor h, at::Tensor c) const {
    c10::InferenceMode guard;
    check_tokens(tokens, 1);
    TORCH_CHECK(tokens.size(0) > 0, "an empty prompt");
    check_rows(1, h, c);
    return layer_by_layer_(tokens.data_ptr<int64_t>(), 0, tokens.stride(0), 1, tokens.size(0), h, c)[0];
  }

 private:
  // Token ids index the table directly: each must be in the vocabulary. ids: dim 1 (n,) or 2 (k, n).
  void check_tokens(const at::Tensor& ids, int64_t dim) const {
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == dim, "token ids must be int64 with ", dim, " dims");
    const at::Tensor rows = dim == 2 ? ids : ids.unsqueeze(0);
    const int64_t* p = rows.data_ptr<int64_t>();
    const int64_t V = table_.size(0);
    for (int64_t i = 0; i < rows.size(0); ++i) {
      for (int64_t j = 0; j < rows.size(1); ++j) {
        const int64_t id = p[i * rows.stride(0) + j * rows.stride(1)];
        TORCH_CHECK(id >= 0 && id < V, "token id ", id, " is out of the vocabulary (", V, ")");
      }
    }
  }

  // h, c (layers, rows, H) fp32, each row contiguous.
  void check_rows(int64_t rows, const at::Tensor& h, const at::Tensor& c) const {
    check_state(h, layers_, hidden_);
    check_state(c, layers_, hidden_);
    TORCH_CHECK(h.size(1) == rows && c.size(1) == rows, "one state row per sequence");
  }

  // FusedStep.advance for B rows: per layer [h_{l-1}, h_l] @ [W_ih, W_hh] (layer 0: h_0 @ W_hh) in
  // int8, then the gates and the cell, h and c (layers, B, H) updated in place.
  void advance_(const int64_t* ids, int64_t id_stride, at::Tensor& h, at::Tensor& c) const {
    const int64_t B = h.size(1), H = hidden_;
    float* hp = h.data_ptr<float>();
    float* cp = c.data_ptr<float>();
    const int64_t h_layer = h.stride(0), h_row = h.stride(1), c_layer = c.stride(0), c_row = c.stride(1);
    at::Tensor gates = at::empty({B, 4 * H}, h.options());
    const bool vnni = B <= vnni_rows_;
    for (int64_t l = 0; l < layers_; ++l) {
      if (vnni) {
        at::Tensor acc = vnni_product_(l, vnni_codes_(l, B, hp + l * h_layer, h_layer, h_row), B);  // (B, 4H+)
        const int64_t acc_row = acc.size(1);
        for (int64_t r = 0; r < B; ++r) {
          const float* base = l == 0 ? table_.data_ptr<float>() + ids[r * id_stride] * 4 * H : bias_[l].data_ptr<float>();
          gates_into(gates.data_ptr<float>() + r * 4 * H, base, acc.data_ptr<int32_t>() + r * acc_row,
                     scale_[l].data_ptr<float>(), 4 * H);
        }
        cell(gates, hp + l * h_layer, h_row, cp + l * c_layer, c_row, H);
        continue;
      }
      const int64_t in = l == 0 ? H : 2 * H;
      const bool packed = packed_[l].has_value() && B > 1;
      at::Tensor codes = at::empty({B, in}, h.options().dtype(packed ? at::kByte : at::kChar));
      for (int64_t r = 0; r < B; ++r) {
        const float* below = hp + (l - 1) * h_layer + r * h_row;  // only read when l > 0
        const float* own = hp + l * h_layer + r * h_row;
        if (packed) {
          uint8_t* out = codes.data_ptr<uint8_t>() + r * in;
          l == 0 ? quantize<uint8_t>(out, own, H, nullptr, 0, 128) : quantize<uint8_t>(out, below, H, own, H, 128);
        } else {
          int8_t* out = codes.data_ptr<int8_t>() + r * in;
          l == 0 ? quantize<int8_t>(out, own, H, nullptr, 0, 0) : quantize<int8_t>(out, below, H, own, H, 0);
        }
      }
      at::Tensor acc = packed ? packed_product_(l, codes) : at::_int_mm(codes, w_t_[l]);  // (B, 4H)
      for (int64_t r = 0; r < B; ++r) {
        const float* base = l == 0 ? table_.data_ptr<float>() + ids[r * id_stride] * 4 * H : bias_[l].data_ptr<float>();
        float* out = gates.data_ptr<float>() + r * 4 * H;
        if (packed) {
          gates_into(out, base, acc.data_ptr<float>() + r * 4 * H, scale_[l].data_ptr<float>(), 4 * H);
        } else {
          gates_into(out, base, acc.data_ptr<int32_t>() + r * 4 * H, scale_[l].data_ptr<float>(), 4 * H);
        }
      }
      cell(gates, hp + l * h_layer, h_row, cp + l * c_layer, c_row, H);
    }
  }

  // n positions of k sequences (the token of sequence r at position t: ids[r * row_stride + t * pos_stride]),
  // layer by layer: layer l's input products W_ih x h_{l-1} for a block of positions in one product (its
  // inputs are all known once the layer below has run them), then its recurrence position by position with
  // W_hh alone. Each product's weights (a quarter of the step's, for the default model: 1 MiB) stay in the
  // core's cache across positions, where the wavefront reads all of them at every position. The int32
  // sums of the two products add to exactly the sums of the step's one product over [h_below, h], so the
  // states and logits are the wavefront's and the step's to the bit. -> logits (k, V) of the last position.
  at::Tensor layer_by_layer_(const int64_t* ids, int64_t row_stride, int64_t pos_stride, int64_t k, int64_t n,
                             at::Tensor& h, at::Tensor& c) const {
    const int64_t L = layers_, H = hidden_;
    float* hp = h.data_ptr<float>();
    float* cp = c.data_ptr<float>();
    const int64_t h_layer = h.stride(0), h_row = h.stride(1), c_layer = c.stride(0), c_row = c.stride(1);
    // the products: textgen's VNNI loops on uint8 codes (+128, rows padded), or torch._int_mm on int8 codes
    const bool vnni = vnni_rows_ >= 1;
    const int64_t width = vnni ? vnni_recurrent_[0].padded_in : H;  // a row of codes of one layer's h
    const auto codes_type = at::TensorOptions().dtype(vnni ? at::kByte : at::kChar);
    const auto quantize_row = [&](void* out, const float* from) {
      if (vnni) {
        quantize<uint8_t>(static_cast<uint8_t*>(out), from, H, nullptr, 0, 128);
      } else {
        quantize<int8_t>(static_cast<int8_t*>(out), from, H, nullptr, 0, 0);
      }
    };
    const auto product = [&](const at::Tensor& codes, int64_t rows, const textgen::VnniWeights* w,
                             const at::Tensor& w_t) -> at::Tensor {  // -> int32 (rows, 4H or padded)
      if (!vnni) return at::_int_mm(codes.narrow(0, 0, rows), w_t);
      at::Tensor sums = at::empty({rows, w->padded_out}, at::TensorOptions().dtype(at::kInt));
      textgen::vnni_product(codes.data_ptr<uint8_t>(), rows, w->padded_in, *w, sums.data_ptr<int32_t>(), vnni_threads_);
      return sums;
    };
    const int64_t block = std::max<int64_t>(1, kLayerBlockRows / k);  // positions per input product
    at::Tensor gates = at::empty({k, 4 * H}, h.options());
    at::Tensor below;  // (n * k, width): codes of the layer below's outputs at every position, rows (t, r)
    for (int64_t l = 0; l < L; ++l) {
      const bool next = l + 1 < L;
      const at::Tensor w_ih = l == 0 ? at::Tensor() : w_t_[l].narrow(0, 0, H);  // (H, 4H) views of the codes
      const at::Tensor w_hh = l == 0 ? w_t_[0] : w_t_[l].narrow(0, H, H);
      const textgen::VnniWeights* rec = vnni ? &vnni_recurrent_[l] : nullptr;
      const textgen::VnniWeights* in = vnni && l > 0 ? &vnni_input_[l] : nullptr;
      at::Tensor outputs = next ? at::zeros({n * k, width}, codes_type) : at::Tensor();
      at::Tensor own = at::zeros({k, width}, codes_type);
      at::Tensor inputs;  // int32 (block * k, 4H+): W_ih x h_below for the current block of positions
      for (int64_t t = 0; t < n; ++t) {
        if (l > 0 && t % block == 0) {
          const int64_t rows = std::min(block, n - t) * k;
          inputs = product(below.narrow(0, t * k, rows), rows, in, w_ih);
        }
        for (int64_t r = 0; r < k; ++r) {
          quantize_row(static_cast<char*>(own.data_ptr()) + r * width, hp + l * h_layer + r * h_row);
        }
        at::Tensor acc = product(own, k, rec, w_hh);
        int32_t* sums = acc.data_ptr<int32_t>();
        for (int64_t r = 0; r < k; ++r) {
          int32_t* row = sums + r * acc.size(1);
          if (l > 0) {
            const int32_t* from_below = inputs.data_ptr<int32_t>() + ((t % block) * k + r) * inputs.size(1);
            for (int64_t j = 0; j < 4 * H; ++j) row[j] += from_below[j];
          }
          const float* base = l == 0 ? table_.data_ptr<float>() + ids[r * row_stride + t * pos_stride] * 4 * H
                                     : bias_[l].data_ptr<float>();
          gates_into(gates.data_ptr<float>() + r * 4 * H, base, row, scale_[l].data_ptr<float>(), 4 * H);
        }
        cell(gates, hp + l * h_layer, h_row, cp + l * c_layer, c_row, H);
        if (next) {
          char* out = static_cast<char*>(outputs.data_ptr()) + t * k * width;
          for (int64_t r = 0; r < k; ++r) quantize_row(out + r * width, hp + l * h_layer + r * h_row);
        }
      }
      below = outputs;
    }
    return at::addmm(head_b_, h[L - 1], head_w_);
  }

  // Layer l's input codes for `rows` rows, as the VNNI product reads them: uint8 (the int8 code + 128),
  // each row padded to the layer's padded input. `own` is the layer's h of row 0 (rows `row_stride`
  // apart); the layer below's h is `layer_stride` before it.
  at::Tensor vnni_codes_(int64_t l, int64_t rows, const float* own, int64_t layer_stride, int64_t row_stride) const {
    const textgen::VnniWeights& w = vnni_[l];
    at::Tensor codes = at::zeros({rows, w.padded_in}, at::TensorOptions().dtype(at::kByte));
    uint8_t* out = codes.data_ptr<uint8_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* mine = own + r * row_stride;
      l == 0 ? quantize<uint8_t>(out + r * w.padded_in, mine, hidden_, nullptr, 0, 128)
             : quantize<uint8_t>(out + r * w.padded_in, mine - layer_stride, hidden_, mine, hidden_, 128);
    }
    return codes;
  }

  // The exact integer sums of layer l for `rows` rows of VNNI codes -> int32 (rows, padded 4H).
  at::Tensor vnni_product_(int64_t l, const at::Tensor& codes, int64_t rows) const {
    const textgen::VnniWeights& w = vnni_[l];
    at::Tensor acc = at::empty({rows, w.padded_out}, at::TensorOptions().dtype(at::kInt));
    textgen::vnni_product(codes.data_ptr<uint8_t>(), rows, w.padded_in, w, acc.data_ptr<int32_t>(), vnni_threads_);
    return acc;
  }

  // Int8Matrix._packed_mm: uint8 codes (h codes + 128, zero point 128) x the packed weights -> the
  // exact integer sums as fp32 (B, 4H).
  at::Tensor packed_product_(int64_t layer, const at::Tensor& codes) const {
    torch::jit::Stack stack{codes,
                            1.0,
                            int64_t{128},
                            *packed_[layer],
                            ones_,
                            zeros_,
                            c10::IValue(),
                            1.0,
                            int64_t{0},
                            at::kFloat,
                            std::string("none"),
                            c10::List<std::optional<at::Scalar>>(),
                            std::string("")};
    qlinear_.callBoxed(stack);
    return stack[0].toTensor().contiguous();
  }

  int64_t hidden_, layers_;
  at::Tensor table_;
  std::vector<at::Tensor> bias_, scale_, w_t_;
  std::vector<std::optional<at::Tensor>> packed_;
  at::Tensor ones_, zeros_, head_w_, head_b_;
  c10::OperatorHandle qlinear_;
  std::vector<textgen::VnniWeights> vnni_;  // empty without AVX-512 VNNI
  // the same codes split by what they multiply: each layer's W_ih (layers above 0) and its W_hh
  std::vector<textgen::VnniWeights> vnni_input_, vnni_recurrent_;
  int64_t vnni_rows_ = 0, vnni_threads_ = 1;
};

// lm.batch_sampler._sample_rows' draw: each row's exponential race from its own generator (the draw
// torch.multinomial makes from it), then one batched argmax of probs / race -> (B,) int64 ids.
at::Tensor draw_rows(const at::Tensor& probs, const std::vector<at::Generator>& generators) {
  c10::InferenceMode guard;
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == static_cast<int64_t>(generators.size()),
              "one generator per row of probs (B, V)");
  at::Tensor race = at::empty_like(probs);
  for (int64_t r = 0; r < probs.size(0); ++r) {
    race[r].exponential_(1.0, generators[r]);
  }
  return (probs / race).argmax(1);
}

// lm.batch_sampler._sample_rows, the same ATen ops in the same order (so the same bits and ids): less the
// row's maximum, over the temperature; top-k, top-p and min-p on the rows that turn them on; softmax;
// then each row's draw (draw_rows). A per-row parameter is one scalar when every row has the same
// value (a Python float: `_column`), else a float32 column, as there. One call instead of a dozen
// Python-level op dispatches: after a decode step has streamed the weights through the caches, the
// Python path's footprint made it 2-3x slower than alone (docs/PERFORMANCE.md, "Sampling the batch").
at::Tensor column(const std::vector<double>& values) {
  return at::tensor(std::vector<float>(values.begin(), values.end()), at::kFloat).unsqueeze(1);  // (B, 1)
}

bool all_equal(const std::vector<double>& v) { return std::all_of(v.begin(), v.end(), [&](double x) { return x == v[0]; }); }

at::Tensor divided(const at::Tensor& x, const std::vector<double>& by) {
  return all_equal(by) ? x / by[0] : x / column(by);
}

at::Tensor top_k(const at::Tensor& x, const std::vector<int64_t>& ks) {
  const int64_t V = x.size(1), k = ks[0];
  if (std::all_of(ks.begin(), ks.end(), [&](int64_t other) { return other == k; })) {
    if (!(0 < k && k < V)) return x;
    at::Tensor kth = std::get<0>(x.topk(k, 1)).narrow(1, k - 1, 1);  // (B, 1)
    return x.masked_fill(x < kth, -std::numeric_limits<double>::infinity());
  }
  std::vector<uint8_t> on;
  std::vector<int64_t> index;
  for (int64_t each : ks) {
    on.push_back(0 < each && each < V);
    index.push_back(std::min(std::max<int64_t>(each, 1), V) - 1);
  }
  at::Tensor on_t = at::tensor(on).to(at::kBool).unsqueeze(1);
  at::Tensor index_t = at::tensor(index, at::kLong).unsqueeze(1);
  at::Tensor kth = std::get<0>(x.sort(1, true)).gather(1, index_t);
  return x.masked_fill(on_t & (x < kth), -std::numeric_limits<double>::infinity());
}

at::Tensor top_p(const at::Tensor& x, const std::vector<double>& ps) {
  auto [sorted_x, order] = x.sort(1, true);
  at::Tensor probs = at::softmax(sorted_x, 1);
  at::Tensor mass_before = at::cumsum(probs, 1) - probs;
  at::Tensor drop_sorted = all_equal(ps) ? mass_before >= ps[0] : mass_before >= column(ps);
  drop_sorted.select(1, 0).fill_(false);
  if (!std::all_of(ps.begin(), ps.end(), [](double p) { return p < 1.0; })) {
    std::vector<uint8_t> on;
    for (double p : ps) on.push_back(p < 1.0);
    drop_sorted.bitwise_and_(at::tensor(on).to(at::kBool).unsqueeze(1));
  }
  at::Tensor drop = at::zeros_like(drop_sorted).scatter(1, order, drop_sorted);
  return x.masked_fill(drop, -std::numeric_limits<double>::infinity());
}

at::Tensor min_p(const at::Tensor& x, const std::vector<double>& ps) {
  at::Tensor probs = at::softmax(x, 1);
  at::Tensor top = probs.amax(1, true);
  at::Tensor threshold = all_equal(ps) ? ps[0] * top : column(ps) * top;
  return x.masked_fill(probs < threshold, -std::numeric_limits<double>::infinity());
}

at::Tensor sample_rows(const at::Tensor& logits, const std::vector<double>& temperature, const std::vector<int64_t>& ks,
                       const std::vector<double>& top_ps, const std::vector<double>& min_ps,
                       const std::vector<at::Generator>& generators) {
  c10::InferenceMode guard;
  const size_t B = generators.size();
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && static_cast<size_t>(logits.size(0)) == B &&
                  temperature.size() == B && ks.size() == B && top_ps.size() == B && min_ps.size() == B,
              "one row of float32 logits and one value of each parameter per generator");
  at::Tensor x = divided(logits - logits.amax(1, true), temperature);
  if (std::any_of(ks.begin(), ks.end(), [](int64_t k) { return k != 0; })) x = top_k(x, ks);
  if (std::any_of(top_ps.begin(), top_ps.end(), [](double p) { return p < 1.0; })) x = top_p(x, top_ps);
  if (std::any_of(min_ps.begin(), min_ps.end(), [](double p) { return p > 0.0; })) x = min_p(x, min_ps);
  return draw_rows(at::softmax(x, -1), generators);
}

// lm.batch_sampler.choose_batch for rows without penalties: greedy rows take their argmax, the others
// are drawn together (sample_rows), each group as a sub-batch exactly as there.
at::Tensor choose_rows(const at::Tensor& logits, const std::vector<uint8_t>& greedy, const std::vector<double>& temperature,
                       const std::vector<int64_t>& ks, const std::vector<double>& top_ps, const std::vector<double>& min_ps,
                       const std::vector<at::Generator>& generators) {
  const int64_t B = logits.size(0);
  std::vector<int64_t> greedy_rows, sampled_rows;
  for (int64_t r = 0; r < B; ++r) (greedy[r] ? greedy_rows : sampled_rows).push_back(r);
  at::Tensor ids = at::empty({B}, at::kLong);
  if (!greedy_rows.empty()) {
    at::Tensor rows = static_cast<int64_t>(greedy_rows.size()) == B
                          ? logits
                          : logits.index_select(0, at::tensor(greedy_rows, at::kLong));
    ids.index_put_({at::tensor(greedy_rows, at::kLong)}, rows.argmax(1));
  }
  if (!sampled_rows.empty()) {
    const bool all = static_cast<int64_t>(sampled_rows.size()) == B;
    at::Tensor rows = all ? logits : logits.index_select(0, at::tensor(sampled_rows, at::kLong));
    std::vector<double> t, p, m;
    std::vector<int64_t> k;
    std::vector<at::Generator> g;
    for (int64_t r : sampled_rows) {
      t.push_back(temperature[r]);
      k.push_back(ks[r]);
      p.push_back(top_ps[r]);
      m.push_back(min_ps[r]);
      g.push_back(generators[r]);
    }
    ids.index_put_({at::tensor(sampled_rows, at::kLong)}, sample_rows(rows.contiguous(), t, k, p, m, g));
  }
  return ids;
}

// `n` decode steps of B sequences in one call, each step's tokens chosen as the engine's sampler would
// (choose_rows) and fed to the next: the ids (B, n) and the last step's logits (B, V). The same tokens,
// states and draws as n calls of `step` each followed by choose_batch: vLLM's multi-step scheduling,
// for the rows whose sampling the engine does not need to see token by token (app/engine/loop.py).
// `bias`: lm.batch_sampler.batch_bias, (V,) or (B, V), added to each step's logits before the choice
// (the same for the n steps); the logits returned are the model's, without it.
std::tuple<at::Tensor, at::Tensor> decode_steps(const Int8Step& step, const at::Tensor& tokens, at::Tensor h, at::Tensor c,
                                                int64_t n, const std::vector<uint8_t>& greedy,
                                                const std::vector<double>& temperature, const std::vector<int64_t>& ks,
                                                const std::vector<double>& top_ps, const std::vector<double>& min_ps,
                                                const std::vector<at::Generator>& generators,
                                                const std::optional<at::Tensor>& bias) {
  c10::InferenceMode guard;
  const int64_t B = tokens.size(0);
  TORCH_CHECK(n >= 1, "n must be >= 1");
  TORCH_CHECK(static_cast<int64_t>(greedy.size()) == B && static_cast<int64_t>(generators.size()) == B &&
                  static_cast<int64_t>(temperature.size()) == B && static_cast<int64_t>(ks.size()) == B &&
                  static_cast<int64_t>(top_ps.size()) == B && static_cast<int64_t>(min_ps.size()) == B,
              "one sampling setting of each kind per row");
  at::Tensor ids = at::empty({B, n}, at::kLong);
  at::Tensor current = tokens.contiguous();
  at::Tensor logits;
  for (int64_t t = 0; t < n; ++t) {
    logits = step.step(current, h, c);  // (B, V)
    current = choose_rows(bias ? logits + *bias : logits, greedy, temperature, ks, top_ps, min_ps, generators);
    ids.select(1, t).copy_(current);
  }
  return {ids, logits};
}

}  // namespace

void bind_lstm_train(py::module_& m);  // lm/kernels/csrc/lstm_train.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "textgen's int8 LSTM step with its loops in C++, the batch sampler's draws, and the training "
            "LSTM's recurrence (lm/kernels/native.py)";
  bind_lstm_train(m);
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("draw_rows", &draw_rows, release());
  m.def("sample_rows", &sample_rows, release());
  m.def("read_seconds", &textgen::read_seconds, release(), "one streaming read of a buffer (the bandwidth roof)");
  py::class_<Int8Step>(m, "Int8Step")
      .def(py::init<int64_t, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<std::optional<at::Tensor>>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("set_plan", &Int8Step::set_plan, py::arg("vnni_rows"), py::arg("threads"))
      .def_static("vnni_available", &Int8Step::vnni_available)
      .def("decode", &decode_steps, release())
      .def("advance", &Int8Step::advance, release())
      .def("step", &Int8Step::step, release())
      .def("steps", &Int8Step::steps, release())
      .def("prefill", &Int8Step::prefill, release());
}
