// Python module m2r2_moe._native: the C++ slot manager as a Python type, written against the plain
// CPython C API (no pybind11, no torch headers), so one source builds for any Python 3.9+ next to
// any torch build; m2r2_moe/_ext.py is its only importer.
//
// Why not pybind11 here: the runtime calls acquire/release once per expert per MoE layer. A pybind11
// method call costs ~100 ns of dispatch on the project's machines, twice what the manager itself
// costs per layer (benchmarks/bookkeeping.py), and left the C++ manager only ~2x faster than the
// Python twin. METH_O methods cost about what a builtin call costs. The CUDA copy engine, called
// once per copy of a megabyte-sized expert, does use pybind11 (cuda_bindings.cpp).
//
// Errors: m2r2::CacheFull / m2r2::SlotState raise the Python classes handed to `_set_error_types`
// (m2r2_moe.errors.CacheFullError / SlotStateError, set by _ext.py); until then RuntimeError, the
// base class of both. std::invalid_argument raises ValueError.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <chrono>
#include <new>

#include "slot_manager.hpp"

namespace {

constexpr int kAbiVersion = 10;  // bumped when the Python-visible interface changes (see _ext.py)

// Owned references, deliberately never released (they must outlive every instance).
PyObject* g_cache_full = nullptr;
PyObject* g_slot_state = nullptr;
PyTypeObject* g_type = nullptr;

struct PySlotManager {
  PyObject_HEAD
  m2r2::SlotManager* sm;
};

m2r2::SlotManager& of(PyObject* self) { return *reinterpret_cast<PySlotManager*>(self)->sm; }

// Translates the C++ exception in flight; always returns nullptr for `return fail();`.
PyObject* fail() {
  try {
    throw;
  } catch (const m2r2::CacheFull& e) {
    PyErr_SetString(g_cache_full ? g_cache_full : PyExc_RuntimeError, e.what());
  } catch (const m2r2::SlotState& e) {
    PyErr_SetString(g_slot_state ? g_slot_state : PyExc_RuntimeError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// A Python int (or anything with __index__) as a key; false with an exception set otherwise.
bool to_key(PyObject* obj, int64_t* key) {
  long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) return false;
  *key = v;
  return true;
}

PyObject* pair(int64_t a, int64_t b) {
  PyObject* x = PyLong_FromLongLong(a);
  PyObject* y = x ? PyLong_FromLongLong(b) : nullptr;
  PyObject* t = y ? PyTuple_Pack(2, x, y) : nullptr;
  Py_XDECREF(x);
  Py_XDECREF(y);
  return t;
}

// -- methods ------------------------------------------------------------------------------------

PyObject* sm_lookup(PyObject* self, PyObject* arg) {
  int64_t key;
  if (!to_key(arg, &key)) return nullptr;
  return PyLong_FromLongLong(of(self).lookup(key));
}

PyObject* sm_acquire(PyObject* self, PyObject* arg) {
  int64_t key;
  if (!to_key(arg, &key)) return nullptr;
  try {
    m2r2::Acquired r = of(self).acquire(key);
    PyObject* slot = PyLong_FromLongLong(r.slot);
    PyObject* evicted = slot ? PyLong_FromLongLong(r.evicted) : nullptr;
    PyObject* out = evicted ? PyTuple_Pack(3, slot, r.hit ? Py_True : Py_False, evicted) : nullptr;
    Py_XDECREF(slot);
    Py_XDECREF(evicted);
    return out;
  } catch (...) {
    return fail();
  }
}

PyObject* sm_release(PyObject* self, PyObject* arg) {
  int64_t key;
  if (!to_key(arg, &key)) return nullptr;
  try {
    of(self).release(key);
  } catch (...) {
    return fail();
  }
  Py_RETURN_NONE;
}

PyObject* sm_prefetch(PyObject* self, PyObject* arg) {
  int64_t key;
  if (!to_key(arg, &key)) return nullptr;
  try {
    auto [slot, evicted] = of(self).prefetch(key);
    return pair(slot, evicted);
  } catch (...) {
    return fail();
  }
}

PyObject* sm_evict(PyObject* self, PyObject* arg) {
  int64_t key;
  if (!to_key(arg, &key)) return nullptr;
  return PyBool_FromLong(of(self).evict(key));
}

PyObject* sm_pins(PyObject* self, PyObject* arg) {
  int64_t key;
  if (!to_key(arg, &key)) return nullptr;
  return PyLong_FromLongLong(of(self).pins(key));
}

PyObject* sm_resident(PyObject* self, PyObject*) {
  try {
    auto items = of(self).resident();
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(items.size()));
    if (!out) return nullptr;
    for (size_t i = 0; i < items.size(); ++i) {
      PyObject* t = pair(items[i].first, items[i].second);
      if (!t) {
        Py_DECREF(out);
        return nullptr;
      }
      PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), t);  // steals t
    }
    return out;
  } catch (...) {
    return fail();
  }
}

PyObject* sm_occupied(PyObject* self, PyObject*) { return PyLong_FromLongLong(of(self).occupied()); }

PyObject* sm_counters(PyObject* self, PyObject*) {
  const auto& sm = of(self);
  return Py_BuildValue("{sLsLsLsL}", "hits", static_cast<long long>(sm.hits), "misses",
                       static_cast<long long>(sm.misses), "prefetches", static_cast<long long>(sm.prefetches),
                       "evictions", static_cast<long long>(sm.evictions));
}

PyObject* sm_reset_counters(PyObject* self, PyObject*) {
  of(self).reset_counters();
  Py_RETURN_NONE;
}

PyMethodDef sm_methods[] = {
    {"lookup", sm_lookup, METH_O, "The slot holding `key`, or -1. Does not change LRU order."},
    {"acquire", sm_acquire, METH_O,
     "Pin `key` in a slot for the current layer. Returns (slot, hit, evicted_key or -1); raises CacheFullError "
     "when every slot is pinned."},
    {"release", sm_release, METH_O, "Unpin `key` (once per `acquire`); SlotStateError when it is not held."},
    {"prefetch", sm_prefetch, METH_O,
     "Reserve a slot for `key` without pinning it. Returns (slot, evicted_key or -1); (-1, -1) when `key` is "
     "resident or every slot is pinned."},
    {"evict", sm_evict, METH_O, "Drop `key` if it is resident and not pinned. Returns whether it was dropped."},
    {"pins", sm_pins, METH_O, "Pin count of `key` (0 when absent)."},
    {"resident", sm_resident, METH_NOARGS, "(key, slot) pairs, least recently used first."},
    {"occupied", sm_occupied, METH_NOARGS, "How many slots hold a key (resident or being filled)."},
    {"counters", sm_counters, METH_NOARGS, "hits, misses, prefetches, evictions."},
    {"reset_counters", sm_reset_counters, METH_NOARGS, "Zero the counters."},
    {nullptr, nullptr, 0, nullptr},
};

// -- attributes ---------------------------------------------------------------------------------

int64_t m2r2::SlotManager::*const kCounters[] = {&m2r2::SlotManager::hits, &m2r2::SlotManager::misses,
                                                 &m2r2::SlotManager::prefetches, &m2r2::SlotManager::evictions};

PyObject* get_counter(PyObject* self, void* which) {
  return PyLong_FromLongLong(of(self).*kCounters[reinterpret_cast<intptr_t>(which)]);
}

int set_counter(PyObject* self, PyObject* value, void* which) {
  if (value == nullptr) {
    PyErr_SetString(PyExc_AttributeError, "counters cannot be deleted");
    return -1;
  }
  int64_t v;
  if (!to_key(value, &v)) return -1;
  of(self).*kCounters[reinterpret_cast<intptr_t>(which)] = v;
  return 0;
}

PyObject* get_num_slots(PyObject* self, void*) { return PyLong_FromLongLong(of(self).num_slots()); }

PyGetSetDef sm_getset[] = {
    {"num_slots", get_num_slots, nullptr, "Number of slots in the pool.", nullptr},
    {"hits", get_counter, set_counter, nullptr, reinterpret_cast<void*>(0)},
    {"misses", get_counter, set_counter, nullptr, reinterpret_cast<void*>(1)},
    {"prefetches", get_counter, set_counter, nullptr, reinterpret_cast<void*>(2)},
    {"evictions", get_counter, set_counter, nullptr, reinterpret_cast<void*>(3)},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

// -- type slots ---------------------------------------------------------------------------------

PyObject* sm_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"num_slots", nullptr};
  long long num_slots;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L:SlotManager", const_cast<char**>(names), &num_slots)) {
    return nullptr;
  }
  m2r2::SlotManager* sm;
  try {
    sm = new m2r2::SlotManager(num_slots);
  } catch (...) {
    return fail();
  }
  PyObject* self = type->tp_alloc(type, 0);
  if (!self) {
    delete sm;
    return nullptr;
  }
  reinterpret_cast<PySlotManager*>(self)->sm = sm;
  return self;
}

void sm_dealloc(PyObject* self) {
  PyTypeObject* type = Py_TYPE(self);
  delete reinterpret_cast<PySlotManager*>(self)->sm;
  type->tp_free(self);
  Py_DECREF(type);  // heap type: each instance holds a reference to it
}

PyObject* sm_repr(PyObject* self) {
  return PyUnicode_FromFormat("<m2r2_moe._native.SlotManager num_slots=%lld resident=%zd>",
                              static_cast<long long>(of(self).num_slots()),
                              static_cast<Py_ssize_t>(of(self).resident().size()));
}

PyType_Slot sm_slots[] = {
    {Py_tp_doc, const_cast<char*>("LRU slot table for a fixed pool of `num_slots` expert slots (C++ twin of "
                                  "m2r2_moe.runtime.cache.SlotManager).")},
    {Py_tp_new, reinterpret_cast<void*>(sm_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(sm_dealloc)},
    {Py_tp_repr, reinterpret_cast<void*>(sm_repr)},
    {Py_tp_methods, sm_methods},
    {Py_tp_getset, sm_getset},
    {0, nullptr},
};

PyType_Spec sm_spec = {"m2r2_moe._native.SlotManager", sizeof(PySlotManager), 0, Py_TPFLAGS_DEFAULT, sm_slots};

// -- module functions ---------------------------------------------------------------------------

PyObject* set_error_types(PyObject*, PyObject* args) {
  PyObject *cache_full, *slot_state;
  if (!PyArg_ParseTuple(args, "OO:_set_error_types", &cache_full, &slot_state)) return nullptr;
  for (PyObject* t : {cache_full, slot_state}) {
    if (!PyType_Check(t) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(t),
                                              reinterpret_cast<PyTypeObject*>(PyExc_Exception))) {
      PyErr_SetString(PyExc_TypeError, "_set_error_types expects two Exception subclasses");
      return nullptr;
    }
  }
  Py_INCREF(cache_full);
  Py_INCREF(slot_state);
  g_cache_full = cache_full;
  g_slot_state = slot_state;
  Py_RETURN_NONE;
}

// Benchmark helper (benchmarks/bookkeeping.py): the per-layer cycle acquire k1, acquire k2,
// release k1, release k2 over a flat list of (k1, k2) pairs, looped in C++, so the manager's own
// cost can be told apart from the cost of calling it from Python. Returns nanoseconds per layer.
PyObject* loop_layers(PyObject*, PyObject* args) {
  PyObject *manager, *pairs;
  int repeat = 1;
  if (!PyArg_ParseTuple(args, "O!O|i:_loop_layers", g_type, &manager, &pairs, &repeat)) return nullptr;
  PyObject* seq = PySequence_Fast(pairs, "pairs must be a sequence of ints");
  if (!seq) return nullptr;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  std::vector<int64_t> keys(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!to_key(PySequence_Fast_GET_ITEM(seq, i), &keys[static_cast<size_t>(i)])) {
      Py_DECREF(seq);
      return nullptr;
    }
  }
  Py_DECREF(seq);
  if (n % 2 != 0 || n == 0 || repeat < 1) {
    PyErr_SetString(PyExc_ValueError, "pairs must hold a non-zero even number of keys, repeat >= 1");
    return nullptr;
  }
  auto& sm = of(manager);
  try {
    auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < repeat; ++r) {
      for (size_t i = 0; i < keys.size(); i += 2) {
        sm.acquire(keys[i]);
        sm.acquire(keys[i + 1]);
        sm.release(keys[i]);
        sm.release(keys[i + 1]);
      }
    }
    std::chrono::duration<double, std::nano> elapsed = std::chrono::steady_clock::now() - start;
    return PyFloat_FromDouble(elapsed.count() / (static_cast<double>(repeat) * static_cast<double>(n / 2)));
  } catch (...) {
    return fail();
  }
}

PyMethodDef module_methods[] = {
    {"_set_error_types", set_error_types, METH_VARARGS,
     "_set_error_types(cache_full, slot_state): the exception classes raised for CacheFull / SlotState."},
    {"_loop_layers", loop_layers, METH_VARARGS,
     "_loop_layers(manager, pairs, repeat=1) -> ns per layer: acquire k1, k2, release k1, k2 per pair, in C++."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_native",
    "m2r2_moe native core: the C++ expert slot manager (twin of m2r2_moe.runtime.cache.SlotManager)", -1,
    module_methods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__native() {
  PyObject* m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  if (!g_type) g_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&sm_spec));
  if (!g_type || PyModule_AddIntConstant(m, "ABI_VERSION", kAbiVersion) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  Py_INCREF(g_type);
  if (PyModule_AddObject(m, "SlotManager", reinterpret_cast<PyObject*>(g_type)) < 0) {
    Py_DECREF(g_type);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
