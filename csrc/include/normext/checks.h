// Host-side argument checks and layout handling shared by the CPU and CUDA operator entry points,
// so both devices reject the same bad inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/StringUtil.h>
#include <c10/util/accumulate.h>

#include <vector>

#include "normext/math.h"
#include "normext/xhat_source.h"

namespace normext {

// The two native layouts of an (N, C, *) tensor: channels-first (NCHW-contiguous) and
// channels-last (N, *, C contiguous, i.e. channels_last / channels_last_3d and their 1-D analogue).
enum class Layout { kChannelsFirst, kChannelsLast };

inline bool is_channels_last_dense(const at::Tensor& t) {
  const int64_t d = t.dim();
  if (d < 3) return false;
  int64_t expected = t.size(1);
  if (t.stride(1) != 1 && t.size(1) != 1) return false;
  for (int64_t i = d - 1; i >= 2; --i) {
    if (t.stride(i) != expected && t.size(i) != 1) return false;
    expected *= t.size(i);
  }
  return t.stride(0) == expected || t.size(0) == 1;
}

// Channels-first wins when both describe the memory (C == 1 or no spatial extent).
inline Layout layout_of(const at::Tensor& t) {
  if (t.is_contiguous()) return Layout::kChannelsFirst;
  return is_channels_last_dense(t) ? Layout::kChannelsLast : Layout::kChannelsFirst;
}

// A dense copy of t in the given layout, or t itself when it already is one.
inline at::Tensor to_layout(const at::Tensor& t, Layout layout) {
  if (layout == Layout::kChannelsFirst || t.dim() < 3) return t.contiguous();
  if (is_channels_last_dense(t)) return t;
  std::vector<int64_t> perm{0};
  for (int64_t i = 2; i < t.dim(); ++i) perm.push_back(i);
  perm.push_back(1);
  std::vector<int64_t> inv(perm.size());
  for (size_t i = 0; i < perm.size(); ++i) inv[perm[i]] = static_cast<int64_t>(i);
  return t.permute(perm).contiguous().permute(inv);
}

inline void check_input(const at::Tensor& X, const char* op, int64_t min_dim) {
  TORCH_CHECK(X.is_floating_point(), op, ": expected a floating-point input, got ", X.scalar_type());
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kHalf ||
                  X.scalar_type() == at::kBFloat16 || X.scalar_type() == at::kDouble,
              op, ": unsupported input dtype ", X.scalar_type());
  TORCH_CHECK(!(X.is_cuda() && X.scalar_type() == at::kDouble), op,
              ": float64 is supported on the CPU only (for gradcheck)");
  TORCH_CHECK(X.dim() >= min_dim, op, ": expected an input with at least ", min_dim,
              " dimensions, got shape ", X.sizes());
}

inline at::ScalarType acc_dtype(const at::Tensor& X) {
  return X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_activation(int64_t act, const char* op) {
  TORCH_CHECK(act >= 0 && base_activation(act) < kNumActivations, op, ": unknown activation code ", act);
  TORCH_CHECK(!from_output(act), op,
              ": a backward from the output (memory_efficient) is not supported by this kernel");
}

// The activation code of a backward op that may work from the output (act | kFromOutput, see
// xhat_source.h); returns the activation itself, for the argument checks. relu is allowed there only when
// the op needs no x̂ (needs_xhat false: BatchNorm's dx with constant statistics).
inline int64_t check_grad_activation(int64_t act, const char* op, bool needs_xhat = true) {
  const int64_t base = act >= 0 ? base_activation(act) : act;
  check_activation(base, op);
  TORCH_CHECK(
      !(act >= 0 && from_output(act)) || base == kIdentity || base == kLeakyRelu ||
          (base == kRelu && !needs_xhat),
      op, ": a backward from the output needs an invertible activation (identity or leaky_relu), got code ",
      base);
  return base;
}

// A per-channel (or per-element) parameter: 1-D of `numel` floats, on X's device. Its dtype may be
// X's or float32 (mixed precision). Returned contiguous in the accumulation type (float32, or
// float64 for float64 input) so kernels template on one parameter type only; that is a no-op for
// the usual float32 parameters and a C-element cast for half/bf16 ones.
// check_param_shape is the same for a parameter of any shape (LayerNorm's normalized_shape); it is
// returned flattened.
inline c10::optional<at::Tensor> check_param_shape(const c10::optional<at::Tensor>& p, const at::Tensor& X,
                                                   at::IntArrayRef shape, const char* name, const char* op) {
  if (!p.has_value() || !p->defined()) return c10::nullopt;
  TORCH_CHECK(p->device() == X.device(), op, ": ", name, " is on ", p->device(), " but the input is on ",
              X.device());
  TORCH_CHECK(p->sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == X.scalar_type() || p->scalar_type() == at::kFloat, op, ": ", name,
              " must have the input's dtype (", X.scalar_type(), ") or float32, got ", p->scalar_type());
  return p->to(acc_dtype(X)).contiguous().view(-1);
}

inline c10::optional<at::Tensor> check_param(const c10::optional<at::Tensor>& p, const at::Tensor& X,
                                             int64_t numel, const char* name, const char* op) {
  return check_param_shape(p, X, {numel}, name, op);
}

// A tensor that must match X elementwise (residual, dY): same shape, device and dtype; returned
// dense in X's layout so kernels can index it exactly like X.
inline c10::optional<at::Tensor> check_like(const c10::optional<at::Tensor>& t, const at::Tensor& X,
                                            Layout layout, const char* name, const char* op) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  TORCH_CHECK(t->device() == X.device(), op, ": ", name, " is on ", t->device(), " but the input is on ",
              X.device());
  TORCH_CHECK(t->sizes() == X.sizes(), op, ": ", name, " must have the input's shape ", X.sizes(), ", got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == X.scalar_type(), op, ": ", name, " must have the input's dtype ",
              X.scalar_type(), ", got ", t->scalar_type());
  return to_layout(*t, layout);
}

// Saved statistics passed back to a backward op: numel elements of the accumulation type (float32;
// float64 for float64 input, so gradcheck sees exact statistics), on X's device.
inline at::Tensor check_stats(const at::Tensor& s, const at::Tensor& X, int64_t numel, const char* name,
                              const char* op) {
  TORCH_CHECK(s.device() == X.device(), op, ": ", name, " is on ", s.device(), " but the input is on ",
              X.device());
  TORCH_CHECK(s.scalar_type() == acc_dtype(X) && s.numel() == numel, op, ": ", name, " must be a ",
              acc_dtype(X), " tensor of ", numel, " elements");
  return s.contiguous();
}

// (N, C, HxW) of an (N, C, *) input.
struct ChannelDims {
  int64_t N, C, HxW;
};

inline ChannelDims channel_dims(const at::Tensor& X) {
  ChannelDims d{X.size(0), X.size(1), 1};
  for (int64_t i = 2; i < X.dim(); ++i) d.HxW *= X.size(i);
  return d;
}

// Group-norm arguments checked once for both devices.
struct GroupNormArgs {
  at::Tensor X;
  c10::optional<at::Tensor> gamma, beta, residual;
  Layout layout;
  ChannelDims dims;
  int64_t G, D;
};

inline GroupNormArgs check_group_norm(const at::Tensor& X_in, const c10::optional<at::Tensor>& gamma,
                                      const c10::optional<at::Tensor>& beta,
                                      const c10::optional<at::Tensor>& residual, int64_t G, int64_t act,
                                      const char* op) {
  check_input(X_in, op, 2);
  check_activation(act, op);
  GroupNormArgs a;
  a.layout = layout_of(X_in);
  a.X = to_layout(X_in, a.layout);
  a.dims = channel_dims(a.X);
  TORCH_CHECK(G > 0, op, ": num_groups must be positive, got ", G);
  TORCH_CHECK(a.dims.C % G == 0, op, ": expected number of channels in input (", a.dims.C,
              ") to be divisible by num_groups (", G, ")");
  a.G = G;
  a.D = a.dims.C / G;
  a.gamma = check_param(gamma, a.X, a.dims.C, "weight", op);
  a.beta = check_param(beta, a.X, a.dims.C, "bias", op);
  a.residual = check_like(residual, a.X, a.layout, "residual", op);
  return a;
}

// LayerNorm arguments checked once for both devices: X made contiguous and seen as M rows of the
// D = prod(normalized_shape) trailing elements; gamma/beta flattened to D elements.
struct LayerNormArgs {
  at::Tensor X;
  c10::optional<at::Tensor> gamma, beta, residual;
  int64_t M, D;
  std::vector<int64_t> stat_shape;  // X's leading dims: one mean/rstd per row
};

inline LayerNormArgs check_layer_norm(const at::Tensor& X_in, at::IntArrayRef normalized_shape,
                                      const c10::optional<at::Tensor>& gamma,
                                      const c10::optional<at::Tensor>& beta,
                                      const c10::optional<at::Tensor>& residual, int64_t act,
                                      const char* op) {
  check_input(X_in, op, 1);
  check_activation(act, op);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, op, ": normalized_shape must have at least one dimension");
  const int64_t lead = X_in.dim() - k;
  TORCH_CHECK(lead >= 0 && X_in.sizes().slice(lead) == normalized_shape, op,
              ": Given normalized_shape=", normalized_shape, ", expected input with shape [*, ",
              c10::Join(", ", normalized_shape), "], but got input of size ", X_in.sizes());
  LayerNormArgs a;
  a.X = X_in.contiguous();
  a.stat_shape = a.X.sizes().slice(0, lead).vec();
  a.D = c10::multiply_integers(normalized_shape);
  a.M = c10::multiply_integers(a.stat_shape);
  a.gamma = check_param_shape(gamma, a.X, normalized_shape, "weight", op);
  a.beta = check_param_shape(beta, a.X, normalized_shape, "bias", op);
  a.residual = check_like(residual, a.X, Layout::kChannelsFirst, "residual", op);
  return a;
}

// The residual stream of add_layer_norm / add_rms_norm (s = X + R, normalized): R of X's shape and device,
// floating point. s has residual_dtype (default: X's dtype), which must be X's dtype or float32 (a
// float32 stream beside 16-bit activations). Returns R contiguous in that dtype (a cast when R has another).
inline at::Tensor check_add_residual(const at::Tensor& R, const at::Tensor& X,
                                     c10::optional<at::ScalarType> residual_dtype, const char* op) {
  TORCH_CHECK(R.device() == X.device(), op, ": residual is on ", R.device(), " but the input is on ",
              X.device());
  TORCH_CHECK(R.sizes() == X.sizes(), op, ": residual must have the input's shape ", X.sizes(), ", got ",
              R.sizes());
  TORCH_CHECK(R.is_floating_point(), op, ": expected a floating-point residual, got ", R.scalar_type());
  const at::ScalarType res = residual_dtype.value_or(X.scalar_type());
  TORCH_CHECK(res == X.scalar_type() || (res == at::kFloat && X.scalar_type() != at::kDouble), op,
              ": residual_dtype must be the input's dtype (", X.scalar_type(), ") or float32, got ", res);
  return R.to(res).contiguous();
}

// Arguments of the per-channel-parameter norms that are not GroupNorm (LayerNorm2d, BatchNorm),
// checked once for both devices: X (N, C, *) in its native layout, gamma/beta of C elements.
struct ChannelNormArgs {
  at::Tensor X;
  c10::optional<at::Tensor> gamma, beta, residual;
  Layout layout;
  ChannelDims dims;
  // The kernels' view of X: N·HxW rows of C contiguous channels for channels-last memory and for input
  // without spatial extent ((N, C) or HxW == 1, whose contiguous memory is the same); else N·C runs of HxW.
  bool rows;
};

inline ChannelNormArgs check_channel_norm(const at::Tensor& X_in, const c10::optional<at::Tensor>& gamma,
                                          const c10::optional<at::Tensor>& beta,
                                          const c10::optional<at::Tensor>& residual, int64_t act,
                                          const char* op) {
  check_input(X_in, op, 2);
  check_activation(act, op);
  ChannelNormArgs a;
  a.layout = layout_of(X_in);
  a.X = to_layout(X_in, a.layout);
  a.dims = channel_dims(a.X);
  a.rows = a.layout == Layout::kChannelsLast || a.dims.HxW == 1;
  a.gamma = check_param(gamma, a.X, a.dims.C, "weight", op);
  a.beta = check_param(beta, a.X, a.dims.C, "bias", op);
  a.residual = check_like(residual, a.X, a.layout, "residual", op);
  return a;
}

// Running statistics updated in place: 1-D of C elements (any stride) on X's device, of one floating
// dtype (their own; the update is computed in the accumulation type and stored back in it).
inline void check_running_stats(const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var, const at::Tensor& X, int64_t C,
                                const char* op) {
  const std::pair<const c10::optional<at::Tensor>*, const char*> stats[] = {{&running_mean, "running_mean"},
                                                                            {&running_var, "running_var"}};
  for (const auto& [r, name] : stats) {
    if (!r->has_value() || !(*r)->defined()) continue;
    const at::Tensor& t = **r;
    TORCH_CHECK(t.device() == X.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
                X.device());
    TORCH_CHECK(t.numel() == C, op, ": ", name, " should contain ", C, " elements not ", t.numel());
    TORCH_CHECK(t.dim() == 1, op, ": expected ", name, " of shape [", C, "], got ", t.sizes());
    const auto type = t.scalar_type();
    TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, op,
                ": ", name, " must be a floating-point tensor, got ", type);
  }
  if (running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
      running_var->defined()) {
    TORCH_CHECK(running_mean->scalar_type() == running_var->scalar_type(), op,
                ": running_mean and running_var must have the same dtype, got ", running_mean->scalar_type(),
                " and ", running_var->scalar_type());
  }
}

}  // namespace normext
