// See copy_engine.hpp. Host-side CUDA runtime calls only (no kernels): the copies run on the
// GPU's copy engines, which is what saturates the host link for large contiguous buffers.
#include "copy_engine.hpp"

#include <cuda_runtime_api.h>

namespace m2r2::cuda {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw Error(std::string(what) + " failed: " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
  }
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
cudaEvent_t as_event(std::uintptr_t e) { return reinterpret_cast<cudaEvent_t>(e); }

// Makes `device` current for a scope and restores the caller's (torch's) current device after.
// cudaGetDevice/cudaSetDevice are host-side bookkeeping; neither synchronizes.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

std::string probe() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // reset the last-error slot so that later calls start clean
    return std::string("cudaGetDeviceCount: ") + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
  }
  if (count == 0) return "no CUDA device";
  return "";
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

EventPool::~EventPool() {
  // At interpreter exit the context may already be gone; destroy what can be destroyed.
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) return;
  if (previous != device_) cudaSetDevice(device_);
  for (auto e : all_) cudaEventDestroy(as_event(e));
  if (previous != device_) cudaSetDevice(previous);
}

std::uintptr_t EventPool::take() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!free_.empty()) {
    auto e = free_.back();
    free_.pop_back();
    return e;
  }
  DeviceGuard guard(device_);
  cudaEvent_t event = nullptr;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  auto handle = reinterpret_cast<std::uintptr_t>(event);
  all_.push_back(handle);
  return handle;
}

void EventPool::give_back(std::uintptr_t event) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(event);
}

CopyEngine::CopyEngine(int device, std::uintptr_t stream)
    : device_(device), stream_(stream), pool_(std::make_shared<EventPool>(device)) {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device < 0 || device >= count) {
    throw Error("device index " + std::to_string(device) + " out of range (" + std::to_string(count) + " devices)");
  }
  if (stream == 0) throw Error("the copy engine needs its own stream, not the legacy default stream (0)");
}

std::uintptr_t CopyEngine::submit(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t after) {
  std::uintptr_t event = 0;
  submit_batch(1, &dst, &src, &nbytes, &after, &event);
  return event;
}

void CopyEngine::submit_batch(std::size_t count, const std::uintptr_t* dst, const std::uintptr_t* src,
                              const std::size_t* nbytes, const std::uintptr_t* after, std::uintptr_t* events_out) {
  DeviceGuard guard(device_);
  cudaStream_t stream = as_stream(stream_);
  for (std::size_t i = 0; i < count; ++i) {
    // The slot's previous tenant may still be read by queued compute kernels: overwrite after them.
    if (after[i] != 0) check(cudaStreamWaitEvent(stream, as_event(after[i]), 0), "cudaStreamWaitEvent");
    check(cudaMemcpyAsync(reinterpret_cast<void*>(dst[i]), reinterpret_cast<const void*>(src[i]), nbytes[i],
                          cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync");
    std::uintptr_t event = pool_->take();
    check(cudaEventRecord(as_event(event), stream), "cudaEventRecord");
    events_out[i] = event;
    bytes_ += nbytes[i];
  }
}

bool CopyEngine::query(std::uintptr_t event) {
  cudaError_t status = cudaEventQuery(as_event(event));
  if (status == cudaErrorNotReady) {
    cudaGetLastError();  // cudaErrorNotReady is not an error; do not leave it as the last error
    return false;
  }
  check(status, "cudaEventQuery");
  return true;
}

void CopyEngine::wait_on(std::uintptr_t event, std::uintptr_t stream) {
  check(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0), "cudaStreamWaitEvent");
}

void CopyEngine::synchronize_event(std::uintptr_t event) {
  check(cudaEventSynchronize(as_event(event)), "cudaEventSynchronize");
}

void CopyEngine::synchronize() {
  DeviceGuard guard(device_);
  check(cudaStreamSynchronize(as_stream(stream_)), "cudaStreamSynchronize");
}

}  // namespace m2r2::cuda
