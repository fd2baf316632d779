// The CPU copy engine's worker (cpu_copy.hpp says why it is C++ and what it guarantees).
#include "cpu_copy.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace m2r2 {

double monotonic_seconds() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // what time.perf_counter reads on Linux
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

CpuCopyEngine::CpuCopyEngine(double bytes_per_s, double latency_s, Hook hook, double spin_s)
    : bytes_per_s_(bytes_per_s), latency_s_(latency_s), spin_s_(spin_s), hook_(std::move(hook)) {
  worker_ = std::thread([this] { run(); });
}

CpuCopyEngine::~CpuCopyEngine() { close(); }

double CpuCopyEngine::link_seconds(int64_t nbytes) const {
  return emulated() ? latency_s_ + static_cast<double>(nbytes) / bytes_per_s_ : 0.0;
}

int64_t CpuCopyEngine::bytes_copied() {
  std::lock_guard<SpinFirstMutex> lk(mu_);
  return bytes_copied_;
}

double CpuCopyEngine::busy_seconds() {
  std::lock_guard<SpinFirstMutex> lk(mu_);
  return busy_seconds_;
}

std::shared_ptr<CpuCopy> CpuCopyEngine::submit(int64_t id, int64_t key, int64_t slot, int64_t nbytes, int priority,
                                               char* dst, const char* src, int64_t copy_bytes, bool hooked) {
  auto t = std::make_shared<CpuCopy>();
  t->id = id, t->key = key, t->slot = slot, t->nbytes = nbytes, t->priority = priority;
  t->dst = dst, t->src = src, t->copy_bytes = copy_bytes, t->hooked = hooked;
  std::lock_guard<SpinFirstMutex> lk(mu_);
  if (closed_) return nullptr;
  push(t, priority);
  return t;
}

void CpuCopyEngine::push(const std::shared_ptr<CpuCopy>& t, int priority) {
  t->entry = ++seq_;
  queue_.push(Entry{priority, t->entry, t});
  pushes_.fetch_add(1, std::memory_order_release);
  if (sleeping_ && (holding_ < 0 || (priority == kDemand && holding_ != kDemand))) cv_.notify_one();
}

bool CpuCopyEngine::cancel(const std::shared_ptr<CpuCopy>& t) {
  std::lock_guard<SpinFirstMutex> lk(mu_);
  if (t->claimed) return false;
  if (!t->done.load()) {
    t->cancelled = true;
    t->done.store(true, std::memory_order_release);
    done_cv_.notify_all();
  }
  return true;
}

void CpuCopyEngine::promote(const std::shared_ptr<CpuCopy>& t) {
  std::lock_guard<SpinFirstMutex> lk(mu_);
  if (!t->cancelled && !t->done.load() && t->priority != kDemand) {
    t->priority = kDemand;
    push(t, kDemand);
  }
}

bool CpuCopyEngine::wait(const std::shared_ptr<CpuCopy>& t, double timeout_s) {
  if (spin_s_ > 0) {  // poll first: being woken costs the waker a syscall and the waiter its wake-up latency
    double until = monotonic_seconds() + (timeout_s < 0 ? spin_s_ : std::min(spin_s_, timeout_s));
    while (!t->done.load(std::memory_order_acquire) && monotonic_seconds() < until) cpu_relax();
    if (t->done.load(std::memory_order_acquire)) return true;
  }
  std::unique_lock<SpinFirstMutex> lk(mu_);
  if (timeout_s < 0 || timeout_s > 1e9) {  // forever (a longer finite wait would overflow the duration)
    done_cv_.wait(lk, [&] { return t->done.load(); });
    return true;
  }
  return done_cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [&] { return t->done.load(); });
}

void CpuCopyEngine::close() {
  {
    std::lock_guard<SpinFirstMutex> lk(mu_);
    closed_ = true;
    pushes_.fetch_add(1, std::memory_order_release);  // ends a polling worker's wait
    cv_.notify_all();
  }
  if (worker_.joinable() && worker_.get_id() != std::this_thread::get_id()) worker_.join();
}

void CpuCopyEngine::run() {
  std::unique_lock<SpinFirstMutex> lk(mu_);
  for (;;) {
    if (queue_.empty() && !closed_ && !idle_spin(lk)) {
      sleeping_ = true;
      cv_.wait(lk, [&] { return !queue_.empty() || closed_; });
      sleeping_ = false;
    }
    if (queue_.empty()) return;  // closed, and every queued copy served
    Entry e = queue_.top();
    queue_.pop();
    const auto& t = e.copy;
    if (t->cancelled || t->entry != e.seq || t->done.load()) continue;  // withdrawn, or a promoted copy's old entry
    t->claimed = true;
    lk.unlock();
    bool done = serve(t);
    lk.lock();
    if (!done && t->entry == e.seq) queue_.push(Entry{t->priority, e.seq, t});  // pre-empted: back in its place
  }
}

bool CpuCopyEngine::idle_spin(std::unique_lock<SpinFirstMutex>& lk) {
  if (spin_s_ <= 0) return false;
  uint64_t seen = pushes_.load(std::memory_order_acquire);
  lk.unlock();
  double until = monotonic_seconds() + spin_s_;
  while (pushes_.load(std::memory_order_acquire) == seen && monotonic_seconds() < until) cpu_relax();
  lk.lock();
  return !queue_.empty() || closed_;
}

bool CpuCopyEngine::serve(const std::shared_ptr<CpuCopy>& t) {
  double start = monotonic_seconds(), held = -1;
  bool done = true, failed = false, first = false;
  {
    std::lock_guard<SpinFirstMutex> lk(mu_);
    first = t->remaining < 0;
    if (first) t->started_at = start;
  }
  if (first) {
    double extra = 0;
    if (t->hooked) {
      extra = hook_ ? hook_(t->id) : 0.0;
      failed = extra < 0;
    }
    if (!failed && t->copy_bytes > 0) std::memcpy(t->dst, t->src, static_cast<size_t>(t->copy_bytes));
    std::lock_guard<SpinFirstMutex> lk(mu_);
    if (!failed) {
      t->remaining = link_seconds(t->nbytes) + extra;
      if (emulated()) t->started_at = std::max(start, link_free_at_);
    }
  }
  if (!failed && emulated()) std::tie(held, done) = hold_link(t, start);
  double end = monotonic_seconds();
  std::lock_guard<SpinFirstMutex> lk(mu_);
  if (done && !failed) bytes_copied_ += t->nbytes;
  double busy = held < 0 ? end - start : held;  // the link's time on an emulated link, else the copy's
  t->busy += busy;
  busy_seconds_ += busy;
  if (done) {
    t->finished_at = end;
    t->failed = failed;
    t->done.store(true, std::memory_order_release);
    done_cv_.notify_all();
  }
  return done;
}

std::pair<double, bool> CpuCopyEngine::hold_link(const std::shared_ptr<CpuCopy>& t, double start) {
  std::unique_lock<SpinFirstMutex> lk(mu_);
  double link_start = std::max(start, link_free_at_);
  double deadline = link_start + t->remaining;
  holding_ = t->priority;
  for (;;) {
    double left = deadline - monotonic_seconds();
    if (left <= 0 || closed_) break;  // closing: the queue drains at memcpy speed, nobody times it any more
    if (!queue_.empty() && queue_.top().priority == kDemand && t->priority != kDemand) {
      double now = monotonic_seconds();  // pre-empted: the link is free from now on
      t->remaining = deadline - now;
      link_free_at_ = now;
      holding_ = -1;
      return {std::max(now - link_start, 0.0), false};
    }
    if (spin_s_ > 0) {  // poll until the deadline or the next push (which may be a demand load)
      uint64_t seen = pushes_.load(std::memory_order_acquire);
      lk.unlock();
      while (pushes_.load(std::memory_order_acquire) == seen && monotonic_seconds() < deadline)
        cpu_relax();
      lk.lock();
      continue;
    }
    sleeping_ = true;
    cv_.wait_for(lk, std::chrono::duration<double>(std::min(left, 1.0)));  // bounded: no duration overflow
    sleeping_ = false;
  }
  holding_ = -1;
  deadline = std::min(deadline, monotonic_seconds());
  link_free_at_ = deadline;
  t->remaining = 0;
  return {std::max(deadline - link_start, 0.0), true};
}

}  // namespace m2r2
