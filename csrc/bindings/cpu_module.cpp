// spar_kernels._C_cpu: the CPU twins. Arguments are raw pointers (ints), sizes, strides in
// elements and DType codes; nothing here links against torch.
#include <pybind11/pybind11.h>

#include "quantize_fp8/api.h"
// @ops-cpu-includes (one line per op: #include "<op>/api.h")

namespace py = pybind11;

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "spar CPU kernels (twins of the CUDA kernels)";
  m.def("quantize_fp8", &spar::quantize_fp8_cpu, py::arg("x"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_stride"), py::arg("q"), py::arg("scales"), py::arg("per_token"),
        py::call_guard<py::gil_scoped_release>());
  // @ops-cpu-defs (one m.def block per op)
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
