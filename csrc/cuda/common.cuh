// Device building blocks shared by normext's CUDA kernels: vector access that converts to float,
// warp / block / column reductions (sums and Welford-Chan moments) in fixed, shape-only orders, and
// small host helpers (alignment, ceil_div, dtype dispatch).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

#include "normext/math.h"
#include "runtime.cuh"

// float32 / float16 / bfloat16: float64 is rejected on CUDA, so instantiating it would only cost
// build time.
#define NORMEXT_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                             \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)    \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                             AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace normext::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
C10_HOST_DEVICE constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
C10_HOST_DEVICE constexpr T round_up(T a, T b) {
  return ceil_div(a, b) * b;
}

// rstd = 1/sqrt(var + eps), rounded once (within an ulp of 1.f / sqrtf(v), and closer). Unlike the IEEE
// division and square root it has no slow-path subroutine call, whose register saves ptxas reports as
// spills in kernels that hold many values (tools/cuda_report.py).
__device__ __forceinline__ float rsqrt_rn(float v) { return __frsqrt_rn(v); }

// a / b for non-negative a, b: 32-bit division when both fit (64-bit division is a long instruction
// sequence, a subroutine call), else 64-bit.
__device__ __forceinline__ int64_t div_idx(int64_t a, int64_t b) {
  if (a <= UINT32_MAX && b <= UINT32_MAX) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// a / b for 0 <= a, b < 2^32 in 32 bits: block and group indices (a 1-D grid has fewer than 2^31 blocks, and
// the per-block counts the host divides it by are smaller still). No 64-bit division subroutine call, whose
// register saves ptxas counts as spills.
__device__ __forceinline__ int64_t div32(int64_t a, int64_t b) {
  return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
}

// Elements of scalar_t per 16-byte access.
template <typename scalar_t>
constexpr int kMaxVec = 16 / static_cast<int>(sizeof(scalar_t));

// Whether p can be accessed `vec` elements at a time. A null pointer (an absent optional tensor)
// does not constrain the choice.
template <typename scalar_t>
inline bool vec_aligned(const scalar_t* p, int vec) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * vec) == 0;
}

// The widest vector, in elements of scalar_t (16, 8 or 4 bytes, else 1 element), that divides `extent` (the
// contiguous run a vector must not cross: a row, a plane, a group's span) and to which every pointer is
// aligned (pointers of another element type, e.g. a float32 residual stream, by the same element count). So
// one odd extent narrows the vector (C = 60 in bfloat16: 8-byte vectors) instead of dropping to scalars.
template <typename scalar_t, typename... P>
int widest_vec(int64_t extent, const P*... ptrs) {
  for (int v = kMaxVec<scalar_t>; v > 1; v /= 2) {
    if (extent % v == 0 && (vec_aligned(ptrs, v) && ...)) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>) for V = vec, one of the widths widest_vec returns. Only these
// widths are instantiated: each changes the memory access.
template <typename scalar_t, int V = kMaxVec<scalar_t>, typename F>
void dispatch_vec(int vec, const F& f) {
  if constexpr (V == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (vec == V) {
    f(std::integral_constant<int, V>{});
  } else {
    dispatch_vec<scalar_t, V / 2>(vec, f);
  }
}

// f(integral_constant V) returning whether it could run at V, tried at V = vec, vec / 2, ..., 1 until it
// does (f must succeed at V = 1).
template <typename scalar_t, int V = kMaxVec<scalar_t>, typename F>
void dispatch_vec_down(int vec, const F& f) {
  if constexpr (V == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    if (vec >= V && f(std::integral_constant<int, V>{})) return;
    dispatch_vec_down<scalar_t, V / 2>(vec, f);
  }
}

// ---------------------------------------------------------------------------------------------
// Vector access. p must be VEC-element aligned and i a multiple of VEC: callers pick VEC > 1 only
// after checking every base pointer and the contiguous extent (vec_aligned, sizes % VEC).

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) AlignedVector {
  scalar_t val[VEC];
};

// Raw loads keep 16-bit values packed (half the registers of floats) while several loads are in
// flight; convert with static_cast<float>(v.val[j]) when consuming them.
template <int VEC, typename scalar_t>
__device__ __forceinline__ AlignedVector<scalar_t, VEC> load_vec(const scalar_t* __restrict__ p, int64_t i) {
  check_vector_access(p + i, sizeof(AlignedVector<scalar_t, VEC>), sizeof(scalar_t));
  return *reinterpret_cast<const AlignedVector<scalar_t, VEC>*>(p + i);
}

// load_vec, or zeros when p is null (an absent optional input such as the residual).
template <int VEC, typename scalar_t>
__device__ __forceinline__ AlignedVector<scalar_t, VEC> load_vec_or_zero(const scalar_t* __restrict__ p,
                                                                         int64_t i) {
  if (p) return load_vec<VEC>(p, i);
  AlignedVector<scalar_t, VEC> v;
#pragma unroll
  for (int j = 0; j < VEC; ++j) v.val[j] = static_cast<scalar_t>(0.f);
  return v;
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void load_float(const scalar_t* __restrict__ p, int64_t i, float (&out)[VEC]) {
  const auto v = load_vec<VEC>(p, i);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(v.val[j]);
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_float(scalar_t* __restrict__ p, int64_t i, const float (&in)[VEC]) {
  AlignedVector<scalar_t, VEC> v;
#pragma unroll
  for (int j = 0; j < VEC; ++j) v.val[j] = static_cast<scalar_t>(in[j]);
  check_vector_access(p + i, sizeof(v), sizeof(scalar_t));
  *reinterpret_cast<AlignedVector<scalar_t, VEC>*>(p + i) = v;
}

// The valid elements [lo, hi) of a VEC-aligned chunk that starts `pos` elements into an extent of `len`
// values; pos < 0 at the head of an extent whose start is not VEC-aligned (a plane of 49 values at an odd
// offset), hi < VEC at its tail, and the chunk is empty when hi <= lo.
template <int VEC>
struct ChunkPart {
  int lo, hi;
  __device__ __forceinline__ bool empty() const { return hi <= lo; }
  __device__ __forceinline__ bool full() const { return lo == 0 && hi == VEC; }
  __device__ __forceinline__ bool has(int j) const { return j >= lo && j < hi; }
};

template <int VEC>
__device__ __forceinline__ ChunkPart<VEC> chunk_part(int64_t pos, int64_t len) {
  return {int(pos < 0 ? -pos : 0), int(len - pos < VEC ? len - pos : VEC)};
}

// The chunk's valid elements, the others zero (all zero when p is null, an absent optional input): a full
// chunk is one vector load, a head or tail one scalar load per valid element (never touching the
// neighbouring extent or memory past the tensor).
template <int VEC, typename scalar_t>
__device__ __forceinline__ AlignedVector<scalar_t, VEC> load_vec_part(const scalar_t* __restrict__ p,
                                                                      int64_t i, ChunkPart<VEC> k) {
  if (p == nullptr) k = ChunkPart<VEC>{0, 0};
  if (k.full()) return load_vec<VEC>(p, i);
  AlignedVector<scalar_t, VEC> v;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    v.val[j] = k.has(j) ? load_vec<1>(p, i + j).val[0] : static_cast<scalar_t>(0.f);
  }
  return v;
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void load_float_part(const scalar_t* __restrict__ p, int64_t i, ChunkPart<VEC> k,
                                                float (&out)[VEC]) {
  const auto v = load_vec_part<VEC>(p, i, k);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(v.val[j]);
}

// Stores the chunk's valid elements only.
template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_float_part(scalar_t* __restrict__ p, int64_t i, ChunkPart<VEC> k,
                                                 const float (&in)[VEC]) {
  if (k.full()) {
    store_float<VEC>(p, i, in);
    return;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (k.has(j)) {
      const float e[1] = {in[j]};
      store_float<1>(p, i + j, e);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Value types that reductions combine.

// VEC independent float lanes with lane-wise arithmetic, so that normext::welford_push/merge run
// VEC running moments with one shared count (and one division per pushed vector).
template <int N>
struct Lanes {
  float v[N];
  Lanes() = default;
  C10_HOST_DEVICE explicit Lanes(float s) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = s;
  }
};

template <int N>
C10_HOST_DEVICE Lanes<N> operator+(const Lanes<N>& a, const Lanes<N>& b) {
  Lanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}

template <int N>
C10_HOST_DEVICE Lanes<N> operator-(const Lanes<N>& a, const Lanes<N>& b) {
  Lanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = a.v[i] - b.v[i];
  return r;
}

template <int N>
C10_HOST_DEVICE Lanes<N> operator*(const Lanes<N>& a, const Lanes<N>& b) {
  Lanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = a.v[i] * b.v[i];
  return r;
}

template <int N, typename scalar_t>
C10_HOST_DEVICE Lanes<N> to_lanes(const AlignedVector<scalar_t, N>& x) {
  Lanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = static_cast<float>(x.val[i]);
  return r;
}

using WelfordF = normext::Welford<float, float>;

template <int N>
using WelfordLanes = normext::Welford<Lanes<N>, float>;

template <int N>
C10_HOST_DEVICE WelfordLanes<N> welford_lanes_zero() {
  return {Lanes<N>(0.f), Lanes<N>(0.f), 0.f};
}

// Lane j of a lane-wise Welford as a scalar one.
template <int N>
C10_HOST_DEVICE WelfordF welford_lane(const WelfordLanes<N>& w, int j) {
  return {w.mean.v[j], w.m2.v[j], w.n};
}

// All lanes merged in lane order (for when every lane saw the same row or group).
template <int N>
C10_HOST_DEVICE WelfordF welford_merge_lanes(const WelfordLanes<N>& w) {
  WelfordF r = welford_lane(w, 0);
#pragma unroll
  for (int j = 1; j < N; ++j) r = normext::welford_merge(r, welford_lane(w, j));
  return r;
}

// Two sums reduced together (e.g. sum(dz) and sum(dz * xhat) in a backward pass).
struct alignas(8) Sum2 {
  float a, b;
};

C10_HOST_DEVICE inline Sum2 operator+(const Sum2& p, const Sum2& q) { return {p.a + q.a, p.b + q.b}; }

struct SumOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

struct WelfordOp {
  __device__ WelfordF operator()(const WelfordF& a, const WelfordF& b) const {
    return normext::welford_merge(a, b);
  }
};

__device__ __forceinline__ float shfl_down(float v, int off) { return __shfl_down_sync(kFullMask, v, off); }

__device__ __forceinline__ Sum2 shfl_down(const Sum2& v, int off) {
  return {shfl_down(v.a, off), shfl_down(v.b, off)};
}

__device__ __forceinline__ WelfordF shfl_down(const WelfordF& w, int off) {
  return {shfl_down(w.mean, off), shfl_down(w.m2, off), shfl_down(w.n, off)};
}

// Double-precision moments, for merges of many partial results whose means are far apart relative to
// their spread (a float mean loses ulp(mean) per merge); per-partial work, not per-element.
using WelfordD = normext::Welford<double, double>;

__device__ __forceinline__ double shfl_down(double v, int off) { return __shfl_down_sync(kFullMask, v, off); }

// ---------------------------------------------------------------------------------------------
// Reductions. All combine in an order fixed by the launch shape (never by timing), so results are
// bit-reproducible; none uses atomics. Every one needs blockDim.x % 32 == 0 (full warps).

// Shuffle tree over a warp; the total is valid in lane 0 only. Lanes that have nothing to
// contribute must pass the identity.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v = op(v, shfl_down(v, off));
  return v;
}

__device__ __forceinline__ float shfl_xor(float v, int off) { return __shfl_xor_sync(kFullMask, v, off); }

__device__ __forceinline__ Sum2 shfl_xor(const Sum2& v, int off) {
  return {shfl_xor(v.a, off), shfl_xor(v.b, off)};
}

// Sum of v over each aligned run of `width` lanes (a power of two <= 32) by an xor butterfly, returned
// to every lane of the run: each step adds the same two values in either order, so all lanes hold the
// same bits. All 32 lanes of the warp must call it.
template <typename T>
__device__ __forceinline__ T group_allsum(T v, int width) {
  for (int off = width / 2; off > 0; off /= 2) v = v + shfl_xor(v, off);
  return v;
}

// Combines v over each run of `seg_warps` consecutive warps (the whole block when seg_warps is the
// number of warps) and returns the total to every thread of the run, each computing it in the same
// order. All threads of the block must call it; red needs a slot per warp and is free on return.
template <typename T, typename Op>
__device__ T block_allreduce(T v, Op op, T* red, int seg_warps) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_reduce(v, op);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int first = warp - warp % seg_warps;
  T total = red[first];
  for (int w = 1; w < seg_warps; ++w) total = op(total, red[first + w]);
  __syncthreads();
  return total;
}

// One warp combines load(0) .. load(count - 1): lane l takes l, l + 32, ... in turn, then a shuffle
// tree. Valid in lane 0; all 32 lanes must call it.
template <typename T, typename Load, typename Op>
__device__ T warp_reduce_range(int64_t count, T identity, Load load, Op op) {
  T acc = identity;
  for (int64_t i = threadIdx.x % kWarpSize; i < count; i += kWarpSize) acc = op(acc, load(i));
  return warp_reduce(acc, op);
}

// Segment s < segments is load(s, 0 .. len - 1); warp w reduces segments w, w + nwarps, ... with
// warp_reduce_range and its lane 0 calls emit(s, total). No block synchronisation inside: callers
// __syncthreads() before reading what emit wrote.
template <typename T, typename Load, typename Op, typename Emit>
__device__ void warp_per_segment(int64_t segments, int64_t len, T identity, Load load, Op op, Emit emit) {
  const int nwarps = blockDim.x / kWarpSize;
  for (int64_t s = threadIdx.x / kWarpSize; s < segments; s += nwarps) {
    const T total = warp_reduce_range(len, identity, [&](int64_t i) { return load(s, i); }, op);
    if (threadIdx.x % kWarpSize == 0) emit(s, total);
  }
}

// Column reduction over a (rows x cols) thread tile: thread (row, col) holds VEC values for columns
// [col*VEC, col*VEC + VEC); threads with row >= rows are padding and pass nothing. On return buf[k],
// k < cols*VEC, holds column k combined over all rows by a fixed pairwise tree. buf needs
// rows*cols*VEC entries that nobody reads while this runs. Every thread of the block must call it.
template <int VEC, typename T, typename Op>
__device__ void column_reduce(const T (&vals)[VEC], T* buf, int row, int col, int rows, int cols, Op op) {
  const int width = cols * VEC;
  if (row < rows) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) buf[row * width + col * VEC + j] = vals[j];
  }
  __syncthreads();
  for (int live = rows; live > 1;) {
    // Rows [half, live) fold onto rows [0, live - half): the written rows are all below `half`
    // and the read ones at or above it, so one step has no read/write overlap.
    const int half = (live + 1) / 2;
    if (row < live - half) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        T& dst = buf[row * width + col * VEC + j];
        dst = op(dst, buf[(row + half) * width + col * VEC + j]);
      }
    }
    __syncthreads();
    live = half;
  }
}

// ---------------------------------------------------------------------------------------------
// Channel-major spans (NCHW rows of L = HxW values per channel).

// Channel (relative to the span start) and offset within it of element i of a span of channels of
// length L, advanced by a fixed stride with no division per step.
struct ChannelCursor {
  int64_t c, rem;  // channel and offset within the channel
  int64_t dc, dr;  // the stride as whole channels plus a remainder

  __device__ ChannelCursor(int64_t i, int64_t stride, int64_t L) {
    if (i <= UINT32_MAX && stride <= UINT32_MAX && L <= UINT32_MAX) {
      const uint32_t l = static_cast<uint32_t>(L);
      c = static_cast<uint32_t>(i) / l;
      dc = static_cast<uint32_t>(stride) / l;
    } else {
      c = i / L;
      dc = stride / L;
    }
    rem = i - c * L;
    dr = stride - dc * L;
  }

  __device__ void advance(int64_t L) {
    c += dc;
    rem += dr;
    if (rem >= L) {
      rem -= L;
      ++c;
    }
  }
};

// Per-element gamma/beta (absent: 1 / 0) of the VEC elements starting at channel c, offset rem, of
// a channel-major span whose first channel is c0. One parameter load when the vector stays in one
// channel, which is the common case.
template <int VEC>
__device__ __forceinline__ void span_params(const float* __restrict__ gamma, const float* __restrict__ beta,
                                            int64_t c0, int64_t c, int64_t rem, int64_t L, float (&gam)[VEC],
                                            float (&bet)[VEC]) {
  if (rem + VEC <= L) {
    const float g = gamma ? gamma[c0 + c] : 1.f, b = beta ? beta[c0 + c] : 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      gam[j] = g;
      bet[j] = b;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (rem == L) {
      rem = 0;
      ++c;
    }
    gam[j] = gamma ? gamma[c0 + c] : 1.f;
    bet[j] = beta ? beta[c0 + c] : 0.f;
    ++rem;
  }
}

}  // namespace normext::cuda
