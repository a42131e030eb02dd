// The titan_memory_update entry points as one pybind11 definition per extension module: titan_fwd / titan_bwd take
// (memory, [grads,] q, k, v, terms, state, chunk_size[, store_states]) and hand the kernels one TitanInputs
// (titan_inputs.h); TITAN_TERMS exports the term order for the Python side's check.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

#include "titan_inputs.h"

namespace hope {

// Fwd(const TitanInputs&, bool store_states) and Bwd(const TitanInputs&, const TitanGradsIn&) per memory
template <typename LinearFwd, typename LinearBwd, typename MlpFwd, typename MlpBwd>
void def_titan(pybind11::module_& m, const char* device, LinearFwd linear_fwd, LinearBwd linear_bwd, MlpFwd mlp_fwd,
               MlpBwd mlp_bwd) {
  namespace py = pybind11;
  m.attr("TITAN_TERMS") = titan_term_names();
  m.def(
      "titan_fwd",
      [=](const std::string& memory, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
          const std::vector<at::Tensor>& terms, const std::vector<at::Tensor>& state, int64_t chunk_size,
          bool store_states) {
        const TitanInputs in = titan_inputs(memory, q, k, v, terms, state, chunk_size);
        return memory == "linear" ? linear_fwd(in, store_states) : mlp_fwd(in, store_states);
      },
      (std::string("titan_memory_update state pass, forward: [out, *final state, chunk-start states] (") + device +
       ")").c_str(),
      py::arg("memory"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("terms"), py::arg("state"),
      py::arg("chunk_size"), py::arg("store_states"));
  m.def(
      "titan_bwd",
      [=](const std::string& memory, const std::vector<at::Tensor>& grads, const at::Tensor& q, const at::Tensor& k,
          const at::Tensor& v, const std::vector<at::Tensor>& terms, const std::vector<at::Tensor>& state,
          int64_t chunk_size) {
        const TitanInputs in = titan_inputs(memory, q, k, v, terms, state, chunk_size);
        const TitanGradsIn g = titan_grads_in(memory, grads);
        return (memory == "linear" ? linear_bwd(in, g) : mlp_bwd(in, g)).list();
      },
      (std::string("titan_memory_update state pass, backward: [dq, dk, dv, *d terms, *d state] (") + device +
       ")").c_str(),
      py::arg("memory"), py::arg("grads"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("terms"),
      py::arg("state"), py::arg("chunk_size"));
}

}  // namespace hope
