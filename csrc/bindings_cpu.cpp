// pybind11 module hope_kernels._C_cpu: the C++ CPU kernels.
#include "ops.h"
#include "titan_bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hope C++ CPU kernels";
  m.def("cms_update", &hope::cms_update_cpu, "CMS level update (CPU)", py::arg("w1"), py::arg("w2"),
        py::arg("m1"), py::arg("m2"), py::arg("x"), py::arg("delta"), py::arg("lr"), py::arg("beta"),
        py::arg("precond"));
  hope::def_titan(m, "CPU, fp32", &hope::titan_linear_fwd_cpu, &hope::titan_linear_bwd_cpu, &hope::titan_mlp_fwd_cpu,
                  &hope::titan_mlp_bwd_cpu);
}
