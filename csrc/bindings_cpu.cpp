// pybind11 module hope_kernels._C_cpu: the C++ CPU kernels.
#include "common.h"

namespace hope {
std::vector<at::Tensor> cms_update_cpu(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                       const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                       double lr, double beta, bool precond);
std::vector<at::Tensor> teach_signal_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                         const at::Tensor& targets, int64_t ignore_index);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hope C++ CPU kernels";
  m.def("cms_update", &hope::cms_update_cpu, "CMS level update (CPU)", py::arg("w1"), py::arg("w2"),
        py::arg("m1"), py::arg("m2"), py::arg("x"), py::arg("delta"), py::arg("lr"), py::arg("beta"),
        py::arg("precond"));
  m.def("teach_signal", &hope::teach_signal_cpu, "CE loss and grad of the logits (CPU)", py::arg("hidden"),
        py::arg("weight"), py::arg("targets"), py::arg("ignore_index"));
}
