// The `ompq` operator library for the CMake build (libtorch, no Python). The Python extension
// defines the same TORCH_LIBRARY in csrc/ompq.cpp next to its Python module init function; the
// op schemas themselves live in the TORCH_LIBRARY_FRAGMENTs of csrc/cpu/*.cpp in both builds.
#include <torch/library.h>

TORCH_LIBRARY(ompq, m) {
  // Schemas are declared in fragments (see csrc/cpu/*.cpp).
}
