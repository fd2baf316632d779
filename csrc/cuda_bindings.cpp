// Python module m2r2_moe._native_cuda: the CUDA copy engine (copy_engine.cu) with pybind11, built
// only where nvcc and the CUDA toolkit are found. No torch and no CUDA headers here: pointers,
// streams and events cross as integers (tensor.data_ptr(), torch.cuda.Stream.cuda_stream,
// torch.cuda.Event.cuda_event). The CUDA runtime is linked statically, so the module needs only
// the driver (libcuda) at run time and loads next to any torch build; importing it never touches
// the GPU (call `probe()` for that).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "copy_engine.hpp"

namespace py = pybind11;
using m2r2::cuda::CopyEngine;
using m2r2::cuda::EventPool;

namespace {

// One copy's completion event. Goes back to its engine's pool when the Python object dies.
class Event {
 public:
  Event(std::shared_ptr<EventPool> pool, std::uintptr_t handle) : pool_(std::move(pool)), handle_(handle) {}
  ~Event() { pool_->give_back(handle_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  std::uintptr_t handle() const { return handle_; }
  bool query() const { return CopyEngine::query(handle_); }
  void wait_on(std::uintptr_t stream) const { CopyEngine::wait_on(handle_, stream); }
  void synchronize() const { CopyEngine::synchronize_event(handle_); }

 private:
  std::shared_ptr<EventPool> pool_;
  std::uintptr_t handle_;
};

py::list submit_batch(CopyEngine& self, const std::vector<std::uintptr_t>& dst, const std::vector<std::uintptr_t>& src,
                      const std::vector<std::size_t>& nbytes, const std::vector<std::uintptr_t>& after) {
  const std::size_t n = dst.size();
  if (src.size() != n || nbytes.size() != n || after.size() != n) {
    throw py::value_error("submit_batch: dst, src, nbytes and after must have the same length");
  }
  std::vector<std::uintptr_t> events(n, 0);
  {
    py::gil_scoped_release nogil;  // a pageable source makes cudaMemcpyAsync block; let other threads run
    self.submit_batch(n, dst.data(), src.data(), nbytes.data(), after.data(), events.data());
  }
  py::list out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = py::cast(new Event(self.pool(), events[i]), py::return_value_policy::take_ownership);
  return out;
}

}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "m2r2_moe native CUDA copy engine (twin of m2r2_moe.runtime.transfer.CudaCopyEngine)";
  m.attr("ABI_VERSION") = 10;
  m.def("probe", &m2r2::cuda::probe, "'' when a CUDA device is usable, else the reason");
  m.def("runtime_version", &m2r2::cuda::runtime_version);
  m.def("driver_version", &m2r2::cuda::driver_version);

  py::class_<Event>(m, "Event", "Completion event of one expert copy (recycled when this object dies).")
      .def_property_readonly("handle", &Event::handle)
      .def("query", &Event::query, "Whether the copy has completed. Never blocks.")
      .def("wait_on", &Event::wait_on, py::arg("stream"),
           "Make `stream` (a cudaStream_t as int) wait for the copy; the host does not block.")
      .def("synchronize", &Event::synchronize, py::call_guard<py::gil_scoped_release>(),
           "Block the host until the copy has completed (tests and shutdown only).");

  py::class_<CopyEngine>(m, "CopyEngine", "Host->device copies on one caller-owned stream, one event per copy.")
      .def(py::init<int, std::uintptr_t>(), py::arg("device"), py::arg("stream"))
      .def(
          "submit",
          [](CopyEngine& self, std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t after) {
            std::uintptr_t event;
            {
              py::gil_scoped_release nogil;
              event = self.submit(dst, src, nbytes, after);
            }
            return std::make_unique<Event>(self.pool(), event);
          },
          py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("after") = 0,
          "Enqueue one copy (after `after`, an event handle or 0); returns its Event.")
      .def("submit_batch", &submit_batch, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("after"),
           "Enqueue several copies in one call; returns one Event per copy.")
      .def("synchronize", &CopyEngine::synchronize, py::call_guard<py::gil_scoped_release>(),
           "Block the host until every queued copy has completed (shutdown only).")
      .def_property_readonly("device", &CopyEngine::device)
      .def_property_readonly("stream", &CopyEngine::stream)
      .def_property_readonly("bytes_submitted", &CopyEngine::bytes_submitted);
}
