// Emulated CUDA runtime (test infrastructure, never installed): what csrc/cuda/runtime.cuh gives nvcc
// builds, for the host C++ compiler. Each CUDA thread is a fiber, blocks run one at a time, shared
// memory is poisoned per block, warp and block synchronisation are checked (design.md §4b).
#pragma once

#include <c10/core/Device.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// Launch errors are raised by the launch itself; runtime calls that can fail throw.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) ((void)(expr))

#define NORMEXT_CUDA_DISPATCH_KEY CPU

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace normext::emu {

// The running thread's built-ins; the scheduler sets them before it switches to a fiber. Hidden, so
// that kernel code reads them directly rather than through the dynamic symbol table.
#define NORMEXT_EMU_HIDDEN __attribute__((visibility("hidden")))
extern NORMEXT_EMU_HIDDEN uint3 g_thread_idx;
extern NORMEXT_EMU_HIDDEN uint3 g_block_idx;
extern NORMEXT_EMU_HIDDEN dim3 g_block_dim;
extern NORMEXT_EMU_HIDDEN dim3 g_grid_dim;

// Runs body once per thread of every block of the grid (see runtime.cpp for the schedule and checks).
void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem,
              const std::function<void()>& body);

// Per-block storage of one NORMEXT_SHARED declaration (keyed by its tag), NaN-poisoned when the first
// thread of the block reaches it.
void* block_shared(const void* tag, size_t bytes, size_t align);
unsigned char* block_dynamic_smem();

// Fails the running kernel (from inside it) with a message naming the kernel, block and thread.
[[noreturn]] void kernel_fail(const std::string& what);

enum class WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kSync, kBallot };
// One warp-collective call of the running thread: waits until every lane of `mask` has made the same
// call, then returns what this lane gets (a shuffled value's bits, or a ballot).
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int arg, int width);
void block_barrier();

// Fails the kernel unless p is `bytes`-aligned; counts the access (emu_vector_access_counts).
void check_vector_access(const void* p, size_t bytes, size_t elem_bytes);

int sm_count();
int max_active_blocks_per_sm(const void* kernel, int threads, size_t smem);
void allow_dynamic_smem(const void* kernel, size_t bytes);

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace normext::emu

#define threadIdx (::normext::emu::g_thread_idx)
#define blockIdx (::normext::emu::g_block_idx)
#define blockDim (::normext::emu::g_block_dim)
#define gridDim (::normext::emu::g_grid_dim)
#define warpSize 32

inline void __syncthreads() { ::normext::emu::block_barrier(); }

// 1/sqrt(x) rounded once to float (CUDA's correctly rounded intrinsic), through double.
inline float __frsqrt_rn(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::normext::emu::warp_collective(::normext::emu::WarpOp::kSync, mask, 0, 0, 32);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  using namespace ::normext::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflIdx, mask, to_bits(v), src, width));
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::normext::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflUp, mask, to_bits(v), static_cast<int>(delta), width));
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::normext::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflDown, mask, to_bits(v), static_cast<int>(delta), width));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace ::normext::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflXor, mask, to_bits(v), lane_mask, width));
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  using namespace ::normext::emu;
  return static_cast<unsigned>(warp_collective(WarpOp::kBallot, mask, pred != 0, 0, 32));
}

inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// The kernel-facing side of csrc/cuda/runtime.cuh.
#define NORMEXT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::normext::cuda::launch_kernel_named(#kernel, kernel, grid, block, smem, stream, __VA_ARGS__)

#define NORMEXT_SHARED(T, name, count)          \
  static const char name##_normext_emu_tag = 0; \
  T(&name)                                      \
  [count] = *static_cast<T(*)[count]>(          \
      ::normext::emu::block_shared(&name##_normext_emu_tag, sizeof(T) * (count), alignof(T)))

#define NORMEXT_SHARED_SCALAR(T, name)          \
  static const char name##_normext_emu_tag = 0; \
  T& name = *static_cast<T*>(::normext::emu::block_shared(&name##_normext_emu_tag, sizeof(T), alignof(T)))

namespace normext::cuda {

// Each thread calls the kernel with its own copy of the arguments, converted once to the kernel's
// parameter types as a <<<...>>> launch converts them.
template <typename... KArgs, typename... Args>
void launch_kernel_named(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t, Args&&... args) {
  const std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  emu::run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, smem,
                [&] { std::apply(kernel, params); });
}

inline cudaStream_t current_stream() { return nullptr; }

inline c10::Device current_device() { return c10::Device(c10::kCPU); }

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline int sm_count() { return emu::sm_count(); }

template <typename... KArgs>
int max_active_blocks_per_sm(void (*kernel)(KArgs...), int threads, size_t smem) {
  return emu::max_active_blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, smem);
}

template <typename... KArgs>
void allow_dynamic_smem(void (*kernel)(KArgs...), size_t bytes) {
  emu::allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

inline unsigned char* dynamic_smem() { return emu::block_dynamic_smem(); }

inline void check_vector_access(const void* p, size_t bytes, size_t elem_bytes) {
  emu::check_vector_access(p, bytes, elem_bytes);
}

}  // namespace normext::cuda

namespace pybind11 {
class module_;
}

namespace normext::emu {
// The emulation's Python surface on normext._C (launch counts, schedule, device profile).
void bind_python(pybind11::module_& m);
}  // namespace normext::emu
