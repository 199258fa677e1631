// Registers the CPU kernels at the CPU key, choosing at load time between their builds per CPU capability
// (setup.py compiles every csrc/cpu/*_cpu.cpp once per capability, in namespace normext::cpu::<CAPABILITY>).
// The choice is ATen's own (at::get_cpu_capability: cpuinfo, lowered by ATEN_CPU_CAPABILITY=default), so
// normext runs the same instruction set as torch's kernels do in that process.
#include "dispatch.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

namespace normext::cpu {

#define NORMEXT_DECLARE_REGISTER(CAP)          \
  namespace CAP {                              \
  void register_group_norm(torch::Library& m); \
  void register_layer_norm(torch::Library& m); \
  void register_batch_norm(torch::Library& m); \
  }
NORMEXT_DECLARE_REGISTER(DEFAULT)
#ifdef NORMEXT_CPU_AVX2
NORMEXT_DECLARE_REGISTER(AVX2)
#endif
#undef NORMEXT_DECLARE_REGISTER

const char* capability() {
#ifdef NORMEXT_CPU_AVX2
  // AVX512 machines run the AVX2 build: normext has no AVX512 one.
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return avx2 ? "AVX2" : "DEFAULT";
#else
  return "DEFAULT";
#endif
}

}  // namespace normext::cpu

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  using namespace normext::cpu;
#ifdef NORMEXT_CPU_AVX2
  if (std::string(capability()) == "AVX2") {
    AVX2::register_group_norm(m);
    AVX2::register_layer_norm(m);
    AVX2::register_batch_norm(m);
    return;
  }
#endif
  DEFAULT::register_group_norm(m);
  DEFAULT::register_layer_norm(m);
  DEFAULT::register_batch_norm(m);
}
