"""
Decoding generalization from memorization: train a network on labels corrupted to a degree p,
then decode every layer with the Minimum Angle Subspace Classifier (MASC), relabel the training
set with the best layer's MASC and retrain.

Reproduces "Decoding Generalization from Memorization in Deep Neural Networks": a network that
memorized corrupted labels (high train accuracy on them, poor test accuracy) still holds class
subspaces in its layers from which MASC decodes a much better test accuracy.

MASC (the paper's Algorithms 1-3): per class k, stack the layer outputs X_k with -X_k (so the mean
is zero), keep the principal components that explain 99% of the variance (subspace S_k), and
predict the class whose subspace makes the smallest angle with a point. The PCA of [X_k; -X_k] is
the eigendecomposition of X_k^T X_k: float32 products on the device, a float64 eigensolver, and
the n_k x n_k Gram matrix instead when a class has fewer samples than dimensions.

Usage:
    python masc_decode.py --dataset mnist --model mlp --corruption 0.8
    python masc_decode.py --dataset fashionmnist --model cnn --corruption 0,0.2,0.4,0.6,0.8,1 --runs 3
    python masc_decode.py --dataset cifar100 --model alexnet --corruption 0,0.4 --posthoc-corruption 0.2,0.4,0.6,0.8
"""
import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

# ----------------------------------------------------------------------------- config

DATASETS = {  # classes, image shape, training accuracy at which training stops (the authors' thresholds)
    "mnist": (10, (1, 28, 28), 0.999),
    "fashionmnist": (10, (1, 28, 28), 0.991),
    "cifar10": (10, (3, 32, 32), 1.0),
    "cifar100": (100, (3, 32, 32), 0.991),
    "tinyimagenet": (200, (3, 64, 64), 0.999),
}
MODELS = ["mlp", "cnn", "alexnet"]


def model_defaults(model, dataset):
    """The authors' optimiser, learning rate and batch size per model (and dataset)."""
    if model == "mlp":
        return dict(optimizer="sgd", lr=1e-3, batch_size=32)
    if model == "cnn":
        return dict(optimizer="adam", lr=2e-4, batch_size=128 if dataset in ("mnist", "fashionmnist") else 32)
    return dict(optimizer="adam", lr=1e-4, batch_size=500 if dataset == "tinyimagenet" else 128)


class UserError(Exception):
    """Bad input or missing data: reported as one line, never a traceback."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def number_list(text, low=0.0, high=1.0):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(not low <= v <= high for v in values):
        raise argparse.ArgumentTypeError(f"every value must be in [{low}, {high}], got {text!r}")
    return values


def variance_fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_int(text):
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser():
    p = OneLineParser(description="Label corruption, layer-wise MASC decoding, relabel and retrain.")
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="training dataset")
    g.add_argument("--model", choices=MODELS, default="mlp", help="architecture (REFERENCE: MLP, CNN, AlexNet)")
    g.add_argument("--corruption", type=number_list, default=[0.8], help="corruption degree p, or a comma list of them")
    g.add_argument("--runs", type=positive_int, default=1, help="independent runs (seeds seed, seed+1, ...) per degree")
    g.add_argument("--posthoc-corruption", type=number_list, default=[], help="latent memorization: degrees applied after training the p=0 model")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=500, help="maximum training epochs")
    g.add_argument("--stop-acc", type=variance_fraction, default=None, help="stop once training accuracy reaches this (default: the authors' per dataset, 1.0 for the MLP)")
    g.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: per model)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default: per model and dataset)")
    g.add_argument("--save-every", type=positive_int, default=10, help="epochs between checkpoints of a model in training")
    g = p.add_argument_group("decoding")
    g.add_argument("--variance", type=variance_fraction, default=0.99, help="fraction of variance each class subspace explains")
    g.add_argument("--no-retrain", action="store_true", help="skip relabelling and retraining")
    g.add_argument("--retrain-epochs", type=positive_int, default=30, help="maximum retraining epochs")
    g.add_argument("--patience", type=positive_int, default=3, help="early-stopping patience of the retraining")
    g = p.add_argument_group("system")
    g.add_argument("--data-dir", default="data", help="where datasets are (or get downloaded)")
    g.add_argument("--out-dir", default="runs/masc", help="config.json, results.json, models/")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--seed", type=int, default=0, help="base seed; run r uses seed + r")
    g.add_argument("--overwrite", action="store_true", help="retrain models saved with other settings")
    return p


def resolve_config(args):
    """Fill per-model defaults and check combinations; returns the run's config dict."""
    try:
        torch.empty(1, device=args.device)
    except Exception as e:
        raise UserError(f"--device {args.device} is not available ({str(e).strip().splitlines()[0]})")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir} exists and is not a directory")
    classes, shape, stop = DATASETS[args.dataset]
    if args.model == "alexnet" and shape[1:] not in ((32, 32), (64, 64)):
        raise UserError(f"--model alexnet needs 32x32 or 64x64 images (cifar10, cifar100, tinyimagenet), not {args.dataset}")
    if args.posthoc_corruption and 0.0 not in args.corruption:
        raise UserError("--posthoc-corruption decodes the p=0 model: add 0 to --corruption")
    d = model_defaults(args.model, args.dataset)
    config = dict(vars(args))
    config["optimizer"] = d["optimizer"]
    config["lr"] = args.lr or d["lr"]
    config["batch_size"] = args.batch_size or d["batch_size"]
    config["stop_acc"] = args.stop_acc or (1.0 if args.model == "mlp" else stop)
    config["num_classes"] = classes
    return config


def named_generator(device, *keys):
    """A torch.Generator seeded from named keys, so independent streams never share a sequence."""
    seed = int(hashlib.sha256(repr(keys).encode()).hexdigest()[:15], 16)
    return torch.Generator(device=device).manual_seed(seed)

# ----------------------------------------------------------------------------- data


def load_torchvision(name, root):
    """(train images uint8 NCHW, labels), (test images, labels) through torchvision, downloaded when missing."""
    cls, folder, url = {
        "mnist": (torchvision.datasets.MNIST, "MNIST/raw", "https://ossci-datasets.s3.amazonaws.com/mnist/ (the four *-ubyte.gz files)"),
        "fashionmnist": (torchvision.datasets.FashionMNIST, "FashionMNIST/raw", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (the four *-ubyte.gz files)"),
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar.html"),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    }[name]
    out = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:
            raise UserError(f"{name} not found in {os.path.join(root, folder)} and could not be downloaded "
                            f"({type(e).__name__}); download it from {url} and put it in {os.path.join(root, folder)}")
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST NHW, CIFAR NHWC -> NCHW
        out.append((x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)))
    return out


TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def load_tinyimagenet(root):
    """tiny-imagenet-200 (train/<wnid>/images, val/val_annotations.txt) decoded once, cached as uint8."""
    base = os.path.join(root, "tiny-imagenet-200")
    cache = os.path.join(base, "uint8_cache.pt")
    if os.path.exists(cache):
        c = torch.load(cache, weights_only=True)
        return (c["train_x"], c["train_y"]), (c["val_x"], c["val_y"])
    if not os.path.isdir(base):
        try:
            torchvision.datasets.utils.download_and_extract_archive(TINY_URL, root)
        except Exception as e:
            raise UserError(f"tinyimagenet not found in {base} and could not be downloaded ({type(e).__name__}); "
                            f"download {TINY_URL} and unzip it into {root}/")
    try:
        with open(os.path.join(base, "wnids.txt")) as f:
            wnids = sorted(line.strip() for line in f if line.strip())
        index = {w: i for i, w in enumerate(wnids)}
        train = [(os.path.join(base, "train", w, "images", name), index[w])
                 for w in wnids for name in sorted(os.listdir(os.path.join(base, "train", w, "images")))]
        with open(os.path.join(base, "val", "val_annotations.txt")) as f:
            val = [(os.path.join(base, "val", "images", parts[0]), index[parts[1]])
                   for parts in (line.split("\t") for line in f if line.strip())]
    except (OSError, KeyError) as e:
        raise UserError(f"Tiny ImageNet in {base} is incomplete ({e}); expected the tiny-imagenet-200 archive layout")

    def decode(items):
        images = torch.empty(len(items), 3, 64, 64, dtype=torch.uint8)
        for n, (path, _) in enumerate(tqdm(items, desc="decoding Tiny ImageNet", leave=False)):
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                img = torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
            if img.shape[-2:] != (64, 64):
                img = torchvision.transforms.v2.functional.resize(img, [64, 64], antialias=True)
            images[n] = img
        return images, torch.tensor([y for _, y in items], dtype=torch.long)

    (tx, ty), (vx, vy) = decode(train), decode(val)
    torch.save({"train_x": tx, "train_y": ty, "val_x": vx, "val_y": vy}, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return (tx, ty), (vx, vy)


def load_dataset(name, root):
    return load_tinyimagenet(root) if name == "tinyimagenet" else load_torchvision(name, root)


def preprocess(images):
    """ToTensor + Normalize(0.5, 0.5) per channel: uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1)


def corrupt_labels(targets, p, num_classes, seed):
    """With probability p, replace a label by a uniform draw over all classes (it may stay the same).

    The expected fraction of changed labels is p - p/K. Deterministic for a seed (an int, or any
    tuple of keys).
    """
    g = named_generator("cpu", "corrupt", seed)
    targets = torch.as_tensor(targets).cpu()
    replace = torch.rand(targets.shape, generator=g) < p
    draw = torch.randint(num_classes, targets.shape, generator=g)
    return torch.where(replace, draw, targets)

# ----------------------------------------------------------------------------- models
# Every model returns its logits and, given a dict `taps`, fills it with the probed layers.


def tap(taps, name, x):
    if taps is not None:
        taps[name] = x
    return x


def fc_relu(x, layers, taps):
    """Linear + ReLU layers, probed after each ReLU as fc1, fc2, ..."""
    for i, layer in enumerate(layers):
        x = tap(taps, f"fc{i + 1}", F.relu(layer(x)))
    return x


class MLP(nn.Module):
    """input -> FC128 -> FC512 -> FC2048 -> FC2048 -> K, ReLU after each hidden layer."""

    def __init__(self, in_dim, num_classes):
        super().__init__()
        widths = [in_dim, 128, 512, 2048, 2048]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.out = nn.Linear(2048, num_classes)

    def forward(self, x, taps=None):
        x = tap(taps, "input", x.flatten(1))
        return self.out(fc_relu(x, self.hidden, taps))


class CNN(nn.Module):
    """conv16, conv16, pool, conv32, conv32, pool, conv64, conv64, pool, flatten, FC250 x3, Linear(250, K) without bias."""

    def __init__(self, shape, num_classes):
        super().__init__()
        layers, c = [], shape[0]
        for width in (16, 32, 64):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        flat = 64 * (shape[1] // 8) * (shape[2] // 8)  # 576 for 28x28, 1024 for 32x32
        self.fc = nn.ModuleList([nn.Linear(flat, 250), nn.Linear(250, 250), nn.Linear(250, 250)])
        self.out = nn.Linear(250, num_classes, bias=False)

    def forward(self, x, taps=None):
        tap(taps, "input", x.flatten(1))
        x = tap(taps, "flatten", self.features(x).flatten(1))
        return self.out(fc_relu(x, self.fc, taps))


class AlexNet(nn.Module):
    """The authors' small-image AlexNet: five convolutions to a 256-d flatten, then 4096 -> 4096 -> K."""

    def __init__(self, shape, num_classes):
        super().__init__()
        if shape[1] == 32:  # CIFAR-100
            first = [nn.Conv2d(shape[0], 64, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
                     nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2)]
        else:  # Tiny ImageNet, 64x64
            first = [nn.Conv2d(shape[0], 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                     nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2)]
        self.features = nn.Sequential(*first, nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
        self.fc = nn.ModuleList([nn.Linear(256, 4096), nn.Linear(4096, 4096)])
        self.out = nn.Linear(4096, num_classes)

    def forward(self, x, taps=None):
        x = tap(taps, "flatten", self.features(x).flatten(1))
        return self.out(fc_relu(x, self.fc, taps))


def build_model(name, shape, num_classes, seed):
    torch.manual_seed(seed)  # initialised on the CPU: the same weights on every device
    if name == "mlp":
        return MLP(shape[0] * shape[1] * shape[2], num_classes)
    return CNN(shape, num_classes) if name == "cnn" else AlexNet(shape, num_classes)

# ----------------------------------------------------------------------------- training


def make_optimizer(model, config):
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=config["lr"])


@torch.no_grad()
def predict(model, images, batch=2048):
    model.eval()
    out = torch.cat([model(preprocess(images[i:i + batch])).argmax(1) for i in range(0, len(images), batch)])
    model.train()
    return out


def accuracy(pred, labels):
    return (pred == labels).float().mean().item()


def train_epoch(model, opt, images, labels, batch_size, gen):
    """One shuffled pass (the last partial batch included); returns the running training accuracy.

    A NaN or infinite loss stops the run with an error, before any checkpoint is written."""
    perm = torch.randperm(len(images), generator=gen, device=images.device)
    correct, total = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    for start in range(0, len(images), batch_size):
        idx = perm[start:start + batch_size]
        out = model(preprocess(images[idx]))
        loss = F.cross_entropy(out, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct += (out.argmax(1) == labels[idx]).sum()
        total += loss.detach()
    correct, total = torch.stack([correct, total]).tolist()  # one host sync per epoch
    if not math.isfinite(total):
        raise UserError(f"the training loss became {total}; stopped, keeping the last checkpoint in its models/ folder")
    return correct / len(images)


def train_to_memorize(model, data, labels, config, seed, desc, partial):
    """Train until the running training accuracy reaches stop_acc or for `epochs` epochs.

    Records the test accuracy after every epoch: its maximum is what early stopping would have given.
    Every --save-every epochs the state (model, optimizer, batch-order generator, history) is saved
    atomically to `partial["path"]`; a saved state with the same key is resumed exactly.
    """
    opt = make_optimizer(model, config)
    gen = named_generator(data["train_x"].device, "order", seed)
    history = {"train_acc": [], "test_acc": []}
    state = load_model_checkpoint(partial["path"], partial["key"], config["overwrite"])
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        history = state["history"]
        tqdm.write(f"{desc}: resuming from epoch {len(history['train_acc'])}")
    bar = tqdm(range(len(history["train_acc"]), config["epochs"]), desc=desc, leave=False,
               initial=len(history["train_acc"]), total=config["epochs"])
    for epoch in bar:
        if history["train_acc"] and history["train_acc"][-1] >= config["stop_acc"]:
            break
        train_acc = train_epoch(model, opt, data["train_x"], labels, config["batch_size"], gen)
        test_acc = accuracy(predict(model, data["test_x"]), data["test_y"])
        history["train_acc"].append(train_acc)
        history["test_acc"].append(test_acc)
        bar.set_postfix(train=f"{train_acc:.4f}", test=f"{test_acc:.4f}")
        if (epoch + 1) % config["save_every"] == 0:
            save_atomic(partial["path"], {"key": partial["key"], "model": model.state_dict(),
                                          "optimizer": opt.state_dict(), "gen": gen.get_state(), "history": history})
    bar.close()
    acc, done = history["train_acc"][-1], len(history["train_acc"])
    if acc >= config["stop_acc"]:
        tqdm.write(f"{desc}: training accuracy {acc:.4f} reached --stop-acc {config['stop_acc']:g} "
                   f"at epoch {done}; stopped")
    else:
        tqdm.write(f"{desc}: training accuracy {acc:.4f} after {done} epochs, below --stop-acc "
                   f"{config['stop_acc']:g}")
    return history


def retrain(model, data, new_labels, val_idx, config, seed):
    """Continue training on relabelled data with a fresh optimizer; early stopping on the validation part.

    Monitors validation accuracy; returns the model with the weights of its best retraining epoch
    and the number of epochs run.
    """
    opt = make_optimizer(model, config)
    gen = named_generator(data["train_x"].device, "retrain", seed)
    val_x, val_y = data["test_x"][val_idx], data["test_y"][val_idx]
    best, best_state, waited, epochs = -1.0, None, 0, 0
    for epochs in range(1, config["retrain_epochs"] + 1):
        train_epoch(model, opt, data["train_x"], new_labels, config["batch_size"], gen)
        val = accuracy(predict(model, val_x), val_y)
        if val > best:
            best, best_state, waited = val, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited >= config["patience"]:
                break
    model.load_state_dict(best_state)
    return model, epochs

# ----------------------------------------------------------------------------- MASC


def subspace_rank(eigenvalues, variance, inner=1):
    """Smallest r whose leading eigenvalues (sorted descending) explain at least `variance` of their sum.

    Capped at the eigenvalues above the rounding floor of a float32 product summed over `inner`
    terms (about trace * sqrt(inner) * eps): below it an eigenvalue is rounding, not a direction.
    """
    ev = eigenvalues.double().clamp_min(0)
    cum = ev.cumsum(0)
    if len(ev) == 0 or cum[-1] == 0:
        return 0
    r = int((cum < variance * cum[-1]).sum().item()) + 1
    floor = cum[-1] * math.sqrt(inner) * torch.finfo(torch.float32).eps
    return min(r, int((ev > floor).sum().item()))


def class_basis(X, variance):
    """Orthonormal basis (D, r) of the principal subspace of [X; -X]: the top eigenvectors of X^T X.

    The matrix products run in float32 on the device; the small symmetric eigenproblem is solved in
    float64, because float32 eigenvectors mix near-equal eigenvalues at the variance cut and change
    predictions. With fewer samples than dimensions the n x n Gram matrix X X^T is decomposed
    instead (its eigenvectors u map to principal directions X^T u / s), so no D x D matrix is formed.
    """
    n, D = X.shape
    if n == 0:
        return X.new_zeros(D, 0)
    gram = n < D
    ev, vec = torch.linalg.eigh((X @ X.T if gram else X.T @ X).double())
    ev, vec = ev.flip(0), vec.flip(1)
    r = subspace_rank(ev, variance, inner=D if gram else n)
    if not gram:
        return vec[:, :r].to(X.dtype)
    return (X.T @ vec[:, :r].to(X.dtype)) / ev[:r].sqrt().to(X.dtype)


def fit_subspaces(feats, labels, num_classes, variance=0.99):
    """One orthonormal basis (D, r_k) per class of the +-symmetrised layer outputs (Algorithms 2-3).

    A class with no samples, or only all-zero samples, gets an empty basis (D, 0): it is never predicted.
    """
    feats = feats.float()
    return [class_basis(feats[labels == k], variance) for k in range(num_classes)]


def masc_predict(bases, feats, chunk=8192):
    """Per row, the class whose subspace makes the smallest angle with it (Algorithm 1).

    cos^2(angle) = ||V_k^T x||^2 / ||x||^2 for an orthonormal basis V_k, so all classes are scored by one
    matmul against the concatenated bases. An all-zero row makes no angle with any subspace: it gets -1.
    """
    feats = feats.float()
    dims = torch.tensor([b.shape[1] for b in bases], device=feats.device)
    owner = torch.repeat_interleave(torch.arange(len(bases), device=feats.device), dims)
    stacked = torch.cat(bases, 1) if len(owner) else feats.new_zeros(feats.shape[1], 0)
    preds = []
    for start in range(0, len(feats), chunk):
        x = feats[start:start + chunk]
        energy = torch.zeros(len(x), len(bases), device=x.device).index_add_(1, owner, (x @ stacked).pow(2))
        norm2 = x.pow(2).sum(1)
        cos2 = energy / norm2.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        cos2[:, dims == 0] = -1  # empty classes never win
        pred = cos2.argmax(1)
        preds.append(torch.where((norm2 > 0) & (dims > 0).any(), pred, torch.full_like(pred, -1)))
    return torch.cat(preds)


@torch.no_grad()
def layer_features(model, images, batch=1024):
    """Every probed layer's outputs for all images: dict name -> (N, D) float32 on the device."""
    model.eval()
    parts = {}
    for start in range(0, len(images), batch):
        taps = {}
        model(preprocess(images[start:start + batch]), taps)
        for name, f in taps.items():
            parts.setdefault(name, []).append(f.float())
    model.train()
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def decode_layers(model, data, y_corrupt, config, desc):
    """MASC of every layer with corrupted- and true-label subspaces; keeps predictions for relabelling."""
    train_f, test_f = layer_features(model, data["train_x"]), layer_features(model, data["test_x"])
    y_true, y_test, K = data["train_y"], data["test_y"], config["num_classes"]
    rows, preds = [], {}
    for name in tqdm(train_f, desc=desc, leave=False):
        bases_c = fit_subspaces(train_f[name], y_corrupt, K, config["variance"])
        bases_t = fit_subspaces(train_f[name], y_true, K, config["variance"])
        tr_c, te_c = masc_predict(bases_c, train_f[name]), masc_predict(bases_c, test_f[name])
        tr_t, te_t = masc_predict(bases_t, train_f[name]), masc_predict(bases_t, test_f[name])
        preds[name] = dict(corrupt=(tr_c, te_c), true=(tr_t, te_t))
        rows.append(dict(name=name, dim=train_f[name].shape[1],
                         corrupt_subspaces=dict(train_corrupt=accuracy(tr_c, y_corrupt), train_true=accuracy(tr_c, y_true),
                                                test=accuracy(te_c, y_test), dims=[b.shape[1] for b in bases_c]),
                         true_subspaces=dict(train_true=accuracy(tr_t, y_true), test=accuracy(te_t, y_test),
                                             dims=[b.shape[1] for b in bases_t])))
    return rows, preds, train_f, test_f


def latent_memorization(train_f, test_f, data, config, seed):
    """MASC of the p=0 model from labels corrupted after training, scored on those labels (paper, supp. 6)."""
    out = []
    for q in config["posthoc_corruption"]:
        y_q = corrupt_labels(data["train_y"].cpu(), q, config["num_classes"], ("posthoc", seed, q)).to(data["train_y"].device)
        layers = []
        for name in train_f:
            bases = fit_subspaces(train_f[name], y_q, config["num_classes"], config["variance"])
            pred = masc_predict(bases, train_f[name])
            layers.append(dict(name=name, train_corrupt=accuracy(pred, y_q), train_true=accuracy(pred, data["train_y"]),
                               test=accuracy(masc_predict(bases, test_f[name]), data["test_y"])))
        out.append(dict(corruption=q, fraction_changed=1 - accuracy(y_q, data["train_y"]), layers=layers))
    return out


def relabel_and_retrain(model, data, y_corrupt, preds, config, seed):
    """Paper section 3.3: best layer on 20% of the test set, relabel, retrain, report on the other 80%."""
    n_test = len(data["test_y"])
    perm = torch.randperm(n_test, generator=named_generator("cpu", "split", seed)).to(data["test_y"].device)
    val_idx, eval_idx = perm[:n_test // 5], perm[n_test // 5:]
    y_true, y_test = data["train_y"], data["test_y"]
    before = accuracy(predict(model, data["test_x"][eval_idx]), y_test[eval_idx])
    wrong = y_corrupt != y_true
    out = dict(val_size=len(val_idx), test_size=len(eval_idx), before_test=before)
    for kind in ("corrupt", "true"):
        best = max(preds, key=lambda name: accuracy(preds[name][kind][1][val_idx], y_test[val_idx]))
        train_pred, test_pred = preds[best][kind]
        new_labels = torch.where(train_pred >= 0, train_pred, y_corrupt)  # rows MASC cannot place keep their label
        fixed = (new_labels[wrong] == y_true[wrong]).float().mean().item() if wrong.any() else None
        broken = (new_labels[~wrong] != y_true[~wrong]).float().mean().item() if (~wrong).any() else None
        tuned, epochs = retrain(copy.deepcopy(model), data, new_labels, val_idx, config, (seed, kind))
        out[f"{kind}_subspaces"] = dict(
            layer=best, masc_test=accuracy(test_pred[eval_idx], y_test[eval_idx]),
            relabel_correct=accuracy(new_labels, y_true), corrupt_correct=accuracy(y_corrupt, y_true),
            fixed=fixed, broken=broken, after_test=accuracy(predict(tuned, data["test_x"][eval_idx]), y_test[eval_idx]),
            epochs=epochs)
    return out


def init_control(data, y_corrupt, config, seed):
    """MASC on the same architecture at its random initialisation (the paper's control)."""
    model = build_model(config["model"], DATASETS[config["dataset"]][1], config["num_classes"], seed).to(data["train_x"].device)
    rows, _, _, _ = decode_layers(model, data, y_corrupt, config, "MASC at init")
    return [dict(name=r["name"], corrupt_subspaces=dict(test=r["corrupt_subspaces"]["test"]),
                 true_subspaces=dict(test=r["true_subspaces"]["test"])) for r in rows]

# ----------------------------------------------------------------------------- runs, checkpoints, report

CHECKPOINT_KEYS = ("dataset", "model", "optimizer", "lr", "batch_size", "epochs", "stop_acc", "seed")


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_atomic(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_model_checkpoint(path, key, overwrite):
    """The checkpoint at path if it was made with the same key; None if absent (or other and overwrite)."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved_key = ckpt["key"]
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); move it away or pass --overwrite")
    if saved_key == key:
        return ckpt
    if overwrite:
        return None
    diff = ", ".join(f"{k}: {saved_key.get(k)!r} -> {v!r}" for k, v in key.items() if saved_key.get(k) != v)
    raise UserError(f"{path} was trained with other settings ({diff}); pass --overwrite or use another --out-dir")


def trained_model(config, data, p, run, seed):
    """Train the memorized model for (p, run), resume its training, or reuse the finished checkpoint."""
    path = os.path.join(config["out_dir"], "models", f"p{p:g}_run{run}.pt")
    key = {k: config[k] for k in CHECKPOINT_KEYS} | {"corruption": p, "run": run}
    model = build_model(config["model"], DATASETS[config["dataset"]][1], config["num_classes"], seed).to(data["train_x"].device)
    done = load_model_checkpoint(path, key, config["overwrite"])
    if done:
        model.load_state_dict(done["model"])
        tqdm.write(f"p={p:g} run {run}: reusing {path}")
        return model, done["labels"].to(data["train_y"].device), done["history"]
    y_corrupt = corrupt_labels(data["train_y"].cpu(), p, config["num_classes"], seed).to(data["train_y"].device)
    partial = {"path": path.replace(".pt", ".partial.pt"), "key": key}
    history = train_to_memorize(model, data, y_corrupt, config, seed, f"train p={p:g} run {run}", partial)
    save_atomic(path, {"key": key, "model": model.state_dict(), "labels": y_corrupt.cpu(), "history": history})
    if os.path.exists(partial["path"]):
        os.remove(partial["path"])
    return model, y_corrupt, history


def run_one(config, data, p, run):
    """Train (or reuse), decode every layer, relabel and retrain, controls: one entry of results.json."""
    seed = config["seed"] + run
    model, y_corrupt, history = trained_model(config, data, p, run, seed)
    model_acc = dict(train_corrupt=accuracy(predict(model, data["train_x"]), y_corrupt),
                     train_true=accuracy(predict(model, data["train_x"]), data["train_y"]),
                     test=accuracy(predict(model, data["test_x"]), data["test_y"]))
    layers, preds, train_f, test_f = decode_layers(model, data, y_corrupt, config, f"MASC p={p:g} run {run}")
    best = max(layers, key=lambda r: r["corrupt_subspaces"]["test"])
    best_true = max(layers, key=lambda r: r["true_subspaces"]["test"])
    gain = lambda acc: 100 * (acc - model_acc["test"]) / model_acc["test"] if model_acc["test"] > 0 else None
    entry = dict(corruption=p, run=run, seed=seed, fraction_changed=1 - accuracy(y_corrupt, data["train_y"]),
                 epochs_trained=len(history["train_acc"]), reached_stop_acc=history["train_acc"][-1] >= config["stop_acc"],
                 model_acc=model_acc, layers=layers,
                 best_layer=best["name"], best_masc_test=best["corrupt_subspaces"]["test"],
                 improvement_pct=gain(best["corrupt_subspaces"]["test"]),
                 best_layer_true=best_true["name"], best_masc_test_true=best_true["true_subspaces"]["test"],
                 improvement_pct_true=gain(best_true["true_subspaces"]["test"]),
                 early_stop_test_acc=max(history["test_acc"]),
                 early_stop_epoch=1 + max(range(len(history["test_acc"])), key=history["test_acc"].__getitem__),
                 history=history)
    entry["posthoc"] = latent_memorization(train_f, test_f, data, config, seed) if p == 0 and config["posthoc_corruption"] else None
    del train_f, test_f
    entry["retrain"] = None if config["no_retrain"] else relabel_and_retrain(model, data, y_corrupt, preds, config, seed)
    entry["init_control"] = init_control(data, y_corrupt, config, seed)
    return entry


def summary_table(runs, corruptions):
    """Per corruption degree, mean [min, max] over runs, shaped like the paper's Table 1."""
    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        mean = sum(values) / len(values)
        return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f},{max(values):.3f}]"
    cols = [("model test", lambda r: r["model_acc"]["test"]),
            ("MASC test (corrupt subsp.)", lambda r: r["best_masc_test"]),
            ("improvement %", lambda r: r["improvement_pct"]),
            ("MASC test (true subsp.)", lambda r: r["best_masc_test_true"]),
            ("early-stop test", lambda r: r["early_stop_test_acc"]),
            ("retrained (corrupt)", lambda r: r["retrain"] and r["retrain"]["corrupt_subspaces"]["after_test"]),
            ("retrained (true)", lambda r: r["retrain"] and r["retrain"]["true_subspaces"]["after_test"])]
    lines = [["p", "best layer"] + [c for c, _ in cols]]
    for p in corruptions:
        rows = [r for r in runs if r["corruption"] == p]
        if rows:
            layers = "/".join(sorted({r["best_layer"] for r in rows}))
            lines.append([f"{p:g}", layers] + [stat([f(r) for r in rows]) for _, f in cols])
    widths = [max(len(line[j]) for line in lines) for j in range(len(lines[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines)


def run(args):
    config = resolve_config(args)
    data_cpu = load_dataset(args.dataset, args.data_dir)
    device = torch.device(args.device)
    (tx, ty), (qx, qy) = data_cpu
    data = dict(train_x=tx.to(device), train_y=ty.to(device), test_x=qx.to(device), test_y=qy.to(device))
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, "config.json"), config)
    results, t0 = {"config": config, "runs": []}, time.time()
    for p in args.corruption:
        for r in range(args.runs):
            results["runs"].append(run_one(config, data, p, r))
            write_json(os.path.join(args.out_dir, "results.json"), results)
    results["seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(args.out_dir, "results.json"), results)
    print(f"{args.model}-{args.dataset}, {args.runs} run(s) per degree, {results['seconds']} s on {args.device}")
    print(summary_table(results["runs"], args.corruption))
    print(f"wrote {os.path.join(args.out_dir, 'results.json')}")
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
