// See planner.hpp. Each function mirrors the method of the same name in m2r2_moe/runtime/planner.py.
#include "planner.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace m2r2 {

Planner::Planner(int64_t num_layers, int64_t num_experts, int64_t key_stride, int64_t width, int64_t max_queued)
    : num_layers_(num_layers), num_experts_(num_experts), key_stride_(key_stride), width_(width),
      max_queued_(max_queued),
      counts_(static_cast<size_t>(2 * (num_layers + 1) * kBins * 2), 0.0),
      prior_(static_cast<size_t>(num_layers), std::vector<double>(static_cast<size_t>(num_experts), 0.0)),
      pending_(static_cast<size_t>(num_layers)) {
  if (num_layers < 1 || num_experts < 1 || key_stride < num_experts || width < 1 || max_queued < 1)
    throw std::invalid_argument("planner: layers, experts, width and max_queued must be >= 1, key_stride >= experts");
  size_t keys = static_cast<size_t>(num_layers * key_stride);  // every key the cache can name
  resident_.assign(keys, 0);
  inflight_.assign(keys, 0);
  evicted_at_.assign(keys, kNever);
  victims_.assign(keys, Victim{});
}

int Planner::bin(double score) const { return std::min(static_cast<int>(score * kBins), kBins - 1); }

double* Planner::counts(int source, int64_t distance, double score) {
  if (distance < 0 || distance > num_layers_) return nullptr;
  size_t i = ((static_cast<size_t>(source) * (num_layers_ + 1) + distance) * kBins + bin(score)) * 2;
  return &counts_[i];
}

double Planner::probability(int source, int64_t distance, double score) const {
  double used = 0, seen = 0;
  if (distance >= 0 && distance <= num_layers_) {
    size_t i = ((static_cast<size_t>(source) * (num_layers_ + 1) + distance) * kBins + bin(score)) * 2;
    used = counts_[i];
    seen = counts_[i + 1];
  }
  return (used + kPrior * score) / (seen + kPrior);
}

void Planner::step(int64_t window, bool decode, double margin) {
  double decay = 1.0 - 1.0 / static_cast<double>(window);
  saved_ *= decay;
  spent_ *= decay;
  flow_saved_ *= decay;
  flow_caused_ *= decay;
  if (!decode) {
    decoding_ = false;
  } else if (!decoding_) {  // the first decode step after a prompt: the decode steps' own stall balance starts
    decoding_ = true;
    flow_saved_ = flow_caused_ = 0;
  }
  if (every_ == 0) {
    if (++quiet_ >= window) {
      every_ = num_layers_;
      quiet_ = 0;
    }
    return;
  }
  // not paying, or the decode steps' prefetches causing more stall than they save by more than `margin`: predict on
  // fewer layers (more again only at twice the cost)
  bool harmful = decoding_ && flow_caused_ > flow_saved_ + margin;
  if ((spent_ > saved_ && spent_ > 0) || harmful) {
    every_ = every_ >= num_layers_ ? 0 : every_ * 2;
  } else if (saved_ > 2 * spent_ && every_ > 1) {
    every_ /= 2;
  }
}

void Planner::load_state(std::vector<double> counts, std::vector<std::vector<double>> prior, double regretted,
                         double evictions) {
  if (counts.size() != counts_.size() || prior.size() != prior_.size())
    throw std::invalid_argument("planner state of the wrong shape: " + std::to_string(counts.size()) +
                                " counts (expected " + std::to_string(counts_.size()) + "), prior of " +
                                std::to_string(prior.size()) + " layers (expected " + std::to_string(num_layers_) + ")");
  auto bad = [](double x) { return !std::isfinite(x) || x < 0; };
  for (const std::vector<double>& row : prior) {
    if (static_cast<int64_t>(row.size()) != num_experts_)
      throw std::invalid_argument("planner state of the wrong shape: a prior row of " + std::to_string(row.size()) +
                                  " experts (expected " + std::to_string(num_experts_) + ")");
    if (std::any_of(row.begin(), row.end(), bad))
      throw std::invalid_argument("planner state has negative or non-finite counts");
  }
  if (std::any_of(counts.begin(), counts.end(), bad) || bad(regretted) || bad(evictions))
    throw std::invalid_argument("planner state has negative or non-finite counts");
  counts_ = std::move(counts);
  prior_ = std::move(prior);
  regretted_ = regretted;
  evictions_ = evictions;
}

void Planner::evict(int64_t key) {
  set_flag(restoring_, key, false);
  set_flag(resident_, key, false);
  set_flag(inflight_, key, false);
}

void Planner::resync(const std::vector<int64_t>& resident) {
  std::fill(resident_.begin(), resident_.end(), 0);
  for (int64_t key : resident) set_flag(resident_, key, true);
  std::fill(inflight_.begin(), inflight_.end(), 0);
  for (auto& p : pending_) p.clear();
  wanted_.clear();
}

void Planner::issued(int64_t key, int64_t evicted, int64_t now) {
  if (evicted == kNotQueued) return;
  set_flag(inflight_, key, true);
  if (key >= 0 && static_cast<size_t>(key) < evicted_at_.size()) {  // a prefetch's victim fetched back: regretted too
    int64_t& at = evicted_at_[static_cast<size_t>(key)];
    if (at != kNever && now - at <= num_layers_) {
      at = kNever;
      regretted_ += 1.0;
      set_flag(restoring_, key, true);
    }
  }
  if (evicted >= 0) {  // evicted for a prefetch: regretted if a demand load or a prefetch brings it back soon
    evict(evicted);
    if (static_cast<size_t>(evicted) >= evicted_at_.size())
      evicted_at_.resize(std::max(static_cast<size_t>(evicted) + 1, 2 * evicted_at_.size()), kNever);
    evicted_at_[static_cast<size_t>(evicted)] = now;
    if (key >= 0) {
      if (static_cast<size_t>(key) >= victims_.size())
        victims_.resize(std::max(static_cast<size_t>(key) + 1, 2 * victims_.size()), Victim{});
      victims_[static_cast<size_t>(key)] = Victim{evicted, now};
    }
    evictions_ = evictions_ * kDecay + 1.0;
    regretted_ *= kDecay;
  }
}

void Planner::absolve(int64_t key, bool in_time) {
  if (key < 0 || static_cast<size_t>(key) >= victims_.size()) return;
  Victim& v = victims_[static_cast<size_t>(key)];
  if (in_time && v.key >= 0 && static_cast<size_t>(v.key) < evicted_at_.size() && evicted_at_[static_cast<size_t>(v.key)] == v.at)
    evicted_at_[static_cast<size_t>(v.key)] = kNever;
  v = Victim{};
}

void Planner::settle(const LayerInput& in) {
  int64_t base = in.layer * key_stride_;
  std::vector<int64_t>& used = used_;
  used.clear();
  for (int64_t key : in.keys) used.push_back(key - base);
  for (size_t i = 0; i < in.keys.size(); ++i) {
    int64_t key = in.keys[i], how = i < in.served.size() ? in.served[i] : kHit;
    set_flag(resident_, key, true);
    set_flag(inflight_, key, false);
    bool restored = flag(restoring_, key);
    if (restored) set_flag(restoring_, key, false);
    if (how == kMiss && key >= 0 && static_cast<size_t>(key) < evicted_at_.size()) {
      int64_t& at = evicted_at_[static_cast<size_t>(key)];
      if (at != kNever) {
        bool recent = in.now - at <= num_layers_;
        at = kNever;
        if (recent) {
          regretted_ += 1.0;
          spent_ += in.miss;
          if (decoding_) flow_caused_ += in.miss;
        }
      }
    } else if (how == kPrefetchHit || how == kLate) {  // a late one hid part of its copy: as much as measured
      if (!restored)  // a copy that only undid a prefetch's eviction saved nothing against on demand
        credit(how == kPrefetchHit ? in.miss : late_saving_ >= 0 ? std::min(late_saving_, in.miss) : in.miss / 2);
      absolve(key, how == kPrefetchHit);
    }
  }
  for (int64_t key : in.evicted) evict(key);
  std::vector<Pending>& pending = settled_;  // this layer's pending predictions, taken (the buffers swap)
  pending.clear();
  pending.swap(pending_[static_cast<size_t>(in.layer)]);
  if (in.decode) {
    for (const Pending& p : pending) {
      double* c = counts(p.source, p.distance, p.score);
      if (c == nullptr) continue;
      bool hit = std::find(used.begin(), used.end(), p.expert) != used.end();
      c[0] = c[0] * kDecay + (hit ? 1.0 : 0.0);
      c[1] = c[1] * kDecay + 1.0;
    }
  }
  std::vector<double>& row = prior_[static_cast<size_t>(in.layer)];
  for (double& c : row) c *= kPriorDecay;
  for (int64_t e : used)
    if (e >= 0 && e < num_experts_) row[static_cast<size_t>(e)] += 1.0;
  // (the Python twin prunes its map of evictions now and then; an entry older than a turn decides nothing)
}

void Planner::candidates(const LayerInput& in, int64_t horizon) {
  std::vector<Candidate>& out = cands_;
  std::vector<double>& row = row_;
  std::vector<int64_t>& order = order_;
  out.clear();
  for (int64_t d = 1; d <= horizon; ++d) {
    int64_t target = in.layer + d;
    bool model = d <= in.rows;
    if ((target >= num_layers_ && !(in.decode && (in.wraps || !model))) || target >= 2 * num_layers_) break;
    target %= num_layers_;
    int source;
    int64_t width = model ? in.cols : num_experts_;
    row.assign(static_cast<size_t>(width), 0.0);
    if (model) {
      source = 0;
      const float* r = in.probs + (d - 1) * in.cols;
      for (int64_t e = 0; e < width; ++e) row[static_cast<size_t>(e)] = static_cast<double>(r[e]);
    } else {
      const std::vector<double>& counts = prior_[static_cast<size_t>(target)];
      double total = 0;
      for (double c : counts) total += c;
      if (total <= 0) continue;
      source = 1;
      for (int64_t e = 0; e < width; ++e) row[static_cast<size_t>(e)] = counts[static_cast<size_t>(e)] / total;
    }
    order.resize(static_cast<size_t>(width));
    for (int64_t e = 0; e < width; ++e) order[static_cast<size_t>(e)] = e;
    int64_t keep = std::min<int64_t>(2 * width_, width);
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](int64_t a, int64_t b) {
      double ra = row[static_cast<size_t>(a)], rb = row[static_cast<size_t>(b)];
      return ra > rb || (ra == rb && a < b);
    });
    for (int64_t i = 0; i < keep; ++i) {
      int64_t e = order[static_cast<size_t>(i)];
      double score = row[static_cast<size_t>(e)];
      if (in.decode) pending_[static_cast<size_t>(target)].push_back({source, d, score, e});
      if (i < width_ && score > 0) out.push_back({d, target, e, probability(source, d, score)});
    }
  }
  std::sort(out.begin(), out.end(), [](const Candidate& a, const Candidate& b) {
    if (a.distance != b.distance) return a.distance < b.distance;
    if (a.q != b.q) return a.q > b.q;
    return a.expert < b.expert;
  });
}

std::vector<Pair> Planner::withdrawals(int64_t layer) {
  std::vector<std::pair<int64_t, std::vector<int64_t>>>& wanted = new_wanted_;  // in the order targets first appear
  size_t targets = 0;  // entries of `wanted` in use (their vectors are kept for reuse)
  for (const Candidate& c : cands_) {
    auto end = wanted.begin() + static_cast<std::ptrdiff_t>(targets);
    auto it = std::find_if(wanted.begin(), end, [&](const auto& w) { return w.first == c.target; });
    if (it == end) {
      if (targets == wanted.size()) wanted.emplace_back();
      wanted[targets].first = c.target;
      wanted[targets].second.assign(1, c.expert);
      ++targets;
    } else if (std::find(it->second.begin(), it->second.end(), c.expert) == it->second.end()) {
      it->second.push_back(c.expert);
    }
  }
  wanted_.erase(std::remove_if(wanted_.begin(), wanted_.end(), [&](const auto& w) { return w.first == layer; }),
                wanted_.end());
  std::vector<Pair> out;
  for (size_t t = 0; t < targets; ++t) {
    auto& [target, experts] = wanted[t];
    std::sort(experts.begin(), experts.end());
    auto old = std::find_if(wanted_.begin(), wanted_.end(), [&](const auto& w) { return w.first == target; });
    if (old != wanted_.end()) {
      for (int64_t e : old->second)  // sorted: the Python twin walks the difference in ascending order
        if (!std::binary_search(experts.begin(), experts.end(), e) && flag(inflight_, target * key_stride_ + e))
          out.emplace_back(target, e);
      old->second = experts;
    } else {
      wanted_.push_back({target, experts});
    }
  }
  return out;
}

Decision Planner::layer(const LayerInput& in) {
  if (in.layer < 0 || in.layer >= num_layers_) throw std::invalid_argument("planner: layer out of range");
  settle(in);
  Decision out;
  if (in.probs == nullptr) return out;
  candidates(in, std::max(in.rows, in.horizon));
  out.withdraw = withdrawals(in.layer);
  double regret_share = regret();
  std::vector<int64_t>& backlog = backlog_;
  backlog.assign(in.backlog.begin(), in.backlog.end());
  int64_t free = in.free;
  for (const Candidate& c : cands_) {
    int64_t key = c.target * key_stride_ + c.expert;
    if (flag(resident_, key)) {
      out.expect.emplace_back(c.target, c.expert, c.distance);
      continue;
    }
    if (flag(inflight_, key) || static_cast<int64_t>(backlog.size()) >= max_queued_ || c.q < in.min_prob) continue;
    if (near_ > 0 && c.distance > near_ && c.q < kEarlyQ) continue;  // an early copy: only a likely one
    int64_t ahead = 0;
    for (int64_t d : backlog) ahead += d <= c.distance;
    double lead = in.compute > 0 ? c.distance * in.compute - in.transfer * ahead : std::numeric_limits<double>::infinity();
    double saving = in.miss * (in.transfer > 0 ? std::min(1.0, std::max(lead, 0.0) / in.transfer) : 1.0);
    double value = c.q * saving - (free <= 0 ? regret_share * in.miss : 0.0);
    if (value <= 0) continue;
    out.queue.emplace_back(c.target, c.expert, c.distance);
    backlog.push_back(c.distance);
    free -= 1;
  }
  return out;
}

}  // namespace m2r2
