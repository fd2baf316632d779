// The CPU copy engine's worker in C++: the twin of m2r2_moe/runtime/cpu_engine.py's ThreadCopyEngine.
//
// Why it exists: the Python engine's worker is a Python thread that needs the GIL every time it wakes (a
// copy queued, a link hold ending, a copy landing). It gets it when the compute thread releases the GIL
// around a torch op, and the compute thread must then wait to take it back: a cost on every op while
// prefetches are on the link, which only the CPU emulation has (on CUDA the copy engines are hardware).
// This worker never touches Python for a plain copy: a memcpy, then the emulated serial link held on a steady
// clock (CLOCK_MONOTONIC, the clock of Python's time.perf_counter on Linux, so its times compare with the
// profiler's).
//
// Waking a thread that sleeps on a condition variable is a futex syscall and, in a virtual machine, an
// inter-processor interrupt, tens of µs for the thread that queues a copy (benchmarks/copy_engine.py measures
// it), as much as the prefetcher's whole per-layer budget. With `spin_s` > 0 the worker polls instead of
// sleeping — idle for up to `spin_s` after its last copy, and for the whole of each emulated link hold — so queueing a copy
// costs a lock and a push; a waiter polls for up to `spin_s` before it sleeps. That takes a core of its own:
// the Python wrapper turns it on only when torch leaves a core free (the emulated link stands in for a DMA
// engine, which needs no core at all).
//
// Semantics are the Python engine's, line for line: a priority queue (priority, sequence), demand loads
// (priority 0) first; on an emulated link a queued demand load pre-empts a prefetch holding the link, which
// resumes its remaining link time later; the bytes move when a copy first gets the link; `promote` re-queues
// a prefetch at demand priority (its older queue entry goes stale); `cancel` withdraws an unclaimed copy.
// A copy submitted with `hooked` calls the engine's hook (with the GIL, in the bindings) before its bytes move:
// that is how the test-only fault hook and compressed experts' expansion run; the hook returns the seconds it
// adds to the link time (an expansion's), or a negative number when the copy failed.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <queue>
#include <thread>
#include <utility>
#include <vector>

namespace m2r2 {

double monotonic_seconds();
void cpu_relax();

// A mutex that tries for a while before it sleeps: the engine's critical sections are a few instructions, and a
// thread that sleeps on a contended mutex costs its holder a futex wake at unlock (the interrupt above).
class SpinFirstMutex {
 public:
  void lock() {
    for (int i = 0; i < 256; ++i) {
      if (m_.try_lock()) return;
      cpu_relax();
    }
    m_.lock();
  }
  bool try_lock() { return m_.try_lock(); }
  void unlock() { m_.unlock(); }

 private:
  std::mutex m_;
};

struct CpuCopy {
  int64_t id = 0, key = 0, slot = 0, nbytes = 0;  // nbytes: what the link carries
  int priority = 0;
  char* dst = nullptr;
  const char* src = nullptr;
  int64_t copy_bytes = 0;  // bytes the worker's memcpy moves (0 when the hook moves them)
  bool hooked = false;
  // the rest is guarded by the engine's mutex
  bool claimed = false, cancelled = false, failed = false;
  std::atomic<bool> done{false};  // set last (release): a reader that sees it sees the fields above
  uint64_t entry = 0;      // sequence number of its live queue entry
  double remaining = -1;   // emulated link seconds still to hold; < 0 until its bytes have moved
  double started_at = 0, finished_at = 0, busy = 0;
};

class CpuCopyEngine {
 public:
  using Hook = std::function<double(int64_t)>;
  static constexpr int kDemand = 0;

  // bytes_per_s <= 0: no emulated link (a copy takes its memcpy's time); spin_s: see the top of the file.
  CpuCopyEngine(double bytes_per_s, double latency_s, Hook hook, double spin_s = 0);
  ~CpuCopyEngine();
  CpuCopyEngine(const CpuCopyEngine&) = delete;
  CpuCopyEngine& operator=(const CpuCopyEngine&) = delete;

  std::shared_ptr<CpuCopy> submit(int64_t id, int64_t key, int64_t slot, int64_t nbytes, int priority, char* dst,
                                  const char* src, int64_t copy_bytes, bool hooked);
  bool cancel(const std::shared_ptr<CpuCopy>& t);
  void promote(const std::shared_ptr<CpuCopy>& t);
  bool wait(const std::shared_ptr<CpuCopy>& t, double timeout_s);  // timeout < 0: forever; false on timeout
  void close();

  double link_seconds(int64_t nbytes) const;
  bool emulated() const { return bytes_per_s_ > 0; }
  int64_t bytes_copied();
  double busy_seconds();
  SpinFirstMutex& mutex() { return mu_; }  // guards a CpuCopy's fields for readers

 private:
  struct Entry {
    int priority;
    uint64_t seq;
    std::shared_ptr<CpuCopy> copy;
    bool operator>(const Entry& o) const { return priority != o.priority ? priority > o.priority : seq > o.seq; }
  };

  void push(const std::shared_ptr<CpuCopy>& t, int priority);  // with mu_ held
  void run();
  bool serve(const std::shared_ptr<CpuCopy>& t);
  std::pair<double, bool> hold_link(const std::shared_ptr<CpuCopy>& t, double start);

  bool idle_spin(std::unique_lock<SpinFirstMutex>& lk);  // polls for a copy, up to spin_s_; true when one came

  const double bytes_per_s_, latency_s_, spin_s_;
  Hook hook_;
  SpinFirstMutex mu_;
  std::condition_variable_any cv_;       // the worker waits here (queue, link hold)
  std::condition_variable_any done_cv_;  // waiters for a copy wait here
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> queue_;
  uint64_t seq_ = 0;
  bool closed_ = false;
  int holding_ = -1;  // priority of the copy holding the emulated link, -1 when idle
  bool sleeping_ = false;  // the worker sleeps on cv_ (a push must wake it); false while it polls
  std::atomic<uint64_t> pushes_{0};  // queue pushes so far: what a polling worker watches
  double link_free_at_ = 0;
  int64_t bytes_copied_ = 0;
  double busy_seconds_ = 0;
  std::thread worker_;
};

}  // namespace m2r2
