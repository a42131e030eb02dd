// pybind11 module hope_kernels._C_cuda: the CUDA kernels.
#include "common.h"

namespace hope {
std::vector<at::Tensor> cms_update_cuda(const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& m1,
                                        const at::Tensor& m2, const at::Tensor& x, const at::Tensor& delta,
                                        double lr, double beta, bool precond);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hope CUDA kernels";
  m.def("cms_update", &hope::cms_update_cuda, "CMS level update (CUDA)", py::arg("w1"), py::arg("w2"),
        py::arg("m1"), py::arg("m2"), py::arg("x"), py::arg("delta"), py::arg("lr"), py::arg("beta"),
        py::arg("precond"));
}
