// The normext._C extension module: every operator schema (one place), and build facts for Python.
// Kernels register themselves per device with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; fake
// impls and autograd live in normext/_ops.py and the per-norm Python modules.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

#ifdef NORMEXT_CUDA_EMU
namespace normext::emu {
void bind_python(pybind11::module_& m);  // csrc/cuda/emu/runtime.cpp
}
#else
#include "cpu/dispatch.h"
#endif

#ifndef NORMEXT_CUDA_ARCHS
#define NORMEXT_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(normext, m) {
  // GroupNorm (InstanceNorm is G == C). X is (N, C, *), NCHW-contiguous or channels-last; Y keeps the
  // layout. mean/rstd are (N, G) float32. act is a normext::Activation code; y = act(norm(x) + res).
  m.def(
      "group_norm_fwd(Tensor X, Tensor? gamma, Tensor? beta, Tensor? residual, int G, float eps, "
      "int act, float slope) -> (Tensor Y, Tensor mean, Tensor rstd)");
  // output_mask selects (dX, dgamma, dbeta, dresidual); unselected outputs are empty tensors.
  // dresidual is the gradient at the pre-activation, so it is only needed when act != identity.
  // Every backward op also takes act | kFromOutput (memory_efficient, normext/xhat_source.h): X then holds
  // the forward's output Y, from which x̂ is recovered (with the residual, when one was fused).
  m.def(
      "group_norm_bwd(Tensor dY, Tensor X, Tensor? residual, Tensor mean, Tensor rstd, "
      "Tensor? gamma, Tensor? beta, int G, int act, float slope, bool[4] output_mask) -> "
      "(Tensor dX, Tensor dgamma, Tensor dbeta, Tensor dresidual)");

  // LayerNorm over the trailing normalized_shape of X (made contiguous): M rows of D elements, gamma/beta
  // of shape normalized_shape (elementwise affine). mean/rstd have X's leading dims (one per row).
  m.def(
      "layer_norm_fwd(Tensor X, Tensor? gamma, Tensor? beta, Tensor? residual, int[] normalized_shape, "
      "float eps, int act, float slope) -> (Tensor Y, Tensor mean, Tensor rstd)");
  // output_mask as for group_norm_bwd; dgamma/dbeta have shape normalized_shape.
  m.def(
      "layer_norm_bwd(Tensor dY, Tensor X, Tensor? residual, Tensor mean, Tensor rstd, Tensor? gamma, "
      "Tensor? beta, int[] normalized_shape, int act, float slope, bool[4] output_mask) -> "
      "(Tensor dX, Tensor dgamma, Tensor dbeta, Tensor dresidual)");
  // LayerNorm2d: X is (N, C, *), NCHW-contiguous or channels-last, normalized over C at each (n, position)
  // with per-channel gamma/beta; Y keeps the layout. mean/rstd are (N, HxW).
  m.def(
      "layer_norm_2d_fwd(Tensor X, Tensor? gamma, Tensor? beta, Tensor? residual, float eps, int act, "
      "float slope) -> (Tensor Y, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_2d_bwd(Tensor dY, Tensor X, Tensor? residual, Tensor mean, Tensor rstd, Tensor? gamma, "
      "Tensor? beta, int act, float slope, bool[4] output_mask) -> "
      "(Tensor dX, Tensor dgamma, Tensor dbeta, Tensor dresidual)");

  // RMSNorm (y = act(x·rstd·gamma + res), rstd of the mean square) and RMSNorm2d: the LayerNorm ops
  // without the centring and beta, on the same kernels; rstd as LayerNorm's. output_mask selects
  // (dX, dgamma, dresidual).
  m.def(
      "rms_norm_fwd(Tensor X, Tensor? gamma, Tensor? residual, int[] normalized_shape, float eps, int act, "
      "float slope) -> (Tensor Y, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor dY, Tensor X, Tensor? residual, Tensor rstd, Tensor? gamma, "
      "int[] normalized_shape, int act, float slope, bool[3] output_mask) -> "
      "(Tensor dX, Tensor dgamma, Tensor dresidual)");
  m.def(
      "rms_norm_2d_fwd(Tensor X, Tensor? gamma, Tensor? residual, float eps, int act, float slope) -> "
      "(Tensor Y, Tensor rstd)");
  m.def(
      "rms_norm_2d_bwd(Tensor dY, Tensor X, Tensor? residual, Tensor rstd, Tensor? gamma, int act, "
      "float slope, bool[3] output_mask) -> (Tensor dX, Tensor dgamma, Tensor dresidual)");
  // Pre-norm add: S = X + R (summed in float32, stored in residual_dtype, default X's dtype: X's or
  // float32) and Y = norm(S) in X's dtype, in one pass that reads X and R once. The backward is
  // layer_norm_bwd / rms_norm_bwd at S. R is not named `residual`: it is the residual stream, never cast
  // to X's dtype by autocast.
  m.def(
      "add_layer_norm_fwd(Tensor X, Tensor R, Tensor? gamma, Tensor? beta, int[] normalized_shape, "
      "float eps, ScalarType? residual_dtype) -> (Tensor Y, Tensor S, Tensor mean, Tensor rstd)");
  m.def(
      "add_rms_norm_fwd(Tensor X, Tensor R, Tensor? gamma, int[] normalized_shape, float eps, "
      "ScalarType? residual_dtype) -> (Tensor Y, Tensor S, Tensor rstd)");

  // BatchNorm (SyncBatchNorm and FrozenBatchNorm2d are built from the same ops). X is (N, C, *) in
  // either layout; statistics are per channel over N and all spatial positions: (C,) float32
  // (float64 for float64 input). Running statistics are updated in place with the unbiased variance,
  // new = (1 - momentum) * old + momentum * batch, and left alone for an empty batch.
  // Training forward: batch statistics, running-stat update, y = act(norm(x) + res) in one op.
  m.def(
      "batch_norm_fwd(Tensor X, Tensor? gamma, Tensor? beta, Tensor? residual, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, int act, float slope) -> "
      "(Tensor Y, Tensor mean, Tensor rstd)");
  // Per-channel mean and M2 = sum((x - mean)^2) of X (0 and 0 for an empty X); the count is numel / C.
  m.def("batch_norm_stats(Tensor X) -> (Tensor mean, Tensor m2)");
  // Chan's merge of K partial statistics (counts (K,), means and m2s (K, C)) in k order: the mean and
  // biased variance of the union, with the running-stat update. SyncBatchNorm's all-gather lands here.
  m.def(
      "batch_norm_merge(Tensor counts, Tensor means, Tensor m2s, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps) -> (Tensor mean, Tensor var)");
  // y = act((x - mean) * rsqrt(var + eps) * gamma + beta + res) with given per-channel statistics
  // (running statistics in eval, FrozenBatchNorm2d, InstanceNorm without input stats, SyncBatchNorm).
  m.def(
      "batch_norm_apply(Tensor X, Tensor mean, Tensor var, Tensor? gamma, Tensor? beta, Tensor? residual, "
      "float eps, int act, float slope) -> Tensor");
  // Backward, per channel: sum_dz = sum(dz), sum_dzxhat = sum(dz * xhat), dz the gradient at the
  // pre-activation; they are dbeta and dgamma, and what SyncBatchNorm all-reduces.
  m.def(
      "batch_norm_bwd_reduce(Tensor dY, Tensor X, Tensor? residual, Tensor mean, Tensor rstd, Tensor? gamma, "
      "Tensor? beta, int act, float slope) -> (Tensor sum_dz, Tensor sum_dzxhat)");
  // dX = gamma * rstd * (dz - sum_dz * inv_count - xhat * sum_dzxhat * inv_count); without the sums
  // (statistics that are constants: eval, frozen) dX = gamma * rstd * dz. output_mask selects
  // (dX, dresidual); unselected outputs are empty tensors.
  m.def(
      "batch_norm_bwd_elemt(Tensor dY, Tensor X, Tensor? residual, Tensor mean, Tensor rstd, Tensor? gamma, "
      "Tensor? beta, Tensor? sum_dz, Tensor? sum_dzxhat, float inv_count, int act, float slope, "
      "bool[2] output_mask) -> (Tensor dX, Tensor dresidual)");
  // The training backward (batch statistics) in one op: batch_norm_bwd_reduce then batch_norm_bwd_elemt with
  // inv_count = C / numel, output_mask and outputs as for group_norm_bwd (dgamma = sum_dzxhat, dbeta =
  // sum_dz).
  m.def(
      "batch_norm_bwd(Tensor dY, Tensor X, Tensor? residual, Tensor mean, Tensor rstd, Tensor? gamma, "
      "Tensor? beta, int act, float slope, bool[4] output_mask) -> "
      "(Tensor dX, Tensor dgamma, Tensor dbeta, Tensor dresidual)");
}

// The ops autograd never differentiates: the backward kernels (a backward whose graph is being built runs
// torch ops instead, normext/_autograd.py) and SyncBatchNorm's statistics (inside an autograd.Function).
// Differentiating one is an error here; torch's default for an op without autograd is a one-time warning
// and a silently wrong gradient. The forward ops get their autograd in Python (register_norm_autograd).
TORCH_LIBRARY_IMPL(normext, Autograd, m) {
  for (const char* op : {"group_norm_bwd", "layer_norm_bwd", "layer_norm_2d_bwd", "rms_norm_bwd",
                         "rms_norm_2d_bwd", "batch_norm_stats", "batch_norm_merge", "batch_norm_bwd_reduce",
                         "batch_norm_bwd_elemt", "batch_norm_bwd"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normext: fused normalization kernels (ops are torch.ops.normext.*)";
#ifdef NORMEXT_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  m.attr("cuda_archs") = NORMEXT_CUDA_ARCHS;
#ifdef NORMEXT_CUDA_EMU
  normext::emu::bind_python(m);
#else
  m.attr("cuda_emulated") = false;
  m.attr("cpu_capability") = normext::cpu::capability();
#endif
}
