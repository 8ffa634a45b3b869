"""
Speed of masc_decode.py's MASC against the authors' approach (float64 covariance of the stacked
[X; -X] data + eigh per class, then the angle between each point and its projection), on synthetic
ReLU features with class structure, and whether both give the same predictions.

    python tests/benchmark_masc.py      # CPU sizes; a GPU also times 4096 wide, 50,000 images
    python tests/benchmark_masc.py --quick   # one tiny setting, to check that it runs
    python tests/benchmark_masc.py --training   # only the training row
    python tests/benchmark_masc.py --device cpu # on the CPU even where a GPU is visible

Then the training of a Table 1 row: 18 MLP-MNIST-shaped models (6 degrees x 3 runs, batch 32),
stacked in one model vs one after another, per epoch (timed over a few steps, scaled to 1,875),
and the operators each issues per step, counted with a dispatch mode.

Not collected by pytest (no test_ prefix).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import masc_decode as m  # noqa: E402
from benchmark import device_arg  # noqa: E402  (tests/: the folder of this file)


def relu_features(rng, classes, per_class, dim, latent=256):
    """ReLU layer outputs with class structure and a decaying spectrum: a latent Gaussian with
    power-law scales and a class mean, mapped by a shared-plus-class-specific matrix, then ReLU."""
    shared = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    scale = np.arange(1, latent + 1) ** -1.0
    maps = [shared + 0.5 * rng.normal(size=(latent, dim)) / np.sqrt(latent)
            for _ in range(classes)]
    means = [rng.normal(size=latent) * scale for _ in range(classes)]

    def sample(count):
        xs = [np.maximum((rng.normal(size=(count, latent)) * scale + means[k]) @ maps[k], 0)
              for k in range(classes)]
        return np.vstack(xs).astype(np.float32), np.repeat(np.arange(classes), count)
    return sample(per_class), sample


def authors_masc(train, y, queries, classes, variance=0.99):
    """The authors' approach, vectorised over points: float64 covariance of [X; -X] + eigh per
    class, then the angle between each point and its projection onto each subspace
    (Algorithm 1)."""
    t0 = time.perf_counter()
    norms = np.linalg.norm(queries, axis=1)
    angles = []
    for k in range(classes):
        X = train[y == k]
        w, V = np.linalg.eigh(np.cov(np.vstack([X, -X]), rowvar=False))
        w, V = w[::-1], V[:, ::-1]
        V = V[:, :int(np.searchsorted(np.cumsum(w) / w.sum(), variance)) + 1]
        proj = (queries @ V) @ V.T
        cos = np.sum(queries * proj, 1) / (norms * np.linalg.norm(proj, axis=1))
        angles.append(np.arccos(np.clip(cos, -1, 1)))
    return np.argmin(np.stack(angles, 1), 1), time.perf_counter() - t0


def ours(train, y, queries, classes, device):
    """masc_decode's fit + score, timed from host arrays to host predictions."""
    t0 = time.perf_counter()
    bases = m.fit_subspaces(torch.tensor(train, device=device), torch.tensor(y, device=device),
                            classes)
    pred = m.masc_predict(bases, torch.tensor(queries, device=device)).cpu().numpy()
    return pred, time.perf_counter() - t0, sum(b.shape[1] for b in bases) / classes


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched (each one a kernel launch, or more, on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def epoch_seconds(run_epoch, steps, batch, images):
    """An epoch's seconds from two short ones (run_epoch(n) trains on n images): the time per
    step, from epochs of `steps` steps and of one, scaled to `images`, plus once what an epoch
    costs before its first step (building the stack: scaled up with the steps, it added 22%
    to the 18 stacked MLPs' epoch and 17% to theirs one after another, measured on a CPU)."""
    times = []
    for n in (steps, 1):
        t0 = time.perf_counter()
        run_epoch(n * batch)
        times.append(time.perf_counter() - t0)
    per_step = (times[0] - times[1]) / (steps - 1)
    return times[1] - per_step + per_step * images / batch


def training_row(arch, models, steps, device):
    """Seconds per MNIST epoch (batch 32 for the MLP, 128 for the CNN) of `models` models stacked
    and one after another, through masc_decode's own train_epoch with the convolutions the script
    picks for each (on a CPU: ATen's for a stack, oneDNN's for one model), and the operators of one
    step in each case."""
    optimizer, lr, batch = m.model_defaults(arch, "mnist")
    n_epoch, shape = 60000, (1, 28, 28)
    m.set_cuda_flags(device)  # as the script: cuDNN autotunes each new shape
    template = m.build_model(arch, shape, 10, 0).to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (steps * batch, *shape), dtype=torch.uint8,
                           generator=g).to(device)
    labels = torch.randint(10, (models, steps * batch), generator=g).to(device)
    jobs = [m.Job(f"{i}", {n: p.detach().clone() for n, p in m.build_model(arch, shape, 10, i)
                           .to(device).named_parameters()},
                  labels[i], torch.Generator(device=device).manual_seed(i))
            for i in range(models)]

    def epoch(group, n=steps * batch):
        stack = m.Stack(template, group, optimizer, lr)
        with m.convolutions_for(device, stacking=len(group) > 1):
            m.train_epoch(stack, images[:n], torch.stack([j.labels[:n] for j in group]), batch,
                          [j.gen for j in group])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    # warm-up at the timed shapes (the whole stack, one model): the first use of a shape costs
    # kernels, cuDNN's autotuning and plans once, which epoch_seconds would scale with the steps
    epoch(jobs, 2 * batch)
    epoch(jobs[:1], 2 * batch)

    one_after_another = lambda n: [epoch([job], n) for job in jobs]
    stacked = epoch_seconds(lambda n: epoch(jobs, n), steps, batch, n_epoch)
    apart = epoch_seconds(one_after_another, steps, batch, n_epoch)
    ops = []
    for group in (jobs, jobs[:1]):  # the operators a step adds: an epoch of two steps minus one
        counts = []
        for n in (2 * batch, batch):
            with OpCounter() as counter:
                epoch(group, n)
            counts.append(counter.count)
        ops.append(counts[0] - counts[1])
    print(f"training, {models} {arch.upper()}-MNIST models, batch {batch}, "
          f"per epoch of {-(-n_epoch // batch):,} steps "
          f"(timed over {steps} and 1): stacked {stacked:.1f} s, "
          f"one after another {apart:.1f} s, "
          f"ratio {apart / stacked:.2f}; operators per step: stacked {ops[0]} for all {models}, "
          f"one model {ops[1]} ({models * ops[1]} for {models} one after another)")


def main():
    p = argparse.ArgumentParser(description="Speed of masc_decode.py's MASC against the "
                                "authors' approach, and of its training, stacked or not.")
    p.add_argument("--device", type=device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="one tiny setting: checks that the benchmark runs")
    p.add_argument("--training", action="store_true", help="only the training row")
    a = p.parse_args()
    quick, device = a.quick, torch.device(a.device)
    if a.training:
        training_row("mlp", 2 if quick else 18, 2 if quick else 20, device)
        training_row("cnn", 2 if quick else 18, 2 if quick else 10, device)
        return
    cuda = device.type == "cuda"  # cuda:1 too
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"{'setting':46s} {'mean r_k':>8s} {'authors f64':>12s} {'ours':>8s} "
          f"{'speed-up':>9s} {'same predictions':>17s}")
    (train, y), _ = relu_features(np.random.default_rng(1), 3, 50, 64)
    ours(train, y, train[:10], 3, device)  # warm-up: on CUDA, its context and solver handles
    for label, classes, per_class, dim, queries in ([
            ("D=4096, 20 classes x 500 (AlexNet fc)", 20, 500, 4096, 2000),
            ("D=2048, 10 classes x 1200 (MLP fc3, n_k < D)", 10, 1200, 2048, 2000),
            ("D=2048, 10 classes x 3000 (MLP fc3, n_k > D)", 10, 3000, 2048, 2000),
            ("D=512, 10 classes x 3000 (MLP fc2, n_k > D)", 10, 3000, 512, 2000)]
            if not quick else [
            ("quick: D=64, 3 classes x 50", 3, 50, 64, 30)]):
        (train, y), sample = relu_features(np.random.default_rng(0), classes, per_class, dim)
        test, _ = sample(queries // classes)  # new points of the same classes
        ref, t_ref = authors_masc(train.astype(np.float64), y, test.astype(np.float64), classes)
        pred, t_ours, rank = ours(train, y, test, classes, device)
        speedup = t_ref / t_ours  # two digits below 10x: the quick setting's is far below 1x
        speedup = f"{speedup:8.0f}" if speedup >= 10 else f"{speedup:8.2g}"
        print(f"{label:46s} {rank:8.0f} {t_ref:11.1f}s {t_ours:7.2f}s "
              f"{speedup}x {np.mean(pred == ref):16.4f}")
    # the size: a 4096-wide layer on 50,000 CIFAR images (100 classes)
    if cuda and not quick:
        (train, y), sample = relu_features(np.random.default_rng(0), 100, 500, 4096)
        test, _ = sample(100)
        ours(train[:1000], y[:1000], test[:100], 100, device)  # warm-up
        _, t, _ = ours(train, y, test, 100, device)
        print(f"GPU: fit + score, 4096-wide layer, 50,000 train / 10,000 test, 100 classes: "
              f"{t:.2f} s")
    training_row("mlp", 2 if quick else 18, 2 if quick else 20, device)
    training_row("cnn", 2 if quick else 18, 2 if quick else 10, device)


if __name__ == "__main__":
    main()
