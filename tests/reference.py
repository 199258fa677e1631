# Independent float64 references for the normalization tests: activations, GroupNorm, InstanceNorm (with
# the running-stat update), LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d (and the permute chains torch users
# write for the channel norms), the unfused torch-native chain used as the low-precision baseline, and
# rel_err.
# Everything here is plain torch ops; nothing is taken from normext.
import math

import torch
import torch.nn.functional as F

# The activation codes of the op schemas (csrc/include/normext/math.h, normext._ops.ACTIVATIONS).
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5}
ACTIVATIONS = [None, "identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"]


def to64(t):
    """t as a float64 CPU tensor, keeping the autograd graph (None stays None)."""
    if t is None:
        return None
    return t.to(device="cpu", dtype=torch.float64)


def act_ref(z, activation, slope=0.01):
    """The activation from its formula, in whatever dtype z has (float64 for references)."""
    if activation in (None, "identity"):
        return z
    if activation == "relu":
        return z.clamp(min=0)  # clamp propagates NaN like torch.relu
    if activation == "leaky_relu":
        return torch.where(z > 0, z, z * slope)
    if activation == "silu":
        return z / (1 + torch.exp(-z))
    if activation == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    raise ValueError(f"unknown activation {activation!r}")


def act_torch(z, activation, slope=0.01):
    """The activation as torch.nn.functional computes it (the unfused native baseline)."""
    if activation in (None, "identity"):
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, slope)
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}")


def _channel_view(p, ndim):
    return p.reshape(1, -1, *([1] * (ndim - 2)))


def group_stats_ref(x, G, eps=1e-5):
    """Per-(n, group) mean and rstd (float64, shape (N, G)); biased variance, eps inside the sqrt."""
    x64 = to64(x)
    N = x64.shape[0]
    xg = x64.reshape(N, G, -1)
    mean = xg.mean(-1)
    var = ((xg - mean.unsqueeze(-1)) ** 2).mean(-1)
    return mean, 1.0 / torch.sqrt(var + eps)


def group_norm_pre_ref(x, G, weight=None, bias=None, eps=1e-5, residual=None):
    """The pre-activation z = GN(x) * w + b + residual in float64 (differentiable)."""
    x64 = to64(x)
    N = x64.shape[0]
    xg = x64.reshape(N, G, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    z = ((xg - mean) / torch.sqrt(var + eps)).reshape(x64.shape)
    if weight is not None:
        z = z * _channel_view(to64(weight), z.dim())
    if bias is not None:
        z = z + _channel_view(to64(bias), z.dim())
    if residual is not None:
        z = z + to64(residual)
    return z


def group_norm_ref(x, G, weight=None, bias=None, eps=1e-5, activation=None, slope=0.01, residual=None):
    """y = act(GN(x) * w + b + residual), float64 on the CPU, from the formula."""
    return act_ref(group_norm_pre_ref(x, G, weight, bias, eps, residual), activation, slope)


def instance_norm_ref(
    x,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
    activation=None,
    slope=0.01,
    residual=None,
):
    """InstanceNorm in float64. Returns (y, new_running_mean, new_running_var); the running stats are
    returned updated (not modified in place): new = (1 - momentum) * old + momentum * batch statistic, where
    the batch statistic is the mean over N of the per-(n, c) mean / unbiased variance."""
    x64 = to64(x)
    N, C = x64.shape[:2]
    new_rm, new_rv = to64(running_mean), to64(running_var)
    if use_input_stats:
        z = group_norm_pre_ref(x64, C, None, None, eps)
        if running_mean is not None:
            xs = x64.detach().reshape(N, C, -1)
            L = xs.shape[-1]
            mean_nc = xs.mean(-1)
            var_nc = ((xs - mean_nc.unsqueeze(-1)) ** 2).sum(-1) / (L - 1)
            new_rm = (1 - momentum) * new_rm + momentum * mean_nc.mean(0)
            new_rv = (1 - momentum) * new_rv + momentum * var_nc.mean(0)
    else:
        rm = _channel_view(to64(running_mean), x64.dim())
        rv = _channel_view(to64(running_var), x64.dim())
        z = (x64 - rm) / torch.sqrt(rv + eps)
    if weight is not None:
        z = z * _channel_view(to64(weight), z.dim())
    if bias is not None:
        z = z + _channel_view(to64(bias), z.dim())
    if residual is not None:
        z = z + to64(residual)
    return act_ref(z, activation, slope), new_rm, new_rv


def native_chain(norm_out, residual, activation, slope=0.01):
    """The unfused torch-native chain after a torch norm: + residual, then the activation (input dtype)."""
    z = norm_out if residual is None else norm_out + residual
    return act_torch(z, activation, slope)


def rel_err(a, ref):
    """||a - ref|| / ||ref|| in float64 (the absolute ||a - ref|| when ref is all zeros)."""
    a64 = a.detach().to(device="cpu", dtype=torch.float64)
    r64 = ref.detach().to(device="cpu", dtype=torch.float64)
    assert a64.shape == r64.shape, f"shape {tuple(a64.shape)} != reference shape {tuple(r64.shape)}"
    num = torch.linalg.vector_norm(a64 - r64).item()
    den = torch.linalg.vector_norm(r64).item()
    return num / den if den > 0 else num


def layer_norm_pre_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5, residual=None):
    """The pre-activation z = LN(x) * w + b + residual over the trailing normalized_shape, float64."""
    x64 = to64(x)
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x64.mean(dims, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dims, keepdim=True)
    z = (x64 - mean) / torch.sqrt(var + eps)
    if weight is not None:
        z = z * to64(weight)
    if bias is not None:
        z = z + to64(bias)
    if residual is not None:
        z = z + to64(residual)
    return z


def layer_norm_ref(
    x, normalized_shape, weight=None, bias=None, eps=1e-5, activation=None, slope=0.01, residual=None
):
    """y = act(LN(x) * w + b + residual), float64 on the CPU, from the formula."""
    return act_ref(layer_norm_pre_ref(x, normalized_shape, weight, bias, eps, residual), activation, slope)


def layer_norm_stats_ref(x, normalized_shape, eps=1e-5):
    """Per-row mean and rstd (float64, shape x.shape[:-len(normalized_shape)])."""
    x64 = to64(x)
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x64.mean(dims)
    var = ((x64 - x64.mean(dims, keepdim=True)) ** 2).mean(dims)
    return mean, 1.0 / torch.sqrt(var + eps)


def layer_norm_2d_pre_ref(x, weight=None, bias=None, eps=1e-6, residual=None):
    """The pre-activation of LayerNorm2d: each (n, position) normalized over the C channels (dim 1), then
    per-channel w, b, + residual; float64."""
    x64 = to64(x)
    mean = x64.mean(1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(1, keepdim=True)
    z = (x64 - mean) / torch.sqrt(var + eps)
    if weight is not None:
        z = z * _channel_view(to64(weight), z.dim())
    if bias is not None:
        z = z + _channel_view(to64(bias), z.dim())
    if residual is not None:
        z = z + to64(residual)
    return z


def layer_norm_2d_ref(x, weight=None, bias=None, eps=1e-6, activation=None, slope=0.01, residual=None):
    """y = act(LayerNorm2d(x) + residual), float64 on the CPU, from the formula."""
    return act_ref(layer_norm_2d_pre_ref(x, weight, bias, eps, residual), activation, slope)


def permute_layer_norm_2d(x, weight=None, bias=None, eps=1e-6):
    """LayerNorm2d as timm / detectron2 write it: permute C last, F.layer_norm, permute back."""
    perm = [0, *range(2, x.dim()), 1]
    inv = [perm.index(i) for i in range(x.dim())]
    return F.layer_norm(x.permute(perm), (x.shape[1],), weight, bias, eps).permute(inv)


def rms_norm_pre_ref(x, dims, weight=None, eps=1e-6, residual=None, channel=False):
    """The pre-activation z = x / sqrt(mean(x²) + eps) * w + residual over dims, float64; w elementwise over
    the trailing dims, or per channel (dim 1) with channel=True (RMSNorm2d)."""
    x64 = to64(x)
    z = x64 / torch.sqrt((x64**2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        z = z * (_channel_view(to64(weight), z.dim()) if channel else to64(weight))
    if residual is not None:
        z = z + to64(residual)
    return z


def rms_norm_ref(x, normalized_shape, weight=None, eps=1e-6, activation=None, slope=0.01, residual=None):
    """y = act(RMSNorm(x) * w + residual) over the trailing normalized_shape, float64, from the formula."""
    dims = tuple(range(-len(normalized_shape), 0))
    return act_ref(rms_norm_pre_ref(x, dims, weight, eps, residual), activation, slope)


def rms_norm_2d_ref(x, weight=None, eps=1e-6, activation=None, slope=0.01, residual=None):
    """y = act(RMSNorm2d(x) + residual): each (n, position) over the C channels (dim 1), float64."""
    return act_ref(rms_norm_pre_ref(x, 1, weight, eps, residual, channel=True), activation, slope)


def permute_rms_norm_2d(x, weight=None, eps=1e-6):
    """RMSNorm2d as torch users write it: permute C last, F.rms_norm, permute back."""
    perm = [0, *range(2, x.dim()), 1]
    inv = [perm.index(i) for i in range(x.dim())]
    return F.rms_norm(x.permute(perm), (x.shape[1],), weight, eps).permute(inv)


def batch_norm_ref(
    x,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    activation=None,
    slope=0.01,
    residual=None,
):
    """BatchNorm in float64 from the formula: statistics per channel over N and every spatial position.
    Training normalizes with the biased batch variance; eval with the running statistics. Returns
    (y, new_running_mean, new_running_var), the running stats updated (not in place) with the batch mean and
    unbiased variance: new = (1 - momentum) * old + momentum * batch statistic."""
    x64 = to64(x)
    C = x64.shape[1]
    dims = [0, *range(2, x64.dim())]
    new_rm, new_rv = to64(running_mean), to64(running_var)
    if training:
        mean = x64.mean(dims, keepdim=True)
        var = ((x64 - mean) ** 2).mean(dims, keepdim=True)
        z = (x64 - mean) / torch.sqrt(var + eps)
        count = x64.numel() // C
        if running_mean is not None and count > 0:
            new_rm = (1 - momentum) * new_rm + momentum * mean.detach().reshape(C)
            new_rv = (1 - momentum) * new_rv + momentum * var.detach().reshape(C) * count / (count - 1)
    else:
        rm = _channel_view(to64(running_mean), x64.dim())
        rv = _channel_view(to64(running_var), x64.dim())
        z = (x64 - rm) / torch.sqrt(rv + eps)
    if weight is not None:
        z = z * _channel_view(to64(weight), z.dim())
    if bias is not None:
        z = z + _channel_view(to64(bias), z.dim())
    if residual is not None:
        z = z + to64(residual)
    return act_ref(z, activation, slope), new_rm, new_rv
