// The AVX2 + FMA build of self_modifying_titans_cpu.cpp (namespace hope::smt::avx2; its operators run this build on
// CPUs that have AVX2 and FMA). The headers (the kernel file's own list) come first, so only the kernels' own
// functions take the target.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=fast")
#define HOPE_SMT_ISA avx2
#define HOPE_SMT_VARIANT_BUILD
#include "self_modifying_titans_cpu.cpp"
#endif
