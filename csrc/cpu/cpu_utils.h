// CPU building blocks: SIMD load/store of any input dtype as accumulation-type vectors, and the
// fixed chunking of long reductions that keeps CPU results independent of the thread count.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "normext/math.h"
#include "normext/xhat_source.h"

// Every CPU kernel is compiled once per capability (setup.py), each build in its own namespace.
#ifndef CPU_CAPABILITY
#error "compile the CPU kernels with -DCPU_CAPABILITY=DEFAULT, AVX2 or AVX512 (see setup.py)"
#endif

namespace normext::cpu::CPU_CAPABILITY {

// Loads/stores kSize elements of scalar_t as one Vectorized<acc_t> (float for half/bf16/float,
// double for double), so every kernel computes in the accumulation type.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // kSize float lanes rounded to 16-bit values, as convert_from_float rounds them.
  static auto narrow(const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      return at::vec::cvtfp32_bf16(v);
    } else {
      return at::vec::cvtfp32_fp16(v);
    }
  }
#endif

  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
  }

  // One float vector to kSize 16-bit values: convert_from_float takes two float vectors, and given the same
  // one twice it converts it twice (for bfloat16, a dozen integer operations per vector).
  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v));
#elif defined(CPU_CAPABILITY_AVX2)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(v));
#else
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kSize);
#endif
    }
  }

  // The first count < kSize elements only; the other lanes of a load are 0. Masked loads where the
  // capability has them (AVX-512): a copy through a stack buffer made the bfloat16 NCHW backward at
  // HxW = 49 slower than element-at-a-time code.
  static Vec load(const scalar_t* p, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p, count);
    } else {
      const auto v = at::vec::Vectorized<scalar_t>::loadu(p, static_cast<int16_t>(count));
      return std::get<0>(at::vec::convert_to_float<scalar_t>(v));
    }
  }

  static void store(scalar_t* p, const Vec& v, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p, count);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << count) - 1), narrow(v));
#else
      at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
#endif
    }
  }
};

// v with the lanes past count set to 0 (a partial vector's), so they add nothing to a sum.
template <typename T>
inline T keep_lanes(const T& v, int64_t count) {
  return T::set(T(0), v, count);
}

// A reduction over `rows` rows is cut into chunks of a size that depends only on the shape, so the
// order of every floating-point merge is the same whatever the number of threads.
struct RowChunks {
  int64_t rows_per_chunk;
  int64_t count;
};

inline RowChunks row_chunks(int64_t rows, int64_t row_len) {
  constexpr int64_t kElemsPerChunk = 32768;
  const int64_t per = std::max<int64_t>(1, kElemsPerChunk / std::max<int64_t>(1, row_len));
  return {per, std::max<int64_t>(1, (rows + per - 1) / per)};
}

// Partial sums (elements added) below which a merge of per-task partials runs in one task: on a busy machine
// every parallel region's join can cost a scheduler tick, more than these adds.
constexpr int64_t kInlineSumElems = 1 << 18;

// Grain for at::parallel_for over items of `work` elements each: about 32k elements per task.
inline int64_t grain_for(int64_t work) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work)); }

// Calls f(std::integral_constant<int64_t, act>{}) so hot loops see the activation as a constant.
template <typename F>
inline void dispatch_activation(int64_t act, const F& f) {
  switch (act) {
    case kRelu:
      return f(std::integral_constant<int64_t, kRelu>{});
    case kLeakyRelu:
      return f(std::integral_constant<int64_t, kLeakyRelu>{});
    case kSilu:
      return f(std::integral_constant<int64_t, kSilu>{});
    case kGelu:
      return f(std::integral_constant<int64_t, kGelu>{});
    case kGeluTanh:
      return f(std::integral_constant<int64_t, kGeluTanh>{});
    default:
      return f(std::integral_constant<int64_t, kIdentity>{});
  }
}

// dispatch_activation for a backward, which may also work from the output (act | kFromOutput).
template <typename F>
inline void dispatch_grad_activation(int64_t act, const F& f) {
  switch (act) {
    case kFromOutput | kIdentity:
      return f(std::integral_constant<int64_t, kFromOutput | kIdentity>{});
    case kFromOutput | kRelu:
      return f(std::integral_constant<int64_t, kFromOutput | kRelu>{});
    case kFromOutput | kLeakyRelu:
      return f(std::integral_constant<int64_t, kFromOutput | kLeakyRelu>{});
    default:
      return dispatch_activation(act, f);
  }
}

// Moments merged across blocks, chunks and channels are held in double: a block mean rounded to
// float loses ulp(mean), which for off-centre data (mean 100, std 0.01) is a visible fraction of the
// differences between block means that Chan's formula adds up. Per-element work stays in acc_t.
using Moments = Welford<double, double>;

// The count of a whole SIMD vector, for loads, stores and the work done per vector.
struct WholeVec {};

// A no-op for deviation_sums' `side` work.
struct NoSideWork {
  template <typename Count>
  void operator()(int64_t, Count) const {}
};

// Σ e and Σ e² of e = (x - k) - m over n contiguous values: row_moments' one pass (m = 0) and its second
// pass, where Σ e is the rounding error of m as the mean of x - k, which the caller adds back (the corrected
// two-pass algorithm). Four SIMD accumulators hide latency; the last n % kSize values are one partial
// vector, its other lanes masked to 0. side(j, count) runs with the loads of vector j (count as in
// for_vectors): a row-at-a-time pass applies the row before this one there, so its loads and stores overlap
// this row's (from L2 or L3), instead of waiting behind the reductions that end each row. The sums do not
// depend on it.
template <typename scalar_t, typename Vec = typename VecIO<scalar_t>::Vec, typename Side = NoSideWork>
std::pair<double, double> deviation_sums(const scalar_t* __restrict p, int64_t n, Vec k, Vec m,
                                         const Side& side = {}) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t kV = IO::kSize;
  const int64_t n4 = n - n % (4 * kV), n1 = n - n % kV;
  Vec e0(0), e1(0), q0(0), q1(0), q2(0), q3(0);
  for (int64_t i = 0; i < n4; i += 4 * kV) {
    const Vec d0 = (IO::load(p + i) - k) - m, d1 = (IO::load(p + i + kV) - k) - m;
    const Vec d2 = (IO::load(p + i + 2 * kV) - k) - m, d3 = (IO::load(p + i + 3 * kV) - k) - m;
    for (int64_t v = 0; v < 4; ++v) side(i + v * kV, WholeVec{});
    e0 = e0 + (d0 + d1);
    e1 = e1 + (d2 + d3);
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
    q2 = at::vec::fmadd(d2, d2, q2);
    q3 = at::vec::fmadd(d3, d3, q3);
  }
  for (int64_t i = n4; i < n1; i += kV) {
    const Vec d = (IO::load(p + i) - k) - m;
    side(i, WholeVec{});
    e0 = e0 + d;
    q0 = at::vec::fmadd(d, d, q0);
  }
  if (n1 < n) {
    const Vec d = keep_lanes((IO::load(p + n1, n - n1) - k) - m, n - n1);
    side(n1, n - n1);
    e1 = e1 + d;
    q1 = at::vec::fmadd(d, d, q1);
  }
  const auto add = [](Vec a, Vec b) { return a + b; };
  return {at::vec::vec_reduce_all(add, e0 + e1), at::vec::vec_reduce_all(add, (q0 + q1) + (q2 + q3))};
}

// Values per block of row_moments: a block stays in L1 between its passes.
template <typename scalar_t>
constexpr int64_t kMomentsBlock = 256 * VecIO<scalar_t>::kSize;

// The shift k of a block of n values for deviation_sums: the mean of its first kSize values, so the float
// sums scale with the spread, not the magnitude (exact enough for off-centre data).
template <typename scalar_t>
at::opmath_type<scalar_t> block_shift(const scalar_t* p, int64_t n) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const int64_t h = std::min(n, IO::kSize);
  const auto add = [](Vec a, Vec b) { return a + b; };
  return at::vec::vec_reduce_all(add, keep_lanes(IO::load(p, h), h)) / at::opmath_type<scalar_t>(h);
}

// The moments of a block of n values from its one-pass sums (Σd, Σd², d = x - shift), merged into w.
// Σd² - (Σd)²/n loses bits as (mean - k)² grows against the variance, by at most n / kSize (the first kSize
// values alone add (mean - k)²·kSize / n to it): past (mean - k)² > variance, a second pass sums the
// deviations from the mean instead. Blocks merge with Chan's formula.
template <typename scalar_t>
Moments add_block(const Moments& w, const scalar_t* p, int64_t n, at::opmath_type<scalar_t> shift,
                  std::pair<double, double> sums) {
  using Vec = typename VecIO<scalar_t>::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  const auto [sum, sq] = sums;
  const double cross = sum * sum / double(n);
  double mean = double(shift) + sum / double(n), m2 = sq - cross;
  if (!(2.0 * cross <= sq)) {
    const acc_t m = acc_t(sum / double(n));
    const auto [e, q] = deviation_sums(p, n, Vec(shift), Vec(m));
    mean = double(shift) + double(m) + e / double(n);
    m2 = q - e * e / double(n);
  }
  return welford_merge(w, {mean, std::max(0.0, m2), double(n)});
}

// Moments of L contiguous values, per block of kMomentsBlock: the shifted sums in one pass (a second one
// where they cancel, see add_block), the blocks merged in double.
template <typename scalar_t>
Moments row_moments(const scalar_t* __restrict x, int64_t L) {
  using Vec = typename VecIO<scalar_t>::Vec;
  Moments w{0.0, 0.0, 0.0};
  for (int64_t b0 = 0; b0 < L; b0 += kMomentsBlock<scalar_t>) {
    const scalar_t* p = x + b0;
    const int64_t n = std::min(kMomentsBlock<scalar_t>, L - b0);
    const auto shift = block_shift(p, n);
    w = add_block(w, p, n, shift, deviation_sums(p, n, Vec(shift), Vec(0)));
  }
  return w;
}

// Per-channel parameter (checked, in the accumulation type) as a pointer, or `fill` when absent.
template <typename acc_t>
const acc_t* param_or(const c10::optional<at::Tensor>& p, std::vector<acc_t>& storage, int64_t C,
                      acc_t fill) {
  if (p.has_value()) return p->data_ptr<acc_t>();
  storage.assign(C, fill);
  return storage.data();
}

}  // namespace normext::cpu::CPU_CAPABILITY
