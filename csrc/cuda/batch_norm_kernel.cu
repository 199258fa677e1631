// BatchNorm on CUDA: the batch_norm_* ops registered at the CUDA key. Per-channel statistics are a
// column reduction: a partial kernel reduces (channel block x partition) tiles to Welford partials
// (or backward sums), a finalize kernel merges the partials of each channel in a fixed order into
// mean/rstd and the running statistics (no atomics: deterministic), and apply / the backward
// elementwise pass are one kernel each. Two views of X (BatchNormArgs::rows_view): rows of C
// channels (channels-last, or no spatial extent) and N·C planes of HxW (channels-first).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "normext/checks.h"
#include "normext/math.h"

namespace normext::cuda {
namespace {

using at::Tensor;
using WelfordF = Welford<float, float>;
using WelfordD = Welford<double, double>;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kRowsTY = kThreads / kWarp;  // thread rows of the rows-view kernels (blockDim = (32, 8))
// Reduction blocks to aim for: several per SM. A function of the shape only, so the partition (and
// with it every floating-point merge order) is the same on every run.
constexpr int64_t kReduceBlocks = 1024;
constexpr int64_t kApplyBlocks = 4096;

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// AT_DISPATCH over the CUDA input dtypes (float64 is a CPU-only dtype, rejected by check_input).
#define NORMEXT_DISPATCH_CUDA(TYPE, NAME, ...)                                                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ------------------------------------------------------------------------------ device helpers

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC consecutive elements as float; VEC > 1 only for 16-byte aligned pointers (checked on the host).
template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<float>(*p);
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(pk.v[i]);
  }
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    *p = static_cast<T>(in[0]);
  } else {
    Pack<T, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<T>(in[i]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

// a / b for non-negative a, b: 32-bit division when both fit (the common case; 64-bit division is
// a long instruction sequence), else 64-bit.
__device__ __forceinline__ int64_t div_idx(int64_t a, int64_t b) {
  if (a <= INT32_MAX && b <= INT32_MAX) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

template <typename T>
__device__ __forceinline__ Welford<T, T> shfl_down(const Welford<T, T>& w, int off) {
  return {__shfl_down_sync(0xffffffffu, w.mean, off), __shfl_down_sync(0xffffffffu, w.m2, off),
          __shfl_down_sync(0xffffffffu, w.n, off)};
}

// Chan merge of the 32 lanes' states in a fixed tree; lane 0 gets the result.
template <typename T>
__device__ __forceinline__ Welford<T, T> warp_welford(Welford<T, T> w) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) w = welford_merge(w, shfl_down(w, off));
  return w;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide merge over all threads (blockDim.x * blockDim.y, a multiple of 32, at most kThreads):
// warps in a fixed shuffle tree, then the warp results by warp 0. Thread (0, 0) gets the result.
__device__ WelfordF block_welford(WelfordF w) {
  __shared__ WelfordF warps[kThreads / kWarp];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nwarps = blockDim.x * blockDim.y / kWarp;
  w = warp_welford(w);
  if (tid % kWarp == 0) warps[tid / kWarp] = w;
  __syncthreads();
  if (tid < kWarp) {
    w = tid < nwarps ? warps[tid] : WelfordF{0.f, 0.f, 0.f};
    w = warp_welford(w);
  }
  return w;
}

// Block-wide sums of two values, same shape as block_welford.
__device__ void block_sum2(float& a, float& b) {
  __shared__ float warps[2][kThreads / kWarp];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nwarps = blockDim.x * blockDim.y / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  if (tid % kWarp == 0) {
    warps[0][tid / kWarp] = a;
    warps[1][tid / kWarp] = b;
  }
  __syncthreads();
  if (tid < kWarp) {
    a = warp_sum(tid < nwarps ? warps[0][tid] : 0.f);
    b = warp_sum(tid < nwarps ? warps[1][tid] : 0.f);
  }
}

// Per-channel statistics and parameters, float and contiguous. `second` holds rstd, or the variance
// (then rstd = 1/sqrt(var + eps)) when second_is_var. gamma/beta may be null (1 and 0).
struct Channels {
  const float* mean;
  const float* second;
  bool second_is_var;
  float eps;
  const float* gamma;
  const float* beta;

  __device__ __forceinline__ void at(int64_t c, float& m, float& rstd, float& g, float& b) const {
    m = mean[c];
    rstd = second_is_var ? 1.f / sqrtf(second[c] + eps) : second[c];
    g = gamma != nullptr ? gamma[c] : 1.f;
    b = beta != nullptr ? beta[c] : 0.f;
  }
};

// Backward sums of the elementwise pass: dX = a·dz + b·x̂ + c with a = gamma·rstd, b = -a·Σdz·x̂·inv,
// c = -a·Σdz·inv; without sums (null) b = c = 0.
struct GradSums {
  const float* sum_dz;
  const float* sum_dzx;
  float inv_count;
};

// dz = dy·act'(z) at the recomputed pre-activation z = x̂·gamma + beta + res.
__device__ __forceinline__ float grad_pre_act(float dy, float xhat, float g, float b, float res, int64_t act,
                                              float slope) {
  return act == kIdentity ? dy : dy * act_grad(xhat * g + b + res, act, slope);
}

// ------------------------------------------------------------------------------ rows view kernels
// X is rows x C, row-major. Block (32, kRowsTY): thread tx owns the VEC channels starting at
// c = (blockIdx.x * 32 + tx) * VEC (VEC > 1 only when C % VEC == 0, so a vector never straddles
// rows or the end); thread row ty walks rows. Precondition of every kernel here: C >= 1.

// Partial moments of partition p = blockIdx.y (rows [p * rows_per_part, ...)). Each lane runs
// Welford on x - K, K the partition's first row, so float rounding scales with the spread and not
// with the magnitude; the kRowsTY states of a channel are merged in ty order. Writes the partial
// (mean, M2) at [p * C + c] and its count at counts[p].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    rows_moments_kernel(const scalar_t* __restrict__ X, int64_t rows, int64_t C, int64_t rows_per_part,
                        float* __restrict__ means, float* __restrict__ m2s, float* __restrict__ counts) {
  __shared__ float s_mean[kThreads * VEC], s_m2[kThreads * VEC], s_n[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = (int64_t(blockIdx.x) * kWarp + tx) * VEC;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_part;
  const int64_t r1 = min(rows, r0 + rows_per_part);
  const bool active = c < C;
  float shift[VEC], mean[VEC], m2[VEC];
  float n = 0.f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) shift[i] = mean[i] = m2[i] = 0.f;
  if (active) {
    load_vec<VEC>(X + r0 * C + c, shift);
    for (int64_t r = r0 + ty; r < r1; r += kRowsTY) {
      float v[VEC];
      load_vec<VEC>(X + r * C + c, v);
      n += 1.f;
      const float inv = __frcp_rn(n);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = (v[i] - shift[i]) - mean[i];
        mean[i] += d * inv;
        m2[i] += d * ((v[i] - shift[i]) - mean[i]);
      }
    }
  }
  const int slot = ty * kWarp + tx;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_mean[slot * VEC + i] = mean[i];
    s_m2[slot * VEC + i] = m2[i];
  }
  s_n[slot] = n;
  __syncthreads();
  if (ty != 0 || !active) return;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    WelfordF w{mean[i], m2[i], n};
    for (int k = 1; k < kRowsTY; ++k) {
      const int o = k * kWarp + tx;
      w = welford_merge(w, WelfordF{s_mean[o * VEC + i], s_m2[o * VEC + i], s_n[o]});
    }
    means[blockIdx.y * C + c + i] = shift[i] + w.mean;
    m2s[blockIdx.y * C + c + i] = w.m2;
    if (i == 0 && c == 0) counts[blockIdx.y] = w.n;
  }
}

// Partial backward sums Σdz and Σdz·x̂ of partition p = blockIdx.y, merged over ty in order.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    rows_grad_sums_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                          const scalar_t* __restrict__ R, int64_t rows, int64_t C, int64_t rows_per_part,
                          Channels ch, int64_t act, float slope, float* __restrict__ part_dz,
                          float* __restrict__ part_dzx) {
  __shared__ float s_dz[kThreads * VEC], s_dzx[kThreads * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = (int64_t(blockIdx.x) * kWarp + tx) * VEC;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_part;
  const int64_t r1 = min(rows, r0 + rows_per_part);
  const bool active = c < C;
  float mean[VEC], rstd[VEC], g[VEC], b[VEC], sdz[VEC], sdzx[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sdz[i] = sdzx[i] = 0.f;
    if (active) ch.at(c + i, mean[i], rstd[i], g[i], b[i]);
  }
  if (active) {
    for (int64_t r = r0 + ty; r < r1; r += kRowsTY) {
      const int64_t o = r * C + c;
      float x[VEC], dy[VEC], res[VEC];
      load_vec<VEC>(X + o, x);
      load_vec<VEC>(dY + o, dy);
#pragma unroll
      for (int i = 0; i < VEC; ++i) res[i] = 0.f;
      if (R != nullptr) load_vec<VEC>(R + o, res);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xhat = (x[i] - mean[i]) * rstd[i];
        const float dz = grad_pre_act(dy[i], xhat, g[i], b[i], res[i], act, slope);
        sdz[i] += dz;
        sdzx[i] += dz * xhat;
      }
    }
  }
  const int slot = ty * kWarp + tx;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_dz[slot * VEC + i] = sdz[i];
    s_dzx[slot * VEC + i] = sdzx[i];
  }
  __syncthreads();
  if (ty != 0 || !active) return;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float a = sdz[i], q = sdzx[i];
    for (int k = 1; k < kRowsTY; ++k) {
      a += s_dz[(k * kWarp + tx) * VEC + i];
      q += s_dzx[(k * kWarp + tx) * VEC + i];
    }
    part_dz[blockIdx.y * C + c + i] = a;
    part_dzx[blockIdx.y * C + c + i] = q;
  }
}

// Y = act((x - mean)·(gamma·rstd) + beta + R); rows blockIdx.y·kRowsTY + ty, grid-strided.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    rows_apply_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ R,
                      scalar_t* __restrict__ Y, int64_t rows, int64_t C, Channels ch, int64_t act,
                      float slope) {
  const int64_t c = (int64_t(blockIdx.x) * kWarp + threadIdx.x) * VEC;
  if (c >= C) return;
  float mean[VEC], scale[VEC], beta[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float rstd, g;
    ch.at(c + i, mean[i], rstd, g, beta[i]);
    scale[i] = g * rstd;
  }
  for (int64_t r = int64_t(blockIdx.y) * kRowsTY + threadIdx.y; r < rows; r += int64_t(gridDim.y) * kRowsTY) {
    const int64_t o = r * C + c;
    float x[VEC], res[VEC], y[VEC];
    load_vec<VEC>(X + o, x);
    if (R != nullptr) load_vec<VEC>(R + o, res);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float z = (x[i] - mean[i]) * scale[i] + beta[i];
      if (R != nullptr) z += res[i];
      y[i] = act_forward(z, act, slope);
    }
    store_vec<VEC>(Y + o, y);
  }
}

// dX = a·dz + b·x̂ + c and dR = dz (either may be null), rows grid-strided as in rows_apply_kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    rows_grad_input_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                           const scalar_t* __restrict__ R, int64_t rows, int64_t C, Channels ch, GradSums gs,
                           int64_t act, float slope, scalar_t* __restrict__ dX, scalar_t* __restrict__ dR) {
  const int64_t c = (int64_t(blockIdx.x) * kWarp + threadIdx.x) * VEC;
  if (c >= C) return;
  float mean[VEC], rstd[VEC], g[VEC], b[VEC], ka[VEC], kb[VEC], kc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    ch.at(c + i, mean[i], rstd[i], g[i], b[i]);
    ka[i] = g[i] * rstd[i];
    kb[i] = gs.sum_dzx != nullptr ? -ka[i] * gs.sum_dzx[c + i] * gs.inv_count : 0.f;
    kc[i] = gs.sum_dz != nullptr ? -ka[i] * gs.sum_dz[c + i] * gs.inv_count : 0.f;
  }
  for (int64_t r = int64_t(blockIdx.y) * kRowsTY + threadIdx.y; r < rows; r += int64_t(gridDim.y) * kRowsTY) {
    const int64_t o = r * C + c;
    float x[VEC], dy[VEC], res[VEC], dz[VEC], dx[VEC];
    load_vec<VEC>(X + o, x);
    load_vec<VEC>(dY + o, dy);
#pragma unroll
    for (int i = 0; i < VEC; ++i) res[i] = 0.f;
    if (R != nullptr) load_vec<VEC>(R + o, res);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xhat = (x[i] - mean[i]) * rstd[i];
      dz[i] = grad_pre_act(dy[i], xhat, g[i], b[i], res[i], act, slope);
      dx[i] = ka[i] * dz[i] + kb[i] * xhat + kc[i];
    }
    if (dR != nullptr) store_vec<VEC>(dR + o, dz);
    if (dX != nullptr) store_vec<VEC>(dX + o, dx);
  }
}

// ---------------------------------------------------------------------------- planes view kernels
// X is N x C x HxW. Each (n, c) plane is cut into S tiles of blockDim.x * VEC elements (VEC > 1
// only when HxW % VEC == 0); thread tx reads the VEC elements at tx * VEC of a tile, thread row ty
// takes every blockDim.y-th tile. blockDim.x is a power of two, blockDim.x * blockDim.y = kThreads.

// Partial moments of channel c = blockIdx.x over its partition p = blockIdx.y of tiles t = n * S + s,
// [p * tiles_per_part, ...). Welford on x - K (K the partition's first element), merged over the
// lanes, then over the block in a fixed tree; writes [p * C + c] and counts[p].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    planes_moments_kernel(const scalar_t* __restrict__ X, int64_t C, int64_t HxW, int64_t S, int64_t tiles,
                          int64_t tiles_per_part, float* __restrict__ means, float* __restrict__ m2s,
                          float* __restrict__ counts) {
  const int64_t c = blockIdx.x;
  const int64_t tile_len = int64_t(blockDim.x) * VEC;
  const int64_t t0 = int64_t(blockIdx.y) * tiles_per_part;
  const int64_t t1 = min(tiles, t0 + tiles_per_part);
  const int64_t n0 = div_idx(t0, S);
  const float shift = static_cast<float>(X[(n0 * C + c) * HxW + (t0 - n0 * S) * tile_len]);
  float mean[VEC], m2[VEC];
  float n = 0.f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) mean[i] = m2[i] = 0.f;
  for (int64_t t = t0 + threadIdx.y; t < t1; t += blockDim.y) {
    const int64_t nn = div_idx(t, S);
    const int64_t hw = (t - nn * S) * tile_len + threadIdx.x * VEC;
    if (hw >= HxW) continue;
    float v[VEC];
    load_vec<VEC>(X + (nn * C + c) * HxW + hw, v);
    n += 1.f;
    const float inv = __frcp_rn(n);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = (v[i] - shift) - mean[i];
      mean[i] += d * inv;
      m2[i] += d * ((v[i] - shift) - mean[i]);
    }
  }
  WelfordF w{mean[0], m2[0], n};
#pragma unroll
  for (int i = 1; i < VEC; ++i) w = welford_merge(w, WelfordF{mean[i], m2[i], n});
  w = block_welford(w);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    means[blockIdx.y * C + c] = shift + w.mean;
    m2s[blockIdx.y * C + c] = w.m2;
    if (c == 0) counts[blockIdx.y] = w.n;
  }
}

// Partial backward sums Σdz and Σdz·x̂ of channel c = blockIdx.x over partition p = blockIdx.y.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    planes_grad_sums_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                            const scalar_t* __restrict__ R, int64_t C, int64_t HxW, int64_t S, int64_t tiles,
                            int64_t tiles_per_part, Channels ch, int64_t act, float slope,
                            float* __restrict__ part_dz, float* __restrict__ part_dzx) {
  const int64_t c = blockIdx.x;
  const int64_t tile_len = int64_t(blockDim.x) * VEC;
  const int64_t t0 = int64_t(blockIdx.y) * tiles_per_part;
  const int64_t t1 = min(tiles, t0 + tiles_per_part);
  float mean, rstd, g, b;
  ch.at(c, mean, rstd, g, b);
  float sdz = 0.f, sdzx = 0.f;
  for (int64_t t = t0 + threadIdx.y; t < t1; t += blockDim.y) {
    const int64_t nn = div_idx(t, S);
    const int64_t hw = (t - nn * S) * tile_len + threadIdx.x * VEC;
    if (hw >= HxW) continue;
    const int64_t o = (nn * C + c) * HxW + hw;
    float x[VEC], dy[VEC], res[VEC];
    load_vec<VEC>(X + o, x);
    load_vec<VEC>(dY + o, dy);
#pragma unroll
    for (int i = 0; i < VEC; ++i) res[i] = 0.f;
    if (R != nullptr) load_vec<VEC>(R + o, res);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xhat = (x[i] - mean) * rstd;
      const float dz = grad_pre_act(dy[i], xhat, g, b, res[i], act, slope);
      sdz += dz;
      sdzx += dz * xhat;
    }
  }
  block_sum2(sdz, sdzx);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    part_dz[blockIdx.y * C + c] = sdz;
    part_dzx[blockIdx.y * C + c] = sdzx;
  }
}

// Elementwise over all N·C·S tiles t (plane nc = t / S, channel nc % C), grid-strided:
// Y = act((x - mean)·(gamma·rstd) + beta + R).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    planes_apply_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ R,
                        scalar_t* __restrict__ Y, int64_t C, int64_t HxW, int64_t S, int64_t tiles,
                        Channels ch, int64_t act, float slope) {
  const int64_t tile_len = int64_t(blockDim.x) * VEC;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < tiles;
       t += int64_t(gridDim.x) * blockDim.y) {
    const int64_t nc = div_idx(t, S);
    const int64_t hw = (t - nc * S) * tile_len + threadIdx.x * VEC;
    if (hw >= HxW) continue;
    float mean, rstd, g, b;
    ch.at(nc - div_idx(nc, C) * C, mean, rstd, g, b);
    const float scale = g * rstd;
    const int64_t o = nc * HxW + hw;
    float x[VEC], res[VEC], y[VEC];
    load_vec<VEC>(X + o, x);
    if (R != nullptr) load_vec<VEC>(R + o, res);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float z = (x[i] - mean) * scale + b;
      if (R != nullptr) z += res[i];
      y[i] = act_forward(z, act, slope);
    }
    store_vec<VEC>(Y + o, y);
  }
}

// dX = a·dz + b·x̂ + c and dR = dz over all tiles, as planes_apply_kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    planes_grad_input_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                             const scalar_t* __restrict__ R, int64_t C, int64_t HxW, int64_t S, int64_t tiles,
                             Channels ch, GradSums gs, int64_t act, float slope, scalar_t* __restrict__ dX,
                             scalar_t* __restrict__ dR) {
  const int64_t tile_len = int64_t(blockDim.x) * VEC;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < tiles;
       t += int64_t(gridDim.x) * blockDim.y) {
    const int64_t nc = div_idx(t, S);
    const int64_t hw = (t - nc * S) * tile_len + threadIdx.x * VEC;
    if (hw >= HxW) continue;
    const int64_t c = nc - div_idx(nc, C) * C;
    float mean, rstd, g, b;
    ch.at(c, mean, rstd, g, b);
    const float ka = g * rstd;
    const float kb = gs.sum_dzx != nullptr ? -ka * gs.sum_dzx[c] * gs.inv_count : 0.f;
    const float kc = gs.sum_dz != nullptr ? -ka * gs.sum_dz[c] * gs.inv_count : 0.f;
    const int64_t o = nc * HxW + hw;
    float x[VEC], dy[VEC], res[VEC], dz[VEC], dx[VEC];
    load_vec<VEC>(X + o, x);
    load_vec<VEC>(dY + o, dy);
#pragma unroll
    for (int i = 0; i < VEC; ++i) res[i] = 0.f;
    if (R != nullptr) load_vec<VEC>(R + o, res);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xhat = (x[i] - mean) * rstd;
      dz[i] = grad_pre_act(dy[i], xhat, g, b, res[i], act, slope);
      dx[i] = ka * dz[i] + kb * xhat + kc;
    }
    if (dR != nullptr) store_vec<VEC>(dR + o, dz);
    if (dX != nullptr) store_vec<VEC>(dX + o, dx);
  }
}

// ------------------------------------------------------------------------------ finalize kernels
// One warp per channel c = blockIdx.x * 8 + warp: lane l takes parts l, l + 32, ... in order, then
// the lanes are merged in a fixed shuffle tree. Merges run in double: the parts' means can be far
// apart relative to the spread, and this is K·C work, not numel.

enum FinalizeMode : int { kOutRstd = 0, kOutVar = 1, kOutM2 = 2 };

// Merges K partial moments (counts[k], means/m2s[k * C + c]) into out_mean and, by mode, rstd =
// 1/sqrt(var + eps), the biased variance, or M2; moves the running statistics (any strides) toward
// the mean and the unbiased variance unless the total count is 0.
template <typename R>
__global__ void __launch_bounds__(kThreads)
    finalize_moments_kernel(const float* __restrict__ counts, const float* __restrict__ means,
                            const float* __restrict__ m2s, int64_t K, int64_t C, int mode, double eps,
                            double momentum, float* __restrict__ out_mean, float* __restrict__ out_second,
                            R* running_mean, int64_t rm_stride, R* running_var, int64_t rv_stride) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = int64_t(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if (c >= C) return;  // warp-uniform: every lane of a warp has the same c
  WelfordD w{0.0, 0.0, 0.0};
  for (int64_t k = lane; k < K; k += kWarp) {
    w = welford_merge(w, WelfordD{double(means[k * C + c]), double(m2s[k * C + c]), double(counts[k])});
  }
  w = warp_welford(w);
  if (lane != 0) return;
  const double var = w.m2 / w.n;
  out_mean[c] = float(w.mean);
  out_second[c] = float(mode == kOutRstd ? 1.0 / sqrt(var + eps) : mode == kOutVar ? var : w.m2);
  if (w.n == 0.0) return;
  if (running_mean != nullptr) {
    R& r = running_mean[c * rm_stride];
    r = R((1.0 - momentum) * double(r) + momentum * w.mean);
  }
  if (running_var != nullptr) {
    R& r = running_var[c * rv_stride];
    r = R((1.0 - momentum) * double(r) + momentum * (w.m2 / (w.n - 1.0)));
  }
}

// Sums K partial backward sums per channel (same warp layout and order as finalize_moments_kernel).
__global__ void __launch_bounds__(kThreads)
    finalize_sums_kernel(const float* __restrict__ part_dz, const float* __restrict__ part_dzx, int64_t K,
                         int64_t C, float* __restrict__ sum_dz, float* __restrict__ sum_dzx) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = int64_t(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if (c >= C) return;
  float a = 0.f, b = 0.f;
  for (int64_t k = lane; k < K; k += kWarp) {
    a += part_dz[k * C + c];
    b += part_dzx[k * C + c];
  }
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sum_dz[c] = a;
    sum_dzx[c] = b;
  }
}

// ----------------------------------------------------------------------------------- host side

// Launch geometry of the reduction kernels over a BatchNorm input; `parts` partials per channel.
struct Plan {
  bool rows_view;
  int64_t N, C, HxW, rows;  // rows = N * HxW (rows view)
  int vec;
  // rows view
  int64_t rows_per_part;
  // planes view
  int tx, ty;
  int64_t S, tiles, tiles_per_part;
  int64_t parts;
};

// VEC for 16-byte accesses when every pointer is 16-byte aligned and `extent` (the contiguous run:
// C for rows, HxW for planes) is a multiple of it; else 1.
template <typename scalar_t>
int vec_width(std::initializer_list<const void*> ptrs, int64_t extent) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (extent % kVec != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return kVec;
}

Plan make_plan(const BatchNormArgs& a, int vec) {
  Plan p{};
  p.rows_view = a.rows_view;
  p.N = a.dims.N;
  p.C = a.dims.C;
  p.HxW = a.dims.HxW;
  p.rows = p.N * p.HxW;
  p.vec = vec;
  if (p.rows_view) {
    const int64_t blocks_x = div_up(p.C, int64_t(kWarp) * vec);
    // At least 4 rows per thread row, so a partition is worth its merge.
    const int64_t parts =
        std::clamp<int64_t>(div_up(kReduceBlocks, blocks_x), 1, div_up(p.rows, kRowsTY * 4));
    p.rows_per_part = div_up(p.rows, parts);
    p.parts = div_up(p.rows, p.rows_per_part);  // no empty partition
  } else {
    p.tx = int(std::min<int64_t>(kThreads, pow2_at_least(div_up(p.HxW, vec))));
    p.tx = std::max(p.tx, 1);
    p.ty = kThreads / p.tx;
    p.S = div_up(p.HxW, int64_t(p.tx) * vec);
    p.tiles = p.N * p.S;
    const int64_t parts =
        std::clamp<int64_t>(div_up(kReduceBlocks, p.C), 1, div_up(p.tiles, int64_t(p.ty) * 4));
    p.tiles_per_part = div_up(p.tiles, parts);
    p.parts = div_up(p.tiles, p.tiles_per_part);
  }
  return p;
}

Channels channels_of(const Tensor& mean, const Tensor& second, bool second_is_var, double eps,
                     const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta) {
  return Channels{mean.const_data_ptr<float>(),
                  second.const_data_ptr<float>(),
                  second_is_var,
                  float(eps),
                  gamma ? gamma->const_data_ptr<float>() : nullptr,
                  beta ? beta->const_data_ptr<float>() : nullptr};
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const c10::optional<Tensor>& t) {
  return t ? t->const_data_ptr<scalar_t>() : nullptr;
}

// Partial moments of X: means/m2s (parts x C) and counts (parts,) in one float buffer.
template <typename scalar_t>
void launch_moments(const BatchNormArgs& a, const Plan& p, float* means, float* m2s, float* counts) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* X = a.X.const_data_ptr<scalar_t>();
  const auto run = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    if (p.rows_view) {
      const dim3 grid(unsigned(div_up(p.C, int64_t(kWarp) * VEC)), unsigned(p.parts));
      rows_moments_kernel<scalar_t, VEC>
          <<<grid, dim3(kWarp, kRowsTY), 0, stream>>>(X, p.rows, p.C, p.rows_per_part, means, m2s, counts);
    } else {
      const dim3 grid(unsigned(p.C), unsigned(p.parts));
      planes_moments_kernel<scalar_t, VEC><<<grid, dim3(p.tx, p.ty), 0, stream>>>(
          X, p.C, p.HxW, p.S, p.tiles, p.tiles_per_part, means, m2s, counts);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (p.vec > 1) {
    run(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

// Merges K partial moments into (mean, second) by mode, updating the running statistics.
void launch_finalize(const float* counts, const float* means, const float* m2s, int64_t K, int64_t C,
                     int mode, double eps, double momentum, Tensor& mean, Tensor& second,
                     const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto rtype =
      running_mean ? running_mean->scalar_type() : (running_var ? running_var->scalar_type() : at::kFloat);
  const dim3 grid(unsigned(div_up(C, kThreads / kWarp)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rtype, "batch_norm_finalize", [&] {
    scalar_t* rm = running_mean ? running_mean->data_ptr<scalar_t>() : nullptr;
    scalar_t* rv = running_var ? running_var->data_ptr<scalar_t>() : nullptr;
    finalize_moments_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        counts, means, m2s, K, C, mode, eps, momentum, mean.data_ptr<float>(), second.data_ptr<float>(), rm,
        running_mean ? running_mean->stride(0) : 0, rv, running_var ? running_var->stride(0) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_apply(const BatchNormArgs& a, const Channels& ch, int64_t act, double slope, Tensor& Y) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* X = a.X.const_data_ptr<scalar_t>();
  const scalar_t* R = ptr_or_null<scalar_t>(a.residual);
  scalar_t* out = Y.data_ptr<scalar_t>();
  const int64_t extent = a.rows_view ? a.dims.C : a.dims.HxW;
  const Plan p = make_plan(a, vec_width<scalar_t>({X, R, out}, extent));
  const auto run = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    if (p.rows_view) {
      const int64_t bx = div_up(p.C, int64_t(kWarp) * VEC);
      const int64_t by =
          std::clamp<int64_t>(div_up(kApplyBlocks, bx), 1, std::min<int64_t>(65535, div_up(p.rows, kRowsTY)));
      rows_apply_kernel<scalar_t, VEC><<<dim3(unsigned(bx), unsigned(by)), dim3(kWarp, kRowsTY), 0, stream>>>(
          X, R, out, p.rows, p.C, ch, act, float(slope));
    } else {
      const int64_t tiles = p.N * p.C * p.S;
      const int64_t bx = std::clamp<int64_t>(div_up(tiles, p.ty), 1, kApplyBlocks * 8);
      planes_apply_kernel<scalar_t, VEC><<<unsigned(bx), dim3(p.tx, p.ty), 0, stream>>>(
          X, R, out, p.C, p.HxW, p.S, tiles, ch, act, float(slope));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (p.vec > 1) {
    run(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_fwd_cuda(
    const Tensor& X_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    const c10::optional<Tensor>& residual, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, double momentum, double eps, int64_t act, double slope) {
  constexpr const char* op = "batch_norm_fwd";
  const c10::cuda::CUDAGuard guard(X_in.device());
  const auto a = check_batch_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  check_running_stats(running_mean, running_var, a.X, C, op);
  Tensor Y = at::empty_like(a.X);
  const auto f32 = a.X.options().dtype(at::kFloat);
  Tensor mean = at::empty({C}, f32);
  Tensor rstd = at::empty({C}, f32);
  if (a.X.numel() == 0) {
    mean.fill_(std::nan(""));
    rstd.fill_(std::nan(""));
    return {Y, mean, rstd};
  }
  NORMEXT_DISPATCH_CUDA(a.X.scalar_type(), "batch_norm_fwd_cuda", [&] {
    const int64_t extent = a.rows_view ? C : a.dims.HxW;
    const Plan p = make_plan(a, vec_width<scalar_t>({a.X.const_data_ptr()}, extent));
    Tensor work = at::empty({p.parts * (2 * C + 1)}, f32);
    float* means = work.data_ptr<float>();
    launch_moments<scalar_t>(a, p, means, means + p.parts * C, means + 2 * p.parts * C);
    launch_finalize(means + 2 * p.parts * C, means, means + p.parts * C, p.parts, C, kOutRstd, eps, momentum,
                    mean, rstd, running_mean, running_var);
    launch_apply<scalar_t>(a, channels_of(mean, rstd, false, eps, a.gamma, a.beta), act, slope, Y);
  });
  return {Y, mean, rstd};
}

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& X_in) {
  const c10::cuda::CUDAGuard guard(X_in.device());
  const auto a =
      check_batch_norm(X_in, c10::nullopt, c10::nullopt, c10::nullopt, kIdentity, "batch_norm_stats");
  const int64_t C = a.dims.C;
  const auto f32 = a.X.options().dtype(at::kFloat);
  if (a.X.numel() == 0) return {at::zeros({C}, f32), at::zeros({C}, f32)};
  Tensor mean = at::empty({C}, f32);
  Tensor m2 = at::empty({C}, f32);
  NORMEXT_DISPATCH_CUDA(a.X.scalar_type(), "batch_norm_stats_cuda", [&] {
    const int64_t extent = a.rows_view ? C : a.dims.HxW;
    const Plan p = make_plan(a, vec_width<scalar_t>({a.X.const_data_ptr()}, extent));
    Tensor work = at::empty({p.parts * (2 * C + 1)}, f32);
    float* means = work.data_ptr<float>();
    launch_moments<scalar_t>(a, p, means, means + p.parts * C, means + 2 * p.parts * C);
    launch_finalize(means + 2 * p.parts * C, means, means + p.parts * C, p.parts, C, kOutM2, 0.0, 0.0, mean,
                    m2, c10::nullopt, c10::nullopt);
  });
  return {mean, m2};
}

std::tuple<Tensor, Tensor> batch_norm_merge_cuda(const Tensor& counts_in, const Tensor& means_in,
                                                 const Tensor& m2s_in,
                                                 const c10::optional<Tensor>& running_mean,
                                                 const c10::optional<Tensor>& running_var, double momentum,
                                                 double eps) {
  constexpr const char* op = "batch_norm_merge";
  const c10::cuda::CUDAGuard guard(means_in.device());
  TORCH_CHECK(means_in.dim() == 2 && m2s_in.sizes() == means_in.sizes(), op,
              ": expected means and m2s of the same shape (K, C), got ", means_in.sizes(), " and ",
              m2s_in.sizes());
  TORCH_CHECK(means_in.scalar_type() == at::kFloat, op, ": expected float32 statistics on CUDA, got ",
              means_in.scalar_type());
  const int64_t K = means_in.size(0), C = means_in.size(1);
  const Tensor means = check_stats(means_in, means_in, K * C, "means", op);
  const Tensor m2s = check_stats(m2s_in, means_in, K * C, "m2s", op);
  const Tensor counts = check_stats(counts_in, means_in, K, "counts", op);
  check_running_stats(running_mean, running_var, means, C, op);
  Tensor mean = at::empty({C}, means.options());
  Tensor var = at::empty({C}, means.options());
  if (C == 0) return {mean, var};
  launch_finalize(counts.const_data_ptr<float>(), means.const_data_ptr<float>(), m2s.const_data_ptr<float>(),
                  K, C, kOutVar, eps, momentum, mean, var, running_mean, running_var);
  return {mean, var};
}

Tensor batch_norm_apply_cuda(const Tensor& X_in, const Tensor& mean_in, const Tensor& var_in,
                             const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
                             const c10::optional<Tensor>& residual, double eps, int64_t act, double slope) {
  constexpr const char* op = "batch_norm_apply";
  const c10::cuda::CUDAGuard guard(X_in.device());
  const auto a = check_batch_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  const Tensor mean = *check_param(mean_in, a.X, C, "mean", op);
  const Tensor var = *check_param(var_in, a.X, C, "var", op);
  Tensor Y = at::empty_like(a.X);
  if (a.X.numel() == 0) return Y;
  NORMEXT_DISPATCH_CUDA(a.X.scalar_type(), "batch_norm_apply_cuda", [&] {
    launch_apply<scalar_t>(a, channels_of(mean, var, true, eps, a.gamma, a.beta), act, slope, Y);
  });
  return Y;
}

std::tuple<Tensor, Tensor> batch_norm_bwd_reduce_cuda(const Tensor& dY_in, const Tensor& X_in,
                                                      const c10::optional<Tensor>& residual,
                                                      const Tensor& mean_in, const Tensor& rstd_in,
                                                      const c10::optional<Tensor>& gamma,
                                                      const c10::optional<Tensor>& beta, int64_t act,
                                                      double slope) {
  constexpr const char* op = "batch_norm_bwd_reduce";
  const c10::cuda::CUDAGuard guard(X_in.device());
  const auto a = check_batch_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = check_stats(mean_in, a.X, C, "mean", op);
  const Tensor rstd = check_stats(rstd_in, a.X, C, "rstd", op);
  const auto f32 = a.X.options().dtype(at::kFloat);
  if (a.X.numel() == 0) return {at::zeros({C}, f32), at::zeros({C}, f32)};
  Tensor sum_dz = at::empty({C}, f32);
  Tensor sum_dzx = at::empty({C}, f32);
  NORMEXT_DISPATCH_CUDA(a.X.scalar_type(), "batch_norm_bwd_reduce_cuda", [&] {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const scalar_t* X = a.X.const_data_ptr<scalar_t>();
    const scalar_t* dy = dY.const_data_ptr<scalar_t>();
    const scalar_t* R = ptr_or_null<scalar_t>(a.residual);
    const int64_t extent = a.rows_view ? C : a.dims.HxW;
    const Plan p = make_plan(a, vec_width<scalar_t>({X, dy, R}, extent));
    Tensor work = at::empty({2 * p.parts * C}, f32);
    float* part_dz = work.data_ptr<float>();
    float* part_dzx = part_dz + p.parts * C;
    const Channels ch = channels_of(mean, rstd, false, 0.0, a.gamma, a.beta);
    const auto run = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      if (p.rows_view) {
        const dim3 grid(unsigned(div_up(C, int64_t(kWarp) * VEC)), unsigned(p.parts));
        rows_grad_sums_kernel<scalar_t, VEC><<<grid, dim3(kWarp, kRowsTY), 0, stream>>>(
            dy, X, R, p.rows, C, p.rows_per_part, ch, act, float(slope), part_dz, part_dzx);
      } else {
        const dim3 grid(unsigned(C), unsigned(p.parts));
        planes_grad_sums_kernel<scalar_t, VEC><<<grid, dim3(p.tx, p.ty), 0, stream>>>(
            dy, X, R, C, p.HxW, p.S, p.tiles, p.tiles_per_part, ch, act, float(slope), part_dz, part_dzx);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (p.vec > 1) {
      run(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
    finalize_sums_kernel<<<unsigned(div_up(C, kThreads / kWarp)), kThreads, 0, stream>>>(
        part_dz, part_dzx, p.parts, C, sum_dz.data_ptr<float>(), sum_dzx.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dz, sum_dzx};
}

std::tuple<Tensor, Tensor> batch_norm_bwd_elemt_cuda(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    const c10::optional<Tensor>& sum_dz_in, const c10::optional<Tensor>& sum_dzx_in, double inv_count,
    int64_t act, double slope, std::array<bool, 2> mask) {
  constexpr const char* op = "batch_norm_bwd_elemt";
  const c10::cuda::CUDAGuard guard(X_in.device());
  const auto a = check_batch_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = check_stats(mean_in, a.X, C, "mean", op);
  const Tensor rstd = check_stats(rstd_in, a.X, C, "rstd", op);
  const bool has_sums = sum_dz_in.has_value() && sum_dz_in->defined();
  TORCH_CHECK(has_sums == (sum_dzx_in.has_value() && sum_dzx_in->defined()), op,
              ": sum_dz and sum_dzxhat must be given together");
  const Tensor sum_dz = has_sums ? check_stats(*sum_dz_in, a.X, C, "sum_dz", op) : Tensor();
  const Tensor sum_dzx = has_sums ? check_stats(*sum_dzx_in, a.X, C, "sum_dzxhat", op) : Tensor();
  Tensor dX = mask[0] ? at::empty_like(a.X) : at::empty({0}, a.X.options());
  Tensor dR = mask[1] ? at::empty_like(a.X) : at::empty({0}, a.X.options());
  if (a.X.numel() == 0 || (!mask[0] && !mask[1])) return {dX, dR};
  NORMEXT_DISPATCH_CUDA(a.X.scalar_type(), "batch_norm_bwd_elemt_cuda", [&] {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const scalar_t* X = a.X.const_data_ptr<scalar_t>();
    const scalar_t* dy = dY.const_data_ptr<scalar_t>();
    const scalar_t* R = ptr_or_null<scalar_t>(a.residual);
    scalar_t* dx = mask[0] ? dX.data_ptr<scalar_t>() : nullptr;
    scalar_t* dr = mask[1] ? dR.data_ptr<scalar_t>() : nullptr;
    const int64_t extent = a.rows_view ? C : a.dims.HxW;
    const Plan p = make_plan(a, vec_width<scalar_t>({X, dy, R, dx, dr}, extent));
    const Channels ch = channels_of(mean, rstd, false, 0.0, a.gamma, a.beta);
    const GradSums gs{has_sums ? sum_dz.const_data_ptr<float>() : nullptr,
                      has_sums ? sum_dzx.const_data_ptr<float>() : nullptr, float(inv_count)};
    const auto run = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      if (p.rows_view) {
        const int64_t bx = div_up(C, int64_t(kWarp) * VEC);
        const int64_t by = std::clamp<int64_t>(div_up(kApplyBlocks, bx), 1,
                                               std::min<int64_t>(65535, div_up(p.rows, kRowsTY)));
        rows_grad_input_kernel<scalar_t, VEC>
            <<<dim3(unsigned(bx), unsigned(by)), dim3(kWarp, kRowsTY), 0, stream>>>(
                dy, X, R, p.rows, C, ch, gs, act, float(slope), dx, dr);
      } else {
        const int64_t tiles = p.N * C * p.S;
        const int64_t bx = std::clamp<int64_t>(div_up(tiles, p.ty), 1, kApplyBlocks * 8);
        planes_grad_input_kernel<scalar_t, VEC><<<unsigned(bx), dim3(p.tx, p.ty), 0, stream>>>(
            dy, X, R, C, p.HxW, p.S, tiles, ch, gs, act, float(slope), dx, dr);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (p.vec > 1) {
      run(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  return {dX, dR};
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CUDA, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_merge", &batch_norm_merge_cuda);
  m.impl("batch_norm_apply", &batch_norm_apply_cuda);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cuda);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt_cuda);
}

}  // namespace normext::cuda
