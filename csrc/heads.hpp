// Prediction heads at batch 1 on the CPU: a predictor's per-layer probabilities in one native call instead of
// four to six small torch ops (each costs microseconds of dispatch at this size). Reference twins: the torch
// paths in m2r2_moe/predict/ (gate's StackedRouting.scores_shared, the M2R2 heads' fused_probabilities);
// tests/test_heads.py compares them within float32 rounding (these are predictions: they steer prefetching,
// never outputs; the bfloat16 variant against the torch path on weights rounded to bfloat16).
//
// Shapes: H hidden, n distances, M hidden units per distance, E experts.
#pragma once

#include <cstdint>

namespace m2r2 {

// gate: x [H] -> rms-normalized (eps) -> logits = x_hat @ w [H, n*E] -> softmax per distance -> out [n, E].
void rms_linear_softmax(const float* x, int64_t hidden, double eps, const float* w, int64_t n, int64_t experts,
                        float* out);

// M2R2 heads: h = relu(x @ w1 [H, n*M] + b1 [n*M]); logits_d = h_d @ w2_d [M, E] + b2_d [E]; softmax per
// distance -> out [n, E].
void mlp_softmax(const float* x, int64_t hidden, const float* w1, const float* b1, int64_t n, int64_t width,
                 const float* w2, const float* b2, int64_t experts, float* out);

// The same with w1 and w2 in bfloat16 (each value the upper 16 bits of a float32, as uint16): half the bytes,
// which are read cold at every token. Equal, within float32 rounding, to mlp_softmax on the weights rounded to
// bfloat16.
void mlp_softmax_bf16(const float* x, int64_t hidden, const uint16_t* w1, const float* b1, int64_t n, int64_t width,
                      const uint16_t* w2, const float* b2, int64_t experts, float* out);

}  // namespace m2r2
