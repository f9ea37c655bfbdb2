// ompq torch extension: the `ompq` operator namespace.
//
// Each op family declares its schemas in a TORCH_LIBRARY_FRAGMENT(ompq, m) next to its kernels
// (csrc/cpu/*.cpp) and registers implementations per dispatch key with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing `ompq._C` loads this shared object, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ompq compiled ops (registered under torch.ops.ompq)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ompq, m) {
  // Schemas are declared in fragments (see csrc/cpu/*.cpp).
}
