"""
The toy model of "The Curious Case of Benign Memorization", Appendix E. The paper's claim: fitting
random labels is benign (the encoder learns the true classes) only once the augmented points
outnumber what the model can memorize.

n training points with random labels, each seen through B fixed augmentations (or fresh ones at
every step: online). A linear encoder h(x) = W x feeds an inverse-distance projector whose K
prototypes bound the model's capacity (the paper's argument; the bound is not exactly K points).
Inputs carry their class in the first d1 coordinates and, in the rest, noise that augmentations
perturb. What this toy shows (README): with B = 1 the K-NN probe of h on the true classes ends no
better than at initialisation; with B >= 16 or online views it ends well above it, as W shrinks
the noise coordinates (at n = 16 it all but ignores them and still fits most random labels:
benign memorization; at n = 64 it fits about half, at n = 256 few, and learns features anyway).
The gain follows B, not n*B alone; the capacity itself is not measured. A sweep trains as one
batched model; each (n, B, seed) cell has its own generators: it gets the result it gets alone.

Usage:
    python toy_capacity.py                                  # default sweep: 14-25 s on 2 cores
    python toy_capacity.py --n 64 --augs 1,16,online --seeds 0 --out-dir runs/toy_n64
    python toy_capacity.py --capacity 16 --steps 4000 --out-dir runs/toy_k16
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

@dataclass
class Config:
    """The sweep (flags) and the world it runs in (constants: edit them here)."""
    n: list = field(default_factory=lambda: [16, 64, 256])  # n*B from 16 up to 16,384 points
    # B fixed views per point, 1 to beyond capacity; None: online (fresh views at every step)
    augs: list = field(default_factory=lambda: [1, 4, 16, 64, None])
    seeds: list = field(default_factory=lambda: [0, 1, 2])  # a mean and a spread per cell
    # projector prototypes K: Appendix E bounds the capacity by K (in the hard-assignment limit);
    # not a count of points: prototypes share labels, and a trained W moves points (README)
    capacity: int = 64
    steps: int = 2000  # SGD steps
    out_dir: str = "runs/toy"
    overwrite: bool = False  # replace the results of another config in out_dir
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    # Constants: Appendix E gives the setting's structure, not these values.
    dim: int = 64  # input dimension d
    # the first d1 coordinates carry the class; the other d - d1 are noise, enough of it that the
    # K-NN probe of the raw points is weak (0.32-0.42, seeds 0-2; 0.25-0.31 through INIT's random
    # W), so that learned features show
    signal_dim: int = 8
    classes: int = 10  # true classes C, also the random labels' classes
    sigma: float = 1.0  # noise std: the paper's Sigma2 = Sigma3 = 10 Sigma1 = sigma^2 I
    center_scale: float = 0.5  # class centres mu_k ~ N(0, center_scale^2 I)
    # labelled reference points of the K-NN probe: fresh ones, since the n = 16 training points
    # are fewer than its k neighbours (README: a deviation)
    probe_points: int = 2000
    test_points: int = 2000  # unseen query points of the K-NN probe and the invariance
    lr: float = 0.15  # SGD with momentum 0.9
    batch_size: int = 128  # per cell
    knn_k: int = 20  # neighbours of the K-NN probe: the paper's k
    fit_views: int = 8  # online cells: fresh augmentations per point when measuring the fit

def augs_label(augs):  # B as --augs, results.json and the streams' names spell it (None: online)
    return "online" if augs is None else augs

def named_generator(device, *keys):  # independent streams never share a sequence
    seed = int(hashlib.sha256(repr(keys).encode()).hexdigest()[:15], 16)
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- data
def sample_points(centres, count, args, gen):
    """x[:d1] | z=k ~ N(mu_k, sigma^2/10 I), x[d1:] ~ N(0, sigma^2 I); returns (x, z)."""
    z = torch.randint(centres.shape[0], (count,), generator=gen, device=centres.device)
    x = torch.randn(count, args.dim, generator=gen, device=centres.device) * args.sigma
    x[:, :args.signal_dim] = centres[z] + x[:, :args.signal_dim] / math.sqrt(10)
    return x, z

def augmentation_noise(count, args, gen):
    """a with a[:d1] = 0 and a[d1:] ~ N(0, sigma^2 I): augmentations only touch the noise."""
    noise = torch.randn(count, args.dim - args.signal_dim, generator=gen, device=args.device)
    return F.pad(noise * args.sigma, (args.signal_dim, 0))

def make_world(seed, args):
    """Class centres, the labelled probe set and the unseen test set, shared by a seed's cells."""
    g = named_generator(args.device, "world", seed)
    centres = torch.randn(args.classes, args.signal_dim, generator=g, device=args.device)
    centres = centres * args.center_scale
    probe_x, probe_z = sample_points(centres, args.probe_points, args, g)
    test_x, test_z = sample_points(centres, args.test_points, args, g)
    return dict(centres=centres, probe_x=probe_x, probe_z=probe_z, test_x=test_x, test_z=test_z)

class Cell:
    """One (n, B, seed) experiment: its training points, their random labels, its own streams."""
    def __init__(self, n, augs, seed, centres, args):
        self.n, self.augs, self.seed = n, augs, seed
        g = named_generator(args.device, "train", seed, n)  # the same points for every B
        self.x, _ = sample_points(centres, n, args, g)  # their true classes: never used
        self.labels = torch.randint(args.classes, (n,), generator=g, device=args.device)
        self.stream = named_generator(args.device, "stream", seed, n, augs_label(augs))
        # What the model is asked to fit: the n points when online, else their n*B augmentations
        # drawn once (row i*B + b is augmentation b of point i), each with its point's label.
        self.fit_x, self.fit_y = self.x, self.labels
        if augs is not None:
            noise = augmentation_noise(n * augs, args, self.stream)
            self.fit_x = self.x.repeat_interleave(augs, 0) + noise
            self.fit_y = self.labels.repeat_interleave(augs)

    def batch(self, size, args):
        idx = torch.randint(len(self.fit_x), (size,), generator=self.stream, device=args.device)
        x = self.fit_x[idx]
        if self.augs is None:
            x = x + augmentation_noise(size, args, self.stream)
        return x, self.fit_y[idx]


# ----------------------------------------------------------------------------- model and training
def projector(h, prototypes, onehots):
    """g_V(h) = sum_i w_i(h) l_i, w_i(h) = (1/||h - v_i||) / sum_j (1/||h - v_j||), batched
    over cells: h (M, b, d), prototypes (M, K, d) and onehots (M, K, C) give (M, b, C)."""
    # ||h - v||^2 = ||h||^2 - 2 h.v + ||v||^2: a batched matmul, not an (M, b, K, d) difference
    sq = (h.pow(2).sum(-1, keepdim=True) - 2 * h @ prototypes.transpose(-1, -2)
          + prototypes.pow(2).sum(-1).unsqueeze(-2))
    # softmax(-log dist) is the normalised inverse distance; the epsilon keeps h == v_i finite
    return torch.softmax(-0.5 * torch.log(sq.clamp_min(0) + 1e-12), dim=-1) @ onehots

def init_models(cells, args):
    """W ~ N(0, 1/d); prototypes start at the embeddings of K draws (with replacement) of the
    n training points, plus noise; their one-hot labels l_i are uniform, as Appendix E's."""
    d, K, dev = args.dim, args.capacity, args.device
    models = []
    for c in cells:
        # the same W0 for every cell of a seed, so that they share one INIT probe
        W = torch.randn(d, d, generator=named_generator(dev, "encoder", c.seed), device=dev)
        W = W / math.sqrt(d)
        gen = named_generator(dev, "projector", c.seed, c.n, augs_label(c.augs))
        pick = torch.randint(c.n, (K,), generator=gen, device=dev)
        V = c.x[pick] @ W.T + 0.1 * torch.randn(K, d, generator=gen, device=dev)
        label = torch.randint(args.classes, (K,), generator=gen, device=dev)
        models.append((W, V, F.one_hot(label, args.classes).float()))
    return tuple(map(torch.stack, zip(*models)))  # W, V, onehots with a leading cell dimension

def train(cells, W, V, onehots, args):
    """Cross-entropy -log g(h)_y on the random labels; the one-hot l_i stay fixed."""
    W, V = W.clone().requires_grad_(True), V.clone().requires_grad_(True)
    opt = torch.optim.SGD([W, V], lr=args.lr, momentum=0.9)
    for _ in range(args.steps):
        xs, ys = zip(*(c.batch(args.batch_size, args) for c in cells))
        x, y = torch.stack(xs), torch.stack(ys)  # (M, b, d), (M, b)
        probs = projector(x @ W.transpose(1, 2), V, onehots)
        # mean over the batch, summed over cells: each cell gets exactly its own gradient
        loss = -torch.log(probs.gather(-1, y.unsqueeze(-1)).clamp_min(1e-12)).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return W.detach(), V.detach()


# ----------------------------------------------------------------------------- measures
def knn_accuracy(ref, ref_labels, queries, query_labels, k, classes):
    """Cosine K-NN, uniform vote (ties to the smallest class), batched over cells: (M, ., d)."""
    sim = F.normalize(queries, dim=-1) @ F.normalize(ref, dim=-1).transpose(-1, -2)
    nn_idx = sim.topk(k, dim=-1).indices  # (M, q, k)
    neighbour_labels = ref_labels.unsqueeze(1).expand(-1, nn_idx.shape[1], -1).gather(-1, nn_idx)
    votes = torch.zeros(*nn_idx.shape[:2], classes, device=ref.device)
    votes.scatter_add_(-1, neighbour_labels, torch.ones_like(nn_idx, dtype=votes.dtype))
    return (votes.argmax(-1) == query_labels).double().mean(-1)  # float32 moves 4th decimals

def normalized_invariance(h_aug1, h_aug2, h_clean):
    """Eq. 2 averaged over points: ||q(T1 x) - q(T2 x)||^2 / mean_{x' != x} ||q(x) - q(x')||^2,
    shapes (..., m, D). The denominator of point i uses sum_j ||q_i - q_j||^2 = m ||q_i||^2 -
    2 q_i . sum_j q_j + sum_j ||q_j||^2 (the j = i term is zero): exact, O(m D)."""
    m = h_clean.shape[-2]
    sq = h_clean.pow(2).sum(-1)
    pair_sum = (m * sq - 2 * (h_clean * h_clean.sum(-2, keepdim=True)).sum(-1)
                + sq.sum(-1, keepdim=True))
    numerator = (h_aug1 - h_aug2).pow(2).sum(-1)
    return (numerator / (pair_sum / (m - 1)).clamp_min(1e-12)).mean(-1)

def noise_to_signal(W, signal_dim):
    """RMS column norm of W over the noise coordinates / over the signal ones (about 1 at init)."""
    col_sq = W.pow(2).sum(-2)  # (M, d): squared norm of each input column
    return (col_sq[..., signal_dim:].mean(-1) / col_sq[..., :signal_dim].mean(-1)).sqrt()

@torch.no_grad()
def fit_accuracy(cells, W, V, onehots, args):
    """Projector argmax vs the random labels on what each cell was asked to fit."""
    accs = []
    for m, c in enumerate(cells):
        x, y = c.fit_x, c.fit_y
        if c.augs is None:  # online: the fit on args.fit_views fresh augmentations of each point
            x, y = x.repeat(args.fit_views, 1), y.repeat(args.fit_views)
            gen = named_generator(args.device, "fit", c.seed, c.n)
            x = x + augmentation_noise(x.shape[0], args, gen)
        pred = projector(x @ W[m].T, V[m], onehots[m]).argmax(-1)
        accs.append((pred == y).double().mean())
    return torch.stack(accs)

@torch.no_grad()
def evaluate(cells, worlds, W, args, chunk=8):
    """Per cell: K-NN accuracy on the test points, their invariance, W's noise-to-signal."""
    knn, invariance = [], []
    # `chunk` cells at a time: an (M, test, probe) similarity tensor of all cells may not fit
    for start in range(0, len(cells), chunk):
        part = cells[start:start + chunk]
        Wt = W[start:start + chunk].transpose(1, 2)
        probe_x, probe_z, test_x, test_z = (torch.stack([worlds[c.seed][key] for c in part])
                                            for key in ("probe_x", "probe_z", "test_x", "test_z"))
        test = test_x @ Wt
        knn.append(knn_accuracy(probe_x @ Wt, probe_z, test, test_z, args.knn_k, args.classes))
        # two augmented views T1 x, T2 x of each test point, the same for all cells of a seed
        views = [test_x + torch.stack([augmentation_noise(
            args.test_points, args, named_generator(args.device, "invariance", c.seed, t))
            for c in part]) for t in (1, 2)]
        invariance.append(normalized_invariance(views[0] @ Wt, views[1] @ Wt, test))
    return torch.cat(knn), torch.cat(invariance), noise_to_signal(W, args.signal_dim)

@torch.no_grad()
def reference_probes(worlds, args):
    """Per seed, the K-NN probe with no encoder (W = I) and with one that keeps only the d1 class
    coordinates (all noise ignored): where INIT and the trained encoders stand between them."""
    rows = []
    for seed, w in worlds.items():
        probe = lambda keep: knn_accuracy(w["probe_x"][None, :, keep], w["probe_z"][None],
                                          w["test_x"][None, :, keep], w["test_z"][None],
                                          args.knn_k, args.classes).item()
        rows.append(dict(seed=seed, knn_input=round(probe(slice(None)), 4),
                         knn_class_coordinates=round(probe(slice(args.signal_dim)), 4)))
    return rows

def run_sweep(args):
    worlds = {s: make_world(s, args) for s in args.seeds}
    cells = [Cell(n, b, s, worlds[s]["centres"], args)
             for n in args.n for b in args.augs for s in args.seeds]
    W0, V0, onehots = init_models(cells, args)
    knn_init, _, _ = evaluate(cells, worlds, W0, args)
    W, V = train(cells, W0, V0, onehots, args)
    fit = fit_accuracy(cells, W, V, onehots, args)
    knn, invariance, noise_ratio = evaluate(cells, worlds, W, args)
    measured = dict(fit=fit, knn=knn, knn_init=knn_init, invariance=invariance,
                    noise_to_signal=noise_ratio)
    rows = [dict(n=c.n, augs=augs_label(c.augs), seed=c.seed,
                 **{key: round(values[i].item(), 4) for key, values in measured.items()})
            for i, c in enumerate(cells)]
    return rows, reference_probes(worlds, args)


# ----------------------------------------------------------------------------- report
def phase_table(results, ns, augs):
    def cell_text(rows):
        gains = torch.tensor([r["knn"] - r["knn_init"] for r in rows], dtype=torch.float64)
        spread = gains.std().item() if len(rows) > 1 else 0.0
        fit = sum(r["fit"] for r in rows) / len(rows)
        return f"{gains.mean().item():+.3f}±{spread:.3f} fit {fit:.2f}"
    lines = [["n \\ B"] + [str(b) for b in augs]]
    for n in ns:
        lines.append([str(n)] + [cell_text([r for r in results if r["n"] == n and r["augs"] == b])
                                 for b in augs])
    widths = [max(len(line[j]) for line in lines) for j in range(len(lines[0]))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)

def config_of(args):  # as config.json holds it
    return dict(asdict(args), augs=[augs_label(b) for b in args.augs])

def read_config(path):  # the saved config.json as a dict, or None if missing or unreadable
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    return saved if isinstance(saved, dict) else None

def same_sweep(config, path):  # False if the config.json at path is another sweep's, or unreadable
    saved = read_config(path)
    try:
        # the device type only: cuda and cuda:0 draw the same numbers, cpu and cuda other ones
        typed = lambda c: dict(c, device=torch.device(c["device"]).type)
        saved, config = typed(saved), typed(config)
        return all(saved[k] == v for k, v in config.items() if k not in ("out_dir", "overwrite"))
    except (TypeError, KeyError, RuntimeError, ValueError):  # None, a key missing, a bad device
        return False

def another_scripts_run(path):  # a readable config.json without the keys every toy sweep wrote
    saved = read_config(path)
    return saved is not None and not {"n", "augs", "seeds", "capacity"} <= saved.keys()

def write_json(path, obj):  # via a temporary file and a rename: never half a file
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # its own: two identical sweeps may share a folder
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C too: no temporary file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

def script_sha256():  # which version of this file made a result, once copied elsewhere
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- command line
class UserError(Exception):
    """Bad input: reported as one line, never a traceback."""

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's exit status 2, without the usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)

LARGEST = 10**7  # of n, B and K: far past any toy, and below sizes whose products overflow torch

def int_list(text, minimum=1, words=(), maximum=LARGEST):  # words: {word: the value it stands for}
    try:
        values = [words[v] if v in words else int(v) for v in map(str.strip, text.split(",")) if v]
    except ValueError:
        values = []
    numbers = [v for v in values if isinstance(v, int)]
    if not values or any(v < minimum or maximum is not None and v > maximum for v in numbers):
        wanted = f"integers >= {minimum}" + (f" and <= {maximum:,}" if maximum else "")
        wanted = " or ".join([wanted, *map(repr, words)])
        raise argparse.ArgumentTypeError(f"expected a comma list of {wanted}, got {text!r}")
    if len(set(values)) < len(values):  # a repeated cell is no second sample
        raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
    return values

def positive_int(text, maximum=None):
    value = int(text) if text.strip().isdigit() else 0
    if value < 1 or maximum is not None and value > maximum:
        at_most = f" and <= {maximum:,}" if maximum else ""
        raise argparse.ArgumentTypeError(f"expected an integer >= 1{at_most}, got {text!r}")
    return value

def build_parser():
    d = Config()
    p = OneLineParser(description="Appendix E toy: n points, B views each, K prototypes.")
    g = p.add_argument_group("sweep")
    g.add_argument("--n", type=int_list, default=d.n, help="training-set sizes n (comma list)")
    g.add_argument("--augs", type=lambda t: int_list(t, words={"online": None}), default=d.augs,
                   help="fixed augmentations per point B, or 'online' (comma list)")
    g.add_argument("--seeds", type=lambda t: int_list(t, minimum=0, maximum=None), default=d.seeds,
                   help="seeds (comma list)")
    g = p.add_argument_group("model and training")
    g.add_argument("--capacity", type=lambda t: positive_int(t, LARGEST), default=d.capacity,
                   help="projector prototypes K (the paper's bound on the capacity)")
    g.add_argument("--steps", type=positive_int, default=d.steps, help="SGD steps")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default=d.out_dir, help="where config.json and results.json go")
    g.add_argument("--device", default=d.device, help="torch device")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the results of another config in --out-dir")
    return p

def check_args(args):  # checks argparse cannot make, before anything is written
    try:
        torch.empty(1, device=args.device)
    except Exception as e:  # unknown or unavailable device
        text = str(e).strip()  # as Python's last traceback line, as the other two scripts say it
        reason = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        raise UserError(f"--device {args.device} is not available ({reason})")
    if torch.device(args.device).type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: this script runs on cpu or cuda")
    existing = os.path.abspath(args.out_dir)
    while not os.path.exists(existing):  # the part of the path that exists must be a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--out-dir {args.out_dir}: {existing} exists and is not a directory")
    saved, results = (os.path.join(args.out_dir, f) for f in ("config.json", "results.json"))
    where = f"--out-dir {os.path.abspath(args.out_dir)}"
    if another_scripts_run(saved):  # --overwrite would replace a record this script cannot redo
        raise UserError(f"{where} holds another script's run (its config.json is not a toy "
                        "sweep's): use another --out-dir")
    if (os.path.exists(saved) or os.path.exists(results)) and not args.overwrite and \
            not same_sweep(config_of(args), saved):
        why = ("a config.json of another sweep (other flags, or the other of cpu and cuda)"
               if os.path.exists(saved) else "a results.json without config.json")
        raise UserError(f"{where} holds {why}: pass --overwrite to replace it, or another "
                        "--out-dir")

def out_of_memory(error):  # CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in str(error))

def main(argv=None):
    args = Config(**vars(build_parser().parse_args(argv)))
    try:
        check_args(args)
        config = config_of(args)
        t0 = time.time()
        results, references = run_sweep(args)
        seconds = time.time() - t0
        os.makedirs(args.out_dir or ".", exist_ok=True)  # "": here, as the other two scripts
        write_json(os.path.join(args.out_dir, "config.json"), config)
        write_json(os.path.join(args.out_dir, "results.json"),
                   {"config": config, "script_sha256": script_sha256(),
                    "seconds": round(seconds, 1), "cells": results,
                    "reference_probes": references})
    except (UserError, OSError) as e:  # OSError: --out-dir cannot be written (a full disk, say)
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        sys.stderr.write(f"error: the sweep does not fit in the memory of {args.device}: run "
                         "fewer cells or smaller ones (--n, --augs, --seeds) at a time\n")
        sys.exit(1)
    print(f"{len(results)} cells, {args.steps} steps, {seconds:.1f} s on {args.device}")
    print("K-NN gain over INIT on unseen test points (mean±std over seeds), "
          "fit = accuracy on the random labels")
    print(phase_table(results, config["n"], config["augs"]))
    print("K-NN with no encoder (W = I) / with only the class coordinates, per seed: " + ", ".join(
        f"{r['knn_input']:.3f} / {r['knn_class_coordinates']:.3f}" for r in references))
    print(f"wrote {os.path.join(args.out_dir, 'results.json')}")
    return results

if __name__ == "__main__":
    main()
