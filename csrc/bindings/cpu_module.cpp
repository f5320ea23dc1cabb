// spar_kernels._C_cpu: the CPU twins. Arguments are raw pointers (ints), sizes, strides in
// elements and DType codes; nothing here links against torch.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "quantize_fp8/api.h"
#include "rms_norm/api.h"
#include "route_layers/api.h"
#include "flow_sampler/api.h"
#include "split_by_expert/api.h"
#include "adaln/api.h"
#include "dwconv_glu/api.h"
#include "linear_attention/api.h"
#include "row_moves/api.h"

namespace py = pybind11;

namespace {

// flow_sampler_step_packed as a plain CPython METH_O function: FlowSampler.step's replay calls it
// once per step, and a step of a small latent takes about 1.5 us, in which pybind11's argument
// dispatch and a GIL release would be a large share. The GIL is released only for work of
// kReleaseGilElems or more (B * P * Q, read from the packed array).
constexpr int64_t kReleaseGilElems = int64_t(1) << 16;

PyObject* flow_sampler_step_packed_raw(PyObject*, PyObject* arg) {
  const unsigned long long addr = PyLong_AsUnsignedLongLong(arg);
  if (addr == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
  if (addr == 0) {
    PyErr_SetString(PyExc_ValueError, "flow_sampler_step_packed: args must be the address of the packed array, got 0");
    return nullptr;
  }
  const int64_t* a = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(addr));
  const bool release = a[2] * a[3] * a[4] >= kReleaseGilElems;  // B * P * Q
  PyThreadState* ts = release ? PyEval_SaveThread() : nullptr;
  const char* err = nullptr;
  std::string what;
  try {
    spar::flow_sampler_step_cpu_packed(static_cast<uintptr_t>(addr));
  } catch (const std::invalid_argument& e) {
    what = e.what();
    err = "value";
  } catch (const std::exception& e) {
    what = e.what();
    err = "runtime";
  }
  if (release) PyEval_RestoreThread(ts);
  if (err) {
    PyErr_SetString(err[0] == 'v' ? PyExc_ValueError : PyExc_RuntimeError, what.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef kFlowSamplerStepPacked = {
    "flow_sampler_step_packed", flow_sampler_step_packed_raw, METH_O,
    "flow_sampler_step with its arguments packed in an int64 array at address `args` (see "
    "csrc/flow_sampler/api.h)"};

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "spar CPU kernels (twins of the CUDA kernels)";
  m.def("quantize_fp8", &spar::quantize_fp8_cpu, py::arg("x"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_stride"), py::arg("q"), py::arg("scales"), py::arg("per_token"),
        py::call_guard<py::gil_scoped_release>());
  m.def("route_layers", &spar::route_layers_cpu, py::arg("hidden"), py::arg("dtype"), py::arg("L"), py::arg("N"),
        py::arg("D"), py::arg("stride_l"), py::arg("stride_n"), py::arg("stride_d"), py::arg("layer_ids"),
        py::arg("ids_int64"), py::arg("K"), py::arg("logits"), py::arg("logits_dtype"), py::arg("logits_stride_n"),
        py::arg("logits_stride_k"), py::arg("alpha"), py::arg("alpha_dtype"), py::arg("ln_weight"), py::arg("ln_bias"),
        py::arg("param_dtype"), py::arg("tau"), py::arg("eps"), py::arg("rows"), py::arg("rows_int64"),
        py::arg("M"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("flow_sampler_step", &spar::flow_sampler_step_cpu,
        "fused flow-sampler step (arguments: see csrc/flow_sampler/api.h)",
        py::call_guard<py::gil_scoped_release>());
  m.add_object("flow_sampler_step_packed",
                py::reinterpret_steal<py::object>(PyCFunction_NewEx(&kFlowSamplerStepPacked, nullptr, m.ptr())));
  m.def("rms_norm", &spar::rms_norm_cpu, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("D"),
        py::arg("x_row_stride"), py::arg("x_d_stride"), py::arg("residual"), py::arg("r_row_stride"),
        py::arg("r_d_stride"), py::arg("weight"), py::arg("weight_dtype"), py::arg("eps"), py::arg("out"),
        py::arg("residual_out"), py::call_guard<py::gil_scoped_release>());
  m.def("split_by_expert", &spar::split_by_expert_cpu, py::arg("x"), py::arg("dtype"), py::arg("N"), py::arg("D"),
        py::arg("stride_n"), py::arg("stride_d"), py::arg("perm"), py::arg("expert_ids"), py::arg("ids_int64"),
        py::arg("weights"), py::arg("weight_dtype"), py::arg("E"), py::arg("weight_stride"), py::arg("eps"),
        py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("adaln_layernorm", &spar::adaln_layernorm_cpu, py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("N"),
        py::arg("C"), py::arg("sxb"), py::arg("sxn"), py::arg("sxc"), py::arg("shift"), py::arg("shb"),
        py::arg("scale"), py::arg("scb"), py::arg("y"), py::arg("syb"), py::arg("syn"), py::arg("syc"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gated_residual", &spar::gated_residual_cpu, py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("N"),
        py::arg("C"), py::arg("sxb"), py::arg("sxn"), py::arg("sxc"), py::arg("y"), py::arg("syb"), py::arg("syn"),
        py::arg("syc"), py::arg("gate"), py::arg("gsb"), py::arg("out"), py::arg("sob"), py::arg("son"), py::arg("soc"),
        py::call_guard<py::gil_scoped_release>());
  m.def("dwconv_glu", &spar::dwconv_glu_cpu, py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("H"),
        py::arg("W"), py::arg("C"), py::arg("sxb"), py::arg("sxn"), py::arg("w"), py::arg("swc"), py::arg("swt"), py::arg("bias"), py::arg("out"),
        py::arg("sob"), py::arg("son"), py::call_guard<py::gil_scoped_release>());
  m.def("linear_attention", &spar::linear_attention_cpu, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dtype"),
        py::arg("B"), py::arg("Nq"), py::arg("Nk"), py::arg("H"), py::arg("D"), py::arg("sqb"), py::arg("sqn"),
        py::arg("sqh"), py::arg("skb"), py::arg("skn"), py::arg("skh"), py::arg("svb"), py::arg("svn"), py::arg("svh"),
        py::arg("out"), py::arg("sob"), py::arg("son"), py::arg("soh"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("scatter_rows", &spar::scatter_rows_cpu, py::arg("x"), py::arg("n_x"), py::arg("x_row_stride"),
        py::arg("index"), py::arg("index_int64"), py::arg("M"), py::arg("src"), py::arg("src_row_stride"),
        py::arg("row_bytes"), py::call_guard<py::gil_scoped_release>());
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
