// LRU slot table for a fixed pool of device expert slots: the C++ twin of
// m2r2_moe/runtime/cache.py:SlotManager. Same decisions, counters and error messages, always
// (tests/test_slot_manager_diff.py compares them on random operation sequences).
//
// Plain C++17, no Python or torch headers: bindings.cpp exposes it with pybind11.
//
// Data structures (S = number of slots):
//   slot_of_   key -> slot                       (hash map)
//   key_of_    slot -> key or -1                 [S]
//   pins_      slot -> pin count                 [S]
//   prev_/next_ intrusive doubly linked LRU list over resident slots, head_ = least recently used
//   free_      min-heap of free slots: the lowest free slot is used first
#pragma once

#include <cstdint>
#include <functional>
#include <queue>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace m2r2 {

// Maps to m2r2_moe.errors.CacheFullError.
struct CacheFull : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Maps to m2r2_moe.errors.SlotStateError.
struct SlotState : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Acquired {
  int64_t slot;
  bool hit;
  int64_t evicted;  // key that lost its slot, or -1
};

class SlotManager {
 public:
  explicit SlotManager(int64_t num_slots);

  int64_t num_slots() const { return num_slots_; }
  // The slot holding `key`, or -1. Does not change LRU order.
  int64_t lookup(int64_t key) const;
  // Pin `key` in a slot; on a miss the caller fills it. Throws CacheFull when every slot is pinned.
  Acquired acquire(int64_t key);
  // Unpin `key` once. Throws SlotState when it is absent or not pinned.
  void release(int64_t key);
  // Reserve a slot without pinning: (slot, evicted) or (-1, -1) when resident / all pinned.
  std::pair<int64_t, int64_t> prefetch(int64_t key);
  // Drop `key` if resident and unpinned.
  bool evict(int64_t key);
  int64_t pins(int64_t key) const;
  // (key, slot) pairs, least recently used first.
  std::vector<std::pair<int64_t, int64_t>> resident() const;
  // How many slots hold a key (resident or being filled).
  int64_t occupied() const { return static_cast<int64_t>(slot_of_.size()); }

  int64_t hits = 0, misses = 0, prefetches = 0, evictions = 0;
  void reset_counters() { hits = misses = prefetches = evictions = 0; }

 private:
  int64_t victim() const;
  std::pair<int64_t, int64_t> place(int64_t key, const char* why);
  void unlink(int32_t slot);
  void push_back(int32_t slot);  // make `slot` the most recently used

  int64_t num_slots_;
  std::unordered_map<int64_t, int32_t> slot_of_;
  std::vector<int64_t> key_of_;
  std::vector<int32_t> pins_;
  std::vector<int32_t> prev_, next_;
  int32_t head_ = -1, tail_ = -1;
  std::priority_queue<int32_t, std::vector<int32_t>, std::greater<int32_t>> free_;
};

}  // namespace m2r2
