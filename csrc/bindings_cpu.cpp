// pybind11 module hope_kernels._C_cpu: the C++ CPU kernels.
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hope C++ CPU kernels";
  m.def("cms_update", &hope::cms_update_cpu, "CMS level update (CPU)", py::arg("w1"), py::arg("w2"),
        py::arg("m1"), py::arg("m2"), py::arg("x"), py::arg("delta"), py::arg("lr"), py::arg("beta"),
        py::arg("precond"));
  m.def("teach_signal", &hope::teach_signal_cpu, "CE loss and grad of the logits (CPU)", py::arg("hidden"),
        py::arg("weight"), py::arg("targets"), py::arg("ignore_index"));
  m.def("titan_linear_fwd", &hope::titan_linear_fwd_cpu,
        "titan_memory_update linear state pass, forward: [out, W_T, S_T, chunk-start states] (CPU, fp32)",
        py::arg("q"), py::arg("k"), py::arg("kh"), py::arg("v"), py::arg("aqk"), py::arg("akk"), py::arg("tinv"),
        py::arg("aqw"), py::arg("vec"), py::arg("end"), py::arg("W0"), py::arg("S0"), py::arg("chunk_size"),
        py::arg("store_states"));
  m.def("titan_linear_bwd", &hope::titan_linear_bwd_cpu,
        "titan_memory_update linear state pass, backward: [dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, "
        "dW0, dS0] (CPU, fp32)", py::arg("do"), py::arg("dWT"), py::arg("dST"), py::arg("q"), py::arg("k"),
        py::arg("kh"), py::arg("v"), py::arg("aqk"), py::arg("akk"), py::arg("tinv"), py::arg("aqw"), py::arg("vec"),
        py::arg("end"), py::arg("W0"), py::arg("S0"), py::arg("chunk_size"));
  m.def("titan_mlp_fwd", &hope::titan_mlp_fwd_cpu,
        "titan_memory_update mlp state pass, forward: [out, W1_T, W2_T, S1_T, S2_T, chunk-start states] (CPU, fp32)",
        py::arg("q"), py::arg("k"), py::arg("kh"), py::arg("v"), py::arg("aqk"), py::arg("gth"), py::arg("akk"),
        py::arg("tinv"), py::arg("aqw"), py::arg("vec"), py::arg("end"), py::arg("W1"), py::arg("W2"), py::arg("S1"),
        py::arg("S2"), py::arg("chunk_size"), py::arg("store_states"));
  m.def("titan_mlp_bwd", &hope::titan_mlp_bwd_cpu,
        "titan_memory_update mlp state pass, backward: [dq, dk, dkh, dv, daqk, dgth, dakk, dtinv, daqw, dvec, dend, "
        "dW1, dW2, dS1, dS2] (CPU, fp32)", py::arg("do"), py::arg("dW1T"), py::arg("dW2T"), py::arg("dS1T"),
        py::arg("dS2T"), py::arg("q"), py::arg("k"), py::arg("kh"), py::arg("v"), py::arg("aqk"), py::arg("gth"),
        py::arg("akk"), py::arg("tinv"), py::arg("aqw"), py::arg("vec"), py::arg("end"), py::arg("W1"), py::arg("W2"),
        py::arg("S1"), py::arg("S2"), py::arg("chunk_size"));
}
