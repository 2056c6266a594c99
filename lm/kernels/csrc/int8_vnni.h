// The int8 step's few-row products with AVX-512 VNNI (int8_vnni.cpp): the same integer sums as
// torch._int_mm, from weights laid out once for vpdpbusd.

#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace textgen {

struct VnniWeights {
  at::Tensor codes;         // int8, tiles of 16 rows x groups of 4 inputs, zero-padded
  at::Tensor compensation;  // int32 (padded_out,): 128 x each row's weight sum
  int64_t out = 0, in = 0, padded_out = 0, padded_in = 0;
};

// Whether this CPU runs the VNNI loops (AVX-512 F, BW and VNNI).
bool vnni_supported();

// weights: int8 (out, in), row-major or not.
VnniWeights vnni_pack(const at::Tensor& weights);

// y (rows, padded_out) int32 = the codes x (rows, in; each row at x + r * x_stride, uint8: the int8 code
// + 128, padded with anything to padded_in) times the weights, less the compensation: exactly
// int8 codes @ weights^T. `threads` > 1 splits the output rows into that many contiguous shares.
void vnni_product(const uint8_t* x, int64_t rows, int64_t x_stride, const VnniWeights& w, int32_t* y,
                  int64_t threads);

// Seconds one streaming read of `buffer` takes (the mean of `reps`), split over `threads` cores as the
// products split their weights: the bandwidth roof a product of that many bytes can reach here.
double read_seconds(const at::Tensor& buffer, int64_t reps, int64_t threads);

}  // namespace textgen
