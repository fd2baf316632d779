// Python module m2r2_moe._native_plan: the C++ planner (planner.hpp) with pybind11. It is called once per
// MoE layer, so pybind11's dispatch (a few µs for this many arguments, called positionally) is small against
// the decision it makes. No torch headers: the predictor's probabilities arrive as a numpy array (a torch
// CPU tensor's `.numpy()`, no copy), read through the buffer protocol; m2r2_moe/_ext.py is the only importer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cpu_copy.hpp"
#include "heads.hpp"
#include "planner.hpp"
#include "policy.hpp"

namespace py = pybind11;

namespace {

constexpr int kAbiVersion = 8;  // bumped when the Python-visible interface changes (see _ext.py)

using Probs = py::array_t<float, py::array::c_style>;

// Points `in` at the probabilities of `probs` (a [D, E] float32 C-contiguous array), or leaves it empty.
void read_probs(const py::object& probs, m2r2::LayerInput& in) {
  if (probs.is_none()) return;
  if (!Probs::check_(probs))
    throw std::invalid_argument("planner: probabilities must be a C-contiguous float32 numpy array [D, E]");
  auto array = py::reinterpret_borrow<Probs>(probs);
  if (array.ndim() != 2) throw std::invalid_argument("planner: probabilities must be [D, E]");
  in.rows = array.shape(0);
  in.cols = array.shape(1);
  in.probs = array.data();
}

// planner.py's export_state: a dict of plain lists, the Python twin's format.
py::dict export_state(const m2r2::Planner& p) {
  py::dict out;
  out["num_layers"] = p.num_layers();
  out["num_experts"] = p.num_experts();
  out["counts"] = p.counts_state();
  out["prior"] = p.prior_state();
  out["regret"] = std::vector<double>{p.regretted(), p.evictions()};
  return out;
}

// planner.py's import_state: another geometry or a bad value is a ValueError, and nothing changes.
void import_state(m2r2::Planner& p, const py::dict& state) {
  for (const char* key : {"num_layers", "num_experts", "counts", "prior", "regret"})
    if (!state.contains(key))
      throw std::invalid_argument(std::string("not a planner state (needs num_layers, num_experts, counts, prior, "
                                              "regret): no ") + key);
  try {
    auto layers = state["num_layers"].cast<int64_t>(), experts = state["num_experts"].cast<int64_t>();
    if (layers != p.num_layers() || experts != p.num_experts())
      throw std::invalid_argument("it was learned for " + std::to_string(layers) + " MoE layers of " +
                                  std::to_string(experts) + " experts, this planner has " +
                                  std::to_string(p.num_layers()) + " of " + std::to_string(p.num_experts()));
    auto regret = state["regret"].cast<std::vector<double>>();
    if (regret.size() != 2) throw std::invalid_argument("planner state of the wrong shape: regret needs 2 numbers");
    p.load_state(state["counts"].cast<std::vector<double>>(),
                 state["prior"].cast<std::vector<std::vector<double>>>(), regret[0], regret[1]);
  } catch (const py::cast_error& e) {
    throw std::invalid_argument(std::string("not a planner state (numbers expected): ") + e.what());
  }
}

using Array = py::array_t<float, py::array::c_style>;

const float* data_of(const Array& a, int64_t size, const char* name) {
  if (a.size() != size) throw std::invalid_argument(std::string("heads: ") + name + " has the wrong size");
  return a.data();
}

Array rms_linear_softmax(const Array& x, double eps, const Array& w, int64_t n) {
  int64_t hidden = x.size(), experts = w.size() / std::max<int64_t>(hidden * n, 1);
  if (w.ndim() != 2 || w.shape(0) != hidden || w.shape(1) != n * experts)
    throw std::invalid_argument("heads: w must be [H, n*E] for x [H]");
  Array out({n, experts});
  m2r2::rms_linear_softmax(x.data(), hidden, eps, w.data(), n, experts, out.mutable_data());
  return out;
}

Array mlp_softmax_of(const float* x, int64_t hidden, const Array& w1, const Array& b1, const Array& w2,
                     const Array& b2) {
  if (w2.ndim() != 3) throw std::invalid_argument("heads: w2 must be [n, M, E]");
  int64_t n = w2.shape(0), width = w2.shape(1), experts = w2.shape(2);
  Array out({n, experts});
  m2r2::mlp_softmax(x, hidden, data_of(w1, hidden * n * width, "w1"), data_of(b1, n * width, "b1"), n, width,
                    w2.data(), data_of(b2, n * experts, "b2"), experts, out.mutable_data());
  return out;
}

Array mlp_softmax(const Array& x, const Array& w1, const Array& b1, const Array& w2, const Array& b2) {
  return mlp_softmax_of(x.data(), x.size(), w1, b1, w2, b2);
}

// The prefetcher's call: every operand by address, the result written into `out` [n, E] float32. x: H contiguous
// float32 values (a torch CPU tensor's data_ptr()); w1 [H, n*M], b1 [n*M], w2 [n, M, E], b2 [n, E], contiguous, w1
// and w2 float32 or (`bf16`) bfloat16 bits. The caller keeps them alive and rightly shaped (m2r2_moe/predict/m2r2.py
// checks them once, when it lays them out). No array is built or checked per call: in a decode step these heads run
// cold, after the layers' kernels, and the numpy arguments and result of the per-array call (mlp_softmax) cost
// about a third of the call there (18 -> 12 µs per predicting layer, tiny-mixtral, simulated time).
void mlp_softmax_into(uintptr_t x, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, int64_t hidden, int64_t n,
                      int64_t width, int64_t experts, bool bf16, uintptr_t out) {
  if (!x || !w1 || !b1 || !w2 || !b2 || !out)
    throw std::invalid_argument("heads: a null address");
  if (hidden < 1 || n < 1 || width < 1 || experts < 1) throw std::invalid_argument("heads: an empty shape");
  auto f = [](uintptr_t a) { return reinterpret_cast<const float*>(a); };
  auto h = [](uintptr_t a) { return reinterpret_cast<const uint16_t*>(a); };
  float* y = reinterpret_cast<float*>(out);
  if (bf16)
    m2r2::mlp_softmax_bf16(f(x), hidden, h(w1), f(b1), n, width, h(w2), f(b2), experts, y);
  else
    m2r2::mlp_softmax(f(x), hidden, f(w1), f(b1), n, width, f(w2), f(b2), experts, y);
}

// The CPU copy engine for Python (runtime/cpu_native.py wraps it). The engine is shared with its copies'
// handles, which lock its mutex to read a copy's fields; `close` (also on the engine's deallocation) releases
// the GIL while it joins the worker, which may be waiting for the GIL inside the hook.
struct CopyEngine {
  py::object hook;  // hook(id) -> seconds added to the link time, < 0 when the copy failed
  std::shared_ptr<m2r2::CpuCopyEngine> engine;

  CopyEngine(double bytes_per_s, double latency_s, py::object fn, double spin_s) : hook(std::move(fn)) {
    PyObject* raw = hook.ptr();  // borrowed: `hook` outlives the worker, which `close` joins first
    engine = std::make_shared<m2r2::CpuCopyEngine>(bytes_per_s, latency_s, [raw](int64_t id) -> double {
      py::gil_scoped_acquire gil;
      try {
        return py::reinterpret_borrow<py::object>(raw)(id).cast<double>();
      } catch (py::error_already_set& e) {
        e.discard_as_unraisable("m2r2_moe CPU copy engine hook");
        return -1.0;
      } catch (const std::exception&) {
        return -1.0;
      }
    }, spin_s);
  }
  ~CopyEngine() {
    py::gil_scoped_release nogil;
    engine->close();
  }
};

struct Copy {
  std::shared_ptr<m2r2::CpuCopyEngine> engine;
  std::shared_ptr<m2r2::CpuCopy> copy;

  template <typename T>
  T read(T m2r2::CpuCopy::*field) const {
    std::lock_guard<m2r2::SpinFirstMutex> lk(engine->mutex());
    return (*copy).*field;
  }
};

// Copy.wait: the Transfer protocol's (runtime/transfer.py).
double wait_transfer(py::object self, py::object timeout) {
  const Copy& c = self.cast<const Copy&>();
  const double limit = timeout.is_none() ? -1.0 : timeout.cast<double>();
  const double start = m2r2::monotonic_seconds();
  bool done = c.copy->done.load(std::memory_order_acquire);
  if (!done) {
    py::gil_scoped_release nogil;
    done = c.engine->wait(c.copy, limit);
  }
  const double waited = m2r2::monotonic_seconds() - start;
  if (!done) {
    PyErr_SetString(PyExc_TimeoutError, ("copy of expert key " + std::to_string(c.copy->key) + " into slot " +
                                         std::to_string(c.copy->slot) + " did not land in " +
                                         std::to_string(limit) + " s").c_str());
    throw py::error_already_set();
  }
  if (c.read(&m2r2::CpuCopy::failed)) {
    py::object error = py::module_::import("m2r2_moe.runtime.transfer").attr("failed_error")(self);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
    throw py::error_already_set();
  }
  return waited;
}

}  // namespace

PYBIND11_MODULE(_native_plan, m) {
  m.doc() = "C++ twin of m2r2_moe.runtime.planner.PlannerCore";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.def("rms_linear_softmax", &rms_linear_softmax, py::arg("x"), py::arg("eps"), py::arg("w"), py::arg("n"),
        "gate at batch 1: softmax per distance of rms_norm(x) @ w [H, n*E] -> [n, E] (csrc/heads.hpp)");
  m.def("mlp_softmax", &mlp_softmax, py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        "M2R2 heads at batch 1: softmax per distance of relu(x @ w1 + b1) @ w2[d] + b2[d] -> [n, E]");
  m.def("mlp_softmax_into", &mlp_softmax_into, py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"),
        py::arg("b2"), py::arg("hidden"), py::arg("n"), py::arg("width"), py::arg("experts"), py::arg("bf16"),
        py::arg("out"), "mlp_softmax with every operand by address and the result written into out [n, E] (float32); "
        "w1 and w2 float32 or (bf16) bfloat16 bits");
  m.def("policy_victim",
        [](uintptr_t when, uintptr_t res, uintptr_t want, uintptr_t since, uintptr_t score, uintptr_t layer,
           int64_t size, std::vector<int64_t> pinned, int64_t now, int64_t layers, double done, double to_come,
           int64_t needed_at) {
          if (!when || !res || !want || !since || !score || !layer || size < 0 || layers < 1)
            throw std::invalid_argument("policy_victim: null arrays, a negative size or no layers");
          const m2r2::PolicyArrays a{reinterpret_cast<const int64_t*>(when), reinterpret_cast<const bool*>(res),
                                     reinterpret_cast<const bool*>(want), reinterpret_cast<const int64_t*>(since),
                                     reinterpret_cast<const double*>(score), reinterpret_cast<const int64_t*>(layer),
                                     size};
          return m2r2::policy_victim(a, std::move(pinned), now, layers, done, to_come, needed_at);
        },
        py::arg("when"), py::arg("res"), py::arg("want"), py::arg("since"), py::arg("score"), py::arg("layer"),
        py::arg("size"), py::arg("pinned"), py::arg("now"), py::arg("layers"), py::arg("done"), py::arg("to_come"),
        py::arg("needed_at"),
        "the predictive policy's victim search over its per-key arrays at these addresses (csrc/policy.hpp)");
  py::class_<Copy>(m, "CpuCopy", "one copy on the C++ CPU copy engine (csrc/cpu_copy.hpp)")
      .def_property_readonly("done", [](const Copy& c) { return c.copy->done.load(std::memory_order_acquire); })
      .def_property_readonly("priority", [](const Copy& c) { return c.read(&m2r2::CpuCopy::priority); })
      .def_property_readonly("cancelled", [](const Copy& c) { return c.read(&m2r2::CpuCopy::cancelled); })
      .def_property_readonly("failed", [](const Copy& c) { return c.read(&m2r2::CpuCopy::failed); })
      .def_property_readonly("started_at", [](const Copy& c) { return c.read(&m2r2::CpuCopy::started_at); })
      .def_property_readonly("finished_at", [](const Copy& c) { return c.read(&m2r2::CpuCopy::finished_at); })
      .def_property_readonly("busy", [](const Copy& c) { return c.read(&m2r2::CpuCopy::busy); })
      .def("wait_done", [](const Copy& c, double timeout) { return c.engine->wait(c.copy, timeout); },
           py::arg("timeout"), py::call_guard<py::gil_scoped_release>(),
           "wait until the copy is done (timeout < 0: forever), without the GIL; False on timeout")
      // The `Transfer` protocol (runtime/transfer.py), so that a plain copy's handle is this object itself
      // (NativeCopyEngine.submit_at): no Python object per copy on the hot path.
      .def_property_readonly("key", [](const Copy& c) { return c.copy->key; })  // fixed at submit: no lock
      .def_property_readonly("slot", [](const Copy& c) { return c.copy->slot; })
      .def_property_readonly("nbytes", [](const Copy& c) { return c.copy->nbytes; })
      .def_property_readonly("error", [](const Copy& c) -> py::object {
        if (!c.read(&m2r2::CpuCopy::failed)) return py::none();
        return py::module_::import("builtins").attr("RuntimeError")("the copy failed in the engine");
      })
      .def("ready", [](const Copy& c) { return c.copy->done.load(std::memory_order_acquire); })
      .def("wait", &wait_transfer, py::arg("timeout") = py::none(),
           "the Transfer protocol's wait: host seconds waited (without the GIL); TimeoutError when the copy has not "
           "landed within `timeout` seconds (None: forever), CopyError when it failed");
  py::class_<CopyEngine>(m, "CpuCopyEngine", "C++ twin of runtime/cpu_engine.py's ThreadCopyEngine")
      .def(py::init<double, double, py::object, double>(), py::arg("bytes_per_s"), py::arg("latency_s"),
           py::arg("hook"), py::arg("spin_s"))
      .def("submit",
           [](CopyEngine& e, int64_t id, int64_t key, int64_t slot, int64_t nbytes, int priority, uintptr_t dst,
              uintptr_t src, int64_t copy_bytes, bool hooked) -> py::object {
             auto t = e.engine->submit(id, key, slot, nbytes, priority, reinterpret_cast<char*>(dst),
                                       reinterpret_cast<const char*>(src), copy_bytes, hooked);
             if (!t) throw std::runtime_error("copy engine is closed");
             return py::cast(Copy{e.engine, std::move(t)});
           },
           py::arg("id"), py::arg("key"), py::arg("slot"), py::arg("nbytes"), py::arg("priority"), py::arg("dst"),
           py::arg("src"), py::arg("copy_bytes"), py::arg("hooked"))
      .def("cancel", [](CopyEngine& e, const Copy& c) { return e.engine->cancel(c.copy); })
      .def("promote", [](CopyEngine& e, const Copy& c) { e.engine->promote(c.copy); })
      .def("close", [](CopyEngine& e) { e.engine->close(); }, py::call_guard<py::gil_scoped_release>())
      .def("link_seconds", [](CopyEngine& e, int64_t nbytes) { return e.engine->link_seconds(nbytes); })
      .def_property_readonly("bytes_copied", [](CopyEngine& e) { return e.engine->bytes_copied(); })
      .def_property_readonly("busy_seconds", [](CopyEngine& e) { return e.engine->busy_seconds(); });
  m.def("monotonic_seconds", &m2r2::monotonic_seconds, "the engine's clock (time.perf_counter's on Linux)");
  py::class_<m2r2::Planner>(m, "Planner")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t>(), py::arg("num_layers"), py::arg("num_experts"),
           py::arg("key_stride"), py::arg("width"), py::arg("max_queued"))
      .def("layer",
           [](m2r2::Planner& p, int64_t layer, bool decode, int64_t now, std::vector<int64_t> keys,
              std::vector<int64_t> served, std::vector<int64_t> evicted, const py::object& probs, bool wraps,
              int64_t horizon, double miss, double transfer, double compute, int64_t free,
              std::vector<int64_t> backlog, double min_prob) {
             m2r2::LayerInput in;
             in.layer = layer;
             in.decode = decode;
             in.now = now;
             in.keys = std::move(keys);
             in.served = std::move(served);
             in.evicted = std::move(evicted);
             read_probs(probs, in);
             in.wraps = wraps;
             in.horizon = horizon;
             in.miss = miss;
             in.transfer = transfer;
             in.compute = compute;
             in.free = free;
             in.backlog = std::move(backlog);
             in.min_prob = min_prob;
             m2r2::Decision d = p.layer(in);
             return py::make_tuple(d.queue, d.expect, d.withdraw);
           },
           py::arg("layer"), py::arg("decode"), py::arg("now"), py::arg("keys"), py::arg("served"), py::arg("evicted"),
           py::arg("probs"), py::arg("wraps"), py::arg("horizon"), py::arg("miss"), py::arg("transfer"),
           py::arg("compute"), py::arg("free"), py::arg("backlog"), py::arg("min_prob"))
      .def("issued", &m2r2::Planner::issued, py::arg("key"), py::arg("evicted"), py::arg("now"))
      .def("withdrawn", &m2r2::Planner::withdrawn, py::arg("key"))
      .def("resync", &m2r2::Planner::resync, py::arg("resident"))
      .def("probability", &m2r2::Planner::probability, py::arg("source"), py::arg("distance"), py::arg("score"))
      .def("regret", &m2r2::Planner::regret)
      .def("active", &m2r2::Planner::active, py::arg("layer"))
      .def("step", &m2r2::Planner::step, py::arg("window"))
      .def("add_spent", &m2r2::Planner::add_spent, py::arg("seconds"))
      .def_property_readonly("saved", &m2r2::Planner::saved)
      .def_property_readonly("spent", &m2r2::Planner::spent)
      .def_property_readonly("every", &m2r2::Planner::every)
      .def("export_state", &export_state)
      .def("import_state", &import_state, py::arg("state"));
}
