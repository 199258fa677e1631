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
#ifdef NORMEXT_CPU_AVX512
NORMEXT_DECLARE_REGISTER(AVX512)
#endif
#undef NORMEXT_DECLARE_REGISTER

const char* capability() {
  static const char* const cap = [] {
    [[maybe_unused]] const std::string aten = at::get_cpu_capability();
#ifdef NORMEXT_CPU_AVX512
    if (aten == "AVX512") return "AVX512";
#endif
#ifdef NORMEXT_CPU_AVX2
    if (aten == "AVX2" || aten == "AVX512") return "AVX2";
#endif
    return "DEFAULT";
  }();
  return cap;
}

}  // namespace normext::cpu

#define NORMEXT_REGISTER(CAP)  \
  CAP::register_group_norm(m); \
  CAP::register_layer_norm(m); \
  CAP::register_batch_norm(m)

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  using namespace normext::cpu;
  [[maybe_unused]] const std::string cap = capability();
#ifdef NORMEXT_CPU_AVX512
  if (cap == "AVX512") {
    NORMEXT_REGISTER(AVX512);
    return;
  }
#endif
#ifdef NORMEXT_CPU_AVX2
  if (cap == "AVX2") {
    NORMEXT_REGISTER(AVX2);
    return;
  }
#endif
  NORMEXT_REGISTER(DEFAULT);
}
