// CPU building blocks: SIMD load/store of any input dtype as accumulation-type vectors, and the
// fixed chunking of long reductions that keeps CPU results independent of the thread count.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "normext/math.h"

namespace normext::cpu {

// Loads/stores kSize elements of scalar_t as one Vectorized<acc_t> (float for half/bf16/float,
// double for double), so every kernel computes in the accumulation type.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();

  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
  }

  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kSize);
    }
  }
};

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

// Grain for at::parallel_for over items of `work` elements each: about 32k elements per task.
inline int64_t grain_for(int64_t work) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work)); }

// Welford moments of L contiguous values: SIMD lanes run their own (equal-count) Welford, merged
// lane by lane with Chan's formula, then the scalar tail.
template <typename scalar_t>
Welford<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> row_moments(const scalar_t* x, int64_t L) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Welford<Vec, acc_t> wv{Vec(acc_t(0)), Vec(acc_t(0)), acc_t(0)};
  int64_t i = 0;
  for (; i + IO::kSize <= L; i += IO::kSize) welford_push(wv, IO::load(x + i));
  acc_t lane_mean[IO::kSize], lane_m2[IO::kSize];
  wv.mean.store(lane_mean);
  wv.m2.store(lane_m2);
  Welford<acc_t, acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t l = 0; l < IO::kSize; ++l) w = welford_merge(w, {lane_mean[l], lane_m2[l], wv.n});
  Welford<acc_t, acc_t> tail{acc_t(0), acc_t(0), acc_t(0)};
  for (; i < L; ++i) welford_push(tail, acc_t(x[i]));
  return welford_merge(w, tail);
}

// Per-channel parameter (checked, in the accumulation type) as a pointer, or `fill` when absent.
template <typename acc_t>
const acc_t* param_or(const c10::optional<at::Tensor>& p, std::vector<acc_t>& storage, int64_t C,
                      acc_t fill) {
  if (p.has_value()) return p->data_ptr<acc_t>();
  storage.assign(C, fill);
  return storage.data();
}

}  // namespace normext::cpu
