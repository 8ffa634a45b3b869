"""
Throughput of benign_memorization.py's training step and probes, on synthetic CIFAR-shaped data.

    python tests/benchmark.py                      # GPU if present, else a small CPU run
    python tests/benchmark.py --compile            # with torch.compile

(a) forward, backward and Adam alone, data already on the device as a float batch;
(b) the full training step: uint8 gather, batched augmentation, mixup, forward, backward, Adam;
(c) the usual pipeline: torchvision per-image transforms in a DataLoader with one worker per core,
    feeding the same model;
(d) one full layer-wise K-NN probe (all nine layers, clean and noisy), after one warm-up probe.
Then a cost model on paper for the full-size run (CIFAR-10, ResNet18, projector 65,536, batch 256):
FLOPs from torch.utils.flop_counter on the meta device, operators per step counted with a dispatch
mode (eager) and from inductor (--compile), the bytes that the operators other than convolutions
and matmuls read and write (and Adam's), the host time of launching eager operators, the
evaluation's peak memory from the script's own grouping and chunking, and the time these imply on
one H100 at a stated utilisation: estimated, not measured.
Not collected by pytest (no test_ prefix).
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benign_memorization as bm  # noqa: E402


def augment_batch(images, generator):
    """The script's full augmentation of float images, one draw of uniforms per image."""
    u = torch.rand(images.shape[0], bm.NUM_UNIFORMS, generator=generator, device=images.device)
    return bm.apply_augment(images, bm.augment_params(u, *images.shape[-2:]))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


# One H100 SXM5 80 GB, from NVIDIA's datasheet (dense, no sparsity), and the utilisations assumed
H100_BF16_FLOPS = 989e12  # bf16/fp16 tensor cores: the step, the probes, the K-NN's fp16 products
H100_MEMORY = 80e9
H100_BANDWIDTH = 3.35e12  # HBM3 bytes/s
BANDWIDTH_UTILISATION = 0.7  # elementwise kernels and Adam stream memory at about this fraction
HOST_SECONDS_PER_OP = 5e-6  # host time to launch one eager operator (typical, not measured here)
STEP_UTILISATION = 0.35  # small 32x32 convolutions at batch 256 keep tensor cores far from peak
GEMM_UTILISATION = 0.6  # the K-NN's large matrix products
TRAIN, TEST, INVARIANCE, EPOCHS, EVAL_EVERY = 50000, 10000, 1000, 5000, 50


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched (each one a kernel launch, or more, on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


GEMMS = ("convolution", "convolution_backward", "mm", "addmm", "bmm")


class ByteCounter(TorchDispatchMode):
    """Bytes read and written by the operators other than convolutions and matmuls (batch norm,
    ReLU, residual adds, pooling, casts, the loss): the memory-bound part of a step, unfused."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] not in GEMMS and not getattr(func, "is_view", False):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(t.numel() * t.element_size() for t in leaves
                              if isinstance(t, torch.Tensor))
        return out


def generated_kernels(fn, *args):
    """Kernels inductor generates for fn(*args) and its backward. Dynamo is reset first: a
    function it compiled before in this process (main's timed --compile step) is not traced
    again and generates none. (Inductor's on-disk caches restore the count when they hit.)"""
    import torch._inductor.metrics as metrics
    torch._dynamo.reset()
    metrics.reset()
    torch.compile(fn, fullgraph=True)(*args).backward()
    return metrics.generated_kernel_count


def cost_model(args, compile_step):
    """FLOPs, operators and memory of the full-size run, and the time they imply on one H100."""
    bs, width = 256, bm.PROJECTOR_WIDTH  # whatever --projector-width the timings above used
    args = argparse.Namespace(**{**vars(args), "projector_width": width})
    model = bm.build_model(args, 10, 32).to("meta")
    x, y = torch.rand(bs, 3, 32, 32, device="meta"), torch.rand(bs, 10, device="meta")
    with FlopCounterMode(display=False) as counter, ByteCounter() as moved:
        bm.compute_loss(model(x), y, "mse").backward()
    train_image = counter.get_total_flops() / bs
    # float32 on the meta device; bf16 autocast halves the activations' bytes (an approximation)
    model_bytes = moved.bytes / 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x, {})
    forward_image = counter.get_total_flops() / bs
    small = bm.build_model(args, 10, 32)
    dims = bm.layer_dims(small, 32)
    knn = sum(2 * TEST * TRAIN * d + 2 * TRAIN * TRAIN * d for d in dims.values())  # clean + noisy
    # L-BFGS: 100 iterations of 1.25 evaluations, each two products (the features need no grad)
    linear = 100 * 1.25 * 2 * 2 * TRAIN * dims["embedding"] * 10
    forward = (TRAIN + TEST + 3 * INVARIANCE) * forward_image
    steps = TRAIN // bs
    epoch = steps * bs * train_image

    # operators of one eager step (any batch size issues the same ones), on the CPU at batch 8
    opt = torch.optim.Adam(small.parameters(), lr=3e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    targets = torch.nn.functional.one_hot(torch.arange(8), 10).float()
    aug_u, mix_u = bm.step_uniforms(8, True, True, g, torch.device("cpu"))
    settings = bm.StepSettings(0.8, "mse", bf16=False, channels_last=False)

    def one_step():
        loss = bm.step_loss(small, images, targets, aug_u, mix_u, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    one_step()  # Adam's first step also creates its state: about 190 operators of no later step
    with OpCounter() as ops:
        one_step()
    extern = sum(op.split(".")[0] in ("convolution", "convolution_backward", "mm", "addmm", "bmm")
                 for op in ops.ops)
    with OpCounter() as aug_ops, ByteCounter() as aug_moved:
        bm.apply_augment(images.float() / 255, bm.augment_params(aug_u, 32, 32))
    aug_bytes = aug_moved.bytes / 8 * bs  # per image, float32 (it runs outside autocast)
    compiled = None
    # inductor's fused kernels for the whole step, plus the convolutions and matmuls: a CPU
    # compile (C++ kernels, which needs a host compiler); a GPU's Triton ones may differ in number
    if compile_step:
        try:
            kernels = generated_kernels(bm.step_loss, small, images, targets, aug_u, mix_u,
                                        settings)
            compiled = kernels + extern + 1  # + the fused Adam kernel
        except Exception as e:  # the timings above are printed already: keep the rest
            e = getattr(e, "inner_exception", e)  # dynamo wraps it after a line "...raised:"
            first = (str(e).strip().splitlines() or [""])[0][:120]
            compiled = f"not counted (the CPU compile failed: {type(e).__name__}: {first})"

    # the evaluation's peak memory at full size, from the script's own grouping and chunking (bf16)
    params = sum(p.numel() for p in model.parameters())
    state = 4 * params * 4  # float32 weights, gradients and Adam's two moments
    budget = bm.FEATURE_MEMORY_FRACTION * (H100_MEMORY - state)
    groups = bm.layer_groups(dims, TRAIN + TEST, budget, 2)
    def knn_temp(d):  # similarity block, float32 query chunk, float32 reference chunk
        chunk = max(1, min(bm.KNN_MAX_QUERIES, bm.KNN_BLOCK_FLOATS // TRAIN,
                           bm.KNN_REF_FLOATS // d))
        return 4 * (chunk * TRAIN + chunk * d + max(1, bm.KNN_REF_FLOATS // d) * d)
    # one forward batch of 1024: bf16 taps and their float copy
    taps = 1024 * sum(dims.values()) * 2 * 2
    peak = state + max(sum(2 * (TRAIN + TEST) * dims[n] for n in gr)
                       + max(knn_temp(dims[n]) for n in gr)
                       for gr in groups) + taps

    compute_s = epoch / (H100_BF16_FLOPS * STEP_UTILISATION)
    adam_bytes = 28 * params  # fused Adam reads weight, gradient, two moments; writes three
    # bf16 autocast casts every weight to bf16 (4 bytes read, 2 written) and its gradient back
    cast_bytes = 12 * params
    fixed_bytes = adam_bytes + cast_bytes  # at any batch size, compiled or not
    memory_s = (steps * (model_bytes + aug_bytes + fixed_bytes)
                / (H100_BANDWIDTH * BANDWIDTH_UTILISATION))
    host_s = steps * len(ops.ops) * HOST_SECONDS_PER_OP
    # compiled: fusion removes part of the unfused traffic (at most all but Adam's), no host bound;
    # eager: the GPU's time or the host's launches, whichever is longer
    epoch_low, epoch_high = (
        compute_s + steps * fixed_bytes / (H100_BANDWIDTH * BANDWIDTH_UTILISATION),
        compute_s + memory_s)
    eager_s = max(epoch_high, host_s)
    epoch_s = epoch_high
    eval_s = (forward / (H100_BF16_FLOPS * STEP_UTILISATION)
              + knn / (H100_BF16_FLOPS * GEMM_UTILISATION))
    evals = EPOCHS // EVAL_EVERY + 1
    print("\ncost model on paper (full size: CIFAR-10 50,000/10,000 images, ResNet18, projector "
          f"{width}, batch {bs})")
    print(f"FLOPs per training image (forward + backward)   {train_image / 1e9:8.2f} GFLOP")
    print(f"FLOPs per epoch ({steps} steps of {bs})          {epoch / 1e12:8.1f} TFLOP")
    print(f"FLOPs per evaluation: forward {forward / 1e12:.1f} TFLOP, K-NN {knn / 1e12:.0f} TFLOP "
          f"(every layer, clean and noisy), linear probe {linear / 1e12:.2f} TFLOP")
    print(f"operators per step, eager: {len(ops.ops)} ({len(aug_ops.ops)} in the augmentation, "
          f"{extern} convolutions and matmuls)")
    print("operators per step, compiled: " + (
        "run with --compile" if compiled is None else compiled if isinstance(compiled, str)
        else f"{compiled} (inductor's CPU kernels + convolutions and matmuls + one fused Adam)"))
    print(f"evaluation peak memory: {peak / 1e9:.1f} GB "
          f"({len(groups)} layer groups within half of "
          f"the free memory of an 80 GB GPU; model and optimizer {state / 1e9:.2f} GB)")
    print(f"memory traffic per step outside convolutions and matmuls (unfused, bf16 activations): "
          f"model {model_bytes / 1e9:.1f} GB, augmentation {aug_bytes / 1e9:.2f} GB, Adam "
          f"{adam_bytes / 1e9:.2f} GB, weight casts {cast_bytes / 1e9:.2f} GB; at "
          f"{BANDWIDTH_UTILISATION:.0%} of "
          f"{H100_BANDWIDTH / 1e12:.2f} TB/s {memory_s / steps * 1e3:.2f} ms, against "
          f"{compute_s / steps * 1e3:.2f} ms of arithmetic")
    print(f"host time per eager step at {HOST_SECONDS_PER_OP * 1e6:.0f} us per operator: "
          f"{host_s / steps * 1e3:.2f} ms")
    print(f"estimated, not measured, epoch on one H100: compiled "
          f"{epoch_low:.2f}-{epoch_high:.2f} s "
          f"(arithmetic + Adam + casts, up to + all unfused traffic), eager {eager_s:.2f} s; "
          f"5000 epochs "
          f"with {evals} evaluations {(EPOCHS * epoch_low + evals * eval_s) / 3600:.1f}-"
          f"{(EPOCHS * epoch_high + evals * eval_s) / 3600:.1f} h compiled")
    print(f"estimated, not measured, on one H100 SXM (bf16 {H100_BF16_FLOPS / 1e12:.0f} TFLOPS at "
          f"{STEP_UTILISATION:.0%}, the K-NN's fp16 products at {GEMM_UTILISATION:.0%}): "
          f"epoch {epoch_s:.2f} s, evaluation {eval_s:.1f} s, {EPOCHS} epochs with {evals} "
          f"evaluations {(EPOCHS * epoch_s + evals * eval_s) / 3600:.1f} h")


class PerImage(Dataset):
    """uint8 CHW images with torchvision's per-image transforms, as a typical training script
    does."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.transform = v2.Compose([
            v2.RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(0.2),
            v2.ToDtype(torch.float32, scale=True)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def device_arg(text):  # a wrong or absent device: argparse's one line, not a traceback
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available here: use --device cpu")
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--device", type=device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--projector-width", type=int, default=bm.PROJECTOR_WIDTH)
    p.add_argument("--steps", type=int, help="timed steps per measurement (default: 50 on a GPU, "
                   "3 on the CPU)")
    p.add_argument("--probe-train", type=int,
                   help="probe reference images (default: 50000 on a GPU, 1000 on the CPU)")
    p.add_argument("--probe-test", type=int,
                   help="probe query images (default: 10000 on a GPU, 200 on the CPU)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="DataLoader workers for (c)")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"  # the defaults follow the device measured, not the machine
    a.steps = (50 if cuda else 3) if a.steps is None else a.steps
    a.probe_train = (50000 if cuda else 1000) if a.probe_train is None else a.probe_train
    a.probe_test = (10000 if cuda else 200) if a.probe_test is None else a.probe_test
    args = bm.build_parser().parse_args(["--batch-size", str(a.batch_size),
                                         "--projector-width", str(a.projector_width),
                                         "--device", a.device, "--invariance-size", "0"])
    bm.check_args(args)
    model = bm.build_model(args, 10, 32).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    step_model = torch.compile(model) if a.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    warmup = 10 if cuda else 1
    bs = a.batch_size
    images = torch.randint(0, 256, (max(bs * (a.steps + warmup), 2 * bs), 3, 32, 32),
                           dtype=torch.uint8)
    labels = torch.randint(0, 10, (len(images),))

    def step(x, y):
        with autocast:
            out = step_model(x)
        loss = bm.compute_loss(out, y, "mse")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # (a) forward, backward and Adam alone: no gather, augmentation or mixup
    x = images[:bs].to(device).float() / 255
    if cuda:  # the model's layout: channels_last on CUDA only, as in the script
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.nn.functional.one_hot(labels[:bs], 10).float().to(device)
    t_a = timed(lambda: step(x, y), a.steps, warmup, device)

    # (b) the script's full step: gather, augment, mixup, step
    data = bm.TrainingSet(images.to(device), torch.arange(len(images), device=device),
                          labels.to(device), 10, "online")
    gen = torch.Generator(device=device).manual_seed(0)

    rt = bm.Runtime(device, bf16=device.type == "cuda", compiled=a.compile)
    step_loss = torch.compile(bm.step_loss, fullgraph=True) if a.compile else bm.step_loss
    settings = bm.StepSettings(0.8, "mse", rt.bf16, rt.channels_last)

    def full_step():
        idx = torch.randint(len(data), (bs,), generator=gen, device=device)
        aug_u, mix_u = bm.step_uniforms(bs, True, True, gen, device)
        images_b, yb, aug_u = data.batch(idx, aug_u)
        loss = step_loss(model, images_b, yb, aug_u, mix_u, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t_b = timed(full_step, a.steps, warmup, device)

    # (c) per-image torchvision transforms in a DataLoader
    loader = DataLoader(PerImage(images, labels), batch_size=bs, shuffle=True, drop_last=True,
                        num_workers=a.workers, pin_memory=device.type == "cuda",
                        persistent_workers=a.workers > 0)
    it = iter(loader)

    def loader_step():
        nonlocal it
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        xb = xb.to(device, non_blocking=True)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        step(xb, torch.nn.functional.one_hot(yb, 10).float().to(device, non_blocking=True))
    t_c = timed(loader_step, a.steps, warmup, device)

    # augmentation alone: the batched version vs torchvision per image, in this process
    floats = images[:bs].to(device).float() / 255
    t_aug = timed(lambda: augment_batch(floats, gen), a.steps, warmup, device)
    per_image = PerImage(images[:bs], labels[:bs])
    t_aug_tv = timed(lambda: [per_image[i] for i in range(bs)], a.steps, warmup,
                     torch.device("cpu"))

    # (d) one full layer-wise probe (K-NN clean and noisy of all nine layers, accuracies,
    # linear probe)
    n_tr, n_te = a.probe_train, a.probe_test
    fake = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8),
                      torch.randint(0, 10, (n,)))
    train, test = fake(n_tr), fake(n_te)
    probe_data = bm.TrainingSet(train[0].to(device), torch.arange(n_tr, device=device),
                                train[1].to(device), 10, "online")
    probe_set = bm.make_probe_set(args, train, test, probe_data, 10, device)
    if device.type == "cuda":  # the probes' own peak, not the training steps' above
        torch.cuda.reset_peak_memory_stats(device)
    # warmed up: compiled once
    t_d = timed(lambda: bm.probe(model, probe_set, args, rt, linear=True), 1, 1, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({os.cpu_count()} cores)")
    rate = lambda t: bs / t
    epoch = (50000 // bs) * t_b
    print(f"device: {name}; torch {torch.__version__}; batch {bs}; "
          f"projector width {a.projector_width}; "
          f"compile {a.compile}; {a.steps} timed steps")
    print(f"(a) forward+backward+Adam alone {rate(t_a):10.0f} img/s")
    print(f"(b) full training step          {rate(t_b):10.0f} img/s   (b)/(a) = {t_a / t_b:.2f}")
    print(f"(c) DataLoader, {a.workers:2d} workers     {rate(t_c):10.0f} img/s   "
          f"(b)/(c) = {t_c / t_b:.2f}")
    print(f"augmentation alone: batched {rate(t_aug):.0f} img/s, "
          f"torchvision per image {rate(t_aug_tv):.0f} img/s (one process)")
    print(f"(d) layer-wise probe {n_tr}/{n_te}: {t_d:.1f} s (after one warm-up probe)"
          + (f"; peak memory {peak / 1e9:.1f} GB" if peak else ""))
    print(f"CIFAR-10 epoch at (b): {epoch:.1f} s; 5000 epochs: {5000 * epoch / 3600:.1f} h")
    cost_model(args, a.compile)


if __name__ == "__main__":
    main()
