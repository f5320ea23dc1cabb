// spar_kernels._C_cuda: the CUDA kernels. Arguments are raw device pointers (ints), sizes,
// strides in elements, DType codes and a cudaStream_t (int). Imports without a GPU or driver:
// nothing touches the driver until a kernel is launched.
#include <pybind11/pybind11.h>

#include "quantize_fp8/api.h"
#include "route_layers/api.h"
#include "flow_sampler/api.h"
#include "common/cuda_info.h"
// @ops-cuda-includes (one line per op: #include "<op>/api.h")

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "spar CUDA kernels";
  // build / driver information for the run-time check that a device can run these kernels
  m.def("driver_version", &spar::cuda_driver_version,
        "the CUDA version the installed driver supports (e.g. 12040), 0 without a driver");
  m.attr("cuda_runtime_version") = spar::cuda_runtime_version();  // CUDART_VERSION of the build
  m.attr("sass_archs") = SPAR_CUDA_SASS;  // comma-separated, e.g. "80,90a": machine code (cubins)
  m.attr("ptx_archs") = SPAR_CUDA_PTX;    // comma-separated, e.g. "80": PTX the driver can JIT
  m.def("quantize_fp8", &spar::quantize_fp8_cuda, py::arg("x"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_stride"), py::arg("q"), py::arg("scales"), py::arg("per_token"),
        py::arg("workspace"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("route_layers", &spar::route_layers_cuda, py::arg("hidden"), py::arg("dtype"), py::arg("L"), py::arg("N"),
        py::arg("D"), py::arg("stride_l"), py::arg("stride_n"), py::arg("stride_d"), py::arg("layer_ids"),
        py::arg("ids_int64"), py::arg("K"), py::arg("logits"), py::arg("logits_dtype"), py::arg("logits_stride_n"),
        py::arg("logits_stride_k"), py::arg("alpha"), py::arg("alpha_dtype"), py::arg("ln_weight"), py::arg("ln_bias"),
        py::arg("param_dtype"), py::arg("tau"), py::arg("eps"), py::arg("rows"), py::arg("rows_int64"),
        py::arg("M"), py::arg("out"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.attr("route_layers_max_d") = spar::kRouteMaxDCuda;
  m.def("flow_sampler_step", &spar::flow_sampler_step_cuda,
        "fused flow-sampler step (arguments: see csrc/flow_sampler/api.h)",
        py::call_guard<py::gil_scoped_release>());
  // @ops-cuda-defs (one m.def block per op)
}
