// Which build of the CPU kernels (csrc/cpu/dispatch.cpp) this process registered: "AVX2" or "DEFAULT".
#pragma once

namespace normext::cpu {
const char* capability();
}  // namespace normext::cpu
