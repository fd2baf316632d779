// CUDA copy engine: asynchronous host->device copies of packed expert buffers into device slots on
// a caller-owned stream, one event per expert copy. The twin of
// m2r2_moe/runtime/transfer.py:CudaCopyEngine (torch `copy_(non_blocking=True)` + torch events).
//
// The interface is CUDA-header-free (pointers, streams and events are passed as integers), so the
// pybind11 layer (cuda_bindings.cpp) compiles with the host compiler alone and nothing here depends
// on torch's or Python's ABI. copy_engine.cu is the only file that talks to the CUDA runtime.
//
// Host blocking: only `synchronize` blocks the host. submit / query / wait_on never do.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace m2r2::cuda {

// A CUDA runtime call failed; the message names the call and CUDA's error string.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "" when the CUDA runtime finds a usable device, else why not (no driver, driver too old, ...).
std::string probe();
int runtime_version();  // e.g. 13000
int driver_version();   // 0 without a driver

// Events (cudaEventDisableTiming: cheapest to record and query) created on one device, recycled.
// Re-recording a recycled event is safe: a cudaStreamWaitEvent already issued keeps waiting on
// the record it saw.
class EventPool {
 public:
  explicit EventPool(int device) : device_(device) {}
  ~EventPool();
  std::uintptr_t take();
  void give_back(std::uintptr_t event);
  int device() const { return device_; }

 private:
  int device_;
  std::mutex mu_;
  std::vector<std::uintptr_t> free_;
  std::vector<std::uintptr_t> all_;
};

class CopyEngine {
 public:
  // `stream`: a cudaStream_t of `device` (for example torch.cuda.Stream.cuda_stream).
  CopyEngine(int device, std::uintptr_t stream);

  // Enqueue on the stream: [wait for `after` if non-zero] copy `nbytes` from pinned host `src`
  // to device `dst`, then record a fresh event, which is returned (hand it back with
  // `pool()->give_back` once unused). Never blocks the host.
  std::uintptr_t submit(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t after);
  // The same for `count` copies in one call; events_out[i] follows copy i.
  void submit_batch(std::size_t count, const std::uintptr_t* dst, const std::uintptr_t* src,
                    const std::size_t* nbytes, const std::uintptr_t* after, std::uintptr_t* events_out);

  static bool query(std::uintptr_t event);                           // completed? (never blocks)
  static void wait_on(std::uintptr_t event, std::uintptr_t stream);  // device-side wait, host continues
  static void synchronize_event(std::uintptr_t event);               // blocks the host
  void synchronize();                                                // blocks the host until the stream drains

  int device() const { return device_; }
  std::uintptr_t stream() const { return stream_; }
  const std::shared_ptr<EventPool>& pool() const { return pool_; }
  std::uint64_t bytes_submitted() const { return bytes_.load(); }

 private:
  int device_;
  std::uintptr_t stream_;
  std::shared_ptr<EventPool> pool_;
  std::atomic<std::uint64_t> bytes_{0};
};

}  // namespace m2r2::cuda
