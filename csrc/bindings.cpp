// Python module m2r2_moe._native: the C++ slot manager, with pybind11 and no torch headers, so one
// source builds against any Python/torch pair (m2r2_moe/_ext.py is the only importer).
//
// Errors: m2r2::CacheFull / m2r2::SlotState become the Python classes handed to
// `_set_error_types` (m2r2_moe.errors.CacheFullError / SlotStateError, set by _ext.py); until then
// they are RuntimeError, the base class of both. std::invalid_argument becomes ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "slot_manager.hpp"

namespace py = pybind11;

namespace {

// Owned references, deliberately never released: they must outlive every translator call, and
// decref-ing at static destruction would run after the interpreter is gone.
PyObject* g_cache_full = PyExc_RuntimeError;
PyObject* g_slot_state = PyExc_RuntimeError;

void set_error_types(py::object cache_full, py::object slot_state) {
  for (auto* type : {cache_full.ptr(), slot_state.ptr()}) {
    if (!PyType_Check(type) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(type),
                                                 reinterpret_cast<PyTypeObject*>(PyExc_Exception))) {
      throw py::type_error("_set_error_types expects two Exception subclasses");
    }
  }
  g_cache_full = cache_full.inc_ref().ptr();
  g_slot_state = slot_state.inc_ref().ptr();
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "m2r2_moe native core: the C++ expert slot manager (twin of m2r2_moe.runtime.cache.SlotManager)";
  m.attr("ABI_VERSION") = 1;  // bumped when the Python-visible interface changes

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const m2r2::CacheFull& e) {
      PyErr_SetString(g_cache_full, e.what());
    } catch (const m2r2::SlotState& e) {
      PyErr_SetString(g_slot_state, e.what());
    }
  });
  m.def("_set_error_types", &set_error_types, py::arg("cache_full"), py::arg("slot_state"));

  using SM = m2r2::SlotManager;
  py::class_<SM>(m, "SlotManager", "LRU slot table for a fixed pool of `num_slots` expert slots (C++).")
      .def(py::init<int64_t>(), py::arg("num_slots"))
      .def_property_readonly("num_slots", &SM::num_slots)
      .def("lookup", &SM::lookup, py::arg("key"), "The slot holding `key`, or -1. Does not change LRU order.")
      .def(
          "acquire",
          [](SM& self, int64_t key) {
            auto r = self.acquire(key);
            return py::make_tuple(r.slot, r.hit, r.evicted);
          },
          py::arg("key"), "Pin `key` in a slot. Returns (slot, hit, evicted_key or -1).")
      .def("release", &SM::release, py::arg("key"), "Unpin `key` (once per `acquire`).")
      .def("prefetch", &SM::prefetch, py::arg("key"),
           "Reserve a slot for `key` without pinning it. Returns (slot, evicted_key or -1).")
      .def("evict", &SM::evict, py::arg("key"), "Drop `key` if resident and not pinned; whether it was dropped.")
      .def("pins", &SM::pins, py::arg("key"))
      .def("resident", &SM::resident, "(key, slot) pairs, least recently used first.")
      .def("counters",
           [](const SM& self) {
             py::dict d;
             d["hits"] = self.hits;
             d["misses"] = self.misses;
             d["prefetches"] = self.prefetches;
             d["evictions"] = self.evictions;
             return d;
           })
      .def("reset_counters", &SM::reset_counters)
      .def_readwrite("hits", &SM::hits)
      .def_readwrite("misses", &SM::misses)
      .def_readwrite("prefetches", &SM::prefetches)
      .def_readwrite("evictions", &SM::evictions)
      .def("__repr__", [](const SM& self) {
        return "<m2r2_moe._native.SlotManager num_slots=" + std::to_string(self.num_slots()) +
               " resident=" + std::to_string(self.resident().size()) + ">";
      });
}
