// The titan_memory_update state pass's tensors as one struct, declared once. The Python side
// (hope_kernels/titan_memory_update/chunk.py) passes q, k, v, the chunk terms as a list in TERM_NAMES order and the
// state as a list; the bindings build a TitanInputs from them (titan_inputs) and every entry point, check and
// launcher takes that struct. The backward returns its gradients as a TitanInputs too (one per input, same names).
#pragma once
#include <string>
#include <vector>

#include "common.h"

namespace hope {

// The chunk terms (docs/kernels/titan_memory.md), in the order of chunk.py's TERM_NAMES; an absent term is an empty
// tensor (khat, akk, tinv, aqw under titans; gth for the linear memory):
//   khat [B, H, NC * C, Dk] unit keys; aqk, gth, akk, tinv, aqw [B, H, NC, C, C]; rows [B, H, NC, 7, C] the per-token
//   weights (kRow* below); ends [B, H, NC, 3] the end-of-chunk scalars B_L, c_L, A_L.
#define HOPE_TITAN_TERMS(X) X(khat) X(aqk) X(gth) X(akk) X(tinv) X(aqw) X(rows) X(ends)

// rows of `rows` (chunk.py ROW_NAMES)
constexpr int64_t kRowBc = 0, kRowC = 1, kRowBp = 2, kRowCp = 3, kRowWg = 4, kRowWp = 5, kRowWb = 6, kNRows = 7;

struct TitanInputs {
  at::Tensor q, k, v;  // [B, H, T, Dk], [B, H, T, Dk], [B, H, T, Dv]
#define HOPE_TITAN_FIELD(name) at::Tensor name;
  HOPE_TITAN_TERMS(HOPE_TITAN_FIELD)
#undef HOPE_TITAN_FIELD
  std::vector<at::Tensor> state;  // linear: W, S [B, H, Dv, Dk]; mlp: W1 [B, H, D, E], W2 [B, H, E, D], S1, S2
  int64_t chunk_size = 0;

  bool dgd() const { return khat.defined() && khat.numel() > 0; }

  // q, k, v, the terms, the state: the order the backward returns its gradients in
  std::vector<at::Tensor> list() const {
    std::vector<at::Tensor> out{q, k, v};
#define HOPE_TITAN_PUSH(name) out.push_back(name);
    HOPE_TITAN_TERMS(HOPE_TITAN_PUSH)
#undef HOPE_TITAN_PUSH
    out.insert(out.end(), state.begin(), state.end());
    return out;
  }
};

// The term names in order (exported by the extensions so a test holds chunk.py's TERM_NAMES to them).
inline std::vector<std::string> titan_term_names() {
  return {
#define HOPE_TITAN_NAME(name) #name,
      HOPE_TITAN_TERMS(HOPE_TITAN_NAME)
#undef HOPE_TITAN_NAME
  };
}

// memory "linear" (state W, S) or "mlp" (state W1, W2, S1, S2): the state's length
inline size_t titan_state_size(const std::string& memory) {
  TORCH_CHECK(memory == "linear" || memory == "mlp", "memory must be 'linear' or 'mlp', got '", memory, "'");
  return memory == "linear" ? 2 : 4;
}

inline TitanInputs titan_inputs(const std::string& memory, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const std::vector<at::Tensor>& terms,
                                const std::vector<at::Tensor>& state, int64_t chunk_size) {
  const std::vector<std::string> names = titan_term_names();
  TORCH_CHECK(terms.size() == names.size(), "terms must hold the ", fmt(static_cast<int64_t>(names.size())),
              " chunk terms (khat, aqk, gth, akk, tinv, aqw, rows, ends), got ",
              fmt(static_cast<int64_t>(terms.size())));
  TORCH_CHECK(state.size() == titan_state_size(memory), "state must hold ",
              memory == "linear" ? "[W, S]" : "[W1, W2, S1, S2]", " for memory='", memory, "', got ",
              fmt(static_cast<int64_t>(state.size())), " tensors");
  TitanInputs in;
  in.q = q;
  in.k = k;
  in.v = v;
  size_t i = 0;
#define HOPE_TITAN_TAKE(name) in.name = terms[i++];
  HOPE_TITAN_TERMS(HOPE_TITAN_TAKE)
#undef HOPE_TITAN_TAKE
  in.state = state;
  in.chunk_size = chunk_size;
  return in;
}

// The backward's incoming gradients: d out (like out, in q's dtype) and one per final-state tensor (fp32).
struct TitanGradsIn {
  at::Tensor out;
  std::vector<at::Tensor> state;
};

inline TitanGradsIn titan_grads_in(const std::string& memory, const std::vector<at::Tensor>& grads) {
  TORCH_CHECK(grads.size() == 1 + titan_state_size(memory), "grads must hold d out and one gradient per state "
              "tensor (", fmt(static_cast<int64_t>(1 + titan_state_size(memory))), "), got ",
              fmt(static_cast<int64_t>(grads.size())));
  return {grads[0], std::vector<at::Tensor>(grads.begin() + 1, grads.end())};
}

}  // namespace hope
