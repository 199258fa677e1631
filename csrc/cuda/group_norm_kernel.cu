// CUDA GroupNorm / InstanceNorm (G == C) forward and backward for NCHW-contiguous and channels-last
// input, with fused residual + activation; registered as the CUDA kernels of
// torch.ops.normext.group_norm_fwd / group_norm_bwd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <utility>

#include "common.cuh"
#include "normext/checks.h"
#include "normext/math.h"

namespace normext::cuda {
namespace {

// Floats per thread that hold a whole group in the fused forward, and per array (dz, xhat) in the
// fused backward. With kMaxBlock threads that is 16K (forward) / 8K (backward) values per block.
constexpr int kFwdRegs = 32;
constexpr int kBwdRegs = 16;
constexpr int kMaxBlock = 512;  // fused kernels
constexpr int kBlock = 256;     // streaming kernels
// Register budgets are ptxas heuristics as much as bounds: given the block size alone, ptxas held some
// kernels (fused channels-last forward, fused NCHW backward) to 64 / 80 registers and spilled a few, so
// those state min blocks 1 (a 128 / 255 budget); for others that same bound made ptxas spill at 128, so they
// keep the block size alone. tools/cuda_report.py checks the result. The fused kernels hold a whole group in
// registers (kFwdRegs / kBwdRegs values per thread) and so run at 25% occupancy: the price of reading x once.
// The streaming kernels are bounded to kStreamBlocks blocks of kBlock threads per SM, 64 registers a
// thread: 50% theoretical occupancy on sm_90. That fits without spills with the unrolls below (independent
// loads in flight per thread) and, channels-last, with per-lane constants of at most 4 channels in the
// backward (bwd_nhwc). The moments loops do one Welford step per value; apply carries its per-channel
// constants; the backward loops recompute x̂ and dz = dy·act'(z) per value (the activation a run-time
// switch) from three streams (x, dy, r), so they load one vector per step from 4 lanes up (two spilled up to
// 1 KB at 64 registers). An unroll never changes a thread's order of accumulation, only the loads in flight.
constexpr int kStreamBlocks = 4;
template <int VEC>
constexpr int kMomentsUnroll = VEC >= 8 ? 2 : 4;
template <int VEC>
constexpr int kApplyUnroll = VEC >= 8   ? 1
                             : VEC >= 4 ? 2
                                        : 4;
template <int VEC>
constexpr int kGradUnroll = VEC >= 4 ? 1 : 2;
// Rows per thread that a channels-last apply or dx tile holds at least (dx: twice this), whatever the unroll:
// each block first loads its per-lane constants and merges its groups' statistics, and longer tiles amortize
// that (and keep the dgamma / dbeta merge inside the dx launch where merge_in_dx allows it).
template <int VEC>
constexpr int kMinTileRows = VEC >= 8 ? 2 : 4;
// Tiling targets. Constants rather than the device's SM count: the tiling fixes the reduction
// order, which must depend on the shape only.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMaxTiles = 128;     // per group (forward), per (n, c) row (NCHW backward sums)
constexpr int64_t kMaxSumTiles = 512;  // per (n, c) in the channels-last backward sums
constexpr int64_t kMinPerThread = 4;   // vectors (or rows) per thread that make a tile worth a block

// Rows per thread in the fused channels-last forward. Scalar access gets half the values: each row
// then costs a 64-bit address as well, and 32 of them would spill.
constexpr int fwd_nhwc_rows(int vec) { return kFwdRegs / (vec > 1 ? vec : 2); }

template <typename scalar_t>
struct FwdParams {
  const scalar_t* X;
  const scalar_t* R;   // residual, or null
  const float* gamma;  // null: 1
  const float* beta;   // null: 0
  scalar_t* Y;
  float* mean;            // (N, G)
  float* rstd;            // (N, G)
  int64_t N, C, L, G, D;  // L = HxW, D = C / G
  float eps;
  int act;
  float slope;
};

template <typename scalar_t>
struct BwdParams {
  const scalar_t* dY;
  const scalar_t* X;
  const scalar_t* R;  // residual, only when the activation needs the pre-activation; else null
  const float* mean;
  const float* rstd;
  const float* gamma;  // null: 1
  const float* beta;   // null: 0
  scalar_t* dX;        // null: not requested
  scalar_t* dR;        // null: not requested
  int64_t N, C, L, G, D;
  int act;
  float slope;
};

// Channels-last chunking: a block covers `width` consecutive channels (a multiple of VEC), either
// `gpb` whole groups (parts == 1) or one of `parts` slices of a single group (parts > 1).
struct ChunkPlan {
  int64_t width;  // channels per chunk; the last chunk of a row or of a group may be narrower
  int64_t gpb;    // whole groups per chunk (parts == 1)
  int64_t parts;  // chunks per group
  int64_t count;  // chunks across the C channels
  int bdx, bdy;   // thread tile: vector columns x rows
};

// What chunk ci covers: `segs` reduction segments of `seg` channels each (whole groups, or the one
// part), starting at channel c0 and group g0.
struct Chunk {
  int64_t c0, width, g0, segs, seg, part;
};

__device__ __forceinline__ Chunk chunk_at(const ChunkPlan& plan, int64_t ci, int64_t D, int64_t G) {
  if (plan.parts > 1) {
    const int64_t g = div32(ci, plan.parts), part = ci - g * plan.parts;
    const int64_t width = std::min(plan.width, D - part * plan.width);
    return {g * D + part * plan.width, width, g, 1, width, part};
  }
  const int64_t g0 = ci * plan.gpb, segs = std::min(plan.gpb, G - g0);
  return {g0 * D, segs * D, g0, segs, D, 0};
}

__device__ __forceinline__ float param_or(const float* __restrict__ p, int64_t c, float dflt) {
  return p ? p[c] : dflt;
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void load_or_zero(const scalar_t* __restrict__ p, int64_t i, float (&out)[VEC]) {
  if (p) {
    load_float<VEC>(p, i, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = 0.f;
  }
}

__device__ __forceinline__ float act_fwd(float z, int act, float slope) {
  return normext::act_forward<float, float>(z, act, slope);
}

// Backward: x̂ and the gradient at the pre-activation z come from normext/xhat_source.h (from x, or from the
// output y with kFromOutput: X then holds y); z is recomputed, never saved.

// The first element of group j = n*G + g (NCHW) or of group g of sample n (channels-last): the shift
// every moments pass accumulates about, mean = K + Σ(x − K)/M, so that a mean far from zero relative
// to the spread (off-centre data) keeps its low bits instead of rounding at every partial sum.
template <typename scalar_t>
__device__ __forceinline__ float group_shift_nchw(const FwdParams<scalar_t>& p, int64_t j) {
  return static_cast<float>(p.X[j * p.D * p.L]);
}

template <typename scalar_t>
__device__ __forceinline__ float group_shift_nhwc(const FwdParams<scalar_t>& p, int64_t n, int64_t g) {
  return static_cast<float>(p.X[n * p.L * p.C + g * p.D]);
}

__device__ __forceinline__ float rstd_of(const WelfordF& w, float eps) {
  return rsqrt_rn(nx_div(w.m2, w.n) + eps);
}

// =============================================================================================
// Forward

// Fused, NCHW. A group is one contiguous run of M = D*L values; `tpg` threads (whole warps) own a
// group and a block holds blockDim.x / tpg groups. Thread r of a group keeps vectors r, r + tpg, ...
// (M <= tpg * kFwdRegs) in registers, so x is read once and mean / M2 are exact two-pass sums.
// Needs M % VEC == 0 and X, R, Y VEC-aligned, so every group starts aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxBlock) gn_fwd_fused_nchw_kernel(FwdParams<scalar_t> p, int tpg) {
  constexpr int kSlots = kFwdRegs / VEC;
  NORMEXT_SHARED(float, red, kMaxBlock / kWarpSize);
  const int r = threadIdx.x % tpg;
  const int64_t j = int64_t(blockIdx.x) * (blockDim.x / tpg) + threadIdx.x / tpg;
  const int L = static_cast<int>(p.L);
  const int M = static_cast<int>(p.D) * L;
  const int nvec = j < p.N * p.G ? M / VEC : 0;  // threads past the last group hold nothing
  const int64_t base = j * M;

  const float K = nvec > 0 ? group_shift_nchw(p, j) : 0.f;
  float x[kSlots][VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int v = r + k * tpg;
    if (v < nvec) {
      load_float<VEC>(p.X, base + int64_t(v) * VEC, x[k]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += x[k][e] - K;
    }
  }
  const int seg_warps = tpg / kWarpSize;
  const float mu = K + nx_div(block_allreduce(sum, SumOp{}, red, seg_warps), static_cast<float>(M));
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    if (r + k * tpg < nvec) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = x[k][e] - mu;
        m2 += d * d;
      }
    }
  }
  const float var = nx_div(block_allreduce(m2, SumOp{}, red, seg_warps), static_cast<float>(M));
  const float rs = rsqrt_rn(var + p.eps);
  if (nvec > 0 && r == 0) {
    p.mean[j] = mu;
    p.rstd[j] = rs;
  }

  const int64_t c0 = (j - div32(j, p.G) * p.G) * p.D;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int v = r + k * tpg;
    if (v < nvec) {
      const int i = v * VEC;
      const int c = i / L;
      float gam[VEC], bet[VEC], res[VEC], y[VEC];
      span_params<VEC>(p.gamma, p.beta, c0, c, i - c * L, L, gam, bet);
      load_or_zero<VEC>(p.R, base + i, res);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        y[e] = act_fwd((x[k][e] - mu) * (gam[e] * rs) + bet[e] + res[e], p.act, p.slope);
      }
      store_float<VEC>(p.Y, base + i, y);
    }
  }
}

// Fused, channels-last. Block = (n, chunk of gpb whole groups): all L rows of the chunk's channels.
// Thread (x, y), tid = y*bdx + x, keeps channels x*VEC .. x*VEC + VEC - 1 of the chunk for rows
// y, y + bdy, ... (L <= bdy * fwd_nhwc_rows(VEC)) in registers. Per-channel sums are reduced down the
// rows (column_reduce), then over each group's D channels by one warp per group; two passes over
// the registers (mean, then M2) make the moments exact. Needs C % VEC == 0, gpb*D % VEC == 0 and
// X, R, Y VEC-aligned, so every row segment of a chunk starts aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxBlock, 1)
    gn_fwd_fused_nhwc_kernel(FwdParams<scalar_t> p, int64_t gpb, int64_t chunks, int bdx, int bdy) {
  constexpr int kRows = fwd_nhwc_rows(VEC);
  unsigned char* smem = dynamic_smem();
  float* cols = reinterpret_cast<float*>(smem);  // bdy x bdx*VEC
  float* gmean = cols + bdy * bdx * VEC;         // gpb
  float* grstd = gmean + gpb;                    // gpb
  const int x = threadIdx.x % bdx, y = threadIdx.x / bdx;
  const int64_t n = div32(blockIdx.x, chunks);
  const int64_t g0 = (blockIdx.x - n * chunks) * gpb;
  const int64_t ng = std::min(gpb, p.G - g0);
  const int D = static_cast<int>(p.D), L = static_cast<int>(p.L);
  const bool active = y < bdy && x * VEC < ng * D;
  const int64_t c = g0 * D + x * VEC;
  const float M = static_cast<float>(D * L);

  float v[kRows][VEC], K[VEC];
  float s[VEC] = {};
#pragma unroll
  for (int e = 0; e < VEC; ++e) K[e] = active ? group_shift_nhwc(p, n, static_cast<int>(c + e) / D) : 0.f;
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    const int row = y + k * bdy;
    if (active && row < L) {
      load_float<VEC>(p.X, (n * L + row) * p.C + c, v[k]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[e] += v[k][e] - K[e];
    }
  }
  const auto col_sum = [&](int64_t g, int64_t i) { return cols[g * D + i]; };
  column_reduce<VEC>(s, cols, y, x, bdy, bdx, SumOp{});
  warp_per_segment(ng, D, 0.f, col_sum, SumOp{},
                   [&](int64_t g, float t) { gmean[g] = group_shift_nhwc(p, n, g0 + g) + nx_div(t, M); });
  __syncthreads();

  float mu[VEC], q[VEC] = {};
#pragma unroll
  for (int e = 0; e < VEC; ++e) mu[e] = active ? gmean[(x * VEC + e) / D] : 0.f;
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    if (active && y + k * bdy < L) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = v[k][e] - mu[e];
        q[e] += d * d;
      }
    }
  }
  column_reduce<VEC>(q, cols, y, x, bdy, bdx, SumOp{});
  warp_per_segment(ng, D, 0.f, col_sum, SumOp{}, [&](int64_t g, float t) {
    const float rs = rsqrt_rn(nx_div(t, M) + p.eps);
    grstd[g] = rs;
    p.mean[n * p.G + g0 + g] = gmean[g];
    p.rstd[n * p.G + g0 + g] = rs;
  });
  __syncthreads();

  if (!active) return;
  float a[VEC], b[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    a[e] = param_or(p.gamma, c + e, 1.f) * grstd[(x * VEC + e) / D];
    b[e] = param_or(p.beta, c + e, 0.f);
  }
  // Pre-activations first, then the activation: fewer values stay live across the activation's
  // division (whose slow path is a call), which otherwise makes ptxas spill a, b and mu.
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    if (y + k * bdy < L) {
      float res[VEC];
      load_or_zero<VEC>(p.R, (n * L + y + k * bdy) * p.C + c, res);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[k][e] = (v[k][e] - mu[e]) * a[e] + b[e] + res[e];
    }
  }
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    if (y + k * bdy < L) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[k][e] = act_fwd(v[k][e], p.act, p.slope);
      store_float<VEC>(p.Y, (n * L + y + k * bdy) * p.C + c, v[k]);
    }
  }
}

// Two-kernel path, NCHW, moments. Block (j, t) = blockIdx.x / T, % T reduces elements
// [t*tile, min(M, (t+1)*tile)) of group j (contiguous) into partial[j*T + t]: a lane-wise Welford
// per thread, lanes merged in order, then warps and the block by fixed trees. Needs tile and M
// multiples of VEC and X VEC-aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    gn_moments_nchw_kernel(FwdParams<scalar_t> p, int64_t tile, int64_t T, WelfordF* __restrict__ partial) {
  NORMEXT_SHARED(WelfordF, red, kBlock / kWarpSize);
  const int64_t j = div32(blockIdx.x, T), t = blockIdx.x - j * T;
  const int64_t M = p.D * p.L;
  const int64_t end = std::min(M, (t + 1) * tile);
  const int64_t stride = int64_t(blockDim.x) * VEC;
  const scalar_t* X = p.X + j * M;
  const Lanes<VEC> K(group_shift_nchw(p, j));
  WelfordLanes<VEC> w = welford_lanes_zero<VEC>();
  for (int64_t i = t * tile + int64_t(threadIdx.x) * VEC; i < end; i += kMomentsUnroll<VEC> * stride) {
    AlignedVector<scalar_t, VEC> v[kMomentsUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kMomentsUnroll<VEC>; ++u) {
      if (i + u * stride < end) v[u] = load_vec<VEC>(X, i + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kMomentsUnroll<VEC>; ++u) {
      if (i + u * stride < end) normext::welford_push(w, to_lanes(v[u]) - K);
    }
  }
  const WelfordF acc = block_allreduce(welford_merge_lanes(w), WelfordOp{}, red, blockDim.x / kWarpSize);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Two-kernel path, NCHW, apply. Block (j, t) first merges group j's T partials (warp 0, fixed
// order; every block of the group gets the same bits), block t == 0 writes mean / rstd, then it
// normalises the same tile as the moments pass. Thread i walks vectors i, i + blockDim.x, ... with
// a ChannelCursor for gamma / beta. Needs tile and M multiples of VEC and X, R, Y VEC-aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    gn_apply_nchw_kernel(FwdParams<scalar_t> p, int64_t tile, int64_t T,
                         const WelfordF* __restrict__ partial) {
  NORMEXT_SHARED(float, stat, 2);
  const int64_t j = div32(blockIdx.x, T), t = blockIdx.x - j * T;
  if (threadIdx.x < kWarpSize) {
    const WelfordF w = warp_reduce_range(
        T, WelfordF{0.f, 0.f, 0.f}, [&](int64_t i) { return partial[j * T + i]; }, WelfordOp{});
    if (threadIdx.x == 0) {
      const float rs = rstd_of(w, p.eps), mean = group_shift_nchw(p, j) + w.mean;
      stat[0] = mean;
      stat[1] = rs;
      if (t == 0) {
        p.mean[j] = mean;
        p.rstd[j] = rs;
      }
    }
  }
  __syncthreads();
  const float mu = stat[0], rs = stat[1];
  const int64_t M = p.D * p.L, base = j * M, c0 = (j - div32(j, p.G) * p.G) * p.D;
  const int64_t end = std::min(M, (t + 1) * tile);
  const int64_t stride = int64_t(blockDim.x) * VEC;
  const int64_t first = t * tile + int64_t(threadIdx.x) * VEC;
  ChannelCursor cur(first, stride, p.L);
  for (int64_t i = first; i < end; i += kApplyUnroll<VEC> * stride) {
    AlignedVector<scalar_t, VEC> xv[kApplyUnroll<VEC>], rv[kApplyUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kApplyUnroll<VEC>; ++u) {
      if (i + u * stride < end) {
        xv[u] = load_vec<VEC>(p.X, base + i + u * stride);
        rv[u] = load_vec_or_zero<VEC>(p.R, base + i + u * stride);
      }
    }
#pragma unroll
    for (int u = 0; u < kApplyUnroll<VEC>; ++u) {
      if (i + u * stride < end) {
        float gam[VEC], bet[VEC], out[VEC];
        span_params<VEC>(p.gamma, p.beta, c0, cur.c, cur.rem, p.L, gam, bet);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float z = (static_cast<float>(xv[u].val[e]) - mu) * (gam[e] * rs) + bet[e] +
                          static_cast<float>(rv[u].val[e]);
          out[e] = act_fwd(z, p.act, p.slope);
        }
        store_float<VEC>(p.Y, base + i + u * stride, out);
      }
      cur.advance(p.L);
    }
  }
}

// Two-kernel path, channels-last, moments. Block (n, t, ci) covers rows
// [t*rows_per_tile, ...) of chunk ci; thread (x, y) runs a lane-wise Welford down rows y, y + bdy,
// ...; lanes are merged down the rows (column_reduce) and then over each segment's channels (a
// group, or a group's part) by one warp, into partial[(n*G + g)*parts*T + part*T + t]. Needs C and
// the plan's width multiples of VEC and X VEC-aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    gn_moments_nhwc_kernel(FwdParams<scalar_t> p, ChunkPlan plan, int64_t rows_per_tile, int64_t T,
                           WelfordF* __restrict__ partial) {
  unsigned char* smem = dynamic_smem();
  WelfordF* cols = reinterpret_cast<WelfordF*>(smem);  // bdy x bdx*VEC
  const int64_t nt = div32(blockIdx.x, plan.count), ci = blockIdx.x - nt * plan.count;
  const int64_t n = div32(nt, T), t = nt - n * T;
  const Chunk ch = chunk_at(plan, ci, p.D, p.G);
  const int x = threadIdx.x % plan.bdx, y = threadIdx.x / plan.bdx;
  const bool active = y < plan.bdy && x * VEC < ch.width;
  const int64_t c = ch.c0 + x * VEC;
  const int64_t end = std::min(p.L, (t + 1) * rows_per_tile);
  const int64_t stride = plan.bdy;
  Lanes<VEC> K(0.f);
#pragma unroll
  for (int e = 0; e < VEC; ++e)
    K.v[e] = active ? group_shift_nhwc(p, n, static_cast<int>(c + e) / static_cast<int>(p.D)) : 0.f;
  WelfordLanes<VEC> w = welford_lanes_zero<VEC>();
  if (active) {
    for (int64_t row = t * rows_per_tile + y; row < end; row += kMomentsUnroll<VEC> * stride) {
      AlignedVector<scalar_t, VEC> v[kMomentsUnroll<VEC>];
#pragma unroll
      for (int u = 0; u < kMomentsUnroll<VEC>; ++u) {
        const int64_t ru = row + u * stride;
        if (ru < end) v[u] = load_vec<VEC>(p.X, (n * p.L + ru) * p.C + c);
      }
#pragma unroll
      for (int u = 0; u < kMomentsUnroll<VEC>; ++u) {
        if (row + u * stride < end) normext::welford_push(w, to_lanes(v[u]) - K);
      }
    }
  }
  WelfordF lanes[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) lanes[e] = welford_lane(w, e);
  column_reduce<VEC>(lanes, cols, y, x, plan.bdy, plan.bdx, WelfordOp{});
  const int64_t S = plan.parts * T;
  warp_per_segment(
      ch.segs, ch.seg, WelfordF{0.f, 0.f, 0.f}, [&](int64_t s, int64_t i) { return cols[s * ch.seg + i]; },
      WelfordOp{},
      [&](int64_t s, const WelfordF& total) {
        partial[(n * p.G + ch.g0 + s) * S + ch.part * T + t] = total;
      });
}

// Two-kernel path, channels-last, apply. Block (n, t, ci): one warp per group of chunk ci merges
// that group's S partials (fixed order, same bits in every block); the blocks with t == 0 and
// part 0 write mean / rstd. Then thread (x, y) normalises its VEC channels for rows
// [t*rows_per_tile, ...) stepping by bdy. Needs C and the plan's width multiples of VEC and X, R, Y
// VEC-aligned.
// Still a merge per block (lanes take partials l, l + 32, ..., then a tree: S / 32 steps, S <= kMaxTiles),
// redundant across the Ta tiles: fwd_nhwc sizes tiles so that it stays under 1/16 of the traffic. Merging
// once (the last moments block of each group, found with an integer counter per (n, g), writes mean / rstd)
// needs a counter buffer zeroed before every forward: a memset launch, or counters the last block resets in
// a workspace kept across calls. Not built yet.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    gn_apply_nhwc_kernel(FwdParams<scalar_t> p, ChunkPlan plan, int64_t rows_per_tile, int64_t T,
                         const WelfordF* __restrict__ partial, int64_t S) {
  unsigned char* smem = dynamic_smem();
  float* gmean = reinterpret_cast<float*>(smem);  // gpb
  float* grstd = gmean + plan.gpb;                // gpb
  const int64_t nt = div32(blockIdx.x, plan.count), ci = blockIdx.x - nt * plan.count;
  const int64_t n = div32(nt, T), t = nt - n * T;
  const Chunk ch = chunk_at(plan, ci, p.D, p.G);
  warp_per_segment(
      ch.segs, S, WelfordF{0.f, 0.f, 0.f},
      [&](int64_t s, int64_t i) { return partial[(n * p.G + ch.g0 + s) * S + i]; }, WelfordOp{},
      [&](int64_t s, const WelfordF& w) {
        const float rs = rstd_of(w, p.eps), mean = group_shift_nhwc(p, n, ch.g0 + s) + w.mean;
        gmean[s] = mean;
        grstd[s] = rs;
        if (t == 0 && ch.part == 0) {
          p.mean[n * p.G + ch.g0 + s] = mean;
          p.rstd[n * p.G + ch.g0 + s] = rs;
        }
      });
  __syncthreads();

  const int x = threadIdx.x % plan.bdx, y = threadIdx.x / plan.bdx;
  if (y >= plan.bdy || x * VEC >= ch.width) return;
  const int64_t c = ch.c0 + x * VEC;
  float mu[VEC], a[VEC], b[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int s = (x * VEC + e) / static_cast<int>(ch.seg);
    mu[e] = gmean[s];
    a[e] = param_or(p.gamma, c + e, 1.f) * grstd[s];
    b[e] = param_or(p.beta, c + e, 0.f);
  }
  const int64_t end = std::min(p.L, (t + 1) * rows_per_tile);
  const int64_t stride = plan.bdy;
  for (int64_t row = t * rows_per_tile + y; row < end; row += kApplyUnroll<VEC> * stride) {
    AlignedVector<scalar_t, VEC> xv[kApplyUnroll<VEC>], rv[kApplyUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kApplyUnroll<VEC>; ++u) {
      const int64_t ru = row + u * stride;
      if (ru < end) {
        xv[u] = load_vec<VEC>(p.X, (n * p.L + ru) * p.C + c);
        rv[u] = load_vec_or_zero<VEC>(p.R, (n * p.L + ru) * p.C + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kApplyUnroll<VEC>; ++u) {
      const int64_t ru = row + u * stride;
      if (ru < end) {
        float out[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float z =
              (static_cast<float>(xv[u].val[e]) - mu[e]) * a[e] + b[e] + static_cast<float>(rv[u].val[e]);
          out[e] = act_fwd(z, p.act, p.slope);
        }
        store_float<VEC>(p.Y, (n * p.L + ru) * p.C + c, out);
      }
    }
  }
}

// =============================================================================================
// Backward. Per (n, c): sdz = sum dz, sdzx = sum dz*xhat (dz = dy * act'(z)). Per (n, g):
// P = sum_c gamma_c*sdz, Q = sum_c gamma_c*sdzx, and dx = rstd*(gamma_c*dz - P/M - xhat*Q/M).
// dgamma[c] = sum_n sdzx, dbeta[c] = sum_n sdz.

// Fused, NCHW. One block of W warps per group j = (n, g). Its D channel rows of L values are cut
// into units of 32 vectors (S = ceil(L / (32*VEC)) units per row); warp w takes units w, w + W, ...
// (at most kBwdRegs / VEC) and keeps dz and xhat in registers. Unit sums (warp trees) go to shared
// memory; a channel adds its S units in order, (P, Q) add the channels in one warp; then dx comes
// from registers, so x and dy are read once. Writes the per-(n, c) sums for dgamma / dbeta when
// `sums` is set. Needs L % VEC == 0 and X, dY, R, dX, dR VEC-aligned (every row starts aligned).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxBlock, 1)
    gn_bwd_fused_nchw_kernel(BwdParams<scalar_t> p, int S, Sum2* __restrict__ sums) {
  constexpr int kSlots = kBwdRegs / VEC;
  constexpr int kMaxUnits = kMaxBlock / kWarpSize * kSlots;
  NORMEXT_SHARED(Sum2, unit_sums, kMaxUnits);
  NORMEXT_SHARED(Sum2, chan, kMaxUnits);  // gamma-weighted channel sums; D <= units
  NORMEXT_SHARED_SCALAR(Sum2, pq);
  const int64_t j = blockIdx.x, g = j - div32(j, p.G) * p.G;
  const int lane = threadIdx.x % kWarpSize, w = threadIdx.x / kWarpSize;
  const int W = blockDim.x / kWarpSize;
  const int D = static_cast<int>(p.D), L = static_cast<int>(p.L);
  const int Lv = L / VEC, U = D * S;
  const float mu = p.mean[j], rs = p.rstd[j];

  float dz[kSlots][VEC], xh[kSlots][VEC];
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int u = w + k * W;
    if (u < U) {  // uniform across the warp, so the whole warp reaches the shuffles
      const int d = u / S, vi = (u - d * S) * kWarpSize + lane;
      Sum2 acc{0.f, 0.f};
      if (vi < Lv) {
        const int64_t off = (j * D + d) * L + int64_t(vi) * VEC;
        const int64_t c = g * D + d;
        const float gam = param_or(p.gamma, c, 1.f), bet = param_or(p.beta, c, 0.f);
        float xv[VEC], dy[VEC], res[VEC];
        load_float<VEC>(p.X, off, xv);
        load_float<VEC>(p.dY, off, dy);
        load_or_zero<VEC>(p.R, off, res);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          xh[k][e] = xhat_from(xv[e], res[e], mu, rs, gam, bet, p.act, p.slope);
          dz[k][e] = grad_pre_act(dy[e], xv[e], xh[k][e], gam, bet, res[e], p.act, p.slope);
          acc.a += dz[k][e];
          acc.b += dz[k][e] * xh[k][e];
        }
      }
      acc = warp_reduce(acc, SumOp{});
      if (lane == 0) unit_sums[u] = acc;
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    Sum2 t = unit_sums[d * S];
    for (int s = 1; s < S; ++s) t = t + unit_sums[d * S + s];
    if (sums) sums[j * D + d] = t;
    const float gam = param_or(p.gamma, g * D + d, 1.f);
    chan[d] = {gam * t.a, gam * t.b};
  }
  __syncthreads();
  if (w == 0) {
    const Sum2 t = warp_reduce_range(D, Sum2{0.f, 0.f}, [&](int64_t i) { return chan[i]; }, SumOp{});
    if (lane == 0) pq = t;
  }
  __syncthreads();

  const float M = static_cast<float>(D * L);
  const float pm = nx_div(pq.a, M), qm = nx_div(pq.b, M);
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int u = w + k * W;
    if (u >= U) continue;
    const int d = u / S, vi = (u - d * S) * kWarpSize + lane;
    if (vi >= Lv) continue;
    const int64_t off = (j * D + d) * L + int64_t(vi) * VEC;
    if (p.dX) {
      const float gam = param_or(p.gamma, g * D + d, 1.f);
      float dx[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) dx[e] = rs * (gam * dz[k][e] - pm - xh[k][e] * qm);
      store_float<VEC>(p.dX, off, dx);
    }
    if (p.dR) store_float<VEC>(p.dR, off, dz[k]);
  }
}

// Fused, channels-last. Block = (n, chunk of gpb whole groups), thread (x, y) keeps dz and xhat of
// its VEC channels for rows y, y + bdy, ... (L <= bdy * kBwdRegs / VEC) in registers. Per-channel
// sums are reduced down the rows (column_reduce) and written for dgamma / dbeta when `sums` is
// set; one warp per group forms (P, Q); dx comes from registers. Needs C % VEC == 0,
// gpb*D % VEC == 0 and X, dY, R, dX, dR VEC-aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxBlock)
    gn_bwd_fused_nhwc_kernel(BwdParams<scalar_t> p, int64_t gpb, int64_t chunks, int bdx, int bdy,
                             Sum2* __restrict__ sums) {
  constexpr int kRows = kBwdRegs / VEC;
  unsigned char* smem = dynamic_smem();
  Sum2* cols = reinterpret_cast<Sum2*>(smem);  // bdy x bdx*VEC
  Sum2* gpq = cols + bdy * bdx * VEC;          // gpb
  const int x = threadIdx.x % bdx, y = threadIdx.x / bdx;
  const int64_t n = div32(blockIdx.x, chunks);
  const int64_t g0 = (blockIdx.x - n * chunks) * gpb;
  const int64_t ng = std::min(gpb, p.G - g0);
  const int D = static_cast<int>(p.D), L = static_cast<int>(p.L);
  const bool active = y < bdy && x * VEC < ng * D;
  const int64_t c = g0 * D + x * VEC;

  float mu[VEC], rs[VEC], gam[VEC], bet[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int64_t ng_idx = n * p.G + g0 + (active ? (x * VEC + e) / D : 0);
    mu[e] = p.mean[ng_idx];
    rs[e] = p.rstd[ng_idx];
    gam[e] = active ? param_or(p.gamma, c + e, 1.f) : 0.f;
    bet[e] = active ? param_or(p.beta, c + e, 0.f) : 0.f;
  }
  float dz[kRows][VEC], xh[kRows][VEC];
  Sum2 acc[VEC] = {};
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    const int row = y + k * bdy;
    if (active && row < L) {
      const int64_t off = (n * L + row) * p.C + c;
      float xv[VEC], dy[VEC], res[VEC];
      load_float<VEC>(p.X, off, xv);
      load_float<VEC>(p.dY, off, dy);
      load_or_zero<VEC>(p.R, off, res);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        xh[k][e] = xhat_from(xv[e], res[e], mu[e], rs[e], gam[e], bet[e], p.act, p.slope);
        dz[k][e] = grad_pre_act(dy[e], xv[e], xh[k][e], gam[e], bet[e], res[e], p.act, p.slope);
        acc[e].a += dz[k][e];
        acc[e].b += dz[k][e] * xh[k][e];
      }
    }
  }
  column_reduce<VEC>(acc, cols, y, x, bdy, bdx, SumOp{});
  if (sums) {
    for (int64_t i = threadIdx.x; i < ng * D; i += blockDim.x) sums[n * p.C + g0 * D + i] = cols[i];
  }
  warp_per_segment(
      ng, D, Sum2{0.f, 0.f},
      [&](int64_t s, int64_t i) {
        const Sum2 t = cols[s * D + i];
        const float ga = param_or(p.gamma, (g0 + s) * D + i, 1.f);
        return Sum2{ga * t.a, ga * t.b};
      },
      SumOp{}, [&](int64_t s, const Sum2& t) { gpq[s] = t; });
  __syncthreads();

  if (!active) return;
  const float M = static_cast<float>(D * L);
  float pm[VEC], qm[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const Sum2 t = gpq[(x * VEC + e) / D];
    pm[e] = nx_div(t.a, M);
    qm[e] = nx_div(t.b, M);
  }
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    const int row = y + k * bdy;
    if (row >= L) continue;
    const int64_t off = (n * L + row) * p.C + c;
    if (p.dX) {
      float dx[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) dx[e] = rs[e] * (gam[e] * dz[k][e] - pm[e] - xh[k][e] * qm[e]);
      store_float<VEC>(p.dX, off, dx);
    }
    if (p.dR) store_float<VEC>(p.dR, off, dz[k]);
  }
}

// Two-kernel path, NCHW, per-(n, c) sums. One warp per (row, tile): row = n*C + c is L contiguous
// values and tiles are tile_v vectors; lanes take vectors lane, lane + 32, ... of the tile and a
// warp tree writes sums[row*T + t]. No block-level synchronisation, so warps past the end just
// return. Needs L % VEC == 0 and X, dY, R VEC-aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    gn_bwd_sums_nchw_kernel(BwdParams<scalar_t> p, int64_t tile_v, int64_t T, Sum2* __restrict__ sums) {
  const int64_t gw = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  if (gw >= p.N * p.C * T) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = div_idx(gw, T), t = gw - row * T;
  const int64_t nrow = div_idx(row, p.C), c = row - nrow * p.C, ng = nrow * p.G + div_idx(c, p.D);
  const float mu = p.mean[ng], rs = p.rstd[ng];
  const float gam = param_or(p.gamma, c, 1.f), bet = param_or(p.beta, c, 0.f);
  const int64_t end = std::min(p.L / VEC, (t + 1) * tile_v);
  const int64_t base = row * p.L;
  Sum2 acc{0.f, 0.f};
  for (int64_t v = t * tile_v + lane; v < end; v += kGradUnroll<VEC> * kWarpSize) {
    AlignedVector<scalar_t, VEC> xv[kGradUnroll<VEC>], dy[kGradUnroll<VEC>], rv[kGradUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      const int64_t vu = v + u * kWarpSize;
      if (vu < end) {
        xv[u] = load_vec<VEC>(p.X, base + vu * VEC);
        dy[u] = load_vec<VEC>(p.dY, base + vu * VEC);
        rv[u] = load_vec_or_zero<VEC>(p.R, base + vu * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      if (v + u * kWarpSize < end) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xv_e = static_cast<float>(xv[u].val[e]), rv_e = static_cast<float>(rv[u].val[e]);
          const float xh = xhat_from(xv_e, rv_e, mu, rs, gam, bet, p.act, p.slope);
          const float dz =
              grad_pre_act(static_cast<float>(dy[u].val[e]), xv_e, xh, gam, bet, rv_e, p.act, p.slope);
          acc.a += dz;
          acc.b += dz * xh;
        }
      }
    }
  }
  acc = warp_reduce(acc, SumOp{});
  if (lane == 0) sums[gw] = acc;
}

// Two-kernel path, channels-last, per-(n, c) sums. Block (n, t, ci): channels
// [ci*bdx*VEC, +bdx*VEC) (no group alignment needed) for rows [t*rows_per_tile, ...); thread (x, y)
// sums down rows y, y + bdy, ..., column_reduce merges the rows and the block writes
// sums[(n*C + c)*T + t]. Needs C % VEC == 0 and X, dY, R VEC-aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    gn_bwd_sums_nhwc_kernel(BwdParams<scalar_t> p, int bdx, int bdy, int64_t chunks, int64_t rows_per_tile,
                            int64_t T, Sum2* __restrict__ sums) {
  unsigned char* smem = dynamic_smem();
  Sum2* cols = reinterpret_cast<Sum2*>(smem);  // bdy x bdx*VEC
  const int64_t nt = div32(blockIdx.x, chunks), ci = blockIdx.x - nt * chunks;
  const int64_t n = div32(nt, T), t = nt - n * T;
  const int64_t c0 = ci * bdx * VEC, width = std::min<int64_t>(bdx * VEC, p.C - c0);
  const int x = threadIdx.x % bdx, y = threadIdx.x / bdx;
  const bool active = y < bdy && x * VEC < width;
  const int64_t c = c0 + x * VEC;
  float mu[VEC], rs[VEC], gam[VEC], bet[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int64_t ng = n * p.G + (active ? static_cast<int>(c + e) / static_cast<int>(p.D) : 0);
    mu[e] = p.mean[ng];
    rs[e] = p.rstd[ng];
    gam[e] = active ? param_or(p.gamma, c + e, 1.f) : 0.f;
    bet[e] = active ? param_or(p.beta, c + e, 0.f) : 0.f;
  }
  const int64_t end = std::min(p.L, (t + 1) * rows_per_tile);
  const int64_t stride = bdy;
  Sum2 acc[VEC] = {};
  if (active) {
    for (int64_t row = t * rows_per_tile + y; row < end; row += kGradUnroll<VEC> * stride) {
      AlignedVector<scalar_t, VEC> xv[kGradUnroll<VEC>], dy[kGradUnroll<VEC>], rv[kGradUnroll<VEC>];
#pragma unroll
      for (int u = 0; u < kGradUnroll<VEC>; ++u) {
        const int64_t ru = row + u * stride;
        if (ru < end) {
          const int64_t off = (n * p.L + ru) * p.C + c;
          xv[u] = load_vec<VEC>(p.X, off);
          dy[u] = load_vec<VEC>(p.dY, off);
          rv[u] = load_vec_or_zero<VEC>(p.R, off);
        }
      }
#pragma unroll
      for (int u = 0; u < kGradUnroll<VEC>; ++u) {
        if (row + u * stride < end) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float xv_e = static_cast<float>(xv[u].val[e]), rv_e = static_cast<float>(rv[u].val[e]);
            const float xh = xhat_from(xv_e, rv_e, mu[e], rs[e], gam[e], bet[e], p.act, p.slope);
            const float dz = grad_pre_act(static_cast<float>(dy[u].val[e]), xv_e, xh, gam[e], bet[e], rv_e,
                                          p.act, p.slope);
            acc[e].a += dz;
            acc[e].b += dz * xh;
          }
        }
      }
    }
  }
  column_reduce<VEC>(acc, cols, y, x, bdy, bdx, SumOp{});
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) sums[(n * p.C + c0 + i) * T + t] = cols[i];
}

// (P, Q) of group j = (n, g) from the per-(n, c, tile) sums: its D*T entries are contiguous (n*C + g*D ==
// j*D), gamma-weighted, thread-strided, then a block tree (the same order in every block that calls it).
// Every thread of the block must call it; the total is returned to all of them. red needs kBlock entries.
__device__ Sum2 group_pq(const Sum2* __restrict__ sums, const float* __restrict__ gamma, int64_t j, int64_t D,
                         int64_t G, int64_t T, Sum2* red) {
  const int64_t c0 = (j - div32(j, G) * G) * D;
  const Sum2* s = sums + j * D * T;
  Sum2 acc{0.f, 0.f};
  for (int64_t i = threadIdx.x; i < D * T; i += blockDim.x) {
    const float ga = param_or(gamma, c0 + div32(i, T), 1.f);
    acc = acc + Sum2{ga * s[i].a, ga * s[i].b};
  }
  return block_allreduce(acc, SumOp{}, red, blockDim.x / kWarpSize);
}

// dgamma / dbeta (either may be null) of the 32 channels of block b (a block index counted from the first
// such block): warp y sums entries k = y, y + ny, ... of each channel's N*T (n, tile) sums (k = n*T + t), so
// all ny warps work whatever N is, and the ny warp totals are added in order. red needs kBlock entries.
__device__ void channel_sums(const Sum2* __restrict__ sums, float* __restrict__ dgamma,
                             float* __restrict__ dbeta, int64_t b, int64_t N, int64_t C, int64_t T,
                             Sum2* red) {
  const int x = threadIdx.x % kWarpSize, y = threadIdx.x / kWarpSize;
  const int ny = blockDim.x / kWarpSize;
  const int64_t c = b * kWarpSize + x;
  Sum2 acc{0.f, 0.f};
  if (c < C) {
    for (int64_t k = y; k < N * T; k += ny) {
      const int64_t n = div32(k, T);
      acc = acc + sums[(n * C + c) * T + (k - n * T)];
    }
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  if (y == 0 && c < C) {
    Sum2 total = red[x];
    for (int r = 1; r < ny; ++r) total = total + red[r * kWarpSize + x];
    if (dgamma) dgamma[c] = total.b;
    if (dbeta) dbeta[c] = total.a;
  }
}

// Backward combine: two independent fixed-order reductions of the per-(n, c, tile) sums in one launch.
// Blocks [0, pq_blocks) each form (P, Q) of group j = blockIdx.x (group_pq); the remaining blocks reduce 32
// channels each into dgamma / dbeta (channel_sums).
__global__ void __launch_bounds__(kBlock)
    gn_bwd_combine_kernel(const Sum2* __restrict__ sums, const float* __restrict__ gamma,
                          Sum2* __restrict__ pq, float* __restrict__ dgamma, float* __restrict__ dbeta,
                          int64_t N, int64_t C, int64_t G, int64_t T, int64_t pq_blocks) {
  NORMEXT_SHARED(Sum2, red, kBlock);
  if (blockIdx.x < pq_blocks) {
    const Sum2 t = group_pq(sums, gamma, blockIdx.x, C / G, G, T, red);
    if (threadIdx.x == 0) pq[blockIdx.x] = t;
    return;
  }
  channel_sums(sums, dgamma, dbeta, blockIdx.x - pq_blocks, N, C, T, red);
}

// Where a dx kernel takes each group's (P, Q) from, and the dgamma / dbeta blocks that may follow its dx
// blocks, so that a two-kernel backward is two launches (sums, then dx) when the groups' sums are few.
struct DxSums {
  const Sum2* pq;    // per-group (P, Q) from gn_bwd_combine_kernel, or null
  const Sum2* sums;  // else the per-(n, c, tile) sums, (P, Q) formed in the block (null with pq: no dx)
  int64_t T;         // tiles per (n, c) in sums
  float* dgamma;     // blocks >= dx_blocks reduce sums into dgamma / dbeta (channel_sums)
  float* dbeta;
  int64_t dx_blocks;
};

// Two-kernel path, NCHW, dx / dresidual. Block (j, t) covers elements [t*tile, ...) of group j's
// contiguous run with a ChannelCursor (as the forward apply); (P, Q) of group j from ds (zero when dX is not
// requested). Blocks past ds.dx_blocks form dgamma / dbeta. Needs tile and M multiples of VEC and X, dY, R,
// dX, dR VEC-aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    gn_bwd_dx_nchw_kernel(BwdParams<scalar_t> p, int64_t tile, int64_t T, DxSums ds) {
  NORMEXT_SHARED(Sum2, red, kBlock);
  if (blockIdx.x >= ds.dx_blocks) {
    channel_sums(ds.sums, ds.dgamma, ds.dbeta, blockIdx.x - ds.dx_blocks, p.N, p.C, ds.T, red);
    return;
  }
  const int64_t j = div32(blockIdx.x, T), t = blockIdx.x - j * T;
  const int64_t M = p.D * p.L, base = j * M, c0 = (j - div32(j, p.G) * p.G) * p.D;
  const float mu = p.mean[j], rs = p.rstd[j];
  Sum2 pqj{0.f, 0.f};
  if (ds.pq) {
    pqj = ds.pq[j];
  } else if (ds.sums && p.dX) {  // uniform over the block
    pqj = group_pq(ds.sums, p.gamma, j, p.D, p.G, ds.T, red);
  }
  const float pm = nx_div(pqj.a, static_cast<float>(M)), qm = nx_div(pqj.b, static_cast<float>(M));
  const int64_t end = std::min(M, (t + 1) * tile);
  const int64_t stride = int64_t(blockDim.x) * VEC;
  const int64_t first = t * tile + int64_t(threadIdx.x) * VEC;
  ChannelCursor cur(first, stride, p.L);
  for (int64_t i = first; i < end; i += kGradUnroll<VEC> * stride) {
    AlignedVector<scalar_t, VEC> xv[kGradUnroll<VEC>], dy[kGradUnroll<VEC>], rv[kGradUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      const int64_t off = base + i + u * stride;
      if (i + u * stride < end) {
        xv[u] = load_vec<VEC>(p.X, off);
        dy[u] = load_vec<VEC>(p.dY, off);
        rv[u] = load_vec_or_zero<VEC>(p.R, off);
      }
    }
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      if (i + u * stride < end) {
        const int64_t off = base + i + u * stride;
        float gam[VEC], bet[VEC], dz[VEC], dx[VEC];
        span_params<VEC>(p.gamma, p.beta, c0, cur.c, cur.rem, p.L, gam, bet);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xv_e = static_cast<float>(xv[u].val[e]), rv_e = static_cast<float>(rv[u].val[e]);
          const float xh = xhat_from(xv_e, rv_e, mu, rs, gam[e], bet[e], p.act, p.slope);
          dz[e] =
              grad_pre_act(static_cast<float>(dy[u].val[e]), xv_e, xh, gam[e], bet[e], rv_e, p.act, p.slope);
          dx[e] = rs * (gam[e] * dz[e] - pm - xh * qm);
        }
        if (p.dX) store_float<VEC>(p.dX, off, dx);
        if (p.dR) store_float<VEC>(p.dR, off, dz);
      }
      cur.advance(p.L);
    }
  }
}

// Two-kernel path, channels-last, dx / dresidual. Block (n, t, ci) as gn_bwd_sums_nhwc_kernel; (P, Q) of
// the groups its channels touch from ds (ds.pq, or merged here from ds.sums, one warp per group, into
// dynamic shared memory: a slot per group, at most bdx*VEC + 1). Per-lane constants (group stats, P/M, Q/M,
// gamma, beta) are loaded once, then rows stream. Blocks past ds.dx_blocks form dgamma / dbeta. Needs
// C % VEC == 0 and X, dY, R, dX, dR VEC-aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, kStreamBlocks)
    gn_bwd_dx_nhwc_kernel(BwdParams<scalar_t> p, int bdx, int bdy, int64_t chunks, int64_t rows_per_tile,
                          int64_t T, DxSums ds) {
  NORMEXT_SHARED(Sum2, red, kBlock);
  if (blockIdx.x >= ds.dx_blocks) {
    channel_sums(ds.sums, ds.dgamma, ds.dbeta, blockIdx.x - ds.dx_blocks, p.N, p.C, ds.T, red);
    return;
  }
  Sum2* gpq = reinterpret_cast<Sum2*>(dynamic_smem());
  const int64_t nt = div32(blockIdx.x, chunks), ci = blockIdx.x - nt * chunks;
  const int64_t n = div32(nt, T), t = nt - n * T;
  const int64_t c0 = ci * bdx * VEC;
  const int D = static_cast<int>(p.D);
  const int g_first = static_cast<int>(c0) / D;
  if (!ds.pq && ds.sums && p.dX) {  // uniform over the block
    const int64_t c_end = std::min<int64_t>(p.C, c0 + int64_t(bdx) * VEC);
    const int segs = static_cast<int>(c_end - 1) / D - g_first + 1;
    warp_per_segment(
        segs, p.D * ds.T, Sum2{0.f, 0.f},
        [&](int64_t s, int64_t i) {
          const int64_t g = g_first + s, k = (n * p.C + g * p.D) * ds.T + i;
          const float ga = param_or(p.gamma, g * p.D + div32(i, ds.T), 1.f);
          return Sum2{ga * ds.sums[k].a, ga * ds.sums[k].b};
        },
        SumOp{}, [&](int64_t s, const Sum2& v) { gpq[s] = v; });
    __syncthreads();
  }
  const int x = threadIdx.x % bdx, y = threadIdx.x / bdx;
  if (y >= bdy || c0 + x * VEC >= p.C) return;
  const int64_t c = c0 + x * VEC;
  const float inv_m = nx_recip(static_cast<float>(p.D * p.L));
  float mu[VEC], rs[VEC], gam[VEC], bet[VEC], pm[VEC], qm[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int g = static_cast<int>(c + e) / D;
    const int64_t ng = n * p.G + g;
    mu[e] = p.mean[ng];
    rs[e] = p.rstd[ng];
    gam[e] = param_or(p.gamma, c + e, 1.f);
    bet[e] = param_or(p.beta, c + e, 0.f);
    Sum2 v{0.f, 0.f};
    if (ds.pq) {
      v = ds.pq[ng];
    } else if (ds.sums && p.dX) {
      v = gpq[g - g_first];
    }
    pm[e] = v.a * inv_m;
    qm[e] = v.b * inv_m;
  }
  const int64_t end = std::min(p.L, (t + 1) * rows_per_tile);
  const int64_t stride = bdy;
  for (int64_t row = t * rows_per_tile + y; row < end; row += kGradUnroll<VEC> * stride) {
    AlignedVector<scalar_t, VEC> xv[kGradUnroll<VEC>], dy[kGradUnroll<VEC>], rv[kGradUnroll<VEC>];
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      const int64_t ru = row + u * stride;
      if (ru < end) {
        const int64_t off = (n * p.L + ru) * p.C + c;
        xv[u] = load_vec<VEC>(p.X, off);
        dy[u] = load_vec<VEC>(p.dY, off);
        rv[u] = load_vec_or_zero<VEC>(p.R, off);
      }
    }
#pragma unroll
    for (int u = 0; u < kGradUnroll<VEC>; ++u) {
      const int64_t ru = row + u * stride;
      if (ru < end) {
        const int64_t off = (n * p.L + ru) * p.C + c;
        float dz[VEC], dx[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xv_e = static_cast<float>(xv[u].val[e]), rv_e = static_cast<float>(rv[u].val[e]);
          const float xh = xhat_from(xv_e, rv_e, mu[e], rs[e], gam[e], bet[e], p.act, p.slope);
          dz[e] =
              grad_pre_act(static_cast<float>(dy[u].val[e]), xv_e, xh, gam[e], bet[e], rv_e, p.act, p.slope);
          dx[e] = rs[e] * (gam[e] * dz[e] - pm[e] - xh * qm[e]);
        }
        if (p.dX) store_float<VEC>(p.dX, off, dx);
        if (p.dR) store_float<VEC>(p.dR, off, dz);
      }
    }
  }
}

// =============================================================================================
// Host side: path and launch-shape choice. Every choice depends on shapes, dtype and pointer
// alignment only.

// A 1-D grid (gridDim.x allows 2^31 - 1 blocks; y and z only 65535, so they are not used).
dim3 grid_of(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "group_norm (CUDA): the input is too large for one launch (", blocks, " blocks)");
  return dim3(static_cast<unsigned>(blocks));
}

// Whole-group chunks. The narrowest chunk whose starts are all vector-aligned holds
// q = VEC / gcd(D, VEC) groups (G is a multiple of q because C % VEC == 0); it is widened toward
// target_bdx vector columns. False when even the narrowest needs more than max_bdx columns.
bool plan_whole_groups(int64_t D, int64_t G, int vec, int64_t max_bdx, int64_t target_bdx, ChunkPlan& plan) {
  const int64_t q = vec / std::gcd(D, int64_t(vec));
  const int64_t bdx0 = q * D / vec;
  if (bdx0 > max_bdx) return false;
  const int64_t m = std::clamp<int64_t>(target_bdx / bdx0, 1, G / q);
  plan.gpb = q * m;
  plan.parts = 1;
  plan.width = plan.gpb * D;
  plan.count = ceil_div(G, plan.gpb);
  plan.bdx = static_cast<int>(plan.width / vec);
  return true;
}

// Each group split into parts of at most max_bdx vector columns. Needs D % vec == 0.
ChunkPlan plan_group_parts(int64_t D, int64_t G, int vec, int64_t max_bdx) {
  const int64_t dv = D / vec;
  const int64_t cols = ceil_div(dv, ceil_div(dv, max_bdx));
  ChunkPlan plan{};
  plan.parts = ceil_div(dv, cols);
  plan.gpb = 1;
  plan.width = cols * vec;
  plan.count = G * plan.parts;
  plan.bdx = static_cast<int>(cols);
  return plan;
}

// Tiles of a contiguous run of M values (one per group) for the streaming NCHW kernels: enough
// blocks overall, at least kMinPerThread vectors per thread, at most kMaxTiles per group.
std::pair<int64_t, int64_t> flat_tiles(int64_t M, int64_t groups, int vec) {
  int64_t T = std::clamp<int64_t>(ceil_div(kTargetBlocks, groups), 1, kMaxTiles);
  T = std::min(T, std::max<int64_t>(1, M / (int64_t(kBlock) * vec * kMinPerThread)));
  const int64_t tile = round_up(ceil_div(M, T), int64_t(vec));
  return {tile, ceil_div(M, tile)};
}

// Row tiles for the channels-last streaming kernels (`blocks` blocks per tile index), at most
// `max_tiles` and at least kMinPerThread rows per thread.
std::pair<int64_t, int64_t> row_tiles(int64_t L, int64_t blocks, int bdy, int64_t max_tiles) {
  int64_t T = std::clamp<int64_t>(ceil_div(kTargetBlocks, blocks), 1, std::max<int64_t>(1, max_tiles));
  T = std::min(T, std::max<int64_t>(1, L / (int64_t(bdy) * kMinPerThread)));
  const int64_t rows = ceil_div(L, T);
  return {rows, ceil_div(L, rows)};
}

int threads_for(int bdx, int bdy) { return round_up(bdx * bdy, kWarpSize); }

template <typename scalar_t, int VEC>
void fwd_nchw(const FwdParams<scalar_t>& p, const at::Tensor& X, cudaStream_t stream) {
  constexpr int kSlots = kFwdRegs / VEC;
  const int64_t M = p.D * p.L, NG = p.N * p.G;
  if (M / VEC <= int64_t(kMaxBlock) * kSlots) {
    // Fewest threads per group that keep each thread's slots at most half full, so small groups
    // pack several to a block (a warp each) instead of idling threads.
    int tpg = kWarpSize;
    while (tpg < kMaxBlock && int64_t(tpg) * (kSlots / 2) < M / VEC) tpg *= 2;
    const int block = std::max(tpg, 128);
    NORMEXT_LAUNCH((gn_fwd_fused_nchw_kernel<scalar_t, VEC>), grid_of(ceil_div(NG, int64_t(block / tpg))),
                   block, 0, stream, p, tpg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const auto [tile, T] = flat_tiles(M, NG, VEC);
  at::Tensor partial = at::empty({NG * T * 3}, X.options().dtype(at::kFloat));
  auto* part = reinterpret_cast<WelfordF*>(partial.data_ptr<float>());
  NORMEXT_LAUNCH((gn_moments_nchw_kernel<scalar_t, VEC>), grid_of(NG * T), kBlock, 0, stream, p, tile, T,
                 part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  NORMEXT_LAUNCH((gn_apply_nchw_kernel<scalar_t, VEC>), grid_of(NG * T), kBlock, 0, stream, p, tile, T, part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// False when no chunking exists at this VEC (a group neither fits a chunk nor splits on vector
// boundaries); VEC = 1 always succeeds.
template <typename scalar_t, int VEC>
bool fwd_nhwc(const FwdParams<scalar_t>& p, const at::Tensor& X, cudaStream_t stream) {
  constexpr int kRows = fwd_nhwc_rows(VEC);
  const int64_t bdy_min = ceil_div(p.L, int64_t(kRows));
  ChunkPlan plan{};
  if (bdy_min <= kMaxBlock) {
    const int64_t max_bdx = kMaxBlock / bdy_min;
    if (plan_whole_groups(p.D, p.G, VEC, max_bdx, std::min<int64_t>(max_bdx, kWarpSize), plan)) {
      plan.bdy = static_cast<int>(std::min<int64_t>(kMaxBlock / plan.bdx, p.L));
      const size_t smem = (size_t(plan.bdy) * plan.bdx * VEC + 2 * plan.gpb) * sizeof(float);
      NORMEXT_LAUNCH((gn_fwd_fused_nhwc_kernel<scalar_t, VEC>), grid_of(p.N * plan.count),
                     threads_for(plan.bdx, plan.bdy), smem, stream, p, plan.gpb, plan.count, plan.bdx,
                     plan.bdy);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    }
  }

  // Moments: narrow chunks, enough that N * chunks * kMaxTiles reaches kTargetBlocks, each row segment
  // 32 to 128 bytes (whole 32-byte sectors, few cache lines per warp). Apply: wide chunks, and at
  // least 16 values written per partial merged, so that the redundant per-block merge stays a small
  // fraction of the traffic.
  ChunkPlan pm{}, pa{};
  const int64_t bytes = VEC * int64_t(sizeof(scalar_t));
  const int64_t want_chunks = ceil_div(kTargetBlocks, p.N * kMaxTiles);
  const int64_t target = std::clamp<int64_t>(
      ceil_div(p.C / VEC, want_chunks), std::max<int64_t>(1, 32 / bytes), std::max<int64_t>(1, 128 / bytes));
  if (!plan_whole_groups(p.D, p.G, VEC, 64, target, pm)) {
    if (p.D % VEC != 0) return false;
    pm = plan_group_parts(p.D, p.G, VEC, 64);
  }
  if (!plan_whole_groups(p.D, p.G, VEC, kBlock, 64, pa)) pa = plan_group_parts(p.D, p.G, VEC, 64);
  pm.bdy = kBlock / pm.bdx;
  pa.bdy = std::max(1, kBlock / pa.bdx);

  const auto [rows_m, Tm] = row_tiles(p.L, p.N * pm.count, pm.bdy, kMaxTiles / pm.parts);
  const int64_t S = pm.parts * Tm;
  const int64_t segs = pa.parts > 1 ? 1 : pa.gpb;
  const int64_t rows_a = std::min(
      p.L, std::max<int64_t>(int64_t(pa.bdy) * kMinTileRows<VEC>, ceil_div(16 * segs * S, pa.width)));
  const int64_t Ta = ceil_div(p.L, rows_a);

  at::Tensor partial = at::empty({p.N * p.G * S * 3}, X.options().dtype(at::kFloat));
  auto* part = reinterpret_cast<WelfordF*>(partial.data_ptr<float>());
  const size_t smem_m = size_t(pm.bdy) * pm.bdx * VEC * sizeof(WelfordF);
  NORMEXT_LAUNCH((gn_moments_nhwc_kernel<scalar_t, VEC>), grid_of(p.N * Tm * pm.count),
                 threads_for(pm.bdx, pm.bdy), smem_m, stream, p, pm, rows_m, Tm, part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t smem_a = 2 * pa.gpb * sizeof(float);
  NORMEXT_LAUNCH((gn_apply_nhwc_kernel<scalar_t, VEC>), grid_of(p.N * Ta * pa.count),
                 threads_for(pa.bdx, pa.bdy), smem_a, stream, p, pa, rows_a, Ta, part, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

void launch_combine(const Sum2* sums, const float* gamma, Sum2* pq, float* dgamma, float* dbeta, int64_t N,
                    int64_t C, int64_t G, int64_t T, cudaStream_t stream) {
  const int64_t pq_blocks = pq ? N * G : 0;
  const int64_t dg_blocks = (dgamma || dbeta) ? ceil_div(C, int64_t(kWarpSize)) : 0;
  if (pq_blocks + dg_blocks == 0) return;
  NORMEXT_LAUNCH(gn_bwd_combine_kernel, grid_of(pq_blocks + dg_blocks), kBlock, 0, stream, sums, gamma, pq,
                 dgamma, dbeta, N, C, G, T, pq_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct BwdOut {
  float* dgamma;  // null: not requested
  float* dbeta;   // null: not requested
};

at::Tensor sums_workspace(const at::Tensor& X, int64_t entries) {
  return at::empty({entries * 2}, X.options().dtype(at::kFloat));
}

Sum2* as_sum2(const at::Tensor& t) { return reinterpret_cast<Sum2*>(t.data_ptr<float>()); }

// Fused NCHW backward when a group's units fit the registers of one block; false otherwise.
template <typename scalar_t, int VEC>
bool bwd_fused_nchw(const BwdParams<scalar_t>& p, BwdOut out, const at::Tensor& X, cudaStream_t stream) {
  constexpr int kSlots = kBwdRegs / VEC;
  const int64_t S = ceil_div(p.L / VEC, int64_t(kWarpSize));
  const int64_t U = p.D * S;
  constexpr int kMaxWarps = kMaxBlock / kWarpSize;
  if (U > int64_t(kMaxWarps) * kSlots) return false;
  // Enough warps that each fills about half its slots: more loads in flight per thread without
  // idling most of a large block on small groups.
  const int warps =
      static_cast<int>(std::clamp<int64_t>(ceil_div(U, int64_t(std::max(1, kSlots / 2))), 1, kMaxWarps));
  const bool want_sums = out.dgamma || out.dbeta;
  at::Tensor ws = want_sums ? sums_workspace(X, p.N * p.C) : at::Tensor();
  Sum2* sums = want_sums ? as_sum2(ws) : nullptr;
  NORMEXT_LAUNCH((gn_bwd_fused_nchw_kernel<scalar_t, VEC>), grid_of(p.N * p.G), warps * kWarpSize, 0, stream,
                 p, static_cast<int>(S), sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_combine(sums, p.gamma, nullptr, out.dgamma, out.dbeta, p.N, p.C, p.G, 1, stream);
  return true;
}

// Whether the dx blocks form (P, Q) from the per-(n, c, tile) sums themselves (DxSums), each merging
// `entries` of them: two backward launches (sums, then dx with dgamma / dbeta in its last blocks) instead of
// three (sums, combine, dx), bought with redundant merges, allowed while they read at most numel / 4 entries
// in all (the small inputs, where the launch count decides; large ones keep the combine kernel).
bool merge_in_dx(int64_t dx_blocks, int64_t entries, int64_t numel) {
  return dx_blocks * entries * 4 <= numel;
}

template <typename scalar_t>
void bwd_nchw(const BwdParams<scalar_t>& p, BwdOut out, const at::Tensor& X, cudaStream_t stream) {
  // The row kernels (fused, sums) take the widest vector a channel row allows, the flat dx kernel the widest
  // a group's span allows: with HxW = 49 rows are scalar, but a span of 8 x 49 values is 16-byte vectors.
  // Per-row vectors with a scalar head and tail are not built: rows of odd length start at odd offsets, so
  // each row would need its own peel, and the fused kernel's order would then follow the row's alignment.
  const int vec_rows = widest_vec<scalar_t>(p.L, p.X, p.dY, p.R, p.dX, p.dR);
  const int64_t M = p.D * p.L;
  const int vec_flat = widest_vec<scalar_t>(M, p.X, p.dY, p.R, p.dX, p.dR);
  // Scalar access is the second choice for the fused kernel: short rows waste less of its 32-vector
  // units, and one launch beats three on the small groups that take this path.
  bool fused = false;
  dispatch_vec<scalar_t>(
      vec_rows, [&](auto vec) { fused = bwd_fused_nchw<scalar_t, decltype(vec)::value>(p, out, X, stream); });
  if (fused || (vec_rows > 1 && bwd_fused_nchw<scalar_t, 1>(p, out, X, stream))) return;

  const int64_t NG = p.N * p.G;
  const bool want_pq = p.dX != nullptr;
  const bool want_dx = p.dX || p.dR;
  const bool want_sums = want_pq || out.dgamma || out.dbeta;
  const int64_t lv = p.L / vec_rows;
  const int64_t tile_v = std::max<int64_t>(256, ceil_div(lv, kMaxTiles));
  const int64_t T = ceil_div(lv, tile_v);
  const auto [tile, Tx] = flat_tiles(M, NG, vec_flat);
  const bool pq_in_dx = want_dx && merge_in_dx(NG * Tx, p.D * T, p.N * p.C * p.L);
  at::Tensor ws, pq_ws;
  DxSums ds{nullptr, nullptr, T, nullptr, nullptr, NG * Tx};
  if (want_sums) {
    ws = sums_workspace(X, p.N * p.C * T);
    Sum2* sums = as_sum2(ws);
    ds.sums = sums;
    const int64_t warps_per_block = kBlock / kWarpSize;
    const dim3 grid = grid_of(ceil_div(p.N * p.C * T, warps_per_block));
    dispatch_vec<scalar_t>(vec_rows, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      NORMEXT_LAUNCH((gn_bwd_sums_nchw_kernel<scalar_t, VEC>), grid, kBlock, 0, stream, p, tile_v, T, sums);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (pq_in_dx) {
      ds.dgamma = out.dgamma;
      ds.dbeta = out.dbeta;
    } else {
      Sum2* pq = nullptr;
      if (want_pq) {
        pq_ws = sums_workspace(X, NG);
        pq = as_sum2(pq_ws);
      }
      launch_combine(ds.sums, p.gamma, pq, out.dgamma, out.dbeta, p.N, p.C, p.G, T, stream);
      ds.pq = pq;
    }
  }
  if (!want_dx) return;
  const int64_t dg_blocks = (ds.dgamma || ds.dbeta) ? ceil_div(p.C, int64_t(kWarpSize)) : 0;
  const dim3 grid = grid_of(NG * Tx + dg_blocks);
  dispatch_vec<scalar_t>(vec_flat, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    NORMEXT_LAUNCH((gn_bwd_dx_nchw_kernel<scalar_t, VEC>), grid, kBlock, 0, stream, p, tile, Tx, ds);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void bwd_nhwc(const BwdParams<scalar_t>& p, BwdOut out, const at::Tensor& X, cudaStream_t stream) {
  constexpr int kRows = kBwdRegs / VEC;
  const bool want_sums_c = out.dgamma || out.dbeta;
  const int64_t bdy_min = ceil_div(p.L, int64_t(kRows));
  ChunkPlan plan{};
  if (bdy_min <= kMaxBlock && plan_whole_groups(p.D, p.G, VEC, kMaxBlock / bdy_min,
                                                std::min<int64_t>(kMaxBlock / bdy_min, kWarpSize), plan)) {
    plan.bdy = static_cast<int>(std::min<int64_t>(kMaxBlock / plan.bdx, p.L));
    at::Tensor ws = want_sums_c ? sums_workspace(X, p.N * p.C) : at::Tensor();
    Sum2* sums = want_sums_c ? as_sum2(ws) : nullptr;
    const size_t smem = (size_t(plan.bdy) * plan.bdx * VEC + plan.gpb) * sizeof(Sum2);
    NORMEXT_LAUNCH((gn_bwd_fused_nhwc_kernel<scalar_t, VEC>), grid_of(p.N * plan.count),
                   threads_for(plan.bdx, plan.bdy), smem, stream, p, plan.gpb, plan.count, plan.bdx, plan.bdy,
                   sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_combine(sums, p.gamma, nullptr, out.dgamma, out.dbeta, p.N, p.C, p.G, 1, stream);
    return;
  }

  // The streaming kernels take at most 4 values per vector (8 bytes of a 16-bit type): their per-lane
  // constants (group statistics, P/M, Q/M, gamma, beta: 6 x VEC floats) at 8 lanes took 150-160 registers.
  constexpr int SV = VEC < 4 ? VEC : 4;
  const int64_t cv = p.C / SV;
  const bool want_pq = p.dX != nullptr;
  const bool want_dx = p.dX || p.dR;
  const int dbdx = static_cast<int>(std::min<int64_t>(cv, 2 * kWarpSize));
  const int dbdy = std::max(1, kBlock / dbdx);
  const int64_t dchunks = ceil_div(cv, int64_t(dbdx));
  // Row tiles: kTargetBlocks blocks overall where each thread still gets 2 x kMinTileRows rows, else fewer,
  // longer tiles (each block loads its per-lane constants once: more rows per block amortize them).
  const int64_t Td0 = std::clamp<int64_t>(ceil_div(kTargetBlocks, p.N * dchunks), 1,
                                          std::max<int64_t>(1, p.L / (int64_t(dbdy) * kMinTileRows<SV> * 2)));
  const int64_t drows = ceil_div(p.L, Td0), Td = ceil_div(p.L, drows);
  at::Tensor ws, pq_ws;
  DxSums ds{nullptr, nullptr, 1, nullptr, nullptr, p.N * Td * dchunks};
  if (want_pq || want_sums_c) {
    const int bdx = static_cast<int>(std::min<int64_t>(cv, kWarpSize));
    const int bdy = kBlock / bdx;
    const int64_t chunks = ceil_div(cv, int64_t(bdx));
    const auto [rows, T] = row_tiles(p.L, p.N * chunks, bdy, kMaxSumTiles);
    ws = sums_workspace(X, p.N * p.C * T);
    Sum2* sums = as_sum2(ws);
    ds.sums = sums;
    ds.T = T;
    const size_t smem = size_t(bdy) * bdx * SV * sizeof(Sum2);
    NORMEXT_LAUNCH((gn_bwd_sums_nhwc_kernel<scalar_t, SV>), grid_of(p.N * T * chunks), threads_for(bdx, bdy),
                   smem, stream, p, bdx, bdy, chunks, rows, T, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (want_dx && merge_in_dx(ds.dx_blocks, (int64_t(dbdx) * SV + p.D) * T, p.N * p.C * p.L)) {
      ds.dgamma = out.dgamma;
      ds.dbeta = out.dbeta;
    } else {
      Sum2* pq = nullptr;
      if (want_pq) {
        pq_ws = sums_workspace(X, p.N * p.G);
        pq = as_sum2(pq_ws);
      }
      launch_combine(ds.sums, p.gamma, pq, out.dgamma, out.dbeta, p.N, p.C, p.G, T, stream);
      ds.pq = pq;
    }
  }
  if (!want_dx) return;
  const int64_t dg_blocks = (ds.dgamma || ds.dbeta) ? ceil_div(p.C, int64_t(kWarpSize)) : 0;
  const size_t smem = (size_t(dbdx) * SV + 1) * sizeof(Sum2);
  NORMEXT_LAUNCH((gn_bwd_dx_nhwc_kernel<scalar_t, SV>), grid_of(ds.dx_blocks + dg_blocks),
                 threads_for(dbdx, dbdy), smem, stream, p, dbdx, dbdy, dchunks, drows, Td, ds);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* opt_data(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cuda(
    const at::Tensor& X_in, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& residual, int64_t G, double eps, int64_t act, double slope) {
  const auto a = check_group_norm(X_in, gamma, beta, residual, G, act, "group_norm_fwd");
  const DeviceGuard guard(a.X.device());
  const at::Tensor& X = a.X;
  at::Tensor Y = at::empty_like(X);
  at::Tensor mean = at::empty({a.dims.N, G}, X.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({a.dims.N, G}, X.options().dtype(at::kFloat));
  if (X.numel() == 0) {
    // Statistics of empty groups are undefined; NaN as on the CPU (nothing to fill when N == 0).
    if (mean.numel() > 0) {
      mean.fill_(std::nanf(""));
      rstd.fill_(std::nanf(""));
    }
    return {Y, mean, rstd};
  }
  const cudaStream_t stream = current_stream();
  NORMEXT_DISPATCH_CUDA_TYPES(X.scalar_type(), "group_norm_fwd_cuda", [&] {
    const FwdParams<scalar_t> p{X.const_data_ptr<scalar_t>(),
                                opt_data<scalar_t>(a.residual),
                                opt_data<float>(a.gamma),
                                opt_data<float>(a.beta),
                                Y.data_ptr<scalar_t>(),
                                mean.data_ptr<float>(),
                                rstd.data_ptr<float>(),
                                a.dims.N,
                                a.dims.C,
                                a.dims.HxW,
                                G,
                                a.D,
                                static_cast<float>(eps),
                                static_cast<int>(act),
                                static_cast<float>(slope)};
    // The widest vector a group's span (NCHW) or a row of C channels (channels-last) allows; channels-last
    // narrows it further where no chunking of the groups exists at a width. InstanceNorm's span is one plane
    // (D = 1), so HxW = 49 is scalar: a head and tail per span as BatchNorm's planes peel them would shift
    // every register slot of the fused kernel by the span's offset; not built (InstanceNorm's users normalize
    // large images and volumes, whose HxW are multiples of 8).
    if (a.layout == Layout::kChannelsFirst) {
      dispatch_vec<scalar_t>(widest_vec<scalar_t>(p.D * p.L, p.X, p.R, p.Y),
                             [&](auto vec) { fwd_nchw<scalar_t, decltype(vec)::value>(p, X, stream); });
    } else {
      dispatch_vec_down<scalar_t>(widest_vec<scalar_t>(p.C, p.X, p.R, p.Y), [&](auto vec) {
        return fwd_nhwc<scalar_t, decltype(vec)::value>(p, X, stream);
      });
    }
  });
  return {Y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cuda(
    const at::Tensor& dY_in, const at::Tensor& X_in, const std::optional<at::Tensor>& residual,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& beta, int64_t G, int64_t act, double slope,
    std::array<bool, 4> output_mask) {
  constexpr const char* op = "group_norm_bwd";
  TORCH_CHECK(dY_in.defined(), op, ": grad_output is undefined");
  const auto a = check_group_norm(X_in, gamma, beta, residual, G, check_grad_activation(act, op), op);
  const DeviceGuard guard(a.X.device());
  const at::Tensor& X = a.X;
  const int64_t N = a.dims.N, C = a.dims.C;
  const at::Tensor dY = *check_like(dY_in, X, a.layout, "grad_output", op);
  const at::Tensor mean = check_stats(mean_in, X, N * G, "mean", op);
  const at::Tensor rstd = check_stats(rstd_in, X, N * G, "rstd", op);
  const auto f32 = X.options().dtype(at::kFloat);
  at::Tensor dX = output_mask[0] ? at::empty_like(X) : at::empty({0}, X.options());
  at::Tensor dgamma = output_mask[1] ? at::empty({C}, f32) : at::empty({0}, f32);
  at::Tensor dbeta = output_mask[2] ? at::empty({C}, f32) : at::empty({0}, f32);
  at::Tensor dR = output_mask[3] ? at::empty_like(X) : at::empty({0}, X.options());
  if (X.numel() == 0) {
    // Sums over no values.
    if (dgamma.numel() > 0) dgamma.zero_();
    if (dbeta.numel() > 0) dbeta.zero_();
    return {dX, dgamma, dbeta, dR};
  }
  if (!output_mask[0] && !output_mask[1] && !output_mask[2] && !output_mask[3]) {
    return {dX, dgamma, dbeta, dR};
  }
  const cudaStream_t stream = current_stream();
  const BwdOut out{output_mask[1] ? dgamma.data_ptr<float>() : nullptr,
                   output_mask[2] ? dbeta.data_ptr<float>() : nullptr};
  NORMEXT_DISPATCH_CUDA_TYPES(X.scalar_type(), "group_norm_bwd_cuda", [&] {
    const BwdParams<scalar_t> p{dY.const_data_ptr<scalar_t>(),
                                X.const_data_ptr<scalar_t>(),
                                act == kIdentity ? nullptr : opt_data<scalar_t>(a.residual),
                                mean.const_data_ptr<float>(),
                                rstd.const_data_ptr<float>(),
                                opt_data<float>(a.gamma),
                                opt_data<float>(a.beta),
                                output_mask[0] ? dX.data_ptr<scalar_t>() : nullptr,
                                output_mask[3] ? dR.data_ptr<scalar_t>() : nullptr,
                                N,
                                C,
                                a.dims.HxW,
                                G,
                                a.D,
                                static_cast<int>(act),
                                static_cast<float>(slope)};
    if (a.layout == Layout::kChannelsFirst) {
      bwd_nchw<scalar_t>(p, out, X, stream);
      return;
    }
    dispatch_vec<scalar_t>(widest_vec<scalar_t>(C, p.X, p.dY, p.R, p.dX, p.dR),
                           [&](auto vec) { bwd_nhwc<scalar_t, decltype(vec)::value>(p, out, X, stream); });
  });
  return {dX, dgamma, dbeta, dR};
}

}  // namespace
}  // namespace normext::cuda

TORCH_LIBRARY_IMPL(normext, NORMEXT_CUDA_DISPATCH_KEY, m) {
  m.impl("group_norm_fwd", &normext::cuda::group_norm_fwd_cuda);
  m.impl("group_norm_bwd", &normext::cuda::group_norm_bwd_cuda);
}
