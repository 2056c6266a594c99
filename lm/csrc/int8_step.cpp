// The int8 decode step of lm/fast.py (`FusedStep(int8=True)`), with its loops in C++.
//
// Every product, sigmoid and update below is the same ATen op, on the same operands and in the same
// order, as the Python methods it mirrors (named at each function), so the states and logits are the
// same bit for bit (tests/lm/test_native.py compares them). What changes is who runs the loop: a
// 200-token prompt is one call here instead of thousands of Python-level op dispatches, and every
// call runs with the GIL released, so a prompt's prefill on the engine's prefill thread no longer
// competes with the engine thread and the event loop for the interpreter.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

namespace {

constexpr double kHScale = 127.0;  // lm.fast.H_SCALE: the int8 code of h is round(127 h)

// lm.fast._quantize_h
at::Tensor quantize_h(const at::Tensor& x) { return at::round(x * kHScale).to(at::kChar); }

// lm.fast.FusedStep._cell: gates (N, 4H) ordered i, f, o, 2g; h, c (N, H) updated in place.
void cell(at::Tensor gates, at::Tensor h, at::Tensor c, int64_t H) {
  at::Tensor s = gates.sigmoid_();
  at::Tensor i = s.narrow(1, 0, H), f = s.narrow(1, H, H), o = s.narrow(1, 2 * H, H);
  at::Tensor g = s.narrow(1, 3 * H, H).mul_(2).sub_(1);
  c.mul_(f).addcmul_(i, g);
  at::Tensor t = at::mul(c, 2).sigmoid_().mul_(2).sub_(1);
  at::mul_out(h, o, t);
}

class Int8Step {
 public:
  // The tensors of a built `FusedStep(int8=True)`; `packed[l]` is layer l's oneDNN-packed weights,
  // or None where the step multiplies with `_int_mm` only.
  Int8Step(int64_t hidden, at::Tensor table, std::vector<at::Tensor> bias, std::vector<at::Tensor> scale,
           std::vector<at::Tensor> w_t, std::vector<std::optional<at::Tensor>> packed, at::Tensor ones,
           at::Tensor zeros, at::Tensor w_wave, at::Tensor scale_wave, at::Tensor bias_wave, at::Tensor head_w,
           at::Tensor head_b)
      : hidden_(hidden),
        layers_(static_cast<int64_t>(w_t.size())),
        table_(std::move(table)),
        bias_(std::move(bias)),
        scale_(std::move(scale)),
        w_t_(std::move(w_t)),
        packed_(std::move(packed)),
        ones_(std::move(ones)),
        zeros_(std::move(zeros)),
        w_wave_(std::move(w_wave)),
        scale_wave_(std::move(scale_wave)),
        bias_wave_(std::move(bias_wave)),
        head_w_(std::move(head_w)),
        head_b_(std::move(head_b)),
        qlinear_(c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "")) {
    TORCH_CHECK(bias_.size() == w_t_.size() && scale_.size() == w_t_.size() && packed_.size() == w_t_.size(),
                "one bias, scale and weight per layer");
  }

  // FusedStep.advance: tokens (B,) int64; h, c (layers, B, H) updated in place.
  void advance(const at::Tensor& tokens, const at::Tensor& h, const at::Tensor& c) const {
    c10::InferenceMode guard;
    advance_(tokens, h, c);
  }

  // FusedStep.__call__ -> logits (B, V).
  at::Tensor step(const at::Tensor& tokens, const at::Tensor& h, const at::Tensor& c) const {
    c10::InferenceMode guard;
    advance_(tokens, h, c);
    return at::addmm(head_b_, h[layers_ - 1], head_w_);
  }

  // The engine's batched prefill: ids (k, n) -> n steps of k prompts (all but the last without
  // the head) -> logits (k, V) of the last position.
  at::Tensor steps(const at::Tensor& ids, const at::Tensor& h, const at::Tensor& c) const {
    c10::InferenceMode guard;
    const int64_t n = ids.size(1);
    TORCH_CHECK(n > 0, "no positions to run");
    for (int64_t t = 0; t < n; ++t) {
      advance_(ids.select(1, t), h, c);
    }
    return at::addmm(head_b_, h[layers_ - 1], head_w_);
  }

  // FusedStep._prefill_wavefront: tokens (T,); h, c (layers, 1, H) -> logits (V,) of the last position.
  at::Tensor prefill(const at::Tensor& tokens, const at::Tensor& h, const at::Tensor& c) const {
    c10::InferenceMode guard;
    const int64_t T = tokens.size(0), L = layers_;
    TORCH_CHECK(T > 0, "an empty prompt");
    at::Tensor table = table_.index_select(0, tokens);  // (T, 4H)
    at::Tensor base = bias_wave_.expand({T, -1, -1}).clone();  // (T, L, 4H)
    base.select(1, 0).copy_(table);
    at::Tensor hs = h.select(1, 0), cs = c.select(1, 0);  // (L, H)
    for (int64_t t = 0; t < T + L - 1; ++t) {
      const int64_t first = std::max<int64_t>(0, t - T + 1), last = std::min<int64_t>(L - 1, t);
      if (last - first + 1 < L) {  // the wave's edges: the active layers one by one, top first
        for (int64_t layer = last; layer >= first; --layer) {
          at::Tensor row_base = layer == 0 ? table.narrow(0, t, 1) : bias_[layer];
          layer_step_(layer, h, c, row_base);
        }
        continue;
      }
      at::Tensor acc = at::_int_mm(quantize_h(hs.reshape({1, -1})), w_wave_);  // (1, L*4H)
      at::Tensor gates = at::addcmul(base[t], acc.view({L, -1}).to(at::kFloat), scale_wave_);  // (L, 4H)
      cell(gates, hs, cs, hidden_);
    }
    return at::addmm(head_b_, h[L - 1], head_w_)[0];
  }

 private:
  // Int8Matrix.__call__: x (N, in) -> the exact integer sums as fp32 (N, 4H).
  at::Tensor product_(int64_t layer, const at::Tensor& x) const {
    const std::optional<at::Tensor>& packed = packed_[layer];
    if (!packed.has_value() || x.size(0) == 1) {
      return at::_int_mm(quantize_h(x), w_t_[layer]).to(at::kFloat);
    }
    at::Tensor codes = at::round(x * kHScale).add_(128).to(at::kByte);  // Int8Matrix._packed_mm
    torch::jit::Stack stack{codes,
                            1.0,
                            int64_t{128},
                            *packed,
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
    return stack[0].toTensor();
  }

  // FusedStep._gates (int8) and ._cell for one layer: h, c (layers, N, H).
  void update_(int64_t layer, const at::Tensor& base, const at::Tensor& acc, const at::Tensor& h,
               const at::Tensor& c) const {
    cell(at::addcmul(base, acc, scale_[layer]), h[layer], c[layer], hidden_);
  }

  void advance_(const at::Tensor& tokens, const at::Tensor& h, const at::Tensor& c) const {
    for (int64_t layer = 0; layer < layers_; ++layer) {
      if (layer == 0) {
        at::Tensor acc = product_(0, h[0]);
        update_(0, table_.index_select(0, tokens), acc, h, c);
      } else {
        at::Tensor acc = product_(layer, at::cat({h[layer - 1], h[layer]}, 1));
        update_(layer, bias_[layer], acc, h, c);
      }
    }
  }

  // FusedStep._layer_step: one position of one layer, h, c (layers, 1, H).
  void layer_step_(int64_t layer, const at::Tensor& h, const at::Tensor& c, const at::Tensor& base) const {
    at::Tensor x = layer == 0 ? h[0] : at::cat({h[layer - 1], h[layer]}, 1);
    update_(layer, base, product_(layer, x), h, c);
  }

  int64_t hidden_, layers_;
  at::Tensor table_;
  std::vector<at::Tensor> bias_, scale_, w_t_;
  std::vector<std::optional<at::Tensor>> packed_;
  at::Tensor ones_, zeros_, w_wave_, scale_wave_, bias_wave_, head_w_, head_b_;
  c10::OperatorHandle qlinear_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "textgen's int8 LSTM step with its loops in C++ (lm/native.py)";
  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<Int8Step>(m, "Int8Step")
      .def(py::init<int64_t, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<std::optional<at::Tensor>>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor, at::Tensor>())
      .def("advance", &Int8Step::advance, release())
      .def("step", &Int8Step::step, release())
      .def("steps", &Int8Step::steps, release())
      .def("prefill", &Int8Step::prefill, release());
}
