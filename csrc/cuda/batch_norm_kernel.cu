// BatchNorm on CUDA: the batch_norm_* ops registered at the CUDA key. Per-channel statistics are a
// column reduction: a partial kernel reduces (channel block x partition) tiles to Welford partials
// (or backward sums), a finalize kernel merges each channel's partials in a fixed order into
// mean/rstd and the running statistics (no atomics: deterministic), and apply / the backward
// elementwise pass are one kernel each; small inputs take one launch forward and one for the backward
// sums (small_*_kernel). Two views of X (ChannelNormArgs::rows): rows of C channels (channels-last, or no
// spatial extent) and N·C planes of HxW (channels-first).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include "common.cuh"
#include "normext/checks.h"
#include "normext/math.h"

namespace normext::cuda {
namespace {

using at::Tensor;

constexpr int kBlock = 256;
// Rows view: a block is `cols` vector columns (VEC channels each; a power of two up to 32, the fewest that
// cover C, so that a small C such as 64 bf16 channels keeps every lane busy) x kBlock / cols thread rows.
constexpr int kMaxCols = kWarpSize;
// Loads in flight per thread. Every streaming kernel is bounded to kStreamBlocks blocks of kBlock threads
// per SM, 64 registers a thread: 50% theoretical occupancy on sm_90, which the unrolls below fit without
// spills. The reduction loops do one Welford step per value; the elementwise loops carry VEC-wide
// per-channel constants, so they keep fewer (8-wide vectors: one). The backward loops recompute x̂ and
// dz = dy·act'(z) per value (the activation a run-time switch) from three streams (x, dy, r): they load one
// vector of each per step from 4-wide vectors up, two below (more spilled up to 1 KB at 64 registers). An
// unroll never changes a thread's order of accumulation, only how many loads are in flight.
template <int VEC>
constexpr int kReduceUnroll = VEC >= 8 ? 2 : 4;
template <int VEC>
constexpr int kApplyUnroll = VEC >= 8 ? 1 : 2;
template <int VEC>
constexpr int kGradUnroll = VEC >= 4 ? 1 : 2;
constexpr int kStreamBlocks = 4;
// Blocks to aim for. Constants rather than the device's SM count: the partition fixes the
// reduction order, which must depend on the shape only.
constexpr int64_t kReduceBlocks = 1024;
constexpr int64_t kApplyBlocks = 4096;
constexpr int64_t kMinPerThread = 4;  // rows / tiles per thread row that make a partition worth a block

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
    rstd = second_is_var ? rsqrt_rn(second[c] + eps) : second[c];
    g = gamma != nullptr ? gamma[c] : 1.f;
    b = beta != nullptr ? beta[c] : 0.f;
  }
};

// The backward elementwise pass: dX = a·dz + b·x̂ + c with a = gamma·rstd, b = -a·Σdz·x̂·inv,
// c = -a·Σdz·inv; without sums (null) b = c = 0.
struct GradSums {
  const float* sum_dz;
  const float* sum_dzx;
  float inv_count;

  __device__ __forceinline__ void coefs(int64_t c, float g, float rstd, float& a, float& b, float& k) const {
    a = g * rstd;
    b = sum_dzx != nullptr ? -a * sum_dzx[c] * inv_count : 0.f;
    k = sum_dz != nullptr ? -a * sum_dz[c] * inv_count : 0.f;
  }
};

// Backward: x̂ and dz = dy·act'(z) come from normext/xhat_source.h (from x, or from the output y with
// kFromOutput: X then holds y); z is recomputed, never saved.

// ------------------------------------------------------------------------------ rows view kernels
// X is rows x C, row-major. Thread (x, y) = (threadIdx.x % cols, threadIdx.x / cols) owns the VEC
// channels starting at c = (blockIdx.x * cols + x) * VEC (VEC > 1 only when C % VEC == 0 and every
// pointer is VEC-aligned, so a vector never straddles rows) and walks rows y, y + trows, ... (trows =
// kBlock / cols).

// Partial moments of partition p = blockIdx.y, rows [p * rows_per_part, ...) (never empty). Each lane
// runs Welford on x - K, K the partition's first row, so float rounding scales with the spread and
// not with the magnitude; column_reduce merges the trows states of each channel. Writes the partial
// (mean, M2) and its count at [p * C + c].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    rows_moments_kernel(const scalar_t* __restrict__ X, int64_t rows, int64_t C, int cols,
                        int64_t rows_per_part, float* __restrict__ means, float* __restrict__ m2s,
                        float* __restrict__ counts) {
  NORMEXT_SHARED(WelfordF, buf, kBlock * VEC);
  const int x = threadIdx.x % cols, y = threadIdx.x / cols, trows = kBlock / cols;
  const int64_t c = (int64_t(blockIdx.x) * cols + x) * VEC;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_part;
  const int64_t r1 = std::min(rows, r0 + rows_per_part);
  const bool active = c < C;
  Lanes<VEC> shift(0.f);
  WelfordLanes<VEC> w = welford_lanes_zero<VEC>();
  if (active) {
    shift = to_lanes(load_vec<VEC>(X, r0 * C + c));
    for (int64_t r = r0 + y; r < r1; r += kReduceUnroll<VEC> * trows) {
      AlignedVector<scalar_t, VEC> v[kReduceUnroll<VEC>];
#pragma unroll
      for (int u = 0; u < kReduceUnroll<VEC>; ++u) {
        if (r + u * trows < r1) v[u] = load_vec<VEC>(X, (r + u * trows) * C + c);
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll<VEC>; ++u) {
        if (r + u * trows < r1) welford_push(w, to_lanes(v[u]) - shift);
      }
    }
  }
  WelfordF lanes[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) lanes[e] = welford_lane(w, e);
  column_reduce<VEC>(lanes, buf, y, x, trows, cols, WelfordOp{});
  if (y != 0 || !active) return;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const WelfordF t = buf[x * VEC + e];
    means[blockIdx.y * C + c + e] = shift.v[e] + t.mean;
    m2s[blockIdx.y * C + c + e] = t.m2;
    counts[blockIdx.y * C + c + e] = t.n;
  }
}

// Partial backward sums Σdz and Σdz·x̂ of partition p = blockIdx.y, merged over the thread rows by
// column_reduce; written at [p * C + c].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    rows_grad_sums_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                          const scalar_t* __restrict__ R, int64_t rows, int64_t C, int cols,
                          int64_t rows_per_part, Channels ch, int64_t act, float slope,
                          Sum2* __restrict__ partial) {
  NORMEXT_SHARED(Sum2, buf, kBlock * VEC);
  const int x = threadIdx.x % cols, y = threadIdx.x / cols, trows = kBlock / cols;
  const int64_t c = (int64_t(blockIdx.x) * cols + x) * VEC;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_part;
  const int64_t r1 = std::min(rows, r0 + rows_per_part);
  const bool active = c < C;
  float mean[VEC], rstd[VEC], g[VEC], b[VEC];
  Sum2 acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    acc[e] = Sum2{0.f, 0.f};
    if (active) ch.at(c + e, mean[e], rstd[e], g[e], b[e]);
  }
  if (active) {
    for (int64_t r = r0 + y; r < r1; r += kGradUnroll<VEC> * trows) {
      AlignedVector<scalar_t, VEC> xv[kGradUnroll<VEC>], dv[kGradUnroll<VEC>], rv[kGradUnroll<VEC>];
#pragma unroll
      for (int u = 0; u < kGradUnroll<VEC>; ++u) {
        if (r + u * trows < r1) {
          const int64_t o = (r + u * trows) * C + c;
          xv[u] = load_vec<VEC>(X, o);
          dv[u] = load_vec<VEC>(dY, o);
          rv[u] = load_vec_or_zero<VEC>(R, o);
        }
      }
#pragma unroll
      for (int u = 0; u < kGradUnroll<VEC>; ++u) {
        if (r + u * trows >= r1) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xv_e = static_cast<float>(xv[u].val[e]), rv_e = static_cast<float>(rv[u].val[e]);
          const float xhat = xhat_from(xv_e, rv_e, mean[e], rstd[e], g[e], b[e], act, slope);
          const float dz =
              grad_pre_act(static_cast<float>(dv[u].val[e]), xv_e, xhat, g[e], b[e], rv_e, act, slope);
          acc[e].a += dz;
          acc[e].b += dz * xhat;
        }
      }
    }
  }
  column_reduce<VEC>(acc, buf, y, x, trows, cols, SumOp{});
  if (y != 0 || !active) return;
#pragma unroll
  for (int e = 0; e < VEC; ++e) partial[blockIdx.y * C + c + e] = buf[x * VEC + e];
}

// Y = act((x - mean)·(gamma·rstd) + beta + R); rows blockIdx.y·trows + y, grid-strided.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    rows_apply_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ R,
                      scalar_t* __restrict__ Y, int64_t rows, int64_t C, int cols, Channels ch, int64_t act,
                      float slope) {
  const int x = threadIdx.x % cols, y = threadIdx.x / cols, trows = kBlock / cols;
  const int64_t c = (int64_t(blockIdx.x) * cols + x) * VEC;
  if (c >= C) return;
  float mean[VEC], scale[VEC], beta[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    float rstd, g;
    ch.at(c + e, mean[e], rstd, g, beta[e]);
    scale[e] = g * rstd;
  }
  const int64_t step = int64_t(gridDim.y) * trows;
  for (int64_t r = int64_t(blockIdx.y) * trows + y; r < rows; r += kApplyUnroll<VEC> * step) {
    AlignedVector<scalar_t, VEC> xv[kApplyUnroll<VEC>], rv[kApplyUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kApplyUnroll<VEC>; ++u) {
      if (r + u * step < rows) {
        xv[u] = load_vec<VEC>(X, (r + u * step) * C + c);
        rv[u] = load_vec_or_zero<VEC>(R, (r + u * step) * C + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kApplyUnroll<VEC>; ++u) {
      if (r + u * step >= rows) continue;
      float out[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float z = (static_cast<float>(xv[u].val[e]) - mean[e]) * scale[e] + beta[e] +
                        static_cast<float>(rv[u].val[e]);
        out[e] = act_forward<float, float>(z, act, slope);
      }
      store_float<VEC>(Y, (r + u * step) * C + c, out);
    }
  }
}

// dX = a·dz + b·x̂ + c and dR = dz (either may be null), rows as in rows_apply_kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    rows_grad_input_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                           const scalar_t* __restrict__ R, int64_t rows, int64_t C, int cols, Channels ch,
                           GradSums gs, int64_t act, float slope, scalar_t* __restrict__ dX,
                           scalar_t* __restrict__ dR) {
  const int x = threadIdx.x % cols, y = threadIdx.x / cols, trows = kBlock / cols;
  const int64_t c = (int64_t(blockIdx.x) * cols + x) * VEC;
  if (c >= C) return;
  float mean[VEC], rstd[VEC], g[VEC], b[VEC], ka[VEC], kb[VEC], kc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    ch.at(c + e, mean[e], rstd[e], g[e], b[e]);
    gs.coefs(c + e, g[e], rstd[e], ka[e], kb[e], kc[e]);
  }
  const int64_t step = int64_t(gridDim.y) * trows;
  for (int64_t r = int64_t(blockIdx.y) * trows + y; r < rows; r += kGradUnroll<VEC> * step) {
    AlignedVector<scalar_t, VEC> xv[kGradUnroll<VEC>], dv[kGradUnroll<VEC>], rv[kGradUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      if (r + u * step < rows) {
        const int64_t o = (r + u * step) * C + c;
        xv[u] = load_vec<VEC>(X, o);
        dv[u] = load_vec<VEC>(dY, o);
        rv[u] = load_vec_or_zero<VEC>(R, o);
      }
    }
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      if (r + u * step >= rows) continue;
      float dz[VEC], dx[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xv_e = static_cast<float>(xv[u].val[e]), rv_e = static_cast<float>(rv[u].val[e]);
        const float xhat = xhat_from(xv_e, rv_e, mean[e], rstd[e], g[e], b[e], act, slope);
        dz[e] = grad_pre_act(static_cast<float>(dv[u].val[e]), xv_e, xhat, g[e], b[e], rv_e, act, slope);
        dx[e] = ka[e] * dz[e] + kb[e] * xhat + kc[e];
      }
      const int64_t o = (r + u * step) * C + c;
      if (dR != nullptr) store_float<VEC>(dR, o, dz);
      if (dX != nullptr) store_float<VEC>(dX, o, dx);
    }
  }
}

// ---------------------------------------------------------------------------- planes view kernels
// X is N x C x HxW. Plane nc = n * C + c starts (nc * HxW) % VEC elements past a VEC-aligned address (0 when
// HxW % VEC == 0) and is cut, from that address, into S tiles of tx VEC-element chunks: a plane of odd HxW
// (49 in RoI heads) keeps full vectors in its body and reads its head and tail chunks element by element
// (chunk_part). Thread (threadIdx.x % tx, threadIdx.x / tx) takes chunk threadIdx.x % tx of every
// (kBlock / tx)-th tile. VEC > 1 only when every pointer is VEC-aligned; tx is a power of two dividing
// kBlock.

// Where the chunk at element `lane` of tile s of plane nc starts, relative to the plane (< 0 at its head).
template <int VEC>
__device__ __forceinline__ int64_t plane_chunk_pos(int64_t nc, int64_t HxW, int64_t s, int64_t tile_len,
                                                   int64_t lane) {
  return s * tile_len + lane - ((nc * HxW) & (VEC - 1));
}

// Partial moments of channel c = blockIdx.x over its partition p = blockIdx.y of tiles t = n * S + s,
// [p * tiles_per_part, ...) (never empty). Welford on x - K (K the partition's first value of the channel):
// full chunks lane-wise, head and tail values in one more running state, merged in order, then the block by
// block_allreduce; writes [p * C + c] of means, m2s and counts (a partition's count differs between channels
// when their planes' heads do).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    planes_moments_kernel(const scalar_t* __restrict__ X, int64_t C, int64_t HxW, int tx, int64_t S,
                          int64_t tiles, int64_t tiles_per_part, float* __restrict__ means,
                          float* __restrict__ m2s, float* __restrict__ counts) {
  NORMEXT_SHARED(WelfordF, red, kBlock / kWarpSize);
  const int ty = kBlock / tx;
  const int64_t c = blockIdx.x;
  const int64_t tile_len = int64_t(tx) * VEC, lane = int64_t(threadIdx.x % tx) * VEC;
  const int64_t t0 = int64_t(blockIdx.y) * tiles_per_part;
  const int64_t t1 = std::min(tiles, t0 + tiles_per_part);
  const int64_t n0 = t0 / S;
  const int64_t first = plane_chunk_pos<VEC>(n0 * C + c, HxW, t0 - n0 * S, tile_len, 0);
  const float shift = static_cast<float>(X[(n0 * C + c) * HxW + std::clamp<int64_t>(first, 0, HxW - 1)]);
  WelfordLanes<VEC> w = welford_lanes_zero<VEC>();
  WelfordF edge{0.f, 0.f, 0.f};
  ChannelCursor cur(t0 + threadIdx.x / tx, ty, S);  // (n, s) of tile t
  for (int64_t t = t0 + threadIdx.x / tx; t < t1; t += kReduceUnroll<VEC> * ty) {
    AlignedVector<scalar_t, VEC> v[kReduceUnroll<VEC>];
    bool full[kReduceUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kReduceUnroll<VEC>; ++u) {
      const int64_t nc = cur.c * C + c, pos = plane_chunk_pos<VEC>(nc, HxW, cur.rem, tile_len, lane);
      full[u] = t + u * ty < t1 && chunk_part<VEC>(pos, HxW).full();
      if (full[u]) v[u] = load_vec<VEC>(X, nc * HxW + pos);
      cur.advance(S);
    }
#pragma unroll
    for (int u = 0; u < kReduceUnroll<VEC>; ++u) {
      if (full[u]) welford_push(w, to_lanes(v[u]) - Lanes<VEC>(shift));
    }
  }
  // Heads and tails in a second walk over the same tiles: inside the unrolled loop their bounds and the
  // scalar Welford steps spilled registers (ptxas, 28-56 bytes at VEC = 4 and 8).
  if (VEC > 1 && HxW % VEC != 0) {
    ChannelCursor edge_cur(t0 + threadIdx.x / tx, ty, S);
    for (int64_t t = t0 + threadIdx.x / tx; t < t1; t += ty) {
      const int64_t nc = edge_cur.c * C + c,
                    pos = plane_chunk_pos<VEC>(nc, HxW, edge_cur.rem, tile_len, lane);
      const ChunkPart<VEC> part = chunk_part<VEC>(pos, HxW);
      if (!part.empty() && !part.full()) {
        const auto e = load_vec_part<VEC>(X, nc * HxW + pos, part);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (part.has(j)) welford_push(edge, static_cast<float>(e.val[j]) - shift);
        }
      }
      edge_cur.advance(S);
    }
  }
  const WelfordF total = block_allreduce(normext::welford_merge(welford_merge_lanes(w), edge), WelfordOp{},
                                         red, kBlock / kWarpSize);
  if (threadIdx.x == 0) {
    means[blockIdx.y * C + c] = shift + total.mean;
    m2s[blockIdx.y * C + c] = total.m2;
    counts[blockIdx.y * C + c] = total.n;
  }
}

// Partial backward sums Σdz and Σdz·x̂ of channel c = blockIdx.x over partition p = blockIdx.y.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    planes_grad_sums_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                            const scalar_t* __restrict__ R, int64_t C, int64_t HxW, int tx, int64_t S,
                            int64_t tiles, int64_t tiles_per_part, Channels ch, int64_t act, float slope,
                            Sum2* __restrict__ partial) {
  NORMEXT_SHARED(Sum2, red, kBlock / kWarpSize);
  const int ty = kBlock / tx;
  const int64_t c = blockIdx.x;
  const int64_t tile_len = int64_t(tx) * VEC, lane = int64_t(threadIdx.x % tx) * VEC;
  const int64_t t0 = int64_t(blockIdx.y) * tiles_per_part;
  const int64_t t1 = std::min(tiles, t0 + tiles_per_part);
  float mean, rstd, g, b;
  ch.at(c, mean, rstd, g, b);
  Sum2 acc{0.f, 0.f};
  ChannelCursor cur(t0 + threadIdx.x / tx, ty, S);
  for (int64_t t = t0 + threadIdx.x / tx; t < t1; t += kGradUnroll<VEC> * ty) {
    AlignedVector<scalar_t, VEC> xv[kGradUnroll<VEC>], dv[kGradUnroll<VEC>], rv[kGradUnroll<VEC>];
    ChunkPart<VEC> part[kGradUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      const int64_t nc = cur.c * C + c, pos = plane_chunk_pos<VEC>(nc, HxW, cur.rem, tile_len, lane);
      part[u] = t + u * ty < t1 ? chunk_part<VEC>(pos, HxW) : ChunkPart<VEC>{0, 0};
      if (!part[u].empty()) {
        const int64_t o = nc * HxW + pos;
        xv[u] = load_vec_part<VEC>(X, o, part[u]);
        dv[u] = load_vec_part<VEC>(dY, o, part[u]);
        rv[u] = load_vec_part<VEC>(R, o, part[u]);
      }
      cur.advance(S);
    }
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (!part[u].has(e)) continue;
        const float xv_e = static_cast<float>(xv[u].val[e]), rv_e = static_cast<float>(rv[u].val[e]);
        const float xhat = xhat_from(xv_e, rv_e, mean, rstd, g, b, act, slope);
        const float dz = grad_pre_act(static_cast<float>(dv[u].val[e]), xv_e, xhat, g, b, rv_e, act, slope);
        acc.a += dz;
        acc.b += dz * xhat;
      }
    }
  }
  acc = block_allreduce(acc, SumOp{}, red, kBlock / kWarpSize);
  if (threadIdx.x == 0) partial[blockIdx.y * C + c] = acc;
}

// Elementwise over all N·C·S tiles t (plane nc = t / S, channel nc % C), grid-strided:
// Y = act((x - mean)·(gamma·rstd) + beta + R).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    planes_apply_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ R,
                        scalar_t* __restrict__ Y, int64_t C, int64_t HxW, int tx, int64_t S, int64_t tiles,
                        Channels ch, int64_t act, float slope) {
  const int ty = kBlock / tx;
  const int64_t tile_len = int64_t(tx) * VEC, lane = int64_t(threadIdx.x % tx) * VEC;
  for (int64_t t = int64_t(blockIdx.x) * ty + threadIdx.x / tx; t < tiles; t += int64_t(gridDim.x) * ty) {
    const int64_t nc = div_idx(t, S);
    const int64_t pos = plane_chunk_pos<VEC>(nc, HxW, t - nc * S, tile_len, lane);
    const ChunkPart<VEC> part = chunk_part<VEC>(pos, HxW);
    if (part.empty()) continue;
    float mean, rstd, g, b;
    ch.at(nc - div_idx(nc, C) * C, mean, rstd, g, b);
    const float scale = g * rstd;
    const int64_t o = nc * HxW + pos;
    float xv[VEC], rv[VEC], out[VEC];
    load_float_part<VEC>(X, o, part, xv);
    load_float_part<VEC>(R, o, part, rv);
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      out[e] = act_forward<float, float>((xv[e] - mean) * scale + b + rv[e], act, slope);
    store_float_part<VEC>(Y, o, part, out);
  }
}

// dX = a·dz + b·x̂ + c and dR = dz over all tiles, as planes_apply_kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    planes_grad_input_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                             const scalar_t* __restrict__ R, int64_t C, int64_t HxW, int tx, int64_t S,
                             int64_t tiles, Channels ch, GradSums gs, int64_t act, float slope,
                             scalar_t* __restrict__ dX, scalar_t* __restrict__ dR) {
  const int ty = kBlock / tx;
  const int64_t tile_len = int64_t(tx) * VEC, lane = int64_t(threadIdx.x % tx) * VEC;
  for (int64_t t = int64_t(blockIdx.x) * ty + threadIdx.x / tx; t < tiles; t += int64_t(gridDim.x) * ty) {
    const int64_t nc = div_idx(t, S);
    const int64_t pos = plane_chunk_pos<VEC>(nc, HxW, t - nc * S, tile_len, lane);
    const ChunkPart<VEC> part = chunk_part<VEC>(pos, HxW);
    if (part.empty()) continue;
    const int64_t c = nc - div_idx(nc, C) * C;
    float mean, rstd, g, b, ka, kb, kc;
    ch.at(c, mean, rstd, g, b);
    gs.coefs(c, g, rstd, ka, kb, kc);
    const int64_t o = nc * HxW + pos;
    float xv[VEC], dv[VEC], rv[VEC], dz[VEC], dx[VEC];
    load_float_part<VEC>(X, o, part, xv);
    load_float_part<VEC>(dY, o, part, dv);
    load_float_part<VEC>(R, o, part, rv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xhat = xhat_from(xv[e], rv[e], mean, rstd, g, b, act, slope);
      dz[e] = grad_pre_act(dv[e], xv[e], xhat, g, b, rv[e], act, slope);
      dx[e] = ka * dz[e] + kb * xhat + kc;
    }
    if (dR != nullptr) store_float_part<VEC>(dR, o, part, dz);
    if (dX != nullptr) store_float_part<VEC>(dX, o, part, dx);
  }
}

// ------------------------------------------------------------------------------ finalize kernels
// A run of wpc warps (finalize_warps(K)) per channel c = blockIdx.x * (kBlock / 32 / wpc) + warp / wpc:
// thread i of the run merges parts i, i + 32*wpc, ... in turn, then a warp tree and the run's warps in order
// (block_allreduce). The order is fixed by K (a function of the shape), and a large input's ~1024 parts are
// at most kFinalizePerLane steps per lane and a tree, not a chain of K / 32 dependent steps in one warp.

constexpr int kFinalizePerLane = 4;

// Warps per channel: the fewest (a power of two up to a block) that leave each lane at most kFinalizePerLane
// parts.
int finalize_warps(int64_t K) {
  int w = 1;
  while (w < kBlock / kWarpSize && int64_t(w) * kWarpSize * kFinalizePerLane < K) w *= 2;
  return w;
}

unsigned finalize_blocks(int64_t C, int wpc) {
  return unsigned(ceil_div<int64_t>(C, (kBlock / kWarpSize) / wpc));
}

// This thread's channel and its index within the channel's run of wpc warps.
struct FinalizeSlot {
  int64_t c;
  int i;
};

__device__ __forceinline__ FinalizeSlot finalize_slot(int wpc) {
  const int warp = threadIdx.x / kWarpSize;
  return {int64_t(blockIdx.x) * ((kBlock / kWarpSize) / wpc) + warp / wpc,
          (warp % wpc) * kWarpSize + int(threadIdx.x % kWarpSize)};
}

enum FinalizeMode : int { kOutRstd = 0, kOutVar = 1, kOutM2 = 2 };

// Σ n, Σ n·(mean − K) and Σ (M2 + n·(mean − K)²) over partial moments, K a shift: sums that need no
// division per part (a Chan merge divides at every step, and the IEEE division's subroutine call made ptxas
// spill registers around it in this loop).
struct ShiftedSums {
  double n, s1, s2;
};

__device__ __forceinline__ ShiftedSums operator+(const ShiftedSums& a, const ShiftedSums& b) {
  return {a.n + b.n, a.s1 + b.s1, a.s2 + b.s2};
}

__device__ __forceinline__ ShiftedSums shfl_down(const ShiftedSums& v, int off) {
  return {cuda::shfl_down(v.n, off), cuda::shfl_down(v.s1, off), cuda::shfl_down(v.s2, off)};
}

// Merges K partial moments (means/m2s[k * C + c], counts[k * C + c], or counts[k] when !count_per_channel)
// in double (the parts' means can be far
// apart relative to the spread; this is K·C work, not numel) into out_mean and, by mode, rstd =
// 1/sqrt(var + eps), the biased variance, or M2. Moves the running statistics (any strides) toward
// the mean and the unbiased variance unless the total count is 0. The parts are summed about the first
// part's mean K: M2 = Σ (M2_k + n_k·d_k²) − (Σ n_k·d_k)²/n with d_k = mean_k − K, whose cancellation in
// double stays below float32 rounding unless the parts' means are ~10^4 standard deviations apart.
template <typename R>
__global__ void __launch_bounds__(kBlock)
    finalize_moments_kernel(const float* __restrict__ counts, bool count_per_channel,
                            const float* __restrict__ means, const float* __restrict__ m2s, int64_t K,
                            int64_t C, int wpc, int mode, double eps, double momentum,
                            float* __restrict__ out_mean, float* __restrict__ out_second, R* running_mean,
                            int64_t rm_stride, R* running_var, int64_t rv_stride) {
  NORMEXT_SHARED(ShiftedSums, red, kBlock / kWarpSize);
  const auto [c, i] = finalize_slot(wpc);
  const bool live = c < C;  // uniform across a run; every thread still takes part in the block reduction
  const double shift = live && K > 0 ? double(means[c]) : 0.0;
  ShiftedSums acc{0.0, 0.0, 0.0};
  for (int64_t k = i; live && k < K; k += int64_t(wpc) * kWarpSize) {
    const double n = double(counts[count_per_channel ? k * C + c : k]), d = double(means[k * C + c]) - shift;
    acc = acc + ShiftedSums{n, n * d, double(m2s[k * C + c]) + n * d * d};
  }
  const ShiftedSums t = block_allreduce(acc, SumOp{}, red, wpc);
  if (!live || i != 0) return;
  const double d = t.n > 0.0 ? t.s1 / t.n : 0.0;
  const WelfordD w{shift + d, std::max(t.s2 - t.s1 * d, 0.0), t.n};
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

// Sums K partial backward sums per channel into sum_dz / sum_dzx.
__global__ void __launch_bounds__(kBlock)
    finalize_sums_kernel(const Sum2* __restrict__ partial, int64_t K, int64_t C, int wpc,
                         float* __restrict__ sum_dz, float* __restrict__ sum_dzx) {
  NORMEXT_SHARED(Sum2, red, kBlock / kWarpSize);
  const auto [c, i] = finalize_slot(wpc);
  const bool live = c < C;
  Sum2 acc{0.f, 0.f};
  for (int64_t k = i; live && k < K; k += int64_t(wpc) * kWarpSize) acc = acc + partial[k * C + c];
  const Sum2 s = block_allreduce(acc, SumOp{}, red, wpc);
  if (live && i == 0) {
    sum_dz[c] = s.a;
    sum_dzx[c] = s.b;
  }
}

// ------------------------------------------------------------------------- small inputs: one launch
// Inputs of at most kSmallNumel values in channels of at most kSmallCount (the latency floor of design.md §6,
// e.g. 2x256x7x7), where the launch count decides: a warp per channel c = blockIdx.x * (kBlock / 32) + warp
// does in one launch what the partial, finalize and elementwise kernels do in three (two in the backward).
// Lane l takes the channel's values l, l + 32, ... in turn; value k is row k of the rows view, or element k %
// HxW of plane (k / HxW, c). Exact two passes over the values (few, and in L1 by the second), summed over the
// warp by group_allsum, whose order is fixed by the shape.
constexpr int64_t kSmallCount = 2048;
constexpr int64_t kSmallNumel = 65536;

struct SmallView {
  int64_t C, HxW, count;  // count = N·HxW values per channel
  bool rows;
  double unbias;  // 1 / (count - 1), from the host: the unbiased variance without a division in the kernel

  // Indices below kSmallNumel: 32-bit division.
  __device__ __forceinline__ int64_t at(int64_t c, int64_t k) const {
    if (rows) return k * C + c;
    const int64_t n = div32(k, HxW);
    return (n * C + c) * HxW + (k - n * HxW);
  }
};

// Forward: mean = K + Σ(x − K)/n (K the channel's first value), var = Σ(x − mean)²/n; the running statistics
// move toward the mean and the unbiased variance (in double, as finalize_moments_kernel); then Y.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    small_fwd_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ R, scalar_t* __restrict__ Y,
                     SmallView v, const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
                     double momentum, float* __restrict__ out_mean, float* __restrict__ out_rstd,
                     float* running_mean, int64_t rm_stride, float* running_var, int64_t rv_stride,
                     int64_t act, float slope) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t c = int64_t(blockIdx.x) * (kBlock / kWarpSize) + threadIdx.x / kWarpSize;
  if (c >= v.C) return;  // warp-uniform
  const float n = static_cast<float>(v.count);
  const float shift = static_cast<float>(X[v.at(c, 0)]);
  float s = 0.f;
  for (int64_t k = lane; k < v.count; k += kWarpSize) s += static_cast<float>(X[v.at(c, k)]) - shift;
  const float mean = shift + nx_div(group_allsum(s, kWarpSize), n);
  float q = 0.f;
  for (int64_t k = lane; k < v.count; k += kWarpSize) {
    const float d = static_cast<float>(X[v.at(c, k)]) - mean;
    q += d * d;
  }
  const float m2 = group_allsum(q, kWarpSize);
  const float rstd = rsqrt_rn(nx_div(m2, n) + eps);
  if (lane == 0) {
    out_mean[c] = mean;
    out_rstd[c] = rstd;
    if (running_mean != nullptr) {
      float& r = running_mean[c * rm_stride];
      r = float((1.0 - momentum) * double(r) + momentum * double(mean));
    }
    if (running_var != nullptr) {
      float& r = running_var[c * rv_stride];
      r = float((1.0 - momentum) * double(r) + momentum * (double(m2) * v.unbias));
    }
  }
  const float scale = (gamma != nullptr ? gamma[c] : 1.f) * rstd, b = beta != nullptr ? beta[c] : 0.f;
  for (int64_t k = lane; k < v.count; k += kWarpSize) {
    const int64_t o = v.at(c, k);
    const float z =
        (static_cast<float>(X[o]) - mean) * scale + b + (R != nullptr ? static_cast<float>(R[o]) : 0.f);
    Y[o] = static_cast<scalar_t>(act_forward<float, float>(z, act, slope));
  }
}

// Backward sums Σdz and Σdz·x̂ per channel, as the partial and finalize kernels give them.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    small_grad_sums_kernel(const scalar_t* __restrict__ dY, const scalar_t* __restrict__ X,
                           const scalar_t* __restrict__ R, SmallView v, Channels ch, int64_t act, float slope,
                           float* __restrict__ sum_dz, float* __restrict__ sum_dzx) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t c = int64_t(blockIdx.x) * (kBlock / kWarpSize) + threadIdx.x / kWarpSize;
  if (c >= v.C) return;  // warp-uniform
  float mean, rstd, g, b;
  ch.at(c, mean, rstd, g, b);
  Sum2 acc{0.f, 0.f};
  for (int64_t k = lane; k < v.count; k += kWarpSize) {
    const int64_t o = v.at(c, k);
    const float u = static_cast<float>(X[o]), r = R != nullptr ? static_cast<float>(R[o]) : 0.f;
    const float xhat = xhat_from(u, r, mean, rstd, g, b, act, slope);
    const float dz = grad_pre_act(static_cast<float>(dY[o]), u, xhat, g, b, r, act, slope);
    acc.a += dz;
    acc.b += dz * xhat;
  }
  acc = group_allsum(acc, kWarpSize);
  if (lane == 0) {
    sum_dz[c] = acc.a;
    sum_dzx[c] = acc.b;
  }
}

// ----------------------------------------------------------------------------------- host side

// Launch geometry over a BatchNorm input for vector width vec.
struct Plan {
  bool rows_view;
  int64_t N, C, HxW, rows;  // rows = N * HxW (rows view)
  int vec;
  int cols;          // rows view: vector columns per block
  int64_t blocks_x;  // rows view: channel blocks
  int tx;            // planes view: threads per tile
  int64_t S;         // planes view: tiles per plane
  // Reductions: `parts` partitions of rows_per_part rows (rows view) or tiles_per_part of the N·S
  // tiles of a channel (planes view).
  int64_t parts, rows_per_part, tiles_per_part;
};

Plan make_plan(const ChannelNormArgs& a, int vec) {
  Plan p{};
  p.rows_view = a.rows;
  p.N = a.dims.N;
  p.C = a.dims.C;
  p.HxW = a.dims.HxW;
  p.rows = p.N * p.HxW;
  p.vec = vec;
  if (p.rows_view) {
    p.cols = kMaxCols;
    while (p.cols > 1 && int64_t(p.cols / 2) * vec >= p.C) p.cols /= 2;
    p.blocks_x = ceil_div<int64_t>(p.C, int64_t(p.cols) * vec);
    const int64_t parts = std::clamp<int64_t>(ceil_div(kReduceBlocks, p.blocks_x), 1,
                                              ceil_div<int64_t>(p.rows, (kBlock / p.cols) * kMinPerThread));
    p.rows_per_part = ceil_div(p.rows, parts);
    p.parts = ceil_div(p.rows, p.rows_per_part);  // no empty partition
  } else {
    // A plane whose start is not vec-aligned (HxW % vec != 0) spans up to vec - 1 more elements of chunks.
    const int64_t span = p.HxW % vec == 0 ? p.HxW : p.HxW + vec - 1;
    int64_t tx = 1;
    while (tx < kBlock && tx * vec < span) tx *= 2;
    p.tx = int(tx);
    p.S = ceil_div<int64_t>(span, tx * vec);
    const int64_t tiles = p.N * p.S;
    const int64_t parts = std::clamp<int64_t>(ceil_div(kReduceBlocks, p.C), 1,
                                              ceil_div<int64_t>(tiles, (kBlock / tx) * kMinPerThread));
    p.tiles_per_part = ceil_div(tiles, parts);
    p.parts = ceil_div(tiles, p.tiles_per_part);
  }
  return p;
}

// The widest vector (widest_vec) every pointer is aligned to and, for rows, C is a multiple of: C = 60 in
// bfloat16 takes 8-byte vectors. Planes of any HxW take the widest vector, with a head and tail per plane.
template <typename scalar_t, typename... P>
int vec_for(const ChannelNormArgs& a, const P*... ptrs) {
  return widest_vec<scalar_t>(a.rows ? a.dims.C : kMaxVec<scalar_t>, ptrs...);
}

// Calls f(std::integral_constant<int, VEC>) for the plan's vector width.
template <typename scalar_t, typename F>
void with_vec(const Plan& p, const F& f) {
  dispatch_vec<scalar_t>(p.vec, f);
}

// The rows-view backward kernels take at most 4 values per vector (8 bytes of a 16-bit type): at 8 lanes
// their per-channel constants (mean, rstd, gamma, beta and the three dx coefficients: 7 x 8 floats) do not
// fit the 64 registers of kStreamBlocks (ptxas spilled 380-510 bytes). The planes view holds one channel's.
constexpr int kRowsGradVec = 4;

template <typename scalar_t, typename... P>
int grad_vec_for(const ChannelNormArgs& a, const P*... ptrs) {
  const int vec = vec_for<scalar_t>(a, ptrs...);
  return a.rows ? std::min(vec, kRowsGradVec) : vec;
}

// with_vec for the backward: the rows view instantiated up to kRowsGradVec only.
template <typename scalar_t, typename Rows, typename Planes>
void with_grad_vec(const Plan& p, const Rows& rows, const Planes& planes) {
  if (p.rows_view) {
    dispatch_vec<scalar_t, std::min(kMaxVec<scalar_t>, kRowsGradVec)>(p.vec, rows);
  } else {
    dispatch_vec<scalar_t>(p.vec, planes);
  }
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

// The one-launch view of a small input (channels of at most kSmallCount values), else nullopt.
std::optional<SmallView> small_view(const ChannelNormArgs& a) {
  const int64_t count = a.dims.N * a.dims.HxW;
  if (count > kSmallCount || count * a.dims.C > kSmallNumel) return std::nullopt;
  return SmallView{a.dims.C, a.dims.HxW, count, a.rows, 1.0 / (double(count) - 1.0)};
}

unsigned small_blocks(int64_t C) { return unsigned(ceil_div<int64_t>(C, kBlock / kWarpSize)); }

// Partial moments of X into means, m2s and counts (each parts x C).
template <typename scalar_t>
void launch_moments(const ChannelNormArgs& a, const Plan& p, float* means, float* m2s, float* counts) {
  const auto stream = current_stream();
  const scalar_t* X = a.X.const_data_ptr<scalar_t>();
  with_vec<scalar_t>(p, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    if (p.rows_view) {
      NORMEXT_LAUNCH((rows_moments_kernel<scalar_t, VEC>), dim3(unsigned(p.blocks_x), unsigned(p.parts)),
                     kBlock, 0, stream, X, p.rows, p.C, p.cols, p.rows_per_part, means, m2s, counts);
    } else {
      NORMEXT_LAUNCH((planes_moments_kernel<scalar_t, VEC>), dim3(unsigned(p.C), unsigned(p.parts)), kBlock,
                     0, stream, X, p.C, p.HxW, p.tx, p.S, p.N * p.S, p.tiles_per_part, means, m2s, counts);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Merges K partial moments into (mean, second) by mode, updating the running statistics. Each part's count
// is per channel (K x C, the moments kernels) or shared by all channels (K, batch_norm_merge's ranks).
void launch_finalize(const float* counts, bool count_per_channel, const float* means, const float* m2s,
                     int64_t K, int64_t C, int mode, double eps, double momentum, Tensor& mean,
                     Tensor& second, const c10::optional<Tensor>& running_mean,
                     const c10::optional<Tensor>& running_var) {
  const auto stream = current_stream();
  const auto rtype =
      running_mean ? running_mean->scalar_type() : (running_var ? running_var->scalar_type() : at::kFloat);
  const int wpc = finalize_warps(K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rtype, "batch_norm_finalize", [&] {
    scalar_t* rm = running_mean ? running_mean->data_ptr<scalar_t>() : nullptr;
    scalar_t* rv = running_var ? running_var->data_ptr<scalar_t>() : nullptr;
    NORMEXT_LAUNCH(finalize_moments_kernel<scalar_t>, finalize_blocks(C, wpc), kBlock, 0, stream, counts,
                   count_per_channel, means, m2s, K, C, wpc, mode, eps, momentum, mean.data_ptr<float>(),
                   second.data_ptr<float>(), rm, running_mean ? running_mean->stride(0) : 0, rv,
                   running_var ? running_var->stride(0) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_apply(const ChannelNormArgs& a, const Channels& ch, int64_t act, double slope, Tensor& Y) {
  const auto stream = current_stream();
  const scalar_t* X = a.X.const_data_ptr<scalar_t>();
  const scalar_t* R = ptr_or_null<scalar_t>(a.residual);
  scalar_t* out = Y.data_ptr<scalar_t>();
  const Plan p = make_plan(a, vec_for<scalar_t>(a, X, R, out));
  with_vec<scalar_t>(p, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    if (p.rows_view) {
      const int64_t by =
          std::clamp<int64_t>(ceil_div(kApplyBlocks, p.blocks_x), 1,
                              std::min<int64_t>(65535, ceil_div<int64_t>(p.rows, kBlock / p.cols)));
      NORMEXT_LAUNCH((rows_apply_kernel<scalar_t, VEC>), dim3(unsigned(p.blocks_x), unsigned(by)), kBlock, 0,
                     stream, X, R, out, p.rows, p.C, p.cols, ch, act, float(slope));
    } else {
      const int64_t tiles = p.N * p.C * p.S;
      const int64_t bx = std::clamp<int64_t>(ceil_div<int64_t>(tiles, kBlock / p.tx), 1, kApplyBlocks * 8);
      NORMEXT_LAUNCH((planes_apply_kernel<scalar_t, VEC>), unsigned(bx), kBlock, 0, stream, X, R, out, p.C,
                     p.HxW, p.tx, p.S, tiles, ch, act, float(slope));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_fwd_cuda(
    const Tensor& X_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    const c10::optional<Tensor>& residual, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, double momentum, double eps, int64_t act, double slope) {
  constexpr const char* op = "batch_norm_fwd";
  const auto a = check_channel_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  check_running_stats(running_mean, running_var, a.X, C, op);
  const DeviceGuard guard(a.X.device());
  Tensor Y = at::empty_like(a.X);
  const auto f32 = a.X.options().dtype(at::kFloat);
  Tensor mean = at::empty({C}, f32);
  Tensor rstd = at::empty({C}, f32);
  if (a.X.numel() == 0) {
    mean.fill_(std::nan(""));
    rstd.fill_(std::nan(""));
    return {Y, mean, rstd};
  }
  // float32 running statistics (or none) on a small input: one launch (small_fwd_kernel).
  const bool float_stats = (!running_mean || running_mean->scalar_type() == at::kFloat) &&
                           (!running_var || running_var->scalar_type() == at::kFloat);
  const auto small = float_stats ? small_view(a) : std::nullopt;
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "batch_norm_fwd_cuda", [&] {
    if (small) {
      NORMEXT_LAUNCH(
          small_fwd_kernel<scalar_t>, small_blocks(C), kBlock, 0, current_stream(),
          a.X.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.residual), Y.data_ptr<scalar_t>(), *small,
          a.gamma ? a.gamma->const_data_ptr<float>() : nullptr,
          a.beta ? a.beta->const_data_ptr<float>() : nullptr, float(eps), momentum, mean.data_ptr<float>(),
          rstd.data_ptr<float>(), running_mean ? running_mean->data_ptr<float>() : nullptr,
          running_mean ? running_mean->stride(0) : 0, running_var ? running_var->data_ptr<float>() : nullptr,
          running_var ? running_var->stride(0) : 0, act, float(slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const Plan p = make_plan(a, vec_for<scalar_t>(a, a.X.const_data_ptr<scalar_t>()));
    Tensor work = at::empty({p.parts * 3 * C}, f32);
    float* means = work.data_ptr<float>();
    float* m2s = means + p.parts * C;
    float* counts = m2s + p.parts * C;
    launch_moments<scalar_t>(a, p, means, m2s, counts);
    launch_finalize(counts, true, means, m2s, p.parts, C, kOutRstd, eps, momentum, mean, rstd, running_mean,
                    running_var);
    launch_apply<scalar_t>(a, channels_of(mean, rstd, false, eps, a.gamma, a.beta), act, slope, Y);
  });
  return {Y, mean, rstd};
}

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& X_in) {
  const auto a =
      check_channel_norm(X_in, c10::nullopt, c10::nullopt, c10::nullopt, kIdentity, "batch_norm_stats");
  const DeviceGuard guard(a.X.device());
  const int64_t C = a.dims.C;
  const auto f32 = a.X.options().dtype(at::kFloat);
  if (a.X.numel() == 0) return {at::zeros({C}, f32), at::zeros({C}, f32)};
  Tensor mean = at::empty({C}, f32);
  Tensor m2 = at::empty({C}, f32);
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "batch_norm_stats_cuda", [&] {
    const Plan p = make_plan(a, vec_for<scalar_t>(a, a.X.const_data_ptr<scalar_t>()));
    Tensor work = at::empty({p.parts * 3 * C}, f32);
    float* means = work.data_ptr<float>();
    float* m2s = means + p.parts * C;
    float* counts = m2s + p.parts * C;
    launch_moments<scalar_t>(a, p, means, m2s, counts);
    launch_finalize(counts, true, means, m2s, p.parts, C, kOutM2, 0.0, 0.0, mean, m2, c10::nullopt,
                    c10::nullopt);
  });
  return {mean, m2};
}

std::tuple<Tensor, Tensor> batch_norm_merge_cuda(const Tensor& counts_in, const Tensor& means_in,
                                                 const Tensor& m2s_in,
                                                 const c10::optional<Tensor>& running_mean,
                                                 const c10::optional<Tensor>& running_var, double momentum,
                                                 double eps) {
  constexpr const char* op = "batch_norm_merge";
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
  const DeviceGuard guard(means.device());
  Tensor mean = at::empty({C}, means.options());
  Tensor var = at::empty({C}, means.options());
  if (C == 0) return {mean, var};
  launch_finalize(counts.const_data_ptr<float>(), false, means.const_data_ptr<float>(),
                  m2s.const_data_ptr<float>(), K, C, kOutVar, eps, momentum, mean, var, running_mean,
                  running_var);
  return {mean, var};
}

Tensor batch_norm_apply_cuda(const Tensor& X_in, const Tensor& mean_in, const Tensor& var_in,
                             const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
                             const c10::optional<Tensor>& residual, double eps, int64_t act, double slope) {
  constexpr const char* op = "batch_norm_apply";
  const auto a = check_channel_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  const Tensor mean = *check_param(mean_in, a.X, C, "mean", op);
  const Tensor var = *check_param(var_in, a.X, C, "var", op);
  const DeviceGuard guard(a.X.device());
  Tensor Y = at::empty_like(a.X);
  if (a.X.numel() == 0) return Y;
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "batch_norm_apply_cuda", [&] {
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
  const auto a = check_channel_norm(X_in, gamma, beta, residual, check_grad_activation(act, op), op);
  const int64_t C = a.dims.C;
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = check_stats(mean_in, a.X, C, "mean", op);
  const Tensor rstd = check_stats(rstd_in, a.X, C, "rstd", op);
  const DeviceGuard guard(a.X.device());
  const auto f32 = a.X.options().dtype(at::kFloat);
  if (a.X.numel() == 0) return {at::zeros({C}, f32), at::zeros({C}, f32)};
  Tensor sum_dz = at::empty({C}, f32);
  Tensor sum_dzx = at::empty({C}, f32);
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "batch_norm_bwd_reduce_cuda", [&] {
    const auto stream = current_stream();
    const scalar_t* X = a.X.const_data_ptr<scalar_t>();
    const scalar_t* dy = dY.const_data_ptr<scalar_t>();
    const scalar_t* R = ptr_or_null<scalar_t>(a.residual);
    if (const auto small = small_view(a)) {
      NORMEXT_LAUNCH(small_grad_sums_kernel<scalar_t>, small_blocks(C), kBlock, 0, stream, dy, X, R, *small,
                     channels_of(mean, rstd, false, 0.0, a.gamma, a.beta), act, float(slope),
                     sum_dz.data_ptr<float>(), sum_dzx.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const Plan p = make_plan(a, grad_vec_for<scalar_t>(a, X, dy, R));
    static_assert(sizeof(Sum2) == 2 * sizeof(float));
    Tensor work = at::empty({2 * p.parts * C}, f32);
    Sum2* partial = reinterpret_cast<Sum2*>(work.data_ptr<float>());
    const Channels ch = channels_of(mean, rstd, false, 0.0, a.gamma, a.beta);
    with_grad_vec<scalar_t>(
        p,
        [&](auto vec) {
          NORMEXT_LAUNCH((rows_grad_sums_kernel<scalar_t, decltype(vec)::value>),
                         dim3(unsigned(p.blocks_x), unsigned(p.parts)), kBlock, 0, stream, dy, X, R, p.rows,
                         C, p.cols, p.rows_per_part, ch, act, float(slope), partial);
        },
        [&](auto vec) {
          NORMEXT_LAUNCH((planes_grad_sums_kernel<scalar_t, decltype(vec)::value>),
                         dim3(unsigned(C), unsigned(p.parts)), kBlock, 0, stream, dy, X, R, C, p.HxW, p.tx,
                         p.S, p.N * p.S, p.tiles_per_part, ch, act, float(slope), partial);
        });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int wpc = finalize_warps(p.parts);
    NORMEXT_LAUNCH(finalize_sums_kernel, finalize_blocks(C, wpc), kBlock, 0, stream, partial, p.parts, C, wpc,
                   sum_dz.data_ptr<float>(), sum_dzx.data_ptr<float>());
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
  const auto a =
      check_channel_norm(X_in, gamma, beta, residual,
                         check_grad_activation(act, op, sum_dz_in.has_value() && sum_dz_in->defined()), op);
  const int64_t C = a.dims.C;
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = check_stats(mean_in, a.X, C, "mean", op);
  const Tensor rstd = check_stats(rstd_in, a.X, C, "rstd", op);
  const bool has_sums = sum_dz_in.has_value() && sum_dz_in->defined();
  TORCH_CHECK(has_sums == (sum_dzx_in.has_value() && sum_dzx_in->defined()), op,
              ": sum_dz and sum_dzxhat must be given together");
  const Tensor sum_dz = has_sums ? check_stats(*sum_dz_in, a.X, C, "sum_dz", op) : Tensor();
  const Tensor sum_dzx = has_sums ? check_stats(*sum_dzx_in, a.X, C, "sum_dzxhat", op) : Tensor();
  const DeviceGuard guard(a.X.device());
  Tensor dX = mask[0] ? at::empty_like(a.X) : at::empty({0}, a.X.options());
  Tensor dR = mask[1] ? at::empty_like(a.X) : at::empty({0}, a.X.options());
  if (a.X.numel() == 0 || (!mask[0] && !mask[1])) return {dX, dR};
  NORMEXT_DISPATCH_CUDA_TYPES(a.X.scalar_type(), "batch_norm_bwd_elemt_cuda", [&] {
    const auto stream = current_stream();
    const scalar_t* X = a.X.const_data_ptr<scalar_t>();
    const scalar_t* dy = dY.const_data_ptr<scalar_t>();
    const scalar_t* R = ptr_or_null<scalar_t>(a.residual);
    scalar_t* dx = mask[0] ? dX.data_ptr<scalar_t>() : nullptr;
    scalar_t* dr = mask[1] ? dR.data_ptr<scalar_t>() : nullptr;
    const Plan p = make_plan(a, grad_vec_for<scalar_t>(a, X, dy, R, dx, dr));
    const Channels ch = channels_of(mean, rstd, false, 0.0, a.gamma, a.beta);
    const GradSums gs{has_sums ? sum_dz.const_data_ptr<float>() : nullptr,
                      has_sums ? sum_dzx.const_data_ptr<float>() : nullptr, float(inv_count)};
    with_grad_vec<scalar_t>(
        p,
        [&](auto vec) {
          const int64_t by =
              std::clamp<int64_t>(ceil_div(kApplyBlocks, p.blocks_x), 1,
                                  std::min<int64_t>(65535, ceil_div<int64_t>(p.rows, kBlock / p.cols)));
          NORMEXT_LAUNCH((rows_grad_input_kernel<scalar_t, decltype(vec)::value>),
                         dim3(unsigned(p.blocks_x), unsigned(by)), kBlock, 0, stream, dy, X, R, p.rows, C,
                         p.cols, ch, gs, act, float(slope), dx, dr);
        },
        [&](auto vec) {
          const int64_t tiles = p.N * C * p.S;
          const int64_t bx =
              std::clamp<int64_t>(ceil_div<int64_t>(tiles, kBlock / p.tx), 1, kApplyBlocks * 8);
          NORMEXT_LAUNCH((planes_grad_input_kernel<scalar_t, decltype(vec)::value>), unsigned(bx), kBlock, 0,
                         stream, dy, X, R, C, p.HxW, p.tx, p.S, tiles, ch, gs, act, float(slope), dx, dr);
        });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dX, dR};
}

// The training backward in one call: batch_norm_bwd_reduce's sums (dbeta, dgamma), then
// batch_norm_bwd_elemt's dX and dresidual from them, as SyncBatchNorm runs the two without the all-reduce.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_bwd_cuda(const Tensor& dY, const Tensor& X,
                                                               const c10::optional<Tensor>& residual,
                                                               const Tensor& mean, const Tensor& rstd,
                                                               const c10::optional<Tensor>& gamma,
                                                               const c10::optional<Tensor>& beta, int64_t act,
                                                               double slope, std::array<bool, 4> mask) {
  const auto [sum_dz, sum_dzx] =
      batch_norm_bwd_reduce_cuda(dY, X, residual, mean, rstd, gamma, beta, act, slope);
  const int64_t C = X.dim() > 1 ? X.size(1) : 1;
  const double inv_count = 1.0 / double(std::max<int64_t>(1, X.numel() / std::max<int64_t>(1, C)));
  const auto [dX, dR] = batch_norm_bwd_elemt_cuda(dY, X, residual, mean, rstd, gamma, beta, sum_dz, sum_dzx,
                                                  inv_count, act, slope, {mask[0], mask[3]});
  const auto unselected = [&] { return at::empty({0}, sum_dz.options()); };
  return {dX, mask[1] ? sum_dzx : unselected(), mask[2] ? sum_dz : unselected(), dR};
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, NORMEXT_CUDA_DISPATCH_KEY, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_merge", &batch_norm_merge_cuda);
  m.impl("batch_norm_apply", &batch_norm_apply_cuda);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cuda);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt_cuda);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cuda);
}

}  // namespace normext::cuda
