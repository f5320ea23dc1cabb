// spar_kernels._C_cuda: the CUDA kernels. Arguments are raw device pointers (ints), sizes,
// strides in elements, DType codes and a cudaStream_t (int). Imports without a GPU or driver:
// nothing touches the driver until a kernel is launched.
#include <pybind11/pybind11.h>

#include "quantize_fp8/api.h"
// @ops-cuda-includes (one line per op: #include "<op>/api.h")

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "spar CUDA kernels";
  m.def("quantize_fp8", &spar::quantize_fp8_cuda, py::arg("x"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_stride"), py::arg("q"), py::arg("scales"), py::arg("per_token"),
        py::arg("workspace"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  // @ops-cuda-defs (one m.def block per op)
}
