// The prefetcher's per-layer decision: the C++ twin of m2r2_moe/runtime/planner.py:PlannerCore.
// Same inputs, same state, same decisions, always (tests/test_planner_diff.py compares them on random
// sequences of layer calls). Plain C++17: planner_bindings.cpp exposes it with pybind11.
//
// Arithmetic is in double, in the order the Python twin computes it, so that every comparison comes out
// the same: probabilities arrive as float32 and are widened, as Python's float(tensor.tolist()) does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace m2r2 {

constexpr int kBins = 10;
constexpr double kDecay = 0.995;
constexpr double kPrior = 4.0;
constexpr double kPriorDecay = 0.8;
constexpr double kRegretPrior = 0.1;
constexpr double kEarlyQ = 0.5;  // admission.py EARLY_Q
constexpr int kHit = 0, kPrefetchHit = 1, kLate = 2, kMiss = 3;
constexpr int64_t kNotQueued = -2;

using Copy = std::tuple<int64_t, int64_t, int64_t>;  // (target layer, expert, distance)
using Pair = std::tuple<int64_t, int64_t>;            // (target layer, expert)

struct Decision {
  std::vector<Copy> queue, expect;
  std::vector<Pair> withdraw;
};

struct LayerInput {
  int64_t layer = 0;
  bool decode = false;
  int64_t now = 0;
  std::vector<int64_t> keys, served, evicted;
  const float* probs = nullptr;  // [rows, cols] row-major, or null: no prediction at this layer
  int64_t rows = 0, cols = 0;
  bool wraps = false;
  int64_t horizon = 0;
  double miss = 0, transfer = 0, compute = 0;
  int64_t free = 0;
  std::vector<int64_t> backlog;
  double min_prob = 0;
};

class Planner {
 public:
  Planner(int64_t num_layers, int64_t num_experts, int64_t key_stride, int64_t width, int64_t max_queued);

  Decision layer(const LayerInput& in);
  void issued(int64_t key, int64_t evicted, int64_t now);
  void withdrawn(int64_t key) {
    set_flag(inflight_, key, false);
    set_flag(restoring_, key, false);
  }
  // After layers it was not told about: the mirror becomes `resident`, pending predictions are dropped.
  void resync(const std::vector<int64_t>& resident);
  double probability(int source, int64_t distance, double score) const;
  double regret() const { return (regretted_ + kRegretPrior) / (evictions_ + 1.0); }
  bool active(int64_t layer) const { return every_ != 0 && layer % every_ == 0; }
  // Once per forward; `decode`: a decode step (one token); `margin`: by how much the stall the decode steps'
  // prefetches caused may exceed what they saved before prediction backs off (the prefetcher: one demand load's).
  void step(int64_t window, bool decode = false, double margin = 0.0);
  void add_spent(double seconds) { spent_ += seconds; }
  // The stall a late prefetch hid, as the prefetcher measured it; negative: not measured (half a demand load's)
  double late_saving() const { return late_saving_; }
  void set_late_saving(double seconds) { late_saving_ = seconds; }

  double saved() const { return saved_; }
  double spent() const { return spent_; }
  double decode_saved() const { return flow_saved_; }
  double decode_caused() const { return flow_caused_; }
  int64_t every() const { return every_; }
  // Distances past `near` (> 0) are early copies, asked for only while the link is idle: admitted only when more
  // likely used than not (runtime/admission.py, EARLY_Q). 0: no such rule.
  int64_t near() const { return near_; }
  void set_near(int64_t near) { near_ = near; }
  int64_t num_layers() const { return num_layers_; }
  int64_t num_experts() const { return num_experts_; }

  // What outlives a run (planner.py: export_state / import_state): the calibration counts
  // [source 2][distance 0..L][bin][used, seen], each layer's usage prior [L][E] and the regret counts.
  const std::vector<double>& counts_state() const { return counts_; }
  const std::vector<std::vector<double>>& prior_state() const { return prior_; }
  double regretted() const { return regretted_; }
  double evictions() const { return evictions_; }
  // Replaces them, or throws std::invalid_argument (changing nothing) on another geometry or a bad value.
  void load_state(std::vector<double> counts, std::vector<std::vector<double>> prior, double regretted,
                  double evictions);

 private:
  struct Pending {
    int source;
    int64_t distance;
    double score;
    int64_t expert;
  };
  struct Candidate {
    int64_t distance, target, expert;
    double q;
  };

  int bin(double score) const;
  double* counts(int source, int64_t distance, double score);
  void settle(const LayerInput& in);
  void evict(int64_t key);
  void candidates(const LayerInput& in, int64_t horizon);  // into cands_
  std::vector<Pair> withdrawals(int64_t layer);  // of cands_

  int64_t num_layers_, num_experts_, key_stride_, width_, max_queued_;
  std::vector<double> counts_;  // [source 2][distance 0..L][bin][used, seen]
  std::vector<std::vector<double>> prior_;
  std::vector<std::vector<Pending>> pending_;
  // Per key (layer * key_stride + expert), flat and grown on demand: a decode step calls the planner at every layer
  // with the model's kernels in between, so its state is read cold; a hash table's nodes are a cache miss each.
  // `evicted_at_`: the turn a prefetch evicted the key (kNever: none pending).
  static constexpr int64_t kNever = std::numeric_limits<int64_t>::min();
  std::vector<int64_t> evicted_at_;
  // `victims_`: per prefetched key, the key its copy evicted and when ({-1, kNever}: none); when the copy is used
  // having landed in time the prefetch was right, a demand load of it would have evicted too, and the victim's
  // eviction is absolved (a late copy's victim is not: planner.py says why).
  struct Victim {
    int64_t key = -1, at = kNever;
  };
  std::vector<Victim> victims_;
  void absolve(int64_t key, bool in_time);  // forgets key's victim; absolves it if in_time
  double regretted_ = 0, evictions_ = 0, saved_ = 0, spent_ = 0, late_saving_ = -1;
  bool decoding_ = false;  // since the last step of many tokens, decode steps only: their stall balance is kept
  double flow_saved_ = 0, flow_caused_ = 0;  // stall their prefetches saved; caused (victims loaded again)
  void credit(double seconds) {
    saved_ += seconds;
    if (decoding_) flow_saved_ += seconds;
  }
  int64_t every_ = 1, quiet_ = 0;
  int64_t near_ = 0;
  std::vector<uint8_t> resident_, inflight_;
  std::vector<uint8_t> restoring_;  // prefetches of a prefetch's recent victim: their use saves nothing
  std::vector<std::pair<int64_t, std::vector<int64_t>>> wanted_;  // target -> experts, in insertion order
  // scratch reused across calls (no allocation per layer once warm)
  std::vector<int64_t> used_, order_, backlog_;
  std::vector<double> row_;
  std::vector<Pending> settled_;
  std::vector<Candidate> cands_;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> new_wanted_;

  static bool flag(const std::vector<uint8_t>& v, int64_t key) {
    return key >= 0 && static_cast<size_t>(key) < v.size() && v[static_cast<size_t>(key)];
  }
  static void set_flag(std::vector<uint8_t>& v, int64_t key, bool on) {
    if (key < 0) return;
    if (static_cast<size_t>(key) >= v.size()) {
      if (!on) return;
      v.resize(std::max(static_cast<size_t>(key) + 1, 2 * v.size()), 0);
    }
    v[static_cast<size_t>(key)] = on;
  }
};

}  // namespace m2r2
