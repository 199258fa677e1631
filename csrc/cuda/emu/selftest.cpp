// Kernels that break the CUDA rules on purpose, and correct twins, so that tests/test_cuda_emu.py can show
// each emulation check firing (emulated build only; not counted as normext kernels).
#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include <string>

#include "../common.cuh"

namespace normext::emu {
namespace {

using normext::cuda::kFullMask;

// Each thread writes its slot of shared memory and reads its neighbour's; without the barrier the
// neighbour may not have written yet (poison: NaN) depending on the thread order.
template <bool kSync>
__global__ void neighbour_kernel(float* out) {
  NORMEXT_SHARED(float, buf, 64);
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (kSync) __syncthreads();
  out[threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

// Threads past 40 return before a barrier the others wait at.
__global__ void early_exit_barrier_kernel(float* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// A full-mask shuffle (all 32 lanes) run by a block whose last warp is partial, or by only some lanes.
__global__ void shuffle_kernel(float* out, unsigned mask, int active_lanes) {
  float v = static_cast<float>(threadIdx.x);
  if (static_cast<int>(threadIdx.x % 32) < active_lanes) v = __shfl_down_sync(mask, v, 1);
  out[threadIdx.x] = v;
}

// Lane l of each shuffle kind at the given width: out[kind * n + t].
__global__ void shuffle_table_kernel(float* out, int arg, int width) {
  const float v = static_cast<float>(threadIdx.x);
  const int n = static_cast<int>(blockDim.x);
  out[threadIdx.x] = __shfl_sync(kFullMask, v, arg, width);
  out[n + threadIdx.x] = __shfl_up_sync(kFullMask, v, static_cast<unsigned>(arg), width);
  out[2 * n + threadIdx.x] = __shfl_down_sync(kFullMask, v, static_cast<unsigned>(arg), width);
  out[3 * n + threadIdx.x] = __shfl_xor_sync(kFullMask, v, arg, width);
}

// A 16-byte vector load at p + offset floats.
__global__ void vector_load_kernel(const float* p, int64_t offset, float* out) {
  float v[4];
  normext::cuda::load_float<4>(p, offset, v);
  if (threadIdx.x == 0) out[0] = v[0] + v[1] + v[2] + v[3];
}

// Reads shared memory nobody wrote.
__global__ void read_unwritten_kernel(float* out) {
  NORMEXT_SHARED(float, buf, 32);
  out[threadIdx.x] = buf[threadIdx.x];
}

// Uses `bytes` of dynamic shared memory.
__global__ void dynamic_smem_kernel(float* out, int64_t bytes) {
  auto* s = reinterpret_cast<float*>(normext::cuda::dynamic_smem());
  const int64_t n = bytes / static_cast<int64_t>(sizeof(float));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s[i] = 1.f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = s[n - 1];
}

at::Tensor run(const std::string& name, int64_t threads, int64_t arg, int64_t width) {
  at::Tensor out = at::full({4 * threads}, -1.f);
  float* o = out.data_ptr<float>();
  const dim3 block(static_cast<unsigned>(threads));
  if (name == "neighbour") {
    NORMEXT_LAUNCH(neighbour_kernel<false>, 1, block, 0, nullptr, o);
  } else if (name == "neighbour_synced") {
    NORMEXT_LAUNCH(neighbour_kernel<true>, 1, block, 0, nullptr, o);
  } else if (name == "early_exit_barrier") {
    NORMEXT_LAUNCH(early_exit_barrier_kernel, 1, block, 0, nullptr, o);
  } else if (name == "shuffle") {
    NORMEXT_LAUNCH(shuffle_kernel, 1, block, 0, nullptr, o, static_cast<unsigned>(arg),
                   static_cast<int>(width));
  } else if (name == "shuffle_table") {
    NORMEXT_LAUNCH(shuffle_table_kernel, 1, block, 0, nullptr, o, static_cast<int>(arg),
                   static_cast<int>(width));
  } else if (name == "vector_load") {
    at::Tensor in = at::arange(64, at::kFloat);
    NORMEXT_LAUNCH(vector_load_kernel, 1, block, 0, nullptr, in.data_ptr<float>(), arg, o);
  } else if (name == "read_unwritten") {
    NORMEXT_LAUNCH(read_unwritten_kernel, 1, block, 0, nullptr, o);
  } else if (name == "dynamic_smem") {
    NORMEXT_LAUNCH(dynamic_smem_kernel, 1, block, static_cast<size_t>(arg), nullptr, o, arg);
  } else if (name == "dynamic_smem_opted_in") {
    normext::cuda::allow_dynamic_smem(dynamic_smem_kernel, static_cast<size_t>(arg));
    NORMEXT_LAUNCH(dynamic_smem_kernel, 1, block, static_cast<size_t>(arg), nullptr, o, arg);
  } else if (name == "grid_y") {
    NORMEXT_LAUNCH(read_unwritten_kernel, dim3(1, static_cast<unsigned>(arg)), block, 0, nullptr, o);
  } else {
    TORCH_CHECK(false, "cuda-emu selftest: unknown kernel '", name, "'");
  }
  return out;
}

}  // namespace

void bind_selftests(pybind11::module_& m) {
  m.def("emu_selftest", &run, pybind11::arg("name"), pybind11::arg("threads"), pybind11::arg("arg") = 0,
        pybind11::arg("width") = 32,
        "Runs one of the emulation's rule-breaking test kernels; returns its output.");
}

}  // namespace normext::emu
