// See heads.hpp. The inner loops run over contiguous rows (axpy form), which compilers vectorize; the
// AVX2+FMA clone is picked at load time where the CPU has it (target_clones), the portable one elsewhere.
#include "heads.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace m2r2 {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define M2R2_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define M2R2_CLONES
#endif

// y[0:cols] += a * row[0:cols]
M2R2_CLONES void axpy(float a, const float* row, float* y, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) y[j] += a * row[j];
}

// The same with the row in bfloat16: a value's bits are the upper half of its float32's.
M2R2_CLONES void axpy(float a, const uint16_t* row, float* y, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    uint32_t bits = static_cast<uint32_t>(row[j]) << 16;
    float w;
    std::memcpy(&w, &bits, sizeof w);
    y[j] += a * w;
  }
}

constexpr int64_t kAheadBytes = 16384;  // how far ahead of the row being read the rows are requested
constexpr int64_t kLineBytes = 64;      // a cache line

// y[cols] = x[rows] @ w[rows, cols] (+ y's initial values). The weights are read once per token and are cold
// by then (the layers' expert weights went through the caches since): a single sequential stream from memory
// is latency-bound, so the rows kAheadBytes ahead are requested while this one is read, keeping more lines in
// flight than the hardware prefetcher does on its own (cold reads of a 128 x 512 head 1.2-1.4x faster in a
// standalone A/B on a 2-core Xeon VM; benchmarks/prefetch_cost.py measures the prediction in place).
template <typename W>
void matvec(const float* x, const W* w, int64_t rows, int64_t cols, float* y) {
  const int64_t line = kLineBytes / static_cast<int64_t>(sizeof(W));  // weights per cache line
  const int64_t ahead = std::max<int64_t>(1, kAheadBytes / (cols * static_cast<int64_t>(sizeof(W))));
  for (int64_t i = 0; i < std::min(ahead, rows); ++i)
    for (int64_t j = 0; j < cols; j += line) __builtin_prefetch(w + i * cols + j);
  for (int64_t i = 0; i < rows; ++i) {
    if (i + ahead < rows) {
      const W* next = w + (i + ahead) * cols;
      for (int64_t j = 0; j < cols; j += line) __builtin_prefetch(next + j);
    }
    axpy(x[i], w + i * cols, y, cols);
  }
}

void softmax_rows(float* z, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = z + r * cols;
    float top = *std::max_element(row, row + cols);
    float total = 0;
    for (int64_t e = 0; e < cols; ++e) total += (row[e] = std::exp(row[e] - top));
    for (int64_t e = 0; e < cols; ++e) row[e] /= total;
  }
}

}  // namespace

void rms_linear_softmax(const float* x, int64_t hidden, double eps, const float* w, int64_t n, int64_t experts,
                        float* out) {
  double squares = 0;
  for (int64_t i = 0; i < hidden; ++i) squares += static_cast<double>(x[i]) * x[i];
  float scale = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(hidden) + eps));
  std::vector<float> normed(static_cast<size_t>(hidden));
  for (int64_t i = 0; i < hidden; ++i) normed[static_cast<size_t>(i)] = x[i] * scale;
  std::fill(out, out + n * experts, 0.0f);
  matvec(normed.data(), w, hidden, n * experts, out);
  softmax_rows(out, n, experts);
}

namespace {

template <typename W>
void mlp_softmax_of(const float* x, int64_t hidden, const W* w1, const float* b1, int64_t n, int64_t width,
                    const W* w2, const float* b2, int64_t experts, float* out) {
  std::vector<float> h(b1, b1 + n * width);
  matvec(x, w1, hidden, n * width, h.data());
  for (float& v : h) v = std::max(v, 0.0f);
  for (int64_t d = 0; d < n; ++d) {
    float* z = out + d * experts;
    std::copy(b2 + d * experts, b2 + (d + 1) * experts, z);
    matvec(h.data() + d * width, w2 + d * width * experts, width, experts, z);
  }
  softmax_rows(out, n, experts);
}

}  // namespace

void mlp_softmax(const float* x, int64_t hidden, const float* w1, const float* b1, int64_t n, int64_t width,
                 const float* w2, const float* b2, int64_t experts, float* out) {
  mlp_softmax_of(x, hidden, w1, b1, n, width, w2, b2, experts, out);
}

void mlp_softmax_bf16(const float* x, int64_t hidden, const uint16_t* w1, const float* b1, int64_t n, int64_t width,
                      const uint16_t* w2, const float* b2, int64_t experts, float* out) {
  mlp_softmax_of(x, hidden, w1, b1, n, width, w2, b2, experts, out);
}

}  // namespace m2r2
