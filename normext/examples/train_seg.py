"""`python -m normext.examples.train_seg`: trains a small segmentation network for a few steps at batch 2
on synthetic data, once with torch.nn norms and once after normext.convert_model (same initial weights,
same batches), and prints the losses of both side by side and the time per step of each."""

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import normext

NORMS = {
    "group": lambda c: nn.GroupNorm(8, c),
    "batch": nn.BatchNorm2d,
    "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
}


def conv_norm_act(cin, cout, norm, stride=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), NORMS[norm](cout), nn.ReLU(inplace=True)
    )


class SegNet(nn.Module):
    """A two-level encoder-decoder (a small U-Net): conv-norm-ReLU blocks, one skip connection,
    per-pixel class logits at the input resolution."""

    def __init__(self, num_classes, width, norm):
        super().__init__()
        w = width
        self.stem = conv_norm_act(3, w, norm)
        self.down1 = nn.Sequential(conv_norm_act(w, 2 * w, norm, stride=2), conv_norm_act(2 * w, 2 * w, norm))
        self.down2 = nn.Sequential(
            conv_norm_act(2 * w, 4 * w, norm, stride=2), conv_norm_act(4 * w, 4 * w, norm)
        )
        self.up = conv_norm_act(6 * w, 2 * w, norm)
        self.head = nn.Conv2d(2 * w, num_classes, 1)

    def forward(self, x):
        s1 = self.down1(self.stem(x))
        s2 = self.down2(s1)
        u = F.interpolate(s2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        u = self.up(torch.cat([u, s1], dim=1))
        return F.interpolate(self.head(u), size=x.shape[-2:], mode="bilinear", align_corners=False)


def synthetic_batches(steps, batch, size, num_classes, seed):
    """Images whose pixels' classes are the argmax of smooth random fields, colored per class plus
    noise: a task the network makes progress on within a few steps."""
    g = torch.Generator().manual_seed(seed)
    n = steps * batch
    fields = F.interpolate(torch.randn(n, num_classes, size // 8, size // 8, generator=g), size=(size, size),
                           mode="bilinear", align_corners=False)  # fmt: skip
    labels = fields.argmax(1)
    palette = torch.randn(num_classes, 3, generator=g)
    images = palette[labels].permute(0, 3, 1, 2) + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return list(zip(images.split(batch), labels.split(batch), strict=True))


def train(models, batches, args):
    """SGD steps over the batches, the models taking turns on each batch (so that a slow phase of a shared
    machine hits both alike); returns {name: losses} and {name: seconds per step}."""
    runs = {}
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        runs[name] = (torch.compile(model) if args.compile else model, opt)
    losses = {name: [] for name in models}
    times = {name: [] for name in models}
    for images, labels in batches:
        images = images.to(args.device, memory_format=args.memory_format)
        labels = labels.to(args.device)
        for name, (step, opt) in runs.items():
            start = time.perf_counter()
            with torch.autocast(args.device, dtype=args.amp, enabled=args.amp is not None):
                loss = F.cross_entropy(step(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())  # also waits for the device
            times[name].append(time.perf_counter() - start)
    return losses, times


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--size", type=int, default=128, help="image height and width (default 128)")
    p.add_argument("--width", type=int, default=32, help="channels of the first block (default 32)")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--norm", choices=sorted(NORMS), default="group", help="torch.nn norm to convert")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    p.add_argument("--amp", choices=["bfloat16", "float16"], help="train under torch.autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.amp = getattr(torch, args.amp) if args.amp else None
    args.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    reference = SegNet(args.classes, args.width, args.norm).to(args.device, memory_format=args.memory_format)
    converted, report = normext.convert_model(copy.deepcopy(reference), return_report=True)
    batches = synthetic_batches(args.steps, args.batch, args.size, args.classes, args.seed)

    setup = [args.device, f"autocast {str(args.amp)[6:]}" if args.amp else "float32"]
    setup += ["channels_last"] * args.channels_last + ["torch.compile"] * args.compile
    print(f"small segmentation net ({args.norm} norm + ReLU), batch {args.batch}, 3x{args.size}x{args.size}, "
          f"{args.classes} classes, {', '.join(setup)}")  # fmt: skip
    fused = sum(r.activation is not None for r in report)
    kinds = sorted({r.target for r in report})
    print(f"normext.convert_model: {len(report)} norm layers converted ({', '.join(kinds) or 'none'}), "
          f"{fused} with the following activation fused")  # fmt: skip

    losses, times = train({"torch.nn": reference, "normext": converted}, batches, args)

    print(f"{'step':>4}  {'torch.nn loss':>13}  {'normext loss':>12}  {'rel diff':>8}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(losses["torch.nn"], losses["normext"], strict=True), 1):
        diff = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, diff)
        print(f"{i:>4}  {a:>13.6f}  {b:>12.6f}  {diff:>8.1e}")
    skip = 1 if args.steps > 1 else 0  # the first step allocates (and compiles)
    per_step = {name: 1e3 * statistics.median(t[skip:]) for name, t in times.items()}
    print(f"time per step (median of steps {skip + 1}-{args.steps}): "
          + ", ".join(f"{name} {ms:.1f} ms/step" for name, ms in per_step.items()))  # fmt: skip
    tolerance = 1e-3 if args.amp is None else 5e-2
    verdict = "OK" if worst <= tolerance else "MISMATCH"
    print(f"largest relative loss difference {worst:.1e} (tolerance {tolerance:g}): {verdict}")
    if verdict != "OK":
        raise SystemExit(1)
    return losses


if __name__ == "__main__":
    main()
