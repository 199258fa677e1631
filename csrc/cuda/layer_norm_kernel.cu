// LayerNorm and LayerNorm2d on CUDA: the layer_norm[_2d]_fwd/bwd ops registered at the CUDA key.
// Rows (LayerNorm; LayerNorm2d in channels-last) pick their kernel by row length: a group of up to 32
// lanes of a warp per row, or a whole block per row, with the row held in registers (two exact passes
// over the registers for the statistics); only rows too long for that take two passes over memory.
// LayerNorm2d in NCHW reduces over C with threads along the contiguous positions. dgamma/dbeta are
// per-block partial rows summed by a second kernel in a fixed order (no atomics: deterministic).
// RMSNorm is the same kernels without the centring: a null mean (not written in the forward, 0 in the
// backward) selects it, with rstd of the mean square (norm_var) and no beta. add_*_norm's residual stream
// (s = x + a, written to S and normalized) is an option of the row forward kernels.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "normext/checks.h"
#include "normext/math.h"

namespace normext::cuda {
namespace {

using at::Tensor;

// Elements of a row one thread keeps in registers (kCap / VEC vectors) in the forward; the backward holds
// x, dz and the dgamma/dbeta partials of kBwdCap elements each (4·kBwdCap floats), which with kBwdCap = 32
// took up to 246 registers: half of it keeps every backward row kernel within 128 registers.
constexpr int kCap = 32;
constexpr int kBwdCap = 16;
// The forward's kCap for one instantiation: 24 in the block-per-row kernel with 8-byte float vectors, where
// 32 took 128 registers and spilled 12 bytes (tools/cuda_report.py); those rows get more threads instead.
// (24 for scalar access as well spilled 4-8 bytes there, where 32 does not.)
template <typename scalar_t, int VEC, bool kBlock>
constexpr int fwd_cap() {
  return kBlock && VEC == 2 && sizeof(scalar_t) == 4 ? 24 : kCap;
}
// Block size of the kernels where a warp or part of one owns a row (several rows per block).
constexpr int kGroupThreads = 128;
// Block-per-row limits (rows up to 16384 / 8192 elements).
constexpr int kMaxFwdRowThreads = 512;
constexpr int kMaxBwdRowThreads = 512;
constexpr int kLongRowThreads = 256;
// The register-held row kernels state their minimum blocks per SM, a budget of 128 registers: given the
// block size alone, ptxas held some to 64 / 80 registers and spilled a few (tools/cuda_report.py). Holding a
// row in registers (one read of x, and of dy) costs them occupancy: 25-44% on sm_90. The long-row backward
// streams its row twice and is bounded to kLongBwdBlocks blocks, 64 registers a thread: 50% on sm_90,
// without spills (8-wide vectors took 87 registers, 25%, under the 128 of 2 blocks).
constexpr int kLongBwdBlocks = 4;
constexpr int64_t kMaxGrid = 1 << 30;
constexpr int k2dThreads = 256;

int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// Grid of the backward row kernels, whose blocks each write one partial row of dgamma/dbeta: `units` blocks
// (one per row or row group) up to a cap that fills an H100 or H200 (132 SMs) a few times over, lower for
// long rows so that the partials stay within kPartialElems floats. A function of the shape alone, never of
// the SM count or the occupancy API, so that the summation order, and every bit of dgamma/dbeta, is the same
// on every GPU (an H100, an A100, a MIG slice).
constexpr int64_t kMaxBwdBlocks = 512;
constexpr int64_t kMinBwdBlocks = 132;
constexpr int64_t kPartialElems = int64_t(1) << 20;

int64_t bwd_blocks(int64_t units, int D) {
  return std::min(units, std::clamp<int64_t>(kPartialElems / D, kMinBwdBlocks, kMaxBwdBlocks));
}

// ------------------------------------------------------------------------------------ device helpers

// p[j .. j + VEC) of a float parameter (j a multiple of VEC), or `fill` when the parameter is absent. One
// vector load when p is aligned to VEC floats, else VEC scalar loads: gamma / beta may be views at any offset
// into a flat parameter buffer, read as they are instead of copied (the branch is uniform over the grid).
template <int VEC>
__device__ __forceinline__ void load_param(const float* p, int64_t j, float (&out)[VEC], float fill) {
  if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (sizeof(float) * VEC) == 0) {
    load_float<VEC>(p, j, out);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = p != nullptr ? p[j + k] : fill;
  }
}

// Sum of v over a row's thread group, returned to every thread of the group: W <= 32 lanes aligned
// within the warp (group_allsum), or the whole block (kBlock; block_allreduce with `red`, one slot per
// warp, free again on return). Every thread of the block must call it.
template <bool kBlock, typename T>
__device__ __forceinline__ T row_allsum(T v, int W, T* red) {
  if constexpr (kBlock) {
    return block_allreduce(v, SumOp{}, red, blockDim.x / kWarpSize);
  } else {
    return group_allsum(v, W);
  }
}

// A row's first value x[off] (+ a[off] with add_*_norm): the shift of the statistics' sums.
template <typename scalar_t, typename res_t>
__device__ __forceinline__ float first_value(const scalar_t* X, const res_t* A, int64_t off) {
  return static_cast<float>(X[off]) + (A != nullptr ? static_cast<float>(A[off]) : 0.f);
}

// The corrected second pass of a long row's statistics (as the CPU path's deviation_sums): Σe and Σe² of
// e = x − m over one vector, added to acc. m is the mean from sums shifted by the row's first value, which
// can be far from the mean: Σe is what rounding left out of m, and correct_moments adds it back.
template <int VEC>
__device__ __forceinline__ void add_deviations(const float (&x)[VEC], float m, Sum2& acc) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float e = x[k] - m;
    acc.a += e;
    acc.b += e * e;
  }
}

// mean = m + Σe/D and var = (Σe² − (Σe)²/D)/D from the row's total t of add_deviations.
__device__ __forceinline__ void correct_moments(float m, Sum2 t, float inv_d, float& mean, float& var) {
  mean = m + t.a * inv_d;
  var = fmaxf(0.f, (t.b - t.a * t.a * inv_d) * inv_d);
}

// add_*_norm: x += a (in float32), rounded to res_t and stored to S; x keeps the rounded value, so the
// row is normalized from exactly what S holds.
template <int VEC, typename res_t>
__device__ __forceinline__ void add_stream(const res_t* __restrict__ A, res_t* __restrict__ S, int64_t i,
                                           float (&x)[VEC]) {
  float a[VEC];
  load_float<VEC>(A, i, a);
#pragma unroll
  for (int k = 0; k < VEC; ++k) x[k] = static_cast<float>(static_cast<res_t>(x[k] + a[k]));
  store_float<VEC>(S, i, x);
}

// y = act((x − mean)·(rstd·gamma) + beta + r) for one vector.
template <int VEC>
__device__ __forceinline__ void apply_vec(const float (&x)[VEC], float mean, float rstd,
                                          const float (&g)[VEC], const float (&b)[VEC], const float (&r)[VEC],
                                          int act, float slope, float (&y)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) y[k] = act_forward((x[k] - mean) * (rstd * g[k]) + b[k] + r[k], act, slope);
}

// --------------------------------------------------------------------------------------- row kernels

// Forward over M rows of D = nvec·VEC elements, each row held in registers. A group of W threads owns a
// row: W ≤ 32 lanes of a warp (kBlock = false, kGroupThreads / W rows per block), or the whole block
// (kBlock, W = blockDim.x, a multiple of 32). Thread `lane` holds the row's vectors lane, lane + W, ...
// (at most fwd_cap / VEC), so each load of the group is one contiguous span. Statistics from registers:
// m = x0 + Σ(x − x0)/D with x0 the row's first element (a mean far from zero keeps its low bits), then
// mean = m + Σ(x − m)/D, which restores what rounding left out of m when x0 is far from the mean (an outlier
// first), and var = Σ(x − mean)²/D: three sweeps of the registers, each with one sum (two sums in one sweep
// spilled the scalar-access block kernel beside a float residual stream). Rows are strided over the grid; all
// threads of a block run the same iterations (rows ≥ M only skip memory), so shuffles and barriers stay
// convergent. With A (add_*_norm) the row held is s = x + a, also written to S. mean_out null: RMSNorm.
template <typename scalar_t, int VEC, bool kBlock, typename res_t = scalar_t>
__global__ void __launch_bounds__(kBlock ? kMaxFwdRowThreads : kGroupThreads,
                                  kBlock ? 1 : kMaxFwdRowThreads / kGroupThreads)
    ln_fwd_rows_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ R,
                       scalar_t* __restrict__ Y, const float* __restrict__ gamma,
                       const float* __restrict__ beta, float* __restrict__ mean_out,
                       float* __restrict__ rstd_out, int64_t M, int D, float inv_d, int W, float eps, int act,
                       float slope, const res_t* __restrict__ A, res_t* __restrict__ S) {
  constexpr int kIters = fwd_cap<scalar_t, VEC, kBlock>() / VEC;
  NORMEXT_SHARED(float, red, kWarpSize);
  const int lane = kBlock ? threadIdx.x : threadIdx.x % W;
  const int groups = kBlock ? 1 : blockDim.x / W;
  const int group = kBlock ? 0 : threadIdx.x / W;
  const int nvec = D / VEC;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups; base < M;
       base += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = base + group;
    const bool valid = row < M;
    const int64_t off = row * D;
    float x[kIters][VEC];
    const float shift = valid ? first_value(X, A, off) : 0.f;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = i * W + lane;
      if (valid && v < nvec) {
        load_float<VEC>(X, off + static_cast<int64_t>(v) * VEC, x[i]);
        if (A != nullptr) add_stream<VEC>(A, S, off + static_cast<int64_t>(v) * VEC, x[i]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) s += x[i][k] - shift;
      }
    }
    s = row_allsum<kBlock>(s, W, red);
    const float m = shift + s * inv_d;
    float e = 0.f;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if (valid && i * W + lane < nvec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) e += x[i][k] - m;
      }
    }
    const float mean = m + row_allsum<kBlock>(e, W, red) * inv_d;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      if (valid && i * W + lane < nvec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) q += (x[i][k] - mean) * (x[i][k] - mean);
      }
    }
    q = row_allsum<kBlock>(q, W, red);
    const bool rms = mean_out == nullptr;
    const float rstd = rsqrt_rn(norm_var(mean, q * inv_d, rms) + eps);
    const float centre = rms ? 0.f : mean;
    if (valid && lane == 0) {
      if (!rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = i * W + lane;
      if (valid && v < nvec) {
        const int64_t j = static_cast<int64_t>(v) * VEC;
        float g[VEC], b[VEC], r[VEC] = {}, y[VEC];
        load_param<VEC>(gamma, j, g, 1.f);
        load_param<VEC>(beta, j, b, 0.f);
        if (R != nullptr) load_float<VEC>(R, off + j, r);
        apply_vec<VEC>(x[i], centre, rstd, g, b, r, act, slope, y);
        store_float<VEC>(Y, off + j, y);
      }
    }
  }
}

// Forward of rows too long for registers: a block per row (grid-strided). Each thread folds one vector at
// a time into its Welford state (an exact two-pass within the vector, then a Chan merge, on x − x0), the
// block merges the states in a fixed tree, and the apply re-reads the row (mostly from L2). With A
// (add_*_norm) the first pass writes s = x + a to S and the apply re-reads S (the same thread's vectors).
// When x0 lies more than a standard deviation from the mean, the merges' float means lose bits with
// |mean − x0|: then one more pass over the row (or S) corrects the moments as the register kernel does; the
// branch is block-uniform, as every thread holds the same merged state.
template <typename scalar_t, int VEC, typename res_t = scalar_t>
__global__ void __launch_bounds__(kLongRowThreads)
    ln_fwd_long_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ R,
                       scalar_t* __restrict__ Y, const float* __restrict__ gamma,
                       const float* __restrict__ beta, float* __restrict__ mean_out,
                       float* __restrict__ rstd_out, int64_t M, int D, float inv_d, float eps, int act,
                       float slope, const res_t* __restrict__ A, res_t* __restrict__ S) {
  NORMEXT_SHARED(WelfordF, red, kWarpSize);
  NORMEXT_SHARED(Sum2, red2, kWarpSize);
  const int nvec = D / VEC;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t off = row * D;
    const float shift = first_value(X, A, off);
    WelfordF w{0.f, 0.f, 0.f};
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float x[VEC];
      load_float<VEC>(X, off + static_cast<int64_t>(v) * VEC, x);
      if (A != nullptr) add_stream<VEC>(A, S, off + static_cast<int64_t>(v) * VEC, x);
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += x[k] - shift;
      const float vm = s / VEC;
      float q = 0.f;
#pragma unroll
      for (int k = 0; k < VEC; ++k) q += (x[k] - shift - vm) * (x[k] - shift - vm);
      w = welford_merge(w, WelfordF{vm, q, static_cast<float>(VEC)});
    }
    w = block_allreduce(w, WelfordOp{}, red, blockDim.x / kWarpSize);
    float mean = shift + w.mean, var = w.m2 * inv_d;
    if (w.mean * w.mean > var) {
      Sum2 t{0.f, 0.f};
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        const int64_t j = off + static_cast<int64_t>(v) * VEC;
        float x[VEC];
        if (S != nullptr) {
          load_float<VEC>(S, j, x);
        } else {
          load_float<VEC>(X, j, x);
        }
        add_deviations<VEC>(x, mean, t);
      }
      correct_moments(mean, block_allreduce(t, SumOp{}, red2, blockDim.x / kWarpSize), inv_d, mean, var);
    }
    const bool rms = mean_out == nullptr;
    const float rstd = rsqrt_rn(norm_var(mean, var, rms) + eps);
    if (threadIdx.x == 0) {
      if (!rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t j = static_cast<int64_t>(v) * VEC;
      float x[VEC], g[VEC], b[VEC], r[VEC] = {}, y[VEC];
      if (S != nullptr) {
        load_float<VEC>(S, off + j, x);
      } else {
        load_float<VEC>(X, off + j, x);
      }
      load_param<VEC>(gamma, j, g, 1.f);
      load_param<VEC>(beta, j, b, 0.f);
      if (R != nullptr) load_float<VEC>(R, off + j, r);
      apply_vec<VEC>(x, rms ? 0.f : mean, rstd, g, b, r, act, slope, y);
      store_float<VEC>(Y, off + j, y);
    }
  }
}

// dz = dy·act'(z) at the recomputed pre-activation z = x̂·gamma + beta + r, for one vector (in place); u is
// what the backward read (x, or y with kFromOutput: see normext/xhat_source.h, which also gives x̂).
template <int VEC>
__device__ __forceinline__ void grad_pre_activation(float (&dz)[VEC], const float (&u)[VEC],
                                                    const float (&xhat)[VEC], const float (&g)[VEC],
                                                    const float (&b)[VEC], const float (&r)[VEC], int act,
                                                    float slope) {
  if (act == kIdentity) return;
#pragma unroll
  for (int k = 0; k < VEC; ++k) dz[k] = grad_pre_act(dz[k], u[k], xhat[k], g[k], b[k], r[k], act, slope);
}

// Backward over rows held in registers, thread→data mapping as in ln_fwd_rows_kernel. Per row, x and dz
// stay in registers: Σ gamma·dz and Σ gamma·dz·x̂ over the group, then dx = rstd·(gamma·dz − mean(gamma·dz)
// − x̂·mean(gamma·dz·x̂)); dresidual = dz. Every thread keeps running dgamma/dbeta sums (Σ dz·x̂, Σ dz) for
// its columns over the rows it visits; at the end the block writes one partial row of each to
// part_g/part_b[blockIdx.x] (groups of a block added in group order through shared memory). mean_in
// null: RMSNorm (x̂ = x·rstd, and dx without the mean(gamma·dz) term).
template <typename scalar_t, int VEC, bool kBlock>
__global__ void __launch_bounds__(kBlock ? kMaxBwdRowThreads : kGroupThreads,
                                  kBlock ? 1 : kMaxBwdRowThreads / kGroupThreads)
    ln_bwd_rows_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                       const scalar_t* __restrict__ R, const float* __restrict__ mean_in,
                       const float* __restrict__ rstd_in, const float* __restrict__ gamma,
                       const float* __restrict__ beta, scalar_t* __restrict__ dX, scalar_t* __restrict__ dR,
                       float* __restrict__ part_g, float* __restrict__ part_b, int64_t M, int D, int W,
                       int act, float slope) {
  constexpr int kIters = kBwdCap / VEC;
  NORMEXT_SHARED(Sum2, red, kWarpSize);
  const int lane = kBlock ? threadIdx.x : threadIdx.x % W;
  const int groups = kBlock ? 1 : blockDim.x / W;
  const int group = kBlock ? 0 : threadIdx.x / W;
  const int nvec = D / VEC;
  const float inv_d = nx_recip(static_cast<float>(D));
  float pg[kIters][VEC], pb[kIters][VEC];
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) pg[i][k] = pb[i][k] = 0.f;
  }
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups; base < M;
       base += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = base + group;
    const bool valid = row < M;
    const int64_t off = row * D;
    const float mean = valid && mean_in != nullptr ? mean_in[row] : 0.f;
    const float rstd = valid ? rstd_in[row] : 0.f;
    float x[kIters][VEC], dz[kIters][VEC];
    Sum2 s{0.f, 0.f};  // Σ gamma·dz, Σ gamma·dz·x̂
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = i * W + lane;
      if (valid && v < nvec) {
        const int64_t j = static_cast<int64_t>(v) * VEC;
        load_float<VEC>(X, off + j, x[i]);
        load_float<VEC>(dY, off + j, dz[i]);
        float g[VEC], b[VEC] = {}, r[VEC] = {}, xhat[VEC];
        load_param<VEC>(gamma, j, g, 1.f);
        if (act != kIdentity) {
          load_param<VEC>(beta, j, b, 0.f);
          if (R != nullptr) load_float<VEC>(R, off + j, r);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) xhat[k] = xhat_from(x[i][k], r[k], mean, rstd, g[k], b[k], act, slope);
        grad_pre_activation<VEC>(dz[i], x[i], xhat, g, b, r, act, slope);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          pg[i][k] += dz[i][k] * xhat[k];
          pb[i][k] += dz[i][k];
          s.a += g[k] * dz[i][k];
          s.b += g[k] * dz[i][k] * xhat[k];
        }
        if (dR != nullptr) store_float<VEC>(dR, off + j, dz[i]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[i][k] = xhat[k];  // x̂ from here on, for dx
      }
    }
    s = row_allsum<kBlock>(s, W, red);
    if (dX == nullptr) continue;
    const float c1 = mean_in != nullptr ? s.a * inv_d : 0.f, c2 = s.b * inv_d;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = i * W + lane;
      if (valid && v < nvec) {
        const int64_t j = static_cast<int64_t>(v) * VEC;
        float g[VEC], dx[VEC];
        load_param<VEC>(gamma, j, g, 1.f);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dx[k] = rstd * (g[k] * dz[i][k] - c1 - x[i][k] * c2);
        store_float<VEC>(dX, off + j, dx);
      }
    }
  }
  if constexpr (kBlock) {
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int v = i * W + lane;
      if (v < nvec) {
        const int64_t j = static_cast<int64_t>(blockIdx.x) * D + static_cast<int64_t>(v) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (part_g != nullptr) part_g[j + k] = pg[i][k];
          if (part_b != nullptr) part_b[j + k] = pb[i][k];
        }
      }
    }
  } else {
    // groups·D ≤ (kGroupThreads / W)·(W·kBwdCap) = kGroupThreads·kBwdCap.
    NORMEXT_SHARED(float, buf, kGroupThreads* kBwdCap);
    for (int which = 0; which < 2; ++which) {
      float* out = which == 0 ? part_g : part_b;
      if (out == nullptr) continue;
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int v = i * W + lane;
        if (v < nvec) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) buf[group * D + v * VEC + k] = which == 0 ? pg[i][k] : pb[i][k];
        }
      }
      __syncthreads();
      for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float t = 0.f;
        for (int g = 0; g < groups; ++g) t += buf[g * D + j];
        out[static_cast<int64_t>(blockIdx.x) * D + j] = t;
      }
      __syncthreads();
    }
  }
}

// dX / dresidual of rows too long for registers: a block per row (grid-strided); the first pass reads x
// and dy for Σ gamma·dz and Σ gamma·dz·x̂, the second re-reads them (mostly from L2) for dx.
// dgamma/dbeta come from ln_bwd_long_params_kernel. mean_in null: RMSNorm, as in ln_bwd_rows_kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kLongRowThreads, kLongBwdBlocks)
    ln_bwd_long_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                       const scalar_t* __restrict__ R, const float* __restrict__ mean_in,
                       const float* __restrict__ rstd_in, const float* __restrict__ gamma,
                       const float* __restrict__ beta, scalar_t* __restrict__ dX, scalar_t* __restrict__ dR,
                       int64_t M, int D, int act, float slope) {
  NORMEXT_SHARED(Sum2, red, kWarpSize);
  const int nvec = D / VEC;
  const float inv_d = nx_recip(static_cast<float>(D));
  // One vector's x̂, dz and gamma.
  auto grads = [&](int64_t off, int64_t j, float mean, float rstd, float (&xhat)[VEC], float (&dz)[VEC],
                   float (&g)[VEC]) {
    float x[VEC], b[VEC] = {}, r[VEC] = {};
    load_float<VEC>(X, off + j, x);
    load_float<VEC>(dY, off + j, dz);
    load_param<VEC>(gamma, j, g, 1.f);
    if (act != kIdentity) {
      load_param<VEC>(beta, j, b, 0.f);
      if (R != nullptr) load_float<VEC>(R, off + j, r);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) xhat[k] = xhat_from(x[k], r[k], mean, rstd, g[k], b[k], act, slope);
    grad_pre_activation<VEC>(dz, x, xhat, g, b, r, act, slope);
  };
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t off = row * D;
    const float mean = mean_in != nullptr ? mean_in[row] : 0.f, rstd = rstd_in[row];
    Sum2 s{0.f, 0.f};
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t j = static_cast<int64_t>(v) * VEC;
      float xhat[VEC], dz[VEC], g[VEC];
      grads(off, j, mean, rstd, xhat, dz, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s.a += g[k] * dz[k];
        s.b += g[k] * dz[k] * xhat[k];
      }
      if (dR != nullptr) store_float<VEC>(dR, off + j, dz);
    }
    s = row_allsum<true>(s, blockDim.x, red);
    if (dX == nullptr) continue;
    const float c1 = mean_in != nullptr ? s.a * inv_d : 0.f, c2 = s.b * inv_d;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t j = static_cast<int64_t>(v) * VEC;
      float xhat[VEC], dz[VEC], g[VEC], dx[VEC];
      grads(off, j, mean, rstd, xhat, dz, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dx[k] = rstd * (g[k] * dz[k] - c1 - xhat[k] * c2);
      store_float<VEC>(dX, off + j, dx);
    }
  }
}

constexpr int kColsTY = 8;

// dgamma/dbeta partials for long rows (a column reduction). Block (32, kColsTY): threadIdx.x picks
// column blockIdx.x·32 + x, threadIdx.y the rows r ≡ y (mod kColsTY) of row chunk blockIdx.y (rows
// [blockIdx.y·rows_per_chunk, +rows_per_chunk)); column_reduce combines the kColsTY sums into
// part_g/part_b[blockIdx.y].
template <typename scalar_t>
__global__ void __launch_bounds__(32 * kColsTY)
    ln_bwd_long_params_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                              const scalar_t* __restrict__ R, const float* __restrict__ mean_in,
                              const float* __restrict__ rstd_in, const float* __restrict__ gamma,
                              const float* __restrict__ beta, float* __restrict__ part_g,
                              float* __restrict__ part_b, int64_t M, int D, int64_t rows_per_chunk, int act,
                              float slope) {
  NORMEXT_SHARED(Sum2, red, kColsTY * kWarpSize);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = std::min(M, r0 + rows_per_chunk);
  Sum2 sum[1] = {{0.f, 0.f}};  // Σ dz·x̂, Σ dz
  if (j < D) {
    const float g = gamma != nullptr ? gamma[j] : 1.f, b = beta != nullptr ? beta[j] : 0.f;
    for (int64_t row = r0 + threadIdx.y; row < r1; row += kColsTY) {
      const int64_t e = row * D + j;
      const float u = static_cast<float>(X[e]);
      const float r = R != nullptr && act != kIdentity ? static_cast<float>(R[e]) : 0.f;
      const float xhat =
          xhat_from(u, r, mean_in != nullptr ? mean_in[row] : 0.f, rstd_in[row], g, b, act, slope);
      const float dz = grad_pre_act(static_cast<float>(dY[e]), u, xhat, g, b, r, act, slope);
      sum[0].a += dz * xhat;
      sum[0].b += dz;
    }
  }
  column_reduce<1>(sum, red, threadIdx.y, threadIdx.x, kColsTY, kWarpSize, SumOp{});
  if (threadIdx.y == 0 && j < D) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * D + j;
    if (part_g != nullptr) part_g[o] = red[threadIdx.x].a;
    if (part_b != nullptr) part_b[o] = red[threadIdx.x].b;
  }
}

constexpr int kSumTY = 16;

// out[j] = Σ_p part[p·D + j] over P partial rows in a fixed order. Block (32, kSumTY): threadIdx.x picks
// column blockIdx.x·32 + x, threadIdx.y sums rows p ≡ y (mod kSumTY) in order, and the kSumTY sums are
// combined by column_reduce. blockIdx.y selects the (part, out) pair: 0 = dgamma, 1 = dbeta.
__global__ void __launch_bounds__(32 * kSumTY)
    sum_partials_kernel(const float* part0, float* out0, const float* part1, float* out1, int64_t P, int D) {
  NORMEXT_SHARED(float, red, kSumTY* kWarpSize);
  const float* part = blockIdx.y == 0 ? part0 : part1;
  float* out = blockIdx.y == 0 ? out0 : out1;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  float t[1] = {0.f};
  if (j < D) {
    for (int64_t p = threadIdx.y; p < P; p += kSumTY) t[0] += part[p * D + j];
  }
  column_reduce<1>(t, red, threadIdx.y, threadIdx.x, kSumTY, kWarpSize, SumOp{});
  if (threadIdx.y == 0 && j < D) out[j] = red[threadIdx.x];
}

// ---------------------------------------------------------------------------------------- NCHW 2d

// LayerNorm2d on NCHW-contiguous (N, C, HxW): a strided reduction over C at every position. Block
// (TX, TY), TX a power of two <= 32, TX·TY a multiple of 32: threadIdx.x owns VEC consecutive positions of
// the block's TX·VEC (block b covers sample b / blocks_per_n, positions from (b % blocks_per_n)·TX·VEC), and
// threadIdx.y the channels c ≡ y (mod TY). With VEC > 1, HxW is a multiple of VEC, so a vector is all
// inside or all outside the sample. Every thread runs ceil(C / TY) channel iterations (c ≥ C and
// positions ≥ HxW only skip memory), so warp shuffles stay convergent.
struct Tile2d {
  int64_t n, p;  // sample and first position of this thread
  bool valid;    // p < HxW
  int tx, ty, TX, TY, iters;
};

template <int VEC>
__device__ __forceinline__ Tile2d tile_2d(int C, int64_t HxW, int64_t blocks_per_n) {
  Tile2d t;
  t.TX = blockDim.x;
  t.TY = blockDim.y;
  t.tx = threadIdx.x;
  t.ty = threadIdx.y;
  t.n = div32(blockIdx.x, blocks_per_n);
  t.p =
      (blockIdx.x - t.n * blocks_per_n) * static_cast<int64_t>(t.TX) * VEC + static_cast<int64_t>(t.tx) * VEC;
  t.valid = t.p < HxW;
  t.iters = (C + t.TY - 1) / t.TY;
  return t;
}

// Forward. Pass 1: each thread runs a lane-wise Welford over its channels for its VEC positions (on
// x − x[n, 0, p], so a mean far from zero keeps its low bits); column_reduce merges the TY states of
// each position. Pass 2 re-reads x (L1/L2) and writes y. mean_out null: RMSNorm2d.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(k2dThreads)
    ln2d_nchw_fwd_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ R,
                         scalar_t* __restrict__ Y, const float* __restrict__ gamma,
                         const float* __restrict__ beta, float* __restrict__ mean_out,
                         float* __restrict__ rstd_out, int C, int64_t HxW, int64_t blocks_per_n, float eps,
                         int act, float slope) {
  NORMEXT_SHARED(WelfordF, st, k2dThreads * VEC);
  const Tile2d t = tile_2d<VEC>(C, HxW, blocks_per_n);
  const int64_t base = t.n * C * HxW + t.p;
  Lanes<VEC> shift(0.f);
  WelfordLanes<VEC> w = welford_lanes_zero<VEC>();
  if (t.valid) {
    shift = to_lanes(load_vec<VEC>(X, base));
    for (int c = t.ty; c < C; c += t.TY) {
      welford_push(w, to_lanes(load_vec<VEC>(X, base + static_cast<int64_t>(c) * HxW)) - shift);
    }
  }
  WelfordF lanes[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) lanes[k] = welford_lane(w, k);
  column_reduce<VEC>(lanes, st, t.ty, t.tx, t.TY, t.TX, WelfordOp{});
  if (!t.valid) return;  // no barrier below
  const bool rms = mean_out == nullptr;
  float mean[VEC], rstd[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const WelfordF m = st[t.tx * VEC + k];
    mean[k] = shift.v[k] + m.mean;
    rstd[k] = rsqrt_rn(norm_var(mean[k], nx_div(m.m2, static_cast<float>(C)), rms) + eps);
  }
  if (t.ty == 0) {
    const int64_t o = t.n * HxW + t.p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (!rms) mean_out[o + k] = mean[k];
      rstd_out[o + k] = rstd[k];
    }
  }
  if (rms) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) mean[k] = 0.f;
  }
  for (int c = t.ty; c < C; c += t.TY) {
    const int64_t o = base + static_cast<int64_t>(c) * HxW;
    const float g = gamma != nullptr ? gamma[c] : 1.f, b = beta != nullptr ? beta[c] : 0.f;
    float x[VEC], r[VEC] = {}, y[VEC];
    load_float<VEC>(X, o, x);
    if (R != nullptr) load_float<VEC>(R, o, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) y[k] = act_forward((x[k] - mean[k]) * (rstd[k] * g) + b + r[k], act, slope);
    store_float<VEC>(Y, o, y);
  }
}

// Backward. Pass 1 over the thread's channels: dz (dresidual), per-position Σ gamma·dz and
// Σ gamma·dz·x̂, and per channel the block's Σ dz·x̂ and Σ dz (added over the TX lanes of the channel by
// group_allsum; lane 0 writes them to part_g/part_b[blockIdx.x][c], one writer per entry). column_reduce
// merges the per-position sums over TY; pass 2 re-reads x, dy and writes
// dx = rstd·(gamma·dz − mean_c(gamma·dz) − x̂·mean_c(gamma·dz·x̂)). mean_in null: RMSNorm2d (mean 0, no
// mean_c(gamma·dz) term).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(k2dThreads)
    ln2d_nchw_bwd_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                         const scalar_t* __restrict__ R, const float* __restrict__ mean_in,
                         const float* __restrict__ rstd_in, const float* __restrict__ gamma,
                         const float* __restrict__ beta, scalar_t* __restrict__ dX, scalar_t* __restrict__ dR,
                         float* __restrict__ part_g, float* __restrict__ part_b, int C, int64_t HxW,
                         int64_t blocks_per_n, int act, float slope) {
  NORMEXT_SHARED(Sum2, sums, k2dThreads * VEC);
  const Tile2d t = tile_2d<VEC>(C, HxW, blocks_per_n);
  const int64_t base = t.n * C * HxW + t.p;
  float mean[VEC] = {}, rstd[VEC] = {};
  Sum2 s[VEC];  // per position: Σ gamma·dz, Σ gamma·dz·x̂
#pragma unroll
  for (int k = 0; k < VEC; ++k) s[k] = Sum2{0.f, 0.f};
  if (t.valid) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      mean[k] = mean_in != nullptr ? mean_in[t.n * HxW + t.p + k] : 0.f;
      rstd[k] = rstd_in[t.n * HxW + t.p + k];
    }
  }
  // One vector's x̂, dz at channel c.
  auto grads = [&](int c, int64_t o, float (&xhat)[VEC], float (&dz)[VEC]) {
    const float g = gamma != nullptr ? gamma[c] : 1.f, b = beta != nullptr ? beta[c] : 0.f;
    float x[VEC], r[VEC] = {};
    load_float<VEC>(X, o, x);
    load_float<VEC>(dY, o, dz);
    if (R != nullptr && act != kIdentity) load_float<VEC>(R, o, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      xhat[k] = xhat_from(x[k], r[k], mean[k], rstd[k], g, b, act, slope);
      dz[k] = grad_pre_act(dz[k], x[k], xhat[k], g, b, r[k], act, slope);
    }
    return g;
  };
  for (int it = 0; it < t.iters; ++it) {
    const int c = t.ty + it * t.TY;
    Sum2 param{0.f, 0.f};  // Σ dz·x̂, Σ dz of channel c over the thread's positions
    if (c < C && t.valid) {
      const int64_t o = base + static_cast<int64_t>(c) * HxW;
      float xhat[VEC], dz[VEC];
      const float g = grads(c, o, xhat, dz);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s[k].a += g * dz[k];
        s[k].b += g * dz[k] * xhat[k];
        param.a += dz[k] * xhat[k];
        param.b += dz[k];
      }
      if (dR != nullptr) store_float<VEC>(dR, o, dz);
    }
    param = group_allsum(param, t.TX);
    if (t.tx == 0 && c < C) {
      const int64_t o = static_cast<int64_t>(blockIdx.x) * C + c;
      if (part_g != nullptr) part_g[o] = param.a;
      if (part_b != nullptr) part_b[o] = param.b;
    }
  }
  if (dX == nullptr) return;  // uniform over the grid
  column_reduce<VEC>(s, sums, t.ty, t.tx, t.TY, t.TX, SumOp{});
  if (!t.valid) return;
  const float inv_c = nx_recip(static_cast<float>(C));
  float c1[VEC], c2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    c1[k] = mean_in != nullptr ? sums[t.tx * VEC + k].a * inv_c : 0.f;
    c2[k] = sums[t.tx * VEC + k].b * inv_c;
  }
  for (int c = t.ty; c < C; c += t.TY) {
    const int64_t o = base + static_cast<int64_t>(c) * HxW;
    float xhat[VEC], dz[VEC], dx[VEC];
    const float g = grads(c, o, xhat, dz);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dx[k] = rstd[k] * (g * dz[k] - c1[k] - xhat[k] * c2[k]);
    store_float<VEC>(dX, o, dx);
  }
}

// ------------------------------------------------------------------------------------------ launches

// Pointers of one forward or backward call. gamma/beta are float32 (any alignment), or null; mean is null
// for RMSNorm.
template <typename scalar_t>
struct Ptrs {
  const scalar_t* X;
  const scalar_t* R;
  const float* gamma;
  const float* beta;
  float* mean;
  float* rstd;
  const scalar_t* dY;  // backward only
  scalar_t* out;       // Y, or dX (may be null)
  scalar_t* dR;
};

// Calls f(integral_constant VEC) for the widest vector (widest_vec) that every tensor is aligned to and that
// divides `extent` (the contiguous run a vector must not cross: the row, or HxW): D = 770 in bfloat16 takes
// 4-byte vectors, not scalars. A and S (add_*_norm's residual stream, of any element type) must be aligned
// to the same number of elements.
// kWidest caps the width (and the instantiations) for a kernel whose per-lane state does not fit wider.
template <typename scalar_t, int kWidest = kMaxVec<scalar_t>, typename F, typename res_t = scalar_t>
void with_vec(const Ptrs<scalar_t>& p, int64_t extent, const F& f, const res_t* A = nullptr,
              const res_t* S = nullptr) {
  dispatch_vec<scalar_t, kWidest>(
      std::min(kWidest, widest_vec<scalar_t>(extent, p.X, p.R, p.dY, p.out, p.dR, A, S)), f);
}

// Row-kernel class of a row of nvec vectors: threads per row, and whether a warp (part) owns it.
struct RowPlan {
  int threads;  // W
  bool block;   // a block per row (W > 32)
  bool fits;    // held in registers at all
};

RowPlan row_plan(int nvec, int vec, int cap, int max_block_threads) {
  const int64_t needed = ceil_div<int64_t>(nvec, cap / vec);
  if (needed <= kWarpSize) return {pow2_at_least(needed), false, true};
  const int64_t threads = ceil_div<int64_t>(needed, kWarpSize) * kWarpSize;
  return {static_cast<int>(threads), true, threads <= max_block_threads};
}

// Row forward; A/S: add_*_norm's residual stream (res_t), null otherwise.
template <typename scalar_t, typename res_t = scalar_t>
void rows_forward(const Ptrs<scalar_t>& p, int64_t M, int D, float eps, int act, float slope,
                  const res_t* A = nullptr, res_t* S = nullptr) {
  const auto stream = current_stream();
  // 1/D from the host: computed in the kernel, the IEEE division's slow-path call made ptxas keep live
  // registers in local memory around it (spills, tools/cuda_report.py). The same correctly rounded value.
  const float inv_d = 1.f / static_cast<float>(D);
  with_vec(
      p, D,
      [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        RowPlan plan = row_plan(D / VEC, VEC, kCap, kMaxFwdRowThreads);
        if (plan.block) plan = row_plan(D / VEC, VEC, fwd_cap<scalar_t, VEC, true>(), kMaxFwdRowThreads);
        if (plan.fits && !plan.block) {
          const int64_t blocks = std::min(ceil_div<int64_t>(M, kGroupThreads / plan.threads), kMaxGrid);
          NORMEXT_LAUNCH((ln_fwd_rows_kernel<scalar_t, VEC, false, res_t>), blocks, kGroupThreads, 0, stream,
                         p.X, p.R, p.out, p.gamma, p.beta, p.mean, p.rstd, M, D, inv_d, plan.threads, eps,
                         act, slope, A, S);
        } else if (plan.fits) {
          NORMEXT_LAUNCH((ln_fwd_rows_kernel<scalar_t, VEC, true, res_t>), std::min(M, kMaxGrid),
                         plan.threads, 0, stream, p.X, p.R, p.out, p.gamma, p.beta, p.mean, p.rstd, M, D,
                         inv_d, plan.threads, eps, act, slope, A, S);
        } else {
          NORMEXT_LAUNCH((ln_fwd_long_kernel<scalar_t, VEC, res_t>), std::min(M, kMaxGrid), kLongRowThreads,
                         0, stream, p.X, p.R, p.out, p.gamma, p.beta, p.mean, p.rstd, M, D, inv_d, eps, act,
                         slope, A, S);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      A, static_cast<const res_t*>(S));
}

// Sums the P partial rows of the requested dgamma/dbeta (a null `out` is skipped).
void finish_params(const Tensor& part, int64_t P, int D, float* dgamma, float* dbeta) {
  const float* pg = part.data_ptr<float>();
  const float* pb = pg + P * D;
  const float* parts[2];
  float* outs[2];
  int count = 0;
  if (dgamma != nullptr) {
    parts[count] = pg;
    outs[count++] = dgamma;
  }
  if (dbeta != nullptr) {
    parts[count] = pb;
    outs[count++] = dbeta;
  }
  if (count == 0) return;
  const dim3 grid(ceil_div<int64_t>(D, kWarpSize), count);
  NORMEXT_LAUNCH(sum_partials_kernel, grid, dim3(kWarpSize, kSumTY), 0, current_stream(), parts[0], outs[0],
                 parts[count - 1], outs[count - 1], P, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void rows_backward(const Ptrs<scalar_t>& p, int64_t M, int D, int act, float slope, float* dgamma,
                   float* dbeta) {
  const auto stream = current_stream();
  const bool params = dgamma != nullptr || dbeta != nullptr;
  with_vec(p, D, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const RowPlan plan = row_plan(D / VEC, VEC, kBwdCap, kMaxBwdRowThreads);
    // Grid-strided blocks, each writing one partial row of dgamma/dbeta; long rows instead get one partial
    // row per chunk of rows_per_chunk rows from ln_bwd_long_params_kernel.
    const int64_t blocks =
        bwd_blocks(plan.fits && !plan.block ? ceil_div<int64_t>(M, kGroupThreads / plan.threads) : M, D);
    const int64_t rows_per_chunk = ceil_div<int64_t>(M, std::min<int64_t>(M, 256));
    const int64_t P = plan.fits ? blocks : ceil_div<int64_t>(M, rows_per_chunk);
    Tensor part = params
                      ? at::empty({2, P, D}, at::TensorOptions().dtype(at::kFloat).device(current_device()))
                      : Tensor();
    float* pg = dgamma != nullptr ? part.data_ptr<float>() : nullptr;
    float* pb = dbeta != nullptr ? part.data_ptr<float>() + P * D : nullptr;
    if (plan.fits && !plan.block) {
      NORMEXT_LAUNCH((ln_bwd_rows_kernel<scalar_t, VEC, false>), blocks, kGroupThreads, 0, stream, p.dY, p.X,
                     p.R, p.mean, p.rstd, p.gamma, p.beta, p.out, p.dR, pg, pb, M, D, plan.threads, act,
                     slope);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (plan.fits) {
      NORMEXT_LAUNCH((ln_bwd_rows_kernel<scalar_t, VEC, true>), blocks, plan.threads, 0, stream, p.dY, p.X,
                     p.R, p.mean, p.rstd, p.gamma, p.beta, p.out, p.dR, pg, pb, M, D, plan.threads, act,
                     slope);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      if (p.out != nullptr || p.dR != nullptr) {
        NORMEXT_LAUNCH((ln_bwd_long_kernel<scalar_t, VEC>), blocks, kLongRowThreads, 0, stream, p.dY, p.X,
                       p.R, p.mean, p.rstd, p.gamma, p.beta, p.out, p.dR, M, D, act, slope);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (params) {
        NORMEXT_LAUNCH(ln_bwd_long_params_kernel<scalar_t>, dim3(ceil_div<int64_t>(D, kWarpSize), P),
                       dim3(kWarpSize, kColsTY), 0, stream, p.dY, p.X, p.R, p.mean, p.rstd, p.gamma, p.beta,
                       pg, pb, M, D, rows_per_chunk, act, slope);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (params) finish_params(part, P, D, dgamma, dbeta);
  });
}

// Block shape of the NCHW-2d kernels: TX threads along positions (as wide as still gives k2dMinBlocks
// blocks, two per SM of an H100), TY (a power of two, TX·TY a multiple of 32, at most k2dThreads) along
// channels. TX fixes the dgamma/dbeta partials, so it depends on the shape alone, not on the GPU.
constexpr int64_t k2dMinBlocks = 264;

struct Plan2d {
  int TX, TY;
  int64_t blocks_per_n;
};

Plan2d plan_2d(int64_t N, int C, int64_t HxW, int vec) {
  int TX = kWarpSize;
  while (TX > 4 && N * ceil_div<int64_t>(HxW, static_cast<int64_t>(TX) * vec) < k2dMinBlocks) TX /= 2;
  const int TY = std::max(kWarpSize / TX, std::min(k2dThreads / TX, pow2_at_least(C)));
  const int64_t blocks_per_n = ceil_div<int64_t>(HxW, static_cast<int64_t>(TX) * vec);
  TORCH_CHECK(N * blocks_per_n <= INT_MAX, "layer_norm_2d: too many positions for one launch");
  return {TX, TY, blocks_per_n};
}

// The vector must divide HxW (HxW = 49: scalars, still coalesced across threadIdx.x): channel row c starts
// (c·HxW) % VEC past an aligned address, an offset that differs from channel to channel, while a thread holds
// the same positions in every channel it reduces over, so a head and tail per row (BatchNorm's planes) cannot
// be peeled here.
template <typename scalar_t>
void nchw_forward(const Ptrs<scalar_t>& p, const ChannelDims& d, float eps, int act, float slope) {
  const auto stream = current_stream();
  with_vec(p, d.HxW, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const Plan2d plan = plan_2d(d.N, d.C, d.HxW, VEC);
    NORMEXT_LAUNCH((ln2d_nchw_fwd_kernel<scalar_t, VEC>), d.N * plan.blocks_per_n, dim3(plan.TX, plan.TY), 0,
                   stream, p.X, p.R, p.out, p.gamma, p.beta, p.mean, p.rstd, d.C, d.HxW, plan.blocks_per_n,
                   eps, act, slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The backward takes at most 4 positions per vector (8 bytes of a 16-bit type): a thread keeps mean, rstd and
// two sums per position across its channel loop, which at 8 positions took 80 registers (38% occupancy on
// sm_90) and at the 64 of 50% spilled 176 bytes.
constexpr int k2dBwdVec = 4;

template <typename scalar_t>
void nchw_backward(const Ptrs<scalar_t>& p, const ChannelDims& d, int act, float slope, float* dgamma,
                   float* dbeta) {
  const auto stream = current_stream();
  with_vec<scalar_t, std::min(kMaxVec<scalar_t>, k2dBwdVec)>(p, d.HxW, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const Plan2d plan = plan_2d(d.N, d.C, d.HxW, VEC);
    const int64_t P = d.N * plan.blocks_per_n;
    const bool params = dgamma != nullptr || dbeta != nullptr;
    Tensor part = params
                      ? at::empty({2, P, d.C}, at::TensorOptions().dtype(at::kFloat).device(current_device()))
                      : Tensor();
    float* pg = dgamma != nullptr ? part.data_ptr<float>() : nullptr;
    float* pb = dbeta != nullptr ? part.data_ptr<float>() + P * d.C : nullptr;
    NORMEXT_LAUNCH((ln2d_nchw_bwd_kernel<scalar_t, VEC>), P, dim3(plan.TX, plan.TY), 0, stream, p.dY, p.X,
                   p.R, p.mean, p.rstd, p.gamma, p.beta, p.out, p.dR, pg, pb, d.C, d.HxW, plan.blocks_per_n,
                   act, slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (params) finish_params(part, P, d.C, dgamma, dbeta);
  });
}

// ------------------------------------------------------------------------------------------- host side

const float* param_ptr(const c10::optional<Tensor>& p) { return p ? p->const_data_ptr<float>() : nullptr; }

template <typename scalar_t>
Ptrs<scalar_t> make_ptrs(const Tensor& X, const c10::optional<Tensor>& R, const c10::optional<Tensor>& gamma,
                         const c10::optional<Tensor>& beta, const Tensor& mean, const Tensor& rstd) {
  return {X.const_data_ptr<scalar_t>(),
          R ? R->const_data_ptr<scalar_t>() : nullptr,
          param_ptr(gamma),
          param_ptr(beta),
          mean.defined() ? mean.data_ptr<float>() : nullptr,
          rstd.data_ptr<float>(),
          nullptr,
          nullptr,
          nullptr};
}

void check_int_extent(int64_t v, const char* what, const char* op) {
  TORCH_CHECK(v <= INT_MAX, op, ": ", what, " of ", v, " elements is not supported on CUDA (at most ",
              INT_MAX, ")");
}

// Forward of checked rows (LayerNorm, or RMSNorm with rms: no mean); with A (the residual stream of
// add_*_norm, already in residual_dtype) also S = X + A. Rows of no elements get NaN statistics.
struct RowsOut {
  Tensor Y, S, mean, rstd;
};

RowsOut rows_fwd(LayerNormArgs& a, double eps, int64_t act, double slope, bool rms, const char* op,
                 const Tensor* A = nullptr) {
  const DeviceGuard guard(a.X.device());
  check_int_extent(a.D, "a normalized row", op);
  RowsOut o{at::empty_like(a.X), A != nullptr ? at::empty_like(*A) : Tensor(), Tensor(),
            at::empty(a.stat_shape, a.X.options().dtype(at::kFloat))};
  if (!rms) o.mean = at::empty_like(o.rstd);
  if (a.M == 0) return o;
  if (a.D == 0) {
    if (!rms) o.mean.fill_(std::nan(""));
    o.rstd.fill_(std::nan(""));
    return o;
  }
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "layer_norm_fwd_cuda", [&] {
    auto p = make_ptrs<scalar_t>(a.X, a.residual, a.gamma, a.beta, o.mean, o.rstd);
    p.out = o.Y.data_ptr<scalar_t>();
    const auto e = static_cast<float>(eps), sl = static_cast<float>(slope);
    const int D = static_cast<int>(a.D);
    if (A == nullptr || A->scalar_type() == a.X.scalar_type()) {
      rows_forward(p, a.M, D, e, static_cast<int>(act), sl,
                   A != nullptr ? A->const_data_ptr<scalar_t>() : nullptr,
                   A != nullptr ? o.S.data_ptr<scalar_t>() : nullptr);
    } else {
      // A float32 residual stream beside 16-bit activations (check_add_residual allows nothing else).
      rows_forward(p, a.M, D, e, static_cast<int>(act), sl, A->const_data_ptr<float>(),
                   o.S.data_ptr<float>());
    }
  });
  return o;
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& X_in, const c10::optional<Tensor>& gamma,
                                                       const c10::optional<Tensor>& beta,
                                                       const c10::optional<Tensor>& residual,
                                                       at::IntArrayRef normalized_shape, double eps,
                                                       int64_t act, double slope) {
  constexpr const char* op = "layer_norm_fwd";
  auto a = check_layer_norm(X_in, normalized_shape, gamma, beta, residual, act, op);
  auto o = rows_fwd(a, eps, act, slope, false, op);
  return {o.Y, o.mean, o.rstd};
}

std::tuple<Tensor, Tensor> rms_norm_fwd_cuda(const Tensor& X_in, const c10::optional<Tensor>& gamma,
                                             const c10::optional<Tensor>& residual,
                                             at::IntArrayRef normalized_shape, double eps, int64_t act,
                                             double slope) {
  constexpr const char* op = "rms_norm_fwd";
  auto a = check_layer_norm(X_in, normalized_shape, gamma, c10::nullopt, residual, act, op);
  auto o = rows_fwd(a, eps, act, slope, true, op);
  return {o.Y, o.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_cuda(
    const Tensor& X_in, const Tensor& R, const c10::optional<Tensor>& gamma,
    const c10::optional<Tensor>& beta, at::IntArrayRef normalized_shape, double eps,
    c10::optional<at::ScalarType> residual_dtype) {
  constexpr const char* op = "add_layer_norm_fwd";
  auto a = check_layer_norm(X_in, normalized_shape, gamma, beta, c10::nullopt, kIdentity, op);
  const Tensor A = check_add_residual(R, a.X, residual_dtype, op);
  auto o = rows_fwd(a, eps, kIdentity, 0.0, false, op, &A);
  return {o.Y, o.S, o.mean, o.rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_fwd_cuda(const Tensor& X_in, const Tensor& R,
                                                         const c10::optional<Tensor>& gamma,
                                                         at::IntArrayRef normalized_shape, double eps,
                                                         c10::optional<at::ScalarType> residual_dtype) {
  constexpr const char* op = "add_rms_norm_fwd";
  auto a = check_layer_norm(X_in, normalized_shape, gamma, c10::nullopt, c10::nullopt, kIdentity, op);
  const Tensor A = check_add_residual(R, a.X, residual_dtype, op);
  auto o = rows_fwd(a, eps, kIdentity, 0.0, true, op, &A);
  return {o.Y, o.S, o.rstd};
}

// Outputs of a backward op: unselected ones are empty; dgamma/dbeta float32 of param_shape, zero-filled
// only when nothing is reduced (empty input), else written whole by the kernels. no_grads: there is nothing
// for the kernels to do (an empty input, or no output selected), so x and dy are not read.
std::tuple<Tensor, Tensor, Tensor, Tensor> alloc_grads(const Tensor& X, at::IntArrayRef param_shape,
                                                       std::array<bool, 4> mask) {
  const auto f32 = X.options().dtype(at::kFloat);
  std::tuple<Tensor, Tensor, Tensor, Tensor> g{mask[0] ? at::empty_like(X) : at::empty({0}, X.options()),
                                               mask[1] ? at::empty(param_shape, f32) : at::empty({0}, f32),
                                               mask[2] ? at::empty(param_shape, f32) : at::empty({0}, f32),
                                               mask[3] ? at::empty_like(X) : at::empty({0}, X.options())};
  if (X.numel() == 0) {
    std::get<1>(g).zero_();
    std::get<2>(g).zero_();
  }
  return g;
}

bool no_grads(const Tensor& X, std::array<bool, 4> mask) {
  return X.numel() == 0 || !(mask[0] || mask[1] || mask[2] || mask[3]);
}

template <typename scalar_t>
void set_grad_ptrs(Ptrs<scalar_t>& p, const Tensor& dY, const Tensor& dX, const Tensor& dR,
                   std::array<bool, 4> mask) {
  p.dY = dY.const_data_ptr<scalar_t>();
  p.out = mask[0] ? dX.data_ptr<scalar_t>() : nullptr;
  p.dR = mask[3] ? dR.data_ptr<scalar_t>() : nullptr;
}

// Backward of checked rows; mean_in undefined: RMSNorm.
std::tuple<Tensor, Tensor, Tensor, Tensor> rows_bwd(const Tensor& dY_in, LayerNormArgs& a,
                                                    const Tensor& mean_in, const Tensor& rstd_in,
                                                    at::IntArrayRef normalized_shape, int64_t act,
                                                    double slope, std::array<bool, 4> mask, const char* op) {
  const DeviceGuard guard(a.X.device());
  check_int_extent(a.D, "a normalized row", op);
  const Tensor dY = *check_like(dY_in, a.X, Layout::kChannelsFirst, "grad_output", op);
  const Tensor mean = mean_in.defined() ? check_stats(mean_in, a.X, a.M, "mean", op) : Tensor();
  const Tensor rstd = check_stats(rstd_in, a.X, a.M, "rstd", op);
  auto [dX, dgamma, dbeta, dR] = alloc_grads(a.X, normalized_shape, mask);
  if (no_grads(a.X, mask)) return {dX, dgamma, dbeta, dR};
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "layer_norm_bwd_cuda", [&] {
    auto p = make_ptrs<scalar_t>(a.X, a.residual, a.gamma, a.beta, mean, rstd);
    set_grad_ptrs(p, dY, dX, dR, mask);
    rows_backward(p, a.M, static_cast<int>(a.D), static_cast<int>(act), static_cast<float>(slope),
                  mask[1] ? dgamma.data_ptr<float>() : nullptr, mask[2] ? dbeta.data_ptr<float>() : nullptr);
  });
  return {dX, dgamma, dbeta, dR};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_bwd_cuda(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    at::IntArrayRef normalized_shape, int64_t act, double slope, std::array<bool, 4> mask) {
  constexpr const char* op = "layer_norm_bwd";
  auto a =
      check_layer_norm(X_in, normalized_shape, gamma, beta, residual, check_grad_activation(act, op), op);
  return rows_bwd(dY_in, a, mean_in, rstd_in, normalized_shape, act, slope, mask, op);
}

// RMSNorm's backward: output_mask selects (dX, dgamma, dresidual), as for layer_norm_bwd without dbeta.
std::tuple<Tensor, Tensor, Tensor> rms_norm_bwd_cuda(const Tensor& dY_in, const Tensor& X_in,
                                                     const c10::optional<Tensor>& residual,
                                                     const Tensor& rstd_in,
                                                     const c10::optional<Tensor>& gamma,
                                                     at::IntArrayRef normalized_shape, int64_t act,
                                                     double slope, std::array<bool, 3> mask) {
  constexpr const char* op = "rms_norm_bwd";
  auto a = check_layer_norm(X_in, normalized_shape, gamma, c10::nullopt, residual,
                            check_grad_activation(act, op), op);
  auto [dX, dgamma, dbeta, dR] = rows_bwd(dY_in, a, Tensor(), rstd_in, normalized_shape, act, slope,
                                          {mask[0], mask[1], false, mask[2]}, op);
  return {dX, dgamma, dR};
}

// Channel (2d) forward of checked input, LayerNorm2d or with rms RMSNorm2d (mean left undefined).
std::tuple<Tensor, Tensor, Tensor> fwd_2d(ChannelNormArgs& a, double eps, int64_t act, double slope, bool rms,
                                          const char* op) {
  const DeviceGuard guard(a.X.device());
  const auto [N, C, HxW] = a.dims;
  check_int_extent(C, "a channel dimension", op);
  Tensor Y = at::empty_like(a.X);
  Tensor rstd = at::empty({N, HxW}, a.X.options().dtype(at::kFloat));
  Tensor mean = rms ? Tensor() : at::empty_like(rstd);
  if (N * HxW == 0) return {Y, mean, rstd};
  if (C == 0) {
    if (!rms) mean.fill_(std::nan(""));
    rstd.fill_(std::nan(""));
    return {Y, mean, rstd};
  }
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "layer_norm_2d_fwd_cuda", [&] {
    auto p = make_ptrs<scalar_t>(a.X, a.residual, a.gamma, a.beta, mean, rstd);
    p.out = Y.data_ptr<scalar_t>();
    if (a.rows) {
      rows_forward(p, N * HxW, static_cast<int>(C), static_cast<float>(eps), static_cast<int>(act),
                   static_cast<float>(slope));
    } else {
      nchw_forward(p, a.dims, static_cast<float>(eps), static_cast<int>(act), static_cast<float>(slope));
    }
  });
  return {Y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_fwd_cuda(const Tensor& X_in,
                                                          const c10::optional<Tensor>& gamma,
                                                          const c10::optional<Tensor>& beta,
                                                          const c10::optional<Tensor>& residual, double eps,
                                                          int64_t act, double slope) {
  constexpr const char* op = "layer_norm_2d_fwd";
  auto a = check_channel_norm(X_in, gamma, beta, residual, act, op);
  return fwd_2d(a, eps, act, slope, false, op);
}

std::tuple<Tensor, Tensor> rms_norm_2d_fwd_cuda(const Tensor& X_in, const c10::optional<Tensor>& gamma,
                                                const c10::optional<Tensor>& residual, double eps,
                                                int64_t act, double slope) {
  constexpr const char* op = "rms_norm_2d_fwd";
  auto a = check_channel_norm(X_in, gamma, c10::nullopt, residual, act, op);
  auto [Y, mean, rstd] = fwd_2d(a, eps, act, slope, true, op);
  return {Y, rstd};
}

// Channel (2d) backward of checked input; mean_in undefined: RMSNorm2d.
std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_2d(const Tensor& dY_in, ChannelNormArgs& a,
                                                  const Tensor& mean_in, const Tensor& rstd_in, int64_t act,
                                                  double slope, std::array<bool, 4> mask, const char* op) {
  const DeviceGuard guard(a.X.device());
  const auto [N, C, HxW] = a.dims;
  check_int_extent(C, "a channel dimension", op);
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = mean_in.defined() ? check_stats(mean_in, a.X, N * HxW, "mean", op) : Tensor();
  const Tensor rstd = check_stats(rstd_in, a.X, N * HxW, "rstd", op);
  auto [dX, dgamma, dbeta, dR] = alloc_grads(a.X, {C}, mask);
  if (no_grads(a.X, mask)) return {dX, dgamma, dbeta, dR};
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "layer_norm_2d_bwd_cuda", [&] {
    auto p = make_ptrs<scalar_t>(a.X, a.residual, a.gamma, a.beta, mean, rstd);
    set_grad_ptrs(p, dY, dX, dR, mask);
    float* dg = mask[1] ? dgamma.data_ptr<float>() : nullptr;
    float* db = mask[2] ? dbeta.data_ptr<float>() : nullptr;
    if (a.rows) {
      rows_backward(p, N * HxW, static_cast<int>(C), static_cast<int>(act), static_cast<float>(slope), dg,
                    db);
    } else {
      nchw_backward(p, a.dims, static_cast<int>(act), static_cast<float>(slope), dg, db);
    }
  });
  return {dX, dgamma, dbeta, dR};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_2d_bwd_cuda(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta, int64_t act,
    double slope, std::array<bool, 4> mask) {
  constexpr const char* op = "layer_norm_2d_bwd";
  auto a = check_channel_norm(X_in, gamma, beta, residual, check_grad_activation(act, op), op);
  return bwd_2d(dY_in, a, mean_in, rstd_in, act, slope, mask, op);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_2d_bwd_cuda(const Tensor& dY_in, const Tensor& X_in,
                                                        const c10::optional<Tensor>& residual,
                                                        const Tensor& rstd_in,
                                                        const c10::optional<Tensor>& gamma, int64_t act,
                                                        double slope, std::array<bool, 3> mask) {
  constexpr const char* op = "rms_norm_2d_bwd";
  auto a = check_channel_norm(X_in, gamma, c10::nullopt, residual, check_grad_activation(act, op), op);
  auto [dX, dgamma, dbeta, dR] =
      bwd_2d(dY_in, a, Tensor(), rstd_in, act, slope, {mask[0], mask[1], false, mask[2]}, op);
  return {dX, dgamma, dR};
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, NORMEXT_CUDA_DISPATCH_KEY, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
  m.impl("layer_norm_2d_fwd", &layer_norm_2d_fwd_cuda);
  m.impl("layer_norm_2d_bwd", &layer_norm_2d_bwd_cuda);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
  m.impl("rms_norm_2d_fwd", &rms_norm_2d_fwd_cuda);
  m.impl("rms_norm_2d_bwd", &rms_norm_2d_bwd_cuda);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cuda);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_cuda);
}

}  // namespace normext::cuda
