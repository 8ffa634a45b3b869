"""
The toy model of "The Curious Case of Benign Memorization", Appendix E: benign memorization
needs augmentations whose number exceeds the model's capacity.

A linear encoder h(x) = W x feeds an inverse-distance projector with K learnable prototypes
(K bounds how many points it can fit). Every training point gets an entirely random label.
The input carries its true class in the first d1 coordinates and pure noise in the rest;
augmentations only add noise to the noise coordinates. If the model can memorize all
n*B augmented points it has no reason to learn anything; once it cannot, fitting the random
labels forces W to ignore the noise coordinates, which makes the embedding cluster by the
true class (a K-NN probe on clean labels beats the same probe at initialisation).

Every (n, B, seed) cell is an independent model; all cells of a sweep are trained together
as one batched model (a leading "cell" dimension on every tensor), and each cell draws its
randomness from its own generator, so a cell's result does not depend on the rest of the grid.

Usage:
    python toy_capacity.py                                  # default sweep, about a minute
    python toy_capacity.py --n 64 --augs 1,16,online --seeds 0
    python toy_capacity.py --capacity 16 --steps 4000 --out-dir runs/toy_k16
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line instead of usage + error."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def int_list(text, minimum=1):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def augs_list(text):
    """Comma list of augmentation counts B >= 1, or 'online' for fresh noise every step."""
    values = []
    for v in text.split(","):
        v = v.strip()
        if v == "online":
            values.append("online")
        elif v.lstrip("-").isdigit() and int(v) >= 1:
            values.append(int(v))
        else:
            raise argparse.ArgumentTypeError(f"augmentation counts must be integers >= 1 or 'online', got {v!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one augmentation count")
    return values


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def build_parser():
    p = OneLineParser(description="Appendix E toy: feature learning appears once n*B exceeds capacity.")
    g = p.add_argument_group("sweep")
    g.add_argument("--n", type=int_list, default=[16, 64, 256], help="training-set sizes n (comma list)")
    g.add_argument("--augs", type=augs_list, default=[1, 4, 16, 64, "online"], help="fixed augmentations per point B, or 'online' (comma list)")
    g.add_argument("--seeds", type=lambda t: int_list(t, minimum=0), default=[0, 1, 2], help="seeds (comma list)")
    g = p.add_argument_group("data")
    g.add_argument("--dim", type=positive(int), default=64, help="input dimension d")
    g.add_argument("--signal-dim", type=positive(int), default=8, help="class-carrying coordinates d1 < d")
    g.add_argument("--classes", type=positive(int), default=10, help="true classes C (also the random-label classes)")
    g.add_argument("--sigma", type=positive(float), default=1.0, help="noise std: Sigma2 = Sigma3 = 10 Sigma1 = sigma^2 I")
    g.add_argument("--center-scale", type=positive(float), default=0.5, help="class centres mu_k ~ N(0, scale^2 I)")
    g.add_argument("--probe-points", type=positive(int), default=2000, help="labelled reference points for the K-NN probe")
    g.add_argument("--test-points", type=positive(int), default=2000, help="unseen test points (probe queries)")
    g = p.add_argument_group("model and training")
    g.add_argument("--capacity", type=positive(int), default=64, help="projector prototypes K (bounds the capacity)")
    g.add_argument("--steps", type=positive(int), default=2000, help="SGD steps")
    g.add_argument("--lr", type=positive(float), default=0.15, help="SGD learning rate (momentum 0.9)")
    g.add_argument("--batch-size", type=positive(int), default=128, help="batch size per cell")
    g.add_argument("--knn-k", type=positive(int), default=20, help="neighbours of the K-NN probe")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default="runs/toy", help="where config.json and results.json go")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p


def check_config(args):
    """Cross-argument checks; returns an error message or None."""
    if args.signal_dim >= args.dim:
        return f"--signal-dim ({args.signal_dim}) must be smaller than --dim ({args.dim})"
    if args.classes < 2:
        return "--classes must be at least 2"
    if args.knn_k > args.probe_points:
        return f"--knn-k ({args.knn_k}) exceeds --probe-points ({args.probe_points})"
    try:
        torch.empty(1, device=args.device)
    except Exception as e:  # unknown or unavailable device
        return f"--device {args.device} is not available ({str(e).splitlines()[0]})"
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        return f"--out-dir {args.out_dir} exists and is not a directory"
    return None


def generator(device, *keys):
    """A torch.Generator seeded from a tuple of keys, so every stream is named, not positional."""
    seed = int(hashlib.sha256(repr(keys).encode()).hexdigest()[:15], 16)
    return torch.Generator(device=device).manual_seed(seed)

# ----------------------------------------------------------------------------- data


def sample_points(centres, count, signal_dim, dim, sigma, gen):
    """x[:d1] | z=k ~ N(mu_k, sigma^2/10 I), x[d1:] ~ N(0, sigma^2 I); returns (x, z)."""
    classes = centres.shape[0]
    z = torch.randint(classes, (count,), generator=gen, device=centres.device)
    x = torch.randn(count, dim, generator=gen, device=centres.device) * sigma
    x[:, :signal_dim] = centres[z] + x[:, :signal_dim] / math.sqrt(10)
    return x, z


def augmentation_noise(count, signal_dim, dim, sigma, gen, device):
    """a with a[:d1] = 0 and a[d1:] ~ N(0, sigma^2 I): augmentations only touch the noise coordinates."""
    a = torch.zeros(count, dim, device=device)
    a[:, signal_dim:] = torch.randn(count, dim - signal_dim, generator=gen, device=device) * sigma
    return a


class Cell:
    """One (n, B, seed) experiment: its training points, random labels, fixed augmentations."""

    def __init__(self, n, augs, seed, world, args):
        dev = args.device
        self.n, self.augs, self.seed = n, augs, seed
        g = generator(dev, "train", seed, n)
        self.x, self.z = sample_points(world["centres"], n, args.signal_dim, args.dim, args.sigma, g)
        self.labels = torch.randint(args.classes, (n,), generator=g, device=dev)  # random, fixed
        self.gen = generator(dev, "stream", seed, n, augs)  # batches and online noise
        if augs == "online":
            self.fixed = None
        else:  # B fixed augmentations per point, drawn once; row i*B + b is augmentation b of point i
            self.fixed = self.x.repeat_interleave(augs, 0) + augmentation_noise(
                n * augs, args.signal_dim, args.dim, args.sigma, self.gen, dev)

    def training_points(self):
        """The points the model is asked to fit and their labels (n*B of them when B is fixed)."""
        if self.fixed is None:
            return self.x, self.labels
        return self.fixed, self.labels.repeat_interleave(self.augs)

    def batch(self, size, args):
        """One training batch of (points, random labels) drawn from this cell's own stream."""
        points, labels = self.training_points()
        idx = torch.randint(points.shape[0], (size,), generator=self.gen, device=points.device)
        x = points[idx]
        if self.fixed is None:  # online: a fresh augmentation at every access
            x = x + augmentation_noise(size, args.signal_dim, args.dim, args.sigma, self.gen, x.device)
        return x, labels[idx]


def make_world(seed, args):
    """Class centres plus the labelled probe set and the unseen test set, shared by a seed's cells."""
    g = generator(args.device, "world", seed)
    centres = torch.randn(args.classes, args.signal_dim, generator=g, device=args.device) * args.center_scale
    probe_x, probe_z = sample_points(centres, args.probe_points, args.signal_dim, args.dim, args.sigma, g)
    test_x, test_z = sample_points(centres, args.test_points, args.signal_dim, args.dim, args.sigma, g)
    return dict(centres=centres, probe_x=probe_x, probe_z=probe_z, test_x=test_x, test_z=test_z)

# ----------------------------------------------------------------------------- model


def projector_weights(h, prototypes):
    """w_i(h) = (1/||h - v_i||) / sum_j (1/||h - v_j||), batched: (M, b, d), (M, K, d) -> (M, b, K)."""
    # ||h - v||^2 = ||h||^2 - 2 h.v + ||v||^2: a batched matmul instead of an (M, b, K, d) difference
    sq = h.pow(2).sum(-1, keepdim=True) - 2 * h @ prototypes.transpose(-1, -2) + prototypes.pow(2).sum(-1).unsqueeze(-2)
    # softmax(-log dist) is the normalised inverse distance; the epsilon keeps h == v_i finite
    return torch.softmax(-0.5 * torch.log(sq.clamp_min(0) + 1e-12), dim=-1)


def projector(h, prototypes, onehots):
    """g_V(h) = sum_i w_i(h) l_i: a convex combination of the prototypes' fixed one-hot labels."""
    return projector_weights(h, prototypes) @ onehots


def init_models(cells, args):
    """W ~ N(0, 1/d) per seed; prototypes v_i at the initial embeddings W0 x of K training samples
    (drawn with replacement, unaugmented) plus N(0, 0.1^2) noise; one-hot l_i drawn uniformly."""
    d, K = args.dim, args.capacity
    Ws, Vs, Ls = [], [], []
    for c in cells:
        gw = generator(args.device, "encoder", c.seed)  # same W0 for all cells of a seed: same INIT probe
        W = torch.randn(d, d, generator=gw, device=args.device) / math.sqrt(d)
        gv = generator(args.device, "projector", c.seed, c.n, c.augs)
        pick = torch.randint(c.n, (K,), generator=gv, device=args.device)
        V = c.x[pick] @ W.T + 0.1 * torch.randn(K, d, generator=gv, device=args.device)
        onehot = F.one_hot(torch.randint(args.classes, (K,), generator=gv, device=args.device), args.classes)
        Ws.append(W)
        Vs.append(V)
        Ls.append(onehot.float())
    return torch.stack(Ws), torch.stack(Vs), torch.stack(Ls)

# ----------------------------------------------------------------------------- training


def train(cells, W, V, L, args):
    """Cross-entropy -log g(h)_y on the random labels, SGD with momentum, all cells in one batch."""
    W = W.clone().requires_grad_(True)
    V = V.clone().requires_grad_(True)
    opt = torch.optim.SGD([W, V], lr=args.lr, momentum=0.9)
    for _ in range(args.steps):
        xs, ys = zip(*(c.batch(args.batch_size, args) for c in cells))
        x, y = torch.stack(xs), torch.stack(ys)  # (M, b, d), (M, b)
        probs = projector(x @ W.transpose(1, 2), V, L)
        # mean over the batch, summed over cells: each cell gets exactly its own gradient
        loss = -torch.log(probs.gather(-1, y.unsqueeze(-1)).clamp_min(1e-12)).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return W.detach(), V.detach()

# ----------------------------------------------------------------------------- measures


def knn_accuracy(ref, ref_labels, queries, query_labels, k, classes):
    """Cosine K-NN with a uniform vote (ties to the smallest class), batched over cells: (M, ., d)."""
    sim = F.normalize(queries, dim=-1) @ F.normalize(ref, dim=-1).transpose(-1, -2)
    nn_idx = sim.topk(k, dim=-1).indices  # (M, q, k)
    votes = torch.zeros(*nn_idx.shape[:2], classes, device=ref.device)
    votes.scatter_add_(-1, ref_labels.unsqueeze(1).expand(-1, nn_idx.shape[1], -1).gather(-1, nn_idx),
                       torch.ones_like(nn_idx, dtype=votes.dtype))
    return (votes.argmax(-1) == query_labels).float().mean(-1)


def normalized_invariance(h_aug1, h_aug2, h_clean):
    """Eq. 2 averaged over points: ||q(T1 x) - q(T2 x)||^2 / mean_{x' != x} ||q(x) - q(x')||^2.

    Shapes (..., m, D). The denominator for point i uses sum_j ||q_i - q_j||^2 =
    m ||q_i||^2 - 2 q_i . sum_j q_j + sum_j ||q_j||^2 (the j = i term is zero), so it is exact and O(m D).
    """
    m = h_clean.shape[-2]
    sq = h_clean.pow(2).sum(-1)
    pair_sum = m * sq - 2 * (h_clean * h_clean.sum(-2, keepdim=True)).sum(-1) + sq.sum(-1, keepdim=True)
    denominator = pair_sum / (m - 1)
    numerator = (h_aug1 - h_aug2).pow(2).sum(-1)
    return (numerator / denominator.clamp_min(1e-12)).mean(-1)


def noise_to_signal(W, signal_dim):
    """RMS column norm of W over the noise coordinates / over the signal coordinates (about 1 at init)."""
    col_sq = W.pow(2).sum(-2)  # (M, d): squared norm of each input column
    return (col_sq[..., signal_dim:].mean(-1) / col_sq[..., :signal_dim].mean(-1)).sqrt()


@torch.no_grad()
def fit_accuracy(cells, W, V, L, args):
    """Projector argmax vs the random labels on the points trained on (online: 8 fresh augmentations each)."""
    accs = []
    for m, c in enumerate(cells):
        x, y = c.training_points()
        if c.fixed is None:
            x, y = x.repeat(8, 1), y.repeat(8)
            x = x + augmentation_noise(x.shape[0], args.signal_dim, args.dim, args.sigma,
                                       generator(args.device, "fit", c.seed, c.n), x.device)
        pred = projector(x @ W[m].T, V[m], L[m]).argmax(-1)
        accs.append((pred == y).float().mean())
    return torch.stack(accs)


@torch.no_grad()
def evaluate(cells, worlds, W, args, chunk=8):
    """knn, invariance and noise-to-signal of every cell's encoder W (M, d, d)."""
    knn, inv = [], []
    for start in range(0, len(cells), chunk):
        part = cells[start:start + chunk]
        Wp = W[start:start + chunk]
        w = [worlds[c.seed] for c in part]
        stack = lambda key: torch.stack([wi[key] for wi in w])
        probe, test = stack("probe_x") @ Wp.transpose(1, 2), stack("test_x") @ Wp.transpose(1, 2)
        knn.append(knn_accuracy(probe, stack("probe_z"), test, stack("test_z"), args.knn_k, args.classes))
        noise = [[augmentation_noise(args.test_points, args.signal_dim, args.dim, args.sigma,
                                     generator(args.device, "invariance", c.seed, t), args.device)
                  for c in part] for t in (1, 2)]
        x = stack("test_x")
        inv.append(normalized_invariance((x + torch.stack(noise[0])) @ Wp.transpose(1, 2),
                                         (x + torch.stack(noise[1])) @ Wp.transpose(1, 2), test))
    return torch.cat(knn), torch.cat(inv), noise_to_signal(W, args.signal_dim)

# ----------------------------------------------------------------------------- report


def run_sweep(args):
    """Train and measure every (n, B, seed) cell; returns the list of result dicts."""
    worlds = {s: make_world(s, args) for s in args.seeds}
    cells = [Cell(n, b, s, worlds[s], args) for n in args.n for b in args.augs for s in args.seeds]
    W0, V0, L = init_models(cells, args)
    knn0, _, _ = evaluate(cells, worlds, W0, args)
    W, V = train(cells, W0, V0, L, args)
    fit = fit_accuracy(cells, W, V, L, args)
    knn, inv, nts = evaluate(cells, worlds, W, args)
    return [dict(n=c.n, augs=c.augs, seed=c.seed, fit=round(fit[i].item(), 4), knn=round(knn[i].item(), 4),
                 knn_init=round(knn0[i].item(), 4), invariance=round(inv[i].item(), 4),
                 noise_to_signal=round(nts[i].item(), 4)) for i, c in enumerate(cells)]


def phase_table(results, ns, augs):
    """Rows n, columns B: K-NN gain over init (mean +- std over seeds) and the fit on the random labels."""
    def cell_text(rows):
        gains = torch.tensor([r["knn"] - r["knn_init"] for r in rows])
        spread = gains.std().item() if len(rows) > 1 else 0.0
        fit = sum(r["fit"] for r in rows) / len(rows)
        return f"{gains.mean().item():+.3f}±{spread:.3f} fit {fit:.2f}"
    header = ["n \\ B"] + [str(b) for b in augs]
    lines = [header]
    for n in ns:
        lines.append([str(n)] + [cell_text([r for r in results if r["n"] == n and r["augs"] == b]) for b in augs])
    widths = [max(len(line[j]) for line in lines) for j in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    problem = check_config(args)
    if problem:
        sys.stderr.write(f"error: {problem}\n")
        sys.exit(2)
    config = {k: v for k, v in vars(args).items()}
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, "config.json"), config)
    t0 = time.time()
    results = run_sweep(args)
    seconds = time.time() - t0
    write_json(os.path.join(args.out_dir, "results.json"), {"config": config, "seconds": round(seconds, 1), "cells": results})
    print(f"{len(results)} cells, {args.steps} steps, {seconds:.1f} s on {args.device}")
    print("K-NN gain over INIT on unseen test points (mean±std over seeds), fit = accuracy on the random labels")
    print(phase_table(results, args.n, args.augs))
    print(f"wrote {os.path.join(args.out_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
