// The one seam between normext's CUDA sources and the CUDA runtime: kernel launches, statically sized
// and dynamic shared memory, the current stream, the device guard and device queries. nvcc builds get
// the real runtime below; the emulated test build (NORMEXT_CUDA_EMU, csrc/cuda/emu) runs the same files.
#pragma once

#ifdef NORMEXT_CUDA_EMU
#include "emu/runtime.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

// Dispatch key the CUDA entry points register at (the emulated build registers them for CPU tensors).
#define NORMEXT_CUDA_DISPATCH_KEY CUDA

// kernel<<<grid, block, smem, stream>>>(args...). A kernel name with template arguments goes in
// parentheses: NORMEXT_LAUNCH((k<scalar_t, VEC>), grid, block, 0, stream, p, n).
#define NORMEXT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::normext::cuda::launch_kernel(kernel, grid, block, smem, stream, __VA_ARGS__)

// A block's statically sized __shared__ array / object.
#define NORMEXT_SHARED(T, name, count) __shared__ T name[count]
#define NORMEXT_SHARED_SCALAR(T, name) __shared__ T name

namespace normext::cuda {

template <typename... KArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  // clang-format does not know .cuh is CUDA and would split the launch chevrons.
  // clang-format off
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  // clang-format on
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Where workspaces are allocated (the entry points hold a DeviceGuard for their input's device).
inline c10::Device current_device() { return c10::Device(c10::kCUDA, c10::cuda::current_device()); }

using DeviceGuard = c10::cuda::CUDAGuard;

inline int sm_count() {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return n;
}

template <typename... KArgs>
int max_active_blocks_per_sm(void (*kernel)(KArgs...), int threads, size_t smem) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return n;
}

// Dynamic shared memory above 48 KiB needs this opt-in before the launch.
template <typename... KArgs>
void allow_dynamic_smem(void (*kernel)(KArgs...), size_t bytes) {
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// The block's dynamic shared memory (the launch's smem bytes), 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char normext_dynamic_smem[];
  return normext_dynamic_smem;
}

// Vector accesses call this with their address, width and element size; the emulation checks the alignment
// and counts the accesses by width.
__device__ __forceinline__ void check_vector_access(const void*, size_t, size_t) {}

}  // namespace normext::cuda
#endif
