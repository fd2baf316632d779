// See slot_manager.hpp. Every branch mirrors m2r2_moe/runtime/cache.py line for line; the error
// messages are the Python twin's, character for character.
#include "slot_manager.hpp"

#include <limits>

namespace m2r2 {

SlotManager::SlotManager(int64_t num_slots) : num_slots_(num_slots) {
  if (num_slots < 1) {
    throw std::invalid_argument("num_slots must be >= 1, got " + std::to_string(num_slots));
  }
  if (num_slots > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("num_slots must be < 2**31, got " + std::to_string(num_slots));
  }
  key_of_.assign(num_slots, -1);
  pins_.assign(num_slots, 0);
  prev_.assign(num_slots, -1);
  next_.assign(num_slots, -1);
  std::vector<int32_t> all(num_slots);
  for (int32_t s = 0; s < num_slots; ++s) all[s] = s;
  free_ = decltype(free_)(std::greater<int32_t>(), std::move(all));
  slot_of_.reserve(static_cast<size_t>(num_slots) * 2);
}

int64_t SlotManager::lookup(int64_t key) const {
  auto it = slot_of_.find(key);
  return it == slot_of_.end() ? -1 : it->second;
}

Acquired SlotManager::acquire(int64_t key) {
  auto it = slot_of_.find(key);
  if (it != slot_of_.end()) {
    int32_t slot = it->second;
    unlink(slot);
    push_back(slot);
    pins_[slot] += 1;
    hits += 1;
    return {slot, true, -1};
  }
  auto [slot, evicted] = place(key, "acquire");
  pins_[slot] = 1;
  misses += 1;
  return {slot, false, evicted};
}

void SlotManager::release(int64_t key) {
  auto it = slot_of_.find(key);
  if (it == slot_of_.end()) {
    throw SlotState("release of expert key " + std::to_string(key) + ", which is not resident in any slot");
  }
  int32_t slot = it->second;
  if (pins_[slot] == 0) {
    throw SlotState("release of expert key " + std::to_string(key) + " (slot " + std::to_string(slot) +
                    "), which is not held");
  }
  pins_[slot] -= 1;
}

std::pair<int64_t, int64_t> SlotManager::prefetch(int64_t key) {
  if (slot_of_.count(key) || victim() < 0) return {-1, -1};
  auto placed = place(key, "prefetch");
  prefetches += 1;
  return placed;
}

bool SlotManager::evict(int64_t key) {
  auto it = slot_of_.find(key);
  if (it == slot_of_.end() || pins_[it->second] > 0) return false;
  int32_t slot = it->second;
  slot_of_.erase(it);
  unlink(slot);
  key_of_[slot] = -1;
  free_.push(slot);
  return true;
}

int64_t SlotManager::pins(int64_t key) const {
  auto it = slot_of_.find(key);
  return it == slot_of_.end() ? 0 : pins_[it->second];
}

std::vector<std::pair<int64_t, int64_t>> SlotManager::resident() const {
  std::vector<std::pair<int64_t, int64_t>> out;
  out.reserve(slot_of_.size());
  for (int32_t s = head_; s >= 0; s = next_[s]) out.emplace_back(key_of_[s], s);
  return out;
}

// The slot the next placement would use, or -1 when all are pinned. Pinned slots were acquired
// last, so they sit at the most-recently-used end and the walk from the head is short.
int64_t SlotManager::victim() const {
  if (!free_.empty()) return free_.top();
  for (int32_t s = head_; s >= 0; s = next_[s]) {
    if (pins_[s] == 0) return s;
  }
  return -1;
}

std::pair<int64_t, int64_t> SlotManager::place(int64_t key, const char* why) {
  int64_t victim_slot = victim();
  if (victim_slot < 0) {
    throw CacheFull(std::string(why) + " of expert key " + std::to_string(key) + ": all " +
                    std::to_string(num_slots_) +
                    " slots are pinned by the layer being computed; raise cache_experts (it must cover the "
                    "experts one layer uses at once)");
  }
  auto slot = static_cast<int32_t>(victim_slot);
  int64_t evicted = key_of_[slot];
  if (evicted >= 0) {
    slot_of_.erase(evicted);
    unlink(slot);
    evictions += 1;
  } else {
    free_.pop();
  }
  key_of_[slot] = key;
  slot_of_.emplace(key, slot);
  push_back(slot);
  return {slot, evicted};
}

void SlotManager::unlink(int32_t slot) {
  int32_t p = prev_[slot], n = next_[slot];
  (p >= 0 ? next_[p] : head_) = n;
  (n >= 0 ? prev_[n] : tail_) = p;
  prev_[slot] = next_[slot] = -1;
}

void SlotManager::push_back(int32_t slot) {
  prev_[slot] = tail_;
  next_[slot] = -1;
  (tail_ >= 0 ? next_[tail_] : head_) = slot;
  tail_ = slot;
}

}  // namespace m2r2
