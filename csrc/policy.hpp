// The `predictive` eviction policy's victim search: the C++ twin of the vector pass in
// m2r2_moe/runtime/policy.py (NextUsePolicy.victim), over the policy's per-key arrays read in place.
//
// It runs at every demand load and every prefetch that finds the pool full, over every resident expert. In the
// runtime, between a layer's kernels, numpy's fixed cost per operation made the vector pass slower than a plain
// loop on pools of a few hundred experts; one pass here costs a few µs at thousands.
// Same choices as the Python twin, always (tests/test_policy.py checks both against the rule written as a loop).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace m2r2 {

// The policy's per-key arrays (numpy, indexed by key, `size` long): runtime/policy.py `_FIELDS`.
struct PolicyArrays {
  const int64_t* when;   // resident keys: the estimated turn of the next use
  const bool* res;       // resident
  const bool* want;      // a prediction's estimate, not used since
  const int64_t* since;  // the order in which it became resident
  const double* score;   // log of the decayed use count + rate x the forward of the last use
  const int64_t* layer;  // the layer of its uses
  int64_t size;
};

// The key to evict, or -1 when none may go. `pinned`: keys that may not go (any order); `needed_at` < 0: a
// demand load, else a prefetch for that turn (only keys needed later, or stale, qualify). `done` / `to_come`:
// what turns a score into a rate for a layer whose turn in the current forward has passed / is to come.
inline int64_t policy_victim(const PolicyArrays& a, std::vector<int64_t> pinned, int64_t now, int64_t layers,
                             double done, double to_come, int64_t needed_at) {
  constexpr double kTie = 1e-9;  // rates closer than this are equal (as _TIE)
  constexpr double kNone = std::numeric_limits<double>::infinity();
  std::sort(pinned.begin(), pinned.end());
  auto is_pinned = [&](int64_t k) { return std::binary_search(pinned.begin(), pinned.end(), k); };
  const int64_t turn = now % layers;
  const bool prefetch = needed_at >= 0;
  auto rate = [&](int64_t k) { return a.score[k] + (a.layer[k] > turn ? to_come : done); };

  // One pass over the keys, without a branch on the common case (a key not resident, or resident and not among
  // the least frequent so far): a key's rate, or infinity when it may not go by the rate rule; the keys within
  // kTie of the lowest rate so far are kept aside (pinned ones skipped there: few keys get that far).
  double best = kNone;
  std::vector<int64_t> near;
  int64_t farthest = -1, farthest_when = 0;  // the wanted expert needed farthest ahead (highest key of equals)
  for (int64_t k = 0; k < a.size; ++k) {
    const int64_t w = a.when[k];
    const bool resident = a.res[k];
    const bool later = !prefetch | (w <= now) | (w > needed_at);  // a prefetch displaces no sooner need
    const bool wanted = (w > now) & a.want[k];  // goes only if every candidate is wanted
    const double r = (resident & later & !wanted) ? rate(k) : kNone;
    if (r <= best + kTie && r != kNone) {
      if (is_pinned(k)) continue;
      best = std::min(best, r);
      near.push_back(k);
    } else if (resident & later & wanted) {
      if ((farthest < 0 || w >= farthest_when) && !is_pinned(k)) farthest = k, farthest_when = w;
    }
  }
  if (near.empty()) return farthest;  // -1 when nothing may go
  // of the least frequent (within kTie of the lowest): the one whose layer's next turn comes last, then the
  // first resident
  int64_t pick = -1, pick_turn = 0, pick_since = 0;
  for (int64_t k : near) {
    if (!(rate(k) <= best + kTie)) continue;
    const int64_t w = a.when[k];
    const int64_t next = w > now ? w : w + ((now - w) / layers + 1) * layers;
    if (pick < 0 || next > pick_turn || (next == pick_turn && a.since[k] < pick_since))
      pick = k, pick_turn = next, pick_since = a.since[k];
  }
  return pick;
}

// NextUsePolicy._expect_at's rule for one (key, turn): a prediction wants resident `key` at turn `when`; a stale
// or later estimate gives way (a sooner need already recorded stands). Keys not resident, or past the arrays, are
// skipped.
inline void policy_expect(int64_t* when_of, const bool* res, bool* want, int64_t size, int64_t key, int64_t when,
                          int64_t now) {
  if (key < 0 || key >= size || !res[key]) return;
  const int64_t known = when_of[key];
  if (known <= now || known > when) when_of[key] = when;
  if (when > now) want[key] = true;
}

}  // namespace m2r2
