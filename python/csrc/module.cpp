// The Python module scattermoe._C: loading it registers the torch operators (ops.cpp); it
// exposes only what the library says about its own build.
#include <torch/extension.h>

#include "scattermoe/build_info.hpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "scattermoe torch operators (registered under torch.ops.scattermoe)";
  m.def("build_info", [] {
    const scattermoe::BuildInfo info = scattermoe::build_info();
    pybind11::dict d;
    d["version"] = info.version;
    d["cuda_backend"] = info.cuda_backend;
    d["cuda_archs"] = info.cuda_archs;
    return d;
  });
}
