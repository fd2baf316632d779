// Python module m2r2_moe._native_plan: the C++ planner (planner.hpp), the batch-1 heads, the `predictive` policy's
// victim search and the CPU copy engine, with pybind11 — except the four calls made at every MoE layer of a decode
// step (Planner.layer, the heads, the victim search, the engine's submit), which go through the C API (see "Raw
// CPython entry points" below). No torch headers: the predictor's probabilities arrive as a numpy array (a torch
// CPU tensor's `.numpy()`, no copy), read through the buffer protocol; m2r2_moe/_ext.py is the only importer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_copy.hpp"
#include "heads.hpp"
#include "planner.hpp"
#include "policy.hpp"

namespace py = pybind11;

namespace {

constexpr int kAbiVersion = 10;  // bumped when the Python-visible interface changes (see _ext.py)

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

// -- Raw CPython entry points for the calls made at every MoE layer of a decode step ----------------------------
// In a decode step these calls run cold (the layers' kernels went through the caches since the last one), and
// pybind11's generic dispatcher is much code to run cold. These take their arguments through METH_FASTCALL |
// METH_KEYWORDS (by position, or by the names pybind11 gave them) and convert each with one C API call, as the slot
// manager's bindings do (csrc/slot_manager_py.cpp); the functions behind them are the same. Cold (caches swept by
// 8 MB between calls), pybind11 -> here: the victim search 3.8 -> 2.7 µs, Planner.layer settling 5.5 -> 3.6 µs,
// with probabilities 6.8 -> 5.0 µs.
bool arg(PyObject* o, int64_t& v) {
  v = PyLong_AsLongLong(o);
  return !(v == -1 && PyErr_Occurred());
}
bool arg(PyObject* o, uintptr_t& v) {  // an address: a non-negative int (or anything with __index__)
  PyObject* index = PyNumber_Index(o);
  if (index == nullptr) return false;
  v = static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(index));
  Py_DECREF(index);
  return !(v == static_cast<uintptr_t>(-1) && PyErr_Occurred());
}
bool arg(PyObject* o, double& v) {
  v = PyFloat_AsDouble(o);
  return !(v == -1.0 && PyErr_Occurred());
}
bool arg(PyObject* o, bool& v) {
  int truth = PyObject_IsTrue(o);
  v = truth == 1;
  return truth >= 0;
}
bool arg(PyObject* o, std::vector<int64_t>& v) {  // any iterable of ints (a list, a frozenset)
  PyObject* it = PyObject_GetIter(o);
  if (it == nullptr) return false;
  while (PyObject* item = PyIter_Next(it)) {
    int64_t x = PyLong_AsLongLong(item);
    Py_DECREF(item);
    if (x == -1 && PyErr_Occurred()) break;
    v.push_back(x);
  }
  Py_DECREF(it);
  return !PyErr_Occurred();
}

// The arguments of a METH_FASTCALL | METH_KEYWORDS call in the order of `names` (positional, then by keyword, as
// pybind11's py::arg names took them); false with TypeError when one is missing, unknown or given twice.
template <size_t N>
bool gather(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, const char* fn,
            const std::array<const char*, N>& names, std::array<PyObject*, N>& out) {
  out.fill(nullptr);
  if (nargs > static_cast<Py_ssize_t>(N)) {
    PyErr_Format(PyExc_TypeError, "%s() takes %d arguments (%zd given)", fn, static_cast<int>(N), nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) out[static_cast<size_t>(i)] = args[i];
  const Py_ssize_t nkw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, k);
    size_t at = N;
    for (size_t i = 0; i < N; ++i)
      if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0) at = i;
    if (at == N || out[at] != nullptr) {
      PyErr_Format(PyExc_TypeError, "%s() got %s keyword argument '%U'", fn, at == N ? "an unexpected" : "a repeated",
                   name);
      return false;
    }
    out[at] = args[nargs + k];
  }
  for (size_t i = 0; i < N; ++i)
    if (out[i] == nullptr) {
      PyErr_Format(PyExc_TypeError, "%s() missing argument '%s'", fn, names[i]);
      return false;
    }
  return true;
}

template <typename... T, size_t... I>
bool convert(PyObject* const* in, std::index_sequence<I...>, T&... out) {
  return (arg(in[I], out) && ...);
}

// gather, then convert each argument to its C++ type.
template <size_t N, typename... T>
bool parse(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, const char* fn,
           const std::array<const char*, N>& names, T&... out) {
  static_assert(sizeof...(T) == N, "one name per argument");
  std::array<PyObject*, N> in;
  return gather(args, nargs, kwnames, fn, names, in) && convert(in.data(), std::index_sequence_for<T...>{}, out...);
}

// C++ errors as pybind11 maps them: std::invalid_argument -> ValueError, the rest -> RuntimeError.
template <typename F>
PyObject* guarded(F&& f) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* raw_mlp_softmax_into(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const std::array<const char*, 11> names{"x", "w1", "b1", "w2", "b2", "hidden", "n", "width", "experts", "bf16",
                                                 "out"};
  uintptr_t x, w1, b1, w2, b2, out;
  int64_t hidden, n, width, experts;
  bool bf16;
  if (!parse(args, nargs, kwnames, "mlp_softmax_into", names, x, w1, b1, w2, b2, hidden, n, width, experts, bf16, out))
    return nullptr;
  return guarded([&] {
    mlp_softmax_into(x, w1, b1, w2, b2, hidden, n, width, experts, bf16, out);
    Py_RETURN_NONE;
  });
}

PyObject* raw_policy_victim(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const std::array<const char*, 13> names{"when", "res", "want", "since", "score", "layer", "size", "pinned",
                                                 "now", "layers", "done", "to_come", "needed_at"};
  uintptr_t when, res, want, since, score, layer;
  int64_t size, now, layers, needed_at;
  std::vector<int64_t> pinned;
  double done, to_come;
  if (!parse(args, nargs, kwnames, "policy_victim", names, when, res, want, since, score, layer, size, pinned, now,
             layers, done, to_come, needed_at))
    return nullptr;
  return guarded([&] {
    if (!when || !res || !want || !since || !score || !layer || size < 0 || layers < 1)
      throw std::invalid_argument("policy_victim: null arrays, a negative size or no layers");
    const m2r2::PolicyArrays a{reinterpret_cast<const int64_t*>(when), reinterpret_cast<const bool*>(res),
                               reinterpret_cast<const bool*>(want), reinterpret_cast<const int64_t*>(since),
                               reinterpret_cast<const double*>(score), reinterpret_cast<const int64_t*>(layer), size};
    return PyLong_FromLongLong(m2r2::policy_victim(a, std::move(pinned), now, layers, done, to_come, needed_at));
  });
}

// policy_expect for each (layer, expert, distance) of `wanted` (a list of 3-tuples of ints, as Planner.layer's
// `expect`), at key layer * stride + expert and turn now + distance: the cache's one call per layer.
PyObject* raw_policy_expect(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const std::array<const char*, 7> names{"when", "res", "want", "size", "wanted", "stride", "now"};
  std::array<PyObject*, 7> in;
  if (!gather(args, nargs, kwnames, "policy_expect", names, in)) return nullptr;
  uintptr_t when, res, want;
  int64_t size, stride, now;
  if (!arg(in[0], when) || !arg(in[1], res) || !arg(in[2], want) || !arg(in[3], size) || !arg(in[5], stride) ||
      !arg(in[6], now))
    return nullptr;
  if (!when || !res || !want || size < 0 || stride < 1) {
    PyErr_SetString(PyExc_ValueError, "policy_expect: null arrays, a negative size or a stride below 1");
    return nullptr;
  }
  PyObject* wanted = PySequence_Fast(in[4], "policy_expect: wanted must be a sequence of (layer, expert, distance)");
  if (wanted == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(wanted);
  PyObject** items = PySequence_Fast_ITEMS(wanted);
  // checked and read first, written after: a bad item leaves the arrays unchanged
  std::vector<std::array<int64_t, 2>> keyed(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
      Py_DECREF(wanted);
      PyErr_SetString(PyExc_TypeError, "policy_expect: each wanted item must be a tuple (layer, expert, distance)");
      return nullptr;
    }
    const long long layer = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
    const long long expert = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 1));
    const long long distance = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 2));
    if (PyErr_Occurred()) {
      Py_DECREF(wanted);
      return nullptr;
    }
    keyed[static_cast<size_t>(i)] = {layer * stride + expert, now + distance};
  }
  Py_DECREF(wanted);
  for (const auto& [key, turn] : keyed)
    m2r2::policy_expect(reinterpret_cast<int64_t*>(when), reinterpret_cast<const bool*>(res),
                        reinterpret_cast<bool*>(want), size, key, turn, now);
  Py_RETURN_NONE;
}

// A list of tuples of ints, built directly (Py_BuildValue parses its format at every item).
template <typename... T>
PyObject* tuple_of(const std::tuple<T...>& t) {
  PyObject* out = PyTuple_New(sizeof...(T));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  bool ok = true;
  auto put = [&](int64_t v) {
    PyObject* x = PyLong_FromLongLong(v);
    ok = ok && x != nullptr;
    if (x != nullptr) PyTuple_SET_ITEM(out, i, x);
    ++i;
  };
  std::apply([&](auto... v) { (put(v), ...); }, t);
  if (!ok) Py_CLEAR(out);
  return out;
}
template <typename Item>
PyObject* list_of(const std::vector<Item>& items) {
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(items.size()));
  for (size_t i = 0; out != nullptr && i < items.size(); ++i) {
    PyObject* item = tuple_of(items[i]);
    if (item == nullptr) Py_CLEAR(out);
    else PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

// Planner.layer (a method: `self` is the pybind11 Planner). `probs`: None, a C-contiguous float32 [D, E] array, or
// a heads call: mlp_softmax_into's 11 arguments as a tuple (x, w1, b1, w2, b2, hidden, n, width, experts, bf16, out),
// run here first, its `out` [n, E] then the probabilities (the prediction and the decision in one call from Python).
PyObject* raw_planner_layer(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const std::array<const char*, 15> names{"layer", "decode", "now", "keys", "served", "evicted", "probs",
                                                 "wraps", "horizon", "miss", "transfer", "compute", "free", "backlog",
                                                 "min_prob"};
  std::array<PyObject*, 15> in_args;
  if (!gather(args, nargs, kwnames, "layer", names, in_args)) return nullptr;
  PyObject* probs = in_args[6];
  in_args[6] = in_args[14];  // the others, in order, without probs
  m2r2::LayerInput in;
  if (!convert(in_args.data(), std::make_index_sequence<14>{}, in.layer, in.decode, in.now, in.keys, in.served,
               in.evicted, in.min_prob, in.wraps, in.horizon, in.miss, in.transfer, in.compute, in.free, in.backlog))
    return nullptr;
  Py_buffer view{};
  uintptr_t heads[6] = {};  // a heads call's addresses: x, w1, b1, w2, b2, out
  int64_t hidden = 0, width = 0;
  bool bf16 = false;
  const bool call = PyTuple_Check(probs);
  if (call) {
    if (PyTuple_GET_SIZE(probs) != 11) {
      PyErr_SetString(PyExc_TypeError, "planner: a heads call is mlp_softmax_into's 11 arguments as a tuple");
      return nullptr;
    }
    if (!convert(PySequence_Fast_ITEMS(probs), std::make_index_sequence<11>{}, heads[0], heads[1], heads[2], heads[3],
                 heads[4], hidden, in.rows, width, in.cols, bf16, heads[5]))
      return nullptr;
  } else if (probs != Py_None) {
    if (PyObject_GetBuffer(probs, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0 || view.ndim != 2 ||
        view.itemsize != 4 || view.format == nullptr ||
        (std::string(view.format) != "f" && std::string(view.format) != "<f")) {
      if (view.obj != nullptr) PyBuffer_Release(&view);
      PyErr_Clear();
      PyErr_SetString(PyExc_ValueError, "planner: probabilities must be a C-contiguous float32 numpy array [D, E]");
      return nullptr;
    }
    in.rows = view.shape[0];
    in.cols = view.shape[1];
    in.probs = static_cast<const float*>(view.buf);
  }
  PyObject* out = guarded([&]() -> PyObject* {
    if (call) {  // the heads first (they check their addresses and shapes)
      mlp_softmax_into(heads[0], heads[1], heads[2], heads[3], heads[4], hidden, in.rows, width, in.cols, bf16,
                       heads[5]);
      in.probs = reinterpret_cast<const float*>(heads[5]);
    }
    m2r2::Decision d = py::handle(self).cast<m2r2::Planner&>().layer(in);
    PyObject* lists[3] = {list_of(d.queue), list_of(d.expect), list_of(d.withdraw)};
    PyObject* result = lists[0] && lists[1] && lists[2] ? PyTuple_Pack(3, lists[0], lists[1], lists[2]) : nullptr;
    for (PyObject* list : lists) Py_XDECREF(list);
    return result;
  });
  if (view.obj != nullptr) PyBuffer_Release(&view);
  return out;
}

// CpuCopyEngine.submit (a method: `self` is the pybind11 CopyEngine); returns the copy's handle.
PyObject* raw_engine_submit(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const std::array<const char*, 9> names{"id", "key", "slot", "nbytes", "priority", "dst", "src", "copy_bytes",
                                                "hooked"};
  int64_t id, key, slot, nbytes, priority, copy_bytes;
  uintptr_t dst, src;
  bool hooked;
  if (!parse(args, nargs, kwnames, "submit", names, id, key, slot, nbytes, priority, dst, src, copy_bytes, hooked))
    return nullptr;
  return guarded([&]() -> PyObject* {
    CopyEngine& e = py::handle(self).cast<CopyEngine&>();
    auto t = e.engine->submit(id, key, slot, nbytes, static_cast<int>(priority), reinterpret_cast<char*>(dst),
                              reinterpret_cast<const char*>(src), copy_bytes, hooked);
    if (!t) throw std::runtime_error("copy engine is closed");
    return py::cast(Copy{e.engine, std::move(t)}).release().ptr();
  });
}

// Planner.issued and Planner.add_spent: the calls after each copy queued and after each layer's step.
PyObject* raw_planner_issued(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const std::array<const char*, 3> names{"key", "evicted", "now"};
  int64_t key, evicted, now;
  if (!parse(args, nargs, kwnames, "issued", names, key, evicted, now)) return nullptr;
  return guarded([&]() -> PyObject* {
    py::handle(self).cast<m2r2::Planner&>().issued(key, evicted, now);
    Py_RETURN_NONE;
  });
}

PyObject* raw_planner_add_spent(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const std::array<const char*, 1> names{"seconds"};
  double seconds;
  if (!parse(args, nargs, kwnames, "add_spent", names, seconds)) return nullptr;
  return guarded([&]() -> PyObject* {
    py::handle(self).cast<m2r2::Planner&>().add_spent(seconds);
    Py_RETURN_NONE;
  });
}

PyMethodDef kRawPlannerLayer = {
    "layer", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raw_planner_layer)),
    METH_FASTCALL | METH_KEYWORDS,
    "layer(layer, decode, now, keys, served, evicted, probs, wraps, horizon, miss, transfer, compute, free, backlog, "
    "min_prob) -> (queue, expect, withdraw): runtime/planner.py's PlannerCore.layer"};
PyMethodDef kRawPlannerIssued = {
    "issued", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raw_planner_issued)),
    METH_FASTCALL | METH_KEYWORDS, "issued(key, evicted, now): the cache's answer to a copy asked for"};
PyMethodDef kRawPlannerAddSpent = {
    "add_spent", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raw_planner_add_spent)),
    METH_FASTCALL | METH_KEYWORDS, "add_spent(seconds): time spent predicting and planning"};
PyMethodDef kRawEngineSubmit = {
    "submit", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raw_engine_submit)),
    METH_FASTCALL | METH_KEYWORDS,
    "submit(id, key, slot, nbytes, priority, dst, src, copy_bytes, hooked) -> the copy's handle"};

// Puts a raw method on a pybind11 class.
void add_raw_method(py::handle cls, PyMethodDef* def) {
  PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(cls.ptr()), def);
  if (descr == nullptr) throw py::error_already_set();
  py::setattr(cls, def->ml_name, py::reinterpret_steal<py::object>(descr));
}

PyMethodDef kRaw[] = {
    {"mlp_softmax_into", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raw_mlp_softmax_into)),
     METH_FASTCALL | METH_KEYWORDS,
     "mlp_softmax_into(x, w1, b1, w2, b2, hidden, n, width, experts, bf16, out): mlp_softmax with every operand by "
     "address and the result written into out [n, E] (float32); w1 and w2 float32 or (bf16) bfloat16 bits"},
    {"policy_victim", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raw_policy_victim)),
     METH_FASTCALL | METH_KEYWORDS,
     "policy_victim(when, res, want, since, score, layer, size, pinned, now, layers, done, to_come, needed_at): the "
     "predictive policy's victim search over its per-key arrays at these addresses (csrc/policy.hpp); pinned: any "
     "iterable of keys"},
    {"policy_expect", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raw_policy_expect)),
     METH_FASTCALL | METH_KEYWORDS,
     "policy_expect(when, res, want, size, wanted, stride, now): the predictive policy's expect for each (layer, "
     "expert, distance) of wanted, on its per-key arrays at these addresses (csrc/policy.hpp)"},
    {nullptr, nullptr, 0, nullptr}};

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
  for (PyMethodDef* def = kRaw; def->ml_name != nullptr; ++def) {  // the raw entry points above
    PyObject* fn = PyCFunction_NewEx(def, nullptr, m.attr("__name__").ptr());
    if (fn == nullptr) throw py::error_already_set();
    m.add_object(def->ml_name, py::reinterpret_steal<py::object>(fn));
  }
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
      .def("withdrawn", &m2r2::Planner::withdrawn, py::arg("key"))
      .def("resync", &m2r2::Planner::resync, py::arg("resident"))
      .def("probability", &m2r2::Planner::probability, py::arg("source"), py::arg("distance"), py::arg("score"))
      .def("regret", &m2r2::Planner::regret)
      .def("active", &m2r2::Planner::active, py::arg("layer"))
      .def("step", &m2r2::Planner::step, py::arg("window"), py::arg("decode") = false, py::arg("margin") = 0.0)
      .def_property_readonly("saved", &m2r2::Planner::saved)
      .def_property_readonly("spent", &m2r2::Planner::spent)
      .def_property_readonly("decode_saved", &m2r2::Planner::decode_saved)
      .def_property_readonly("decode_caused", &m2r2::Planner::decode_caused)
      .def_property_readonly("every", &m2r2::Planner::every)
      .def_property("near", &m2r2::Planner::near, &m2r2::Planner::set_near)
      .def_property(
          "late_saving",
          [](const m2r2::Planner& p) -> std::optional<double> {
            return p.late_saving() >= 0 ? std::optional<double>(p.late_saving()) : std::nullopt;
          },
          [](m2r2::Planner& p, std::optional<double> seconds) {
            if (seconds && !(*seconds >= 0)) throw py::value_error("late_saving: seconds >= 0, or None");
            p.set_late_saving(seconds ? *seconds : -1.0);
          })
      .def("export_state", &export_state)
      .def("import_state", &import_state, py::arg("state"));
  add_raw_method(m.attr("CpuCopyEngine"), &kRawEngineSubmit);  // the per-copy and per-layer calls: raw, see above
  add_raw_method(m.attr("Planner"), &kRawPlannerLayer);
  add_raw_method(m.attr("Planner"), &kRawPlannerIssued);
  add_raw_method(m.attr("Planner"), &kRawPlannerAddSpent);
}
