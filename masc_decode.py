"""
"Decoding Generalization from Memorization in Deep Neural Networks": train a network on labels
corrupted to a degree p, decode every layer with the Minimum Angle Subspace Classifier (MASC),
relabel the training set with the best layer's MASC and retrain. A network that memorized corrupted
labels still holds class subspaces from which MASC decodes a much better test accuracy.

MASC (Algorithms 1-3): per class k, stack the layer outputs X_k with -X_k (so the mean is zero),
keep the principal components that explain 99% of the variance (subspace S_k), and predict the
class whose subspace makes the smallest angle with a point.

On a GPU all models of a command (degrees x runs) train together as one stacked model
(torch.func.vmap), each with its own labels, batch order, optimizer state and stop: a Table 1 row
of 18 models issues the operators of one, and each model's numbers are, up to rounding, those it
gives trained alone. On a CPU they train one at a time (--models-at-once).

Usage:
    python masc_decode.py --dataset mnist --model mlp --corruption 0.8
    python masc_decode.py --dataset fashionmnist --model cnn --corruption 0,0.2,0.4,0.6,0.8,1 \\
        --runs 3 --out-dir runs/fashion_cnn
    python masc_decode.py --dataset cifar100 --model alexnet --corruption 0,0.4 \\
        --posthoc-corruption 0.2,0.4,0.6,0.8 --out-dir runs/cifar100_alexnet
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import pathlib
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2
from tqdm import tqdm

# ----------------------------------------------------------------------------- datasets, settings

class Dataset(NamedTuple):
    classes: int
    shape: tuple  # of one image: (channels, height, width)
    stop_acc: float  # the training accuracy at which the authors stop training

DATASETS = {
    "mnist": Dataset(10, (1, 28, 28), 0.999),
    "fashionmnist": Dataset(10, (1, 28, 28), 0.991),
    "cifar10": Dataset(10, (3, 32, 32), 1.0),
    "cifar100": Dataset(100, (3, 32, 32), 0.991),
    "tinyimagenet": Dataset(200, (3, 64, 64), 0.999),
}

def model_defaults(model, dataset):  # the authors' optimizer, learning rate and batch size
    if model == "mlp":
        return "sgd", 1e-3, 32
    if model == "cnn":
        return "adam", 2e-4, (128 if dataset in ("mnist", "fashionmnist") else 32)
    return "adam", 1e-4, (500 if dataset == "tinyimagenet" else 128)

@dataclass
class Data:  # a dataset on the device: uint8 images (N, C, H, W) and int64 labels
    train_x: torch.Tensor
    train_y: torch.Tensor  # the true labels
    test_x: torch.Tensor
    test_y: torch.Tensor

class UserError(Exception):
    """Bad input or missing data: reported as one line, never a traceback."""

def first_line(error):  # as Python's last traceback line: "KeyError: 'n01443537'", or the type
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__

# ----------------------------------------------------------------------------- corrupting labels

def named_generator(device, *keys):  # independent streams never share a sequence
    seed = int(hashlib.sha256(repr(keys).encode()).hexdigest()[:15], 16)
    return torch.Generator(device=device).manual_seed(seed)

def corrupt_labels(targets, p, num_classes, seed):
    """With probability p, replace a label by a uniform draw over all classes (it may stay the
    same), so the expected fraction of changed labels is p - p/K. seed: an int or a tuple."""
    g = named_generator("cpu", "corrupt", seed)  # drawn on the CPU: the same on every device
    targets = torch.as_tensor(targets)
    replace = torch.rand(targets.shape, generator=g) < p
    draw = torch.randint(num_classes, targets.shape, generator=g)
    return torch.where(replace, draw, targets.cpu()).to(targets.device)

# ----------------------------------------------------------------------------- models
# Every model returns its logits and, given a dict `taps`, fills it with the probed layers.

def preprocess(images):  # ToTensor + Normalize(0.5, 0.5): uint8 [0, 255] -> float [-1, 1]
    return images.float().div_(127.5).sub_(1)

def tap(taps, name, x):
    if taps is not None:
        taps[name] = x
    return x

def fc_relu(x, layers, taps):
    for i, layer in enumerate(layers):
        x = tap(taps, f"fc{i + 1}", F.relu(layer(x)))
    return x

class MLP(nn.Module):
    def __init__(self, in_dim, num_classes):
        super().__init__()
        widths = [in_dim, 128, 512, 2048, 2048]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.out = nn.Linear(2048, num_classes)

    def forward(self, x, taps=None):
        x = tap(taps, "input", x.flatten(1))
        return self.out(fc_relu(x, self.hidden, taps))

def conv_relu(c_in, c_out, kernel, **kwargs):
    return [nn.Conv2d(c_in, c_out, kernel, **kwargs), nn.ReLU()]

class CNN(nn.Module):
    def __init__(self, shape, num_classes):
        super().__init__()
        layers, c = [], shape[0]
        for width in (16, 32, 64):
            layers += [*conv_relu(c, width, 3, padding=1), *conv_relu(width, width, 3, padding=1),
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

class AlexNet(nn.Module):  # the authors' small-image AlexNet: 5 convolutions, 256, 4096, 4096
    def __init__(self, shape, num_classes):
        super().__init__()
        if shape[1] == 32:  # CIFAR-100 (or CIFAR-10)
            first = [*conv_relu(shape[0], 64, 3, stride=2, padding=1), nn.MaxPool2d(3, 2),
                     *conv_relu(64, 192, 3, padding=1), nn.MaxPool2d(3, 2)]
        else:  # Tiny ImageNet, 64x64
            first = [*conv_relu(shape[0], 64, 11, stride=4, padding=2), nn.MaxPool2d(3, 2),
                     *conv_relu(64, 192, 5, padding=2), nn.MaxPool2d(3, 2)]
        self.features = nn.Sequential(*first, *conv_relu(192, 384, 3, padding=1),
                                      *conv_relu(384, 256, 3, padding=1),
                                      *conv_relu(256, 256, 3, padding=1), nn.MaxPool2d(3, 2))
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

# ----------------------------------------------------------------------------- stacked training
# Each parameter gets a leading model dimension and the architecture runs under torch.func.vmap:
# a model trained alone is the same code with one model in the stack.

@dataclass(eq=False)
class Job:
    name: str  # for messages: "p=0.4 run 1", "retrain p=0.4 run 1 (true subspaces)"
    state: dict  # parameter name -> tensor
    labels: torch.Tensor  # the labels it is trained on
    gen: torch.Generator  # its batch order
    opt: dict = field(default_factory=dict)  # {"step": int, "buffers": {name: {slot: tensor}}}
    history: dict = field(default_factory=lambda: {"train_acc": [], "test_acc": []})

OPTIMIZER_SLOTS = {"sgd": ("momentum",), "adam": ("exp_avg", "exp_avg_sq")}  # per parameter

class Stack:
    """Jobs at one optimizer step as one model, parameters and buffers stacked on a leading model
    dimension; SGD (momentum 0.9) and Adam (0.9, 0.999, eps 1e-8) as torch.optim computes them."""

    def __init__(self, template, jobs, optimizer, lr):
        self.template, self.kind, self.lr = template, optimizer, lr
        names = [n for n, _ in template.named_parameters()]
        self.params = {n: torch.stack([j.state[n] for j in jobs]).requires_grad_() for n in names}
        buffer = lambda j, n, s: j.opt["buffers"][n][s] if j.opt else torch.zeros_like(j.state[n])
        self.buffers = {n: {s: torch.stack([buffer(j, n, s) for j in jobs])
                            for s in OPTIMIZER_SLOTS[optimizer]} for n in names}
        self.step_count = jobs[0].opt.get("step", 0)  # the same for all (see train_pass)

    def logits(self, x, same_batch=False):
        """Every model's logits: x is (M, b, ...), or with same_batch one (b, ...) for all."""
        one_model = lambda params, xi: torch.func.functional_call(self.template, params, (xi,))
        return torch.vmap(one_model, in_dims=(0, None if same_batch else 0))(self.params, x)

    @torch.no_grad()
    def predictions(self, images, batch=2048):  # (models, images)
        return torch.cat([self.logits(preprocess(images[i:i + batch]), same_batch=True).argmax(-1)
                          for i in range(0, len(images), batch)], 1)

    @torch.no_grad()
    def step(self, grads):  # name -> stacked gradient
        """Update every model in place. Each parameter and its buffers first take its gradient's
        layout (vmap's weight gradients come transposed), so that in-place updates stream through
        memory (measured: half the time of a stacked step on the CPU)."""
        self.step_count += 1
        t = self.step_count
        for name, g in grads.items():
            if self.params[name].stride() != g.stride():
                like = lambda x: torch.empty_like(g).copy_(x)  # keeps g's strides
                self.params[name] = like(self.params[name].detach()).requires_grad_()
                self.buffers[name] = {slot: like(b) for slot, b in self.buffers[name].items()}
            param, buf = self.params[name], self.buffers[name]
            if self.kind == "sgd":  # a fresh buffer is zero, so the first step's momentum is g
                param.add_(buf["momentum"].mul_(0.9).add_(g), alpha=-self.lr)
                continue
            buf["exp_avg"].lerp_(g, 0.1)
            buf["exp_avg_sq"].mul_(0.999).addcmul_(g, g, value=0.001)
            denom = (buf["exp_avg_sq"].sqrt() / (1 - 0.999 ** t) ** 0.5).add_(1e-8)
            param.addcdiv_(buf["exp_avg"], denom, value=-self.lr / (1 - 0.9 ** t))

    def write_back(self, jobs):
        for i, job in enumerate(jobs):
            job.state = {n: stacked[i].detach().clone() for n, stacked in self.params.items()}
            buffers = {n: {s: b[i].clone() for s, b in slots.items()}
                       for n, slots in self.buffers.items()}
            job.opt = {"step": self.step_count, "buffers": buffers}

def train_epoch(stack, images, labels, batch_size, gens):
    """One pass of every model over the images (last partial batch included), each in its own order
    on its own labels (M, N): per model, the running training accuracy and whether its loss and
    weights stayed finite."""
    M, N = labels.shape
    order = torch.stack([torch.randperm(N, generator=g, device=images.device) for g in gens])
    correct, loss_sum = torch.zeros(2, M, device=images.device)
    for start in range(0, N, batch_size):
        idx = order[:, start:start + batch_size]  # each model's own batch
        y = labels.gather(1, idx)
        out = stack.logits(preprocess(images[idx]))
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(1)
        # the models share nothing, so the gradient of the sum is each model's own; taken directly,
        # not through .grad, which would copy vmap's transposed weight gradients (half the time)
        grads = torch.autograd.grad(loss.sum(), list(stack.params.values()))
        stack.step(dict(zip(stack.params, grads)))
        correct += (out.argmax(-1) == y).sum(1)
        loss_sum += loss.detach()
    finite = torch.isfinite(loss_sum)
    for param in stack.params.values():  # the epoch's last update shows only in the weights
        finite &= torch.isfinite(param.detach().flatten(1)).all(1)
    # host syncs once per epoch, not per step; float32(0.991) < 0.991 would miss that threshold
    return (correct.double() / N).tolist(), finite.tolist()

@contextlib.contextmanager
def convolutions_for(device, stacking):
    """On the CPU, oneDNN's grouped convolution (a stack of models) sums weight gradients in
    another order than its plain one (a model alone); ATen's computes a grouped one as plain ones,
    so a stacked model's numbers equal its numbers alone (tested). ATen's is about 9x slower for
    the CNN (measured), so a CPU command trains one model at a time with oneDNN by default."""
    if device.type != "cpu" or not stacking:
        yield
        return
    with warnings.catch_warnings():  # the flags warn about TF32 on Intel GPUs, irrelevant here
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield

def train_pass(active, template, data, args, after_epoch):
    """One epoch of every active job, --models-at-once at a time. after_epoch(job, train_acc,
    test_predictions) records the epoch and says whether the job is finished. Returns the
    finished jobs."""
    # one stack per optimizer step count: models resumed at different epochs train apart
    by_step = {}
    for job in active:
        by_step.setdefault(job.opt.get("step", 0), []).append(job)
    groups = [same[i:i + args.models_at_once] for same in by_step.values()
              for i in range(0, len(same), args.models_at_once)]
    finished = []
    for group in groups:
        # restacked every epoch: the jobs hold the state, so finished ones simply drop out
        stack = Stack(template, group, args.optimizer, args.lr)
        labels = torch.stack([j.labels for j in group])
        with convolutions_for(data.train_x.device, args.models_at_once > 1):
            accs, finite = train_epoch(stack, data.train_x, labels, args.batch_size,
                                       [j.gen for j in group])
        if not all(finite):  # before after_epoch writes a checkpoint of this epoch
            names = ", ".join(job.name for job, ok in zip(group, finite) if not ok)
            raise UserError(f"the loss or the weights of {names} became nan or inf (try a lower "
                            "--lr, with --overwrite or another --out-dir); stopped: a model "
                            "memorizing keeps its last checkpoint, a retraining starts again "
                            "from its memorized model")
        # outside the ATen block: on a CPU, oneDNN's forward of a stack equals a lone model's
        preds = stack.predictions(data.test_x)
        stack.write_back(group)
        finished += [job for job, acc, pred in zip(group, accs, preds)
                     if after_epoch(job, acc, pred)]
    return finished

def train_together(jobs, template, data, args, after_epoch, desc):
    active = list(jobs)
    # closed on an error too, so that an error's line does not continue the bar's
    with tqdm(desc=desc, unit="epoch", leave=False) as bar:
        while active:
            finished = train_pass(active, template, data, args, after_epoch)
            bar.update()
            # the slowest model's running accuracy on its labels (memorizing: how far from
            # --stop-acc; retraining stops on --patience or --retrain-epochs instead)
            bar.set_postfix(models=len(active),
                            train_acc=f"{min(j.history['train_acc'][-1] for j in active):.4f}")
            active = [j for j in active if j not in finished]

# ----------------------------------------------------------------------------- MASC

@contextlib.contextmanager
def ieee_float32():
    """IEEE float32 products, whatever the program asked (TF32 keeps 10 of float32's 23 mantissa
    bits): the rank floor below assumes float32 rounding."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [b.fp32_precision for b in backends]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the program set the per-backend switches apart from the global one
        legacy = None
    torch.set_float32_matmul_precision("highest")  # sets both kinds of switch: IEEE everywhere
    try:
        yield
    finally:
        if legacy:
            torch.set_float32_matmul_precision(legacy)
        for b, value in zip(backends, before):  # the legacy call turns a fresh "none" into "ieee"
            if b.fp32_precision != value:
                b.fp32_precision = value

def class_basis(X, variance):
    """Orthonormal basis (D, r) of the principal subspace of [X; -X]: top eigenvectors of X^T X,
    or, with fewer samples than dimensions, of the Gram matrix X X^T (u maps to X^T u / s: no D x D
    matrix). The eigenproblem runs in float64: float32 eigenvectors mix near-equal eigenvalues at
    the variance cut and change predictions. r: the fewest leading eigenvalues that explain
    `variance` of their sum, capped at those above the rounding floor of a float32 product over
    `inner` terms (trace * sqrt(inner) * eps): below it, an eigenvalue is rounding."""
    n, D = X.shape
    if n == 0:
        return X.new_zeros(D, 0)
    gram = n < D
    with ieee_float32():
        product = (X @ X.T if gram else X.T @ X).double()
        if not torch.isfinite(product).all():  # a diverged model's outputs, or their squares
            raise UserError("a layer's outputs are too large or not finite for MASC: the model "
                            "diverged (try a lower --lr, with --overwrite or another --out-dir)")
        ev, vec = torch.linalg.eigh(product)
        ev, vec = ev.flip(0).clamp_min(0), vec.flip(1)
        cum, inner = ev.cumsum(0), D if gram else n
        floor = cum[-1] * math.sqrt(inner) * torch.finfo(torch.float32).eps  # 0 for all-zero rows
        r = min(int((cum < variance * cum[-1]).sum()) + 1, int((ev > floor).sum()))
        basis = vec[:, :r].to(X.dtype)
        return (X.T @ basis) / ev[:r].sqrt().to(X.dtype) if gram else basis

def fit_subspaces(feats, labels, num_classes, variance=0.99):
    """An orthonormal basis (D, r_k) per class of the +-symmetrised layer outputs (Algorithms 2-3);
    a class with no samples, or only all-zero ones, gets an empty one (D, 0), never predicted."""
    return [class_basis(feats[labels == k].float(), variance) for k in range(num_classes)]

def masc_predict(bases, feats, max_floats=2**25):
    """Per row, the class whose subspace makes the smallest angle with it (Algorithm 1), or -1 for
    an all-zero row: cos^2 = ||V_k^T x||^2 / ||x||^2, one product with the concatenated bases per
    chunk of rows, at most max_floats (128 MB) per product (or one row): the bases of a trained
    layer can have tens of thousands of columns in all. Each class's squares are summed by a
    product with a one-hot owner matrix, not index_add_, whose CUDA atomics add in a varying
    order."""
    feats = feats.float()
    dims = torch.tensor([b.shape[1] for b in bases], device=feats.device)
    owner = F.one_hot(torch.repeat_interleave(dims), len(bases)).float()  # (columns, classes)
    stacked = torch.cat(bases, 1)
    chunk = max(1, max_floats // max(1, stacked.shape[1]))
    preds = []
    for start in range(0, len(feats), chunk):
        x = feats[start:start + chunk]
        with ieee_float32():
            energy = (x @ stacked).pow(2) @ owner
        norm2 = x.pow(2).sum(1)
        cos2 = energy / norm2.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        cos2[:, dims == 0] = -1  # empty classes never win
        pred = cos2.argmax(1)
        preds.append(torch.where((norm2 > 0) & (dims > 0).any(), pred, torch.full_like(pred, -1)))
    return torch.cat(preds)

# ----------------------------------------------------------------------------- decoding a model

class Predictions(NamedTuple):  # a layer's MASC predictions for every image
    train: torch.Tensor | None  # None where the training set was not scored
    test: torch.Tensor

def accuracy(pred, labels):  # in float64: float32 stores 1260 / 8000 as 0.1574999988
    return (pred == labels).double().mean().item()

@torch.no_grad()
def predict_and_probe(model, images, batch=1024):
    """The model's predicted classes and every probed layer's outputs (name -> (N, D) float32).
    1024 images at a time bound the activations (AlexNet: 1024 x 4096 per layer)."""
    preds, parts = [], {}
    for start in range(0, len(images), batch):
        taps = {}
        preds.append(model(preprocess(images[start:start + batch]), taps).argmax(1))
        for name, f in taps.items():
            parts.setdefault(name, []).append(f.float())
    return torch.cat(preds), {name: torch.cat(chunks) for name, chunks in parts.items()}

def decode_layers(model, data, y_corrupt, args, desc, score_train=True):
    """MASC of every layer with corrupted- and true-label subspaces: report rows, predictions
    (layer -> kind -> Predictions), and the model's (predictions, features) on train and test.
    score_train=False leaves out MASC's predictions on the training set (None there), which the
    controls and --decode-every do not report (the control at 60,000 images, 2-core CPU: 55 s
    -> 48 s; fitting the subspaces is most of the rest)."""
    (train_pred, train_f), (test_pred, test_f) = (predict_and_probe(model, images)
                                                  for images in (data.train_x, data.test_x))
    y_true, y_test, K = data.train_y, data.test_y, args.num_classes
    same = torch.equal(y_corrupt, y_true)  # p = 0: both kinds are one computation
    rows, preds = [], {}
    for name in tqdm(train_f, desc=desc, leave=False):
        fit_to = lambda labels: fit_subspaces(train_f[name], labels, K, args.variance)
        predict = lambda b: Predictions(masc_predict(b, train_f[name]) if score_train else None,
                                        masc_predict(b, test_f[name]))
        bases = {"corrupt": fit_to(y_corrupt)}
        bases["true"] = bases["corrupt"] if same else fit_to(y_true)
        preds[name] = {"corrupt": predict(bases["corrupt"])}
        preds[name]["true"] = preds[name]["corrupt"] if same else predict(bases["true"])
        corrupt, true = preds[name]["corrupt"], preds[name]["true"]
        on_train = lambda pred, **labels: (
            {key: accuracy(pred.train, y) for key, y in labels.items()} if score_train else {})
        rows.append(dict(
            name=name, dim=train_f[name].shape[1],
            corrupt_subspaces=on_train(corrupt, train_corrupt=y_corrupt, train_true=y_true) | dict(
                test=accuracy(corrupt.test, y_test), dims=[b.shape[1] for b in bases["corrupt"]]),
            true_subspaces=on_train(true, train_true=y_true) | dict(
                test=accuracy(true.test, y_test), dims=[b.shape[1] for b in bases["true"]])))
    return rows, preds, (train_pred, train_f), (test_pred, test_f)

def best_layers(rows):
    best = max(rows, key=lambda r: r["corrupt_subspaces"]["test"])
    best_true = max(rows, key=lambda r: r["true_subspaces"]["test"])
    return dict(layer=best["name"], masc_test=best["corrupt_subspaces"]["test"],
                layer_true=best_true["name"], masc_test_true=best_true["true_subspaces"]["test"])

# ----------------------------------------------------------------------------- relabel, retrain

def relabel(test_pred, data, y_corrupt, preds, seed):
    """Section 3.3 up to retraining: split the test set 80/20; per subspace kind, the layer whose
    MASC is best on the 20% relabels every training image (rows MASC cannot place keep theirs).
    test_pred: the model's test predictions. Returns the report, new labels per kind, the split."""
    y_true, y_test, n_test = data.train_y, data.test_y, len(data.test_y)
    perm = torch.randperm(n_test, generator=named_generator("cpu", "split", seed))
    perm = perm.to(y_test.device)
    val_idx, eval_idx = perm[:n_test // 5], perm[n_test // 5:]  # the paper's 20% / 80%
    wrong = y_corrupt != y_true
    out = dict(val_size=len(val_idx), test_size=len(eval_idx),
               before_test=accuracy(test_pred[eval_idx], y_test[eval_idx]))
    new_labels = {}
    for kind in ("corrupt", "true"):
        on_val = lambda name: accuracy(preds[name][kind].test[val_idx], y_test[val_idx])
        best = max(preds, key=on_val)
        chosen = preds[best][kind]
        labels = torch.where(chosen.train >= 0, chosen.train, y_corrupt)  # -1 rows keep theirs
        fixed = accuracy(labels[wrong], y_true[wrong]) if wrong.any() else None
        broken = (labels != y_true)[~wrong].double().mean().item() if not wrong.all() else None
        out[f"{kind}_subspaces"] = dict(
            layer=best, masc_test=accuracy(chosen.test[eval_idx], y_test[eval_idx]),
            relabel_correct=accuracy(labels, y_true), corrupt_correct=accuracy(y_corrupt, y_true),
            fixed=fixed, broken=broken)
        new_labels[kind] = labels
    return out, new_labels, val_idx, eval_idx

@dataclass(eq=False, kw_only=True)
class Retraining(Job):  # a memorized model trained further on a relabelling (Section 3.3)
    val_idx: torch.Tensor  # the 20% of the test set it early-stops on
    eval_idx: torch.Tensor  # the 80% it is reported on
    report: dict  # the results.json entry it completes
    best_val: float = -1.0  # the best validation accuracy so far,
    best_epoch: int = 0  # and its epoch: the test accuracy reported is that epoch's

def retrain_all(jobs, template, data, args):
    """Section 3.3's retrainings, together: from the memorized weights with a fresh optimizer,
    early-stopped on the job's 20% of the test set (--patience 0: all --retrain-epochs, as Figure
    31). Reports the 80% part's accuracy at the kept epoch (the best on validation; with
    --patience 0, the last) and at every epoch; the weights themselves are not saved."""
    def after_epoch(job, acc, pred):
        val = accuracy(pred[job.val_idx], data.test_y[job.val_idx])
        job.history["train_acc"].append(acc)
        job.history.setdefault("val_acc", []).append(val)
        job.history["test_acc"].append(accuracy(pred[job.eval_idx], data.test_y[job.eval_idx]))
        epochs = len(job.history["train_acc"])
        if args.patience == 0 or val > job.best_val:
            job.best_val, job.best_epoch = val, epochs
        waited_enough = args.patience > 0 and epochs - job.best_epoch >= args.patience
        return waited_enough or epochs >= args.retrain_epochs

    train_together(jobs, template, data, args, after_epoch, "retrain")
    for job in jobs:
        job.report.update(after_test=job.history["test_acc"][job.best_epoch - 1],
                          epochs=len(job.history["train_acc"]), kept_epoch=job.best_epoch,
                          test_per_epoch=job.history["test_acc"],
                          val_per_epoch=job.history["val_acc"])

# ----------------------------------------------------------------------------- controls

def latent_memorization(train_f, test_f, data, args, seed):
    """MASC of the p=0 model from labels corrupted after training (paper, supplement 6)."""
    out = []
    for q in args.posthoc_corruption:
        y_q = corrupt_labels(data.train_y, q, args.num_classes, ("posthoc", seed, q))
        layers = []
        for name in train_f:
            bases = fit_subspaces(train_f[name], y_q, args.num_classes, args.variance)
            pred = masc_predict(bases, train_f[name])
            layers.append(dict(name=name, train_corrupt=accuracy(pred, y_q),
                               train_true=accuracy(pred, data.train_y),
                               test=accuracy(masc_predict(bases, test_f[name]), data.test_y),
                               dims=[b.shape[1] for b in bases]))
        out.append(dict(corruption=q, fraction_changed=1 - accuracy(y_q, data.train_y),
                        layers=layers))
    return out

def init_control(data, y_corrupt, args, seed, posthoc):
    """MASC on the same architecture at its random initialisation (the paper's control) and, with
    posthoc, its fit to the post-hoc labels (ours: what a network that learned nothing fits)."""
    model = build_model(args.model, DATASETS[args.dataset].shape, args.num_classes, seed)
    rows, _, (_, train_f), (_, test_f) = decode_layers(
        model.to(data.train_x.device), data, y_corrupt, args, "MASC at init", score_train=False)
    # dims: whether a random layer's class subspaces collapse, which accuracy alone hides
    control = [dict(name=r["name"], corrupt_subspaces=r["corrupt_subspaces"],
                    true_subspaces=r["true_subspaces"]) for r in rows]  # each: test, dims
    return control, latent_memorization(train_f, test_f, data, args, seed) if posthoc else None

# ----------------------------------------------------------------------------- datasets

def save_atomically(path, obj, shared=False):  # JSON or torch.save, via a temporary file
    """A killed run never leaves half a file. shared: a file that other runs may write at the same
    time (the dataset cache, from several hosts) gets a temporary file of its own; a run folder's
    files, which its lock guards, use path.tmp, so a killed write's leftover is overwritten."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp" if shared else path + ".tmp"  # unique across hosts
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            if path.endswith(".json"):
                f.write(json.dumps(obj, indent=2).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash never leaves an empty file
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C too: no temporary file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):  # a full disk: torch.save's RuntimeError
            raise
        raise UserError(f"could not write {path} ({first_line(e)}); "
                        "any previous version is intact")

class RunFolderLock:
    """One process per run folder: two (a command started twice, a requeued job beside the live
    one) would interleave their checkpoints. A POSIX record lock (os.lockf): the kernel drops it
    when its process ends, however it ends, so a killed run leaves no stale lock (on a network
    disk, a crashed machine's lasts until the server notices)."""

    def __init__(self, out_dir):
        self.out_dir = out_dir or "."  # "": the current folder
        self.file, self.taken, self.absent_at_start = None, False, False

    def take(self, create=False):  # create: make the folder, else only lock one that exists
        if self.taken:
            return
        if not os.path.isdir(self.out_dir):
            self.absent_at_start = True  # made by this command, unless another gets there first
            if not create:
                return
        path = os.path.join(self.out_dir, "run.lock")
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            if hasattr(os, "lockf"):  # not on Windows
                self.file = open(path, "a")  # "a": a record lock needs a file open for writing
                os.lockf(self.file.fileno(), os.F_TLOCK, 0)
        except OSError as e:
            if self.file is None:
                raise UserError(f"could not write {path} ({first_line(e)})")
            if isinstance(e, (BlockingIOError, PermissionError)):  # EAGAIN or EACCES: held
                self.release()
                raise UserError(f"another process is running in {self.out_dir} (it holds "
                                f"{path}): let it finish or stop it, or use another --out-dir; "
                                "if none runs (a crashed machine's lock on a network disk), "
                                "delete run.lock")
            tqdm.write(f"warning: could not lock {path} ({first_line(e)}): make sure no other "
                       "process uses this folder", file=sys.stderr)  # a file system without locks
        self.taken = True
        if self.absent_at_start and os.path.exists(os.path.join(self.out_dir, "config.json")):
            self.release()  # another command started a run there while this one was loading
            raise UserError(f"another command started a run in {self.out_dir} while this one "
                            "was loading: run it again (it resumes that run or says why not)")

    def release(self):  # closing the file drops the lock
        if self.file:
            self.file.close()
        self.file, self.taken = None, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

def load_torchvision(name, root):  # (train uint8 NCHW, labels), (test ...), downloaded if missing
    files, cifar = "(the four *-ubyte.gz files)", "https://www.cs.toronto.edu/~kriz/cifar.html"
    cls, folder, url = {
        "mnist": (torchvision.datasets.MNIST, "MNIST/raw",
                  f"https://ossci-datasets.s3.amazonaws.com/mnist/ {files}"),
        "fashionmnist": (torchvision.datasets.FashionMNIST, "FashionMNIST/raw",
                         f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ {files}"),
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", cifar),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python", cifar),
    }[name]
    out = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:
            where = os.path.join(root, folder)
            raise UserError(f"{name} in {where} is missing or damaged and could not be downloaded "
                            f"({first_line(e)}); download it from {url} and "
                            f"put it in {where}")
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # NHW, NHWC -> NCHW
        out.append((x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)))
    return out

def refuse_stray_folders(train, classes):  # a class is a WordNet id: n01443537
    stray = [c for c in classes if not (c[:1] == "n" and c[1:].isdigit())]
    if stray:  # .ipynb_checkpoints, say, would be class 0 and shift every class after it
        raise UserError(f"{train} holds folders that are not Tiny ImageNet classes "
                        f"({', '.join(stray[:3])}): move them out")

def load_tinyimagenet(root):
    """tiny-imagenet-200 (train/<wnid>/images, val/val_annotations.txt), decoded once into a
    uint8 cache. The classes are the sorted wnids, the training images sorted by file name."""
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    base = os.path.join(root, "tiny-imagenet-200")
    cache = os.path.join(base, "uint8_cache.pt")
    if os.path.exists(cache):
        try:
            c = torch.load(cache, weights_only=True)
            return (c["train_x"], c["train_y"]), (c["val_x"], c["val_y"])
        except Exception as e:
            raise UserError(f"{cache} is unreadable ({type(e).__name__}); delete it to decode "
                            "the images again")
    if not os.path.isdir(base):
        try:
            torchvision.datasets.utils.download_and_extract_archive(url, root)
        except Exception as e:
            raise UserError(f"tinyimagenet not found in {base} and could not be downloaded "
                            f"({first_line(e)}); download {url} and unzip it into {root}/")

    def decode(items):
        images = torch.empty(len(items), 3, 64, 64, dtype=torch.uint8)
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders
            warnings.simplefilter("ignore", DeprecationWarning)
            for n, (path, _) in enumerate(tqdm(items, desc="decoding Tiny ImageNet", leave=False)):
                img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
                resize = img.shape[-2:] != (64, 64)  # RGB mode: grayscale JPEGs get 3 channels
                images[n] = v2.functional.resize(img, [64, 64], antialias=True) if resize else img
        return images, torch.tensor([y for _, y in items], dtype=torch.long)

    try:  # ImageFolder walks train/<wnid>/ down into its images/ folder, in sorted order
        train = torchvision.datasets.ImageFolder(os.path.join(base, "train"))
        refuse_stray_folders(os.path.join(base, "train"), train.classes)
        with open(os.path.join(base, "val", "val_annotations.txt")) as f:
            val = [(os.path.join(base, "val", "images", parts[0]), train.class_to_idx[parts[1]])
                   for parts in (line.split("\t") for line in f if line.strip())]
        (tx, ty), (vx, vy) = decode(train.samples), decode(val)
    except (OSError, KeyError, IndexError, RuntimeError) as e:  # RuntimeError: a bad image
        raise UserError(f"Tiny ImageNet in {base} is incomplete ({first_line(e)}); expected the "
                        "tiny-imagenet-200 archive layout")
    try:
        save_atomically(cache, {"train_x": tx, "train_y": ty, "val_x": vx, "val_y": vy},
                        shared=True)  # a job array's first runs all decode and write it
    except UserError as e:  # a read-only dataset folder (shared storage): not fatal
        tqdm.write(f"warning: {e}; the images are decoded again next time", file=sys.stderr)
    return (tx, ty), (vx, vy)

def balanced_subset(labels, size, seed):
    """Sorted indices of `size` random training images, size // K per class and one more for size
    mod K random classes: the same subset for every degree and run of a command."""
    g = named_generator("cpu", "train-size", seed)
    counts = torch.bincount(labels)
    if size < len(counts):  # MASC would have empty classes, and the subset no balance
        raise UserError(f"--train-size {size} is below the {len(counts)} classes")
    if size > len(counts) * counts.min().item():
        raise UserError(f"--train-size {size} exceeds {len(counts)} classes x "
                        f"{counts.min().item()} images of the smallest class")
    order = torch.randperm(len(labels), generator=g)
    by_class = order[torch.argsort(labels[order], stable=True)]  # by class, random within each
    rank = torch.arange(len(labels)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    class_order = torch.randperm(len(counts), generator=g)  # which classes get the remainder
    key = rank * len(counts) + class_order[labels[by_class]]
    return by_class[torch.argsort(key)[:size]].sort().values

def check_data(name, splits):
    """Files that parse but do not hold the dataset (a header's wrong size, a label out of range,
    labels not one per image) would end in a traceback deep in a run, after its folder is written:
    refused before. Each set needs 5 images at least (the test set's 20% for early stopping)."""
    spec = DATASETS[name]
    for split, (x, y) in zip(("training", "test"), splits):
        problem = (f"its images are {tuple(x.shape[1:])}, not {spec.shape}"
                   if tuple(x.shape[1:]) != spec.shape
                   else f"{len(x)} images but {len(y)} labels" if len(x) != len(y)
                   else f"only {len(y)} images" if len(y) < 5
                   else f"labels outside 0-{spec.classes - 1}"
                   if y.min() < 0 or y.max() >= spec.classes else None)
        if problem:
            raise UserError(f"the {name} {split} set does not hold {name}: {problem}")

def load_data(args):
    (train_x, train_y), (test_x, test_y) = (
        load_tinyimagenet(args.data_dir) if args.dataset == "tinyimagenet"
        else load_torchvision(args.dataset, args.data_dir))
    check_data(args.dataset, [(train_x, train_y), (test_x, test_y)])
    if args.train_size:
        keep = balanced_subset(train_y, args.train_size, args.seed)
        train_x, train_y = train_x[keep], train_y[keep]
    return Data(*(t.to(args.device) for t in (train_x, train_y, test_x, test_y)))

# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_KEYS = ("dataset", "model", "optimizer", "lr", "batch_size", "epochs", "stop_acc",
                   "seed", "train_size", "decode_every")

def checkpoint_key(args, p, run, labels, test_labels):
    """What a saved model must match to be reused: its settings and the labels it was trained and
    tested on (another --data-dir's differ). --decode-every's dynamics are recorded in training."""
    both = torch.cat([labels, test_labels]).cpu().numpy().tobytes()
    return {k: getattr(args, k) for k in CHECKPOINT_KEYS} | {
        "corruption": p, "run": run, "labels_sha256": hashlib.sha256(both).hexdigest()[:16],
        "decode_variance": args.variance if args.decode_every else None}

def in_progress_path(path):  # a model still in training: models/p0.4_run1.partial.pt
    return path[:-len(".pt")] + ".partial.pt"

def fits_template(ckpt, template, partial, optimizer):  # weights (and moments) of its shapes
    shapes = {n: t.shape for n, t in template.state_dict().items()}
    if {n: t.shape for n, t in ckpt["model"].items()} != shapes:
        return False
    slots = OPTIMIZER_SLOTS[optimizer] if partial else ()
    return all(ckpt["optimizer"]["buffers"][n][s].shape == shapes[n]
               for n, _ in template.named_parameters() for s in slots)

def load_model_checkpoint(path, key, overwrite, device, template):
    """The checkpoint (on device) if made with key; None if absent, or other and overwrite."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        saved_key = ckpt["key"]
        if not isinstance(saved_key, dict):
            raise TypeError
        partial = path.endswith(".partial.pt")
        resume = ("optimizer", "gen", "device") if partial else ("labels",)
        complete = {"model", "history", *resume} <= set(ckpt)
        complete = complete and (not partial or {"step", "buffers"} <= set(ckpt["optimizer"]))
        # other settings are refused as such, below; a file of another version of the model
        # under the same key, as unreadable rather than with a traceback
        if saved_key == key and not (complete and fits_template(ckpt, template, partial,
                                                                key["optimizer"])):
            raise KeyError  # the error below names only the type
    except Exception as e:
        if overwrite:  # trained again
            return None
        raise UserError(f"{path} is unreadable ({type(e).__name__}); move it away or --overwrite")
    if saved_key == key:
        return ckpt
    if overwrite:
        return None
    diff = ", ".join(f"{k}: {saved_key.get(k)!r} -> {v!r}" for k, v in key.items()
                     if saved_key.get(k) != v)
    raise UserError(f"{path} was trained with other settings ({diff}); pass --overwrite or use "
                    "another --out-dir")

def keep_other_results(out_dir, config):
    """A command writes its own results.json; another command's (other degrees, other decoding
    flags) is first renamed results.<k>.json, so that no finished result is lost."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            earlier = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # unreadable: kept too
        earlier = None
    # where and how it ran, not what it computed
    ignored = ("device", "data_dir", "out_dir", "overwrite", "models_at_once", "save_every")
    if isinstance(earlier, dict) and all(earlier.get(k) == v for k, v in config.items()
                                         if k not in ignored):
        return  # the same command, resumed or run again
    k = 1
    while os.path.exists(os.path.join(out_dir, f"results.{k}.json")):
        k += 1
    try:
        os.replace(path, os.path.join(out_dir, f"results.{k}.json"))
    except OSError as e:
        raise UserError(f"could not keep {path} as results.{k}.json ({first_line(e)})")
    tqdm.write(f"kept the results.json of another command as results.{k}.json")

def model_from(template, state):
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model

# ----------------------------------------------------------------------------- report

def text_table(lines):
    widths = [max(len(line[j]) for line in lines) for j in range(len(lines[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines)

def dynamics_table(runs):
    """With --decode-every: per model, the epoch and value of the MASC peak (corrupted and true
    subspaces) and of the model's own test accuracy (what early stopping would keep)."""
    lines = [["p", "run", "MASC peak (corrupt subsp.)", "MASC peak (true subsp.)", "model peak"]]
    for r in (r for r in runs if r["history"].get("decode")):
        decoded = r["history"]["decode"]
        peak = lambda key: max(decoded, key=lambda d: d[key])
        c, t = peak("masc_test"), peak("masc_test_true")
        lines.append([f"{r['corruption']:g}", str(r["run"]),
                      f"{c['masc_test']:.3f} at epoch {c['epoch']}",
                      f"{t['masc_test_true']:.3f} at epoch {t['epoch']}",
                      f"{r['early_stop_test_acc']:.3f} at epoch {r['early_stop_epoch']}"])
    return text_table(lines)

def posthoc_table(runs):
    """With --posthoc-corruption (supplement 6): per p=0 run and post-hoc degree q, each layer's
    MASC accuracy on the post-hoc labels it was fitted to (latent memorization; chance is 1/K),
    and in brackets the same layer's at initialisation."""
    rows = [(r["run"], q, at_init) for r in runs if r["posthoc"]
            for q, at_init in zip(r["posthoc"], r["posthoc_init_control"])]
    names = [layer["name"] for layer in rows[0][1]["layers"]] if rows else []
    lines = [["posthoc q", "run", "labels changed"] + [f"{name} (init)" for name in names]]
    for run, q, at_init in rows:
        lines.append([f"{q['corruption']:g}", str(run), f"{q['fraction_changed']:.3f}"]
                     + [f"{a['train_corrupt']:.3f} ({b['train_corrupt']:.3f})"
                        for a, b in zip(q["layers"], at_init["layers"])])
    return text_table(lines)

def best_of_mean_curve(runs, kind):
    """The authors' aggregation for Table 1: average each layer's MASC test accuracy over the runs,
    then take the best layer. Ours (the other columns) averages each run's best layer."""
    per_layer = zip(*(r["layers"] for r in runs))
    return max(sum(layer[kind]["test"] for layer in same) / len(runs) for same in per_layer)

def summary_table(runs, corruptions):
    """Per corruption degree, mean [min, max] over runs, shaped like the paper's Table 1."""
    def stat(values):  # of the values that exist
        values = [v for v in values if v is not None]
        mean = f"{sum(values) / len(values):.3f}" if values else "-"
        return mean if len(values) < 2 else f"{mean} [{min(values):.3f},{max(values):.3f}]"
    retrained = lambda kind: lambda r: r["retrain"] and r["retrain"][kind]["after_test"]
    cols = [("model test", lambda r: r["model_acc"]["test"]),
            ("MASC test (corrupt subsp.)", lambda r: r["best_masc_test"]),
            ("improvement %", lambda r: r["improvement_pct"]),
            ("MASC test (true subsp.)", lambda r: r["best_masc_test_true"]),
            ("early-stop test", lambda r: r["early_stop_test_acc"]),
            ("retrained (corrupt)", retrained("corrupt_subspaces")),
            ("retrained (true)", retrained("true_subspaces"))]
    lines = [["p", "best layer"] + [c for c, _ in cols]
             + ["authors' aggregation (corrupt/true, improvement %)"]]
    for p in corruptions:
        rows = [r for r in runs if r["corruption"] == p]
        layers = "/".join(sorted({r["best_layer"] for r in rows}))
        corrupt, true = (best_of_mean_curve(rows, kind)
                         for kind in ("corrupt_subspaces", "true_subspaces"))
        model = sum(r["model_acc"]["test"] for r in rows) / len(rows)  # Table 1: of the means
        gain = f"{100 * (corrupt / model - 1):.1f}" if model > 0 else "-"
        authors = f"{corrupt:.3f}/{true:.3f}, {gain}"
        lines.append([f"{p:g}", layers] + [stat([f(r) for r in rows]) for _, f in cols]
                     + [authors])
    return text_table(lines)

def script_sha256():  # which version of this file made a result, once copied elsewhere
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()

# ----------------------------------------------------------------------------- the experiment

@dataclass(eq=False, kw_only=True)
class Memorizing(Job):  # a model trained on corrupted labels, checkpointed as it goes
    path: str  # its finished checkpoint (see in_progress_path)
    key: dict  # the settings its checkpoint must match

def model_path(out_dir, p, run):  # a finished model: models/p0.4_run1.pt
    return os.path.join(out_dir, "models", f"p{p:g}_run{run}.pt")

def memorization_job(p, run, template, data, args):
    """(model, labels, history) of a finished (p, run) model, else its Job, fresh or resumed."""
    dev, shape, K = data.train_x.device, DATASETS[args.dataset].shape, args.num_classes
    seed = args.seed + run
    path = model_path(args.out_dir, p, run)
    labels = corrupt_labels(data.train_y, p, K, seed)
    key = checkpoint_key(args, p, run, labels, data.test_y)
    done = load_model_checkpoint(path, key, args.overwrite, dev, template)
    if done:
        tqdm.write(f"p={p:g} run {run}: reusing {path}")
        return model_from(template, done["model"]), done["labels"], done["history"]
    initial = build_model(args.model, shape, K, seed).to(dev).state_dict()
    job = Memorizing(f"p={p:g} run {run}", initial, labels, named_generator(dev, "order", seed),
                     path=path, key=key)
    partial = in_progress_path(path)
    resumed = load_model_checkpoint(partial, key, args.overwrite, dev, template)
    was = resumed and resumed["device"]  # a CPU generator cannot continue a CUDA one, nor back
    if resumed and was != dev.type and not args.overwrite:  # with it, the model trains afresh
        raise UserError(f"{partial} was written on {was}: resume it with --device "
                        f"{was}, or pass --overwrite to train that model again")
    if resumed and was == dev.type:
        job.state, job.opt = resumed["model"], resumed["optimizer"]
        job.history = resumed["history"]
        job.gen.set_state(resumed["gen"].cpu())  # a generator's state is a CPU byte tensor
        tqdm.write(f"{job.name}: resuming from epoch {len(job.history['train_acc'])}")
    return job

def memorize(prepared, template, data, args):
    """prepared: {(p, run): memorization_job(...)}, a Job or an already finished model. Trains
    every Job together, to --stop-acc or --epochs. Returns {(p, run): (model, labels, history)}."""
    jobs = {spec: job for spec, job in prepared.items() if isinstance(job, Memorizing)}
    for p, run in prepared.keys() - jobs.keys():  # finished, and its in-progress file is left
        # by a command stopped between the two writes: removed now the folder may change
        pathlib.Path(in_progress_path(model_path(args.out_dir, p, run))).unlink(missing_ok=True)

    def after_epoch(job, acc, pred):
        history = job.history
        history["train_acc"].append(acc)
        history["test_acc"].append(accuracy(pred, data.test_y))
        epoch = len(history["train_acc"])
        if args.decode_every and epoch % args.decode_every == 0:  # decoding during training
            rows = decode_layers(model_from(template, job.state), data, job.labels, args,
                                 "MASC during training", score_train=False)[0]
            per_layer = [dict(name=r["name"], masc_test=r["corrupt_subspaces"]["test"],
                              masc_test_true=r["true_subspaces"]["test"]) for r in rows]
            history.setdefault("decode", []).append(dict(
                epoch=epoch, model_test=history["test_acc"][-1], **best_layers(rows),
                layers=per_layer))
        finished = acc >= args.stop_acc or epoch >= args.epochs
        saved = {"key": job.key, "model": job.state, "history": history}
        if finished:
            how = "reached" if acc >= args.stop_acc else "still below"
            tqdm.write(f"{job.name}: training accuracy {acc:.4f} {how} --stop-acc "
                       f"{args.stop_acc:g} at epoch {epoch}; stopped")
            # the finished model replaces its in-progress checkpoint; a later command reuses it
            save_atomically(job.path, saved | {"labels": job.labels.cpu()})
            pathlib.Path(in_progress_path(job.path)).unlink(missing_ok=True)
        elif epoch % args.save_every == 0:  # all a resumed model needs to continue exactly
            save_atomically(in_progress_path(job.path), saved | {
                "optimizer": job.opt, "gen": job.gen.get_state(), "device": job.gen.device.type})
        return finished

    train_together(list(jobs.values()), template, data, args, after_epoch, "memorize")
    return prepared | {spec: (model_from(template, job.state), job.labels, job.history)
                       for spec, job in jobs.items()}

def decode_run(args, data, p, run, model, y_corrupt, history):
    """Decode every layer of a memorized model, the controls, and the relabelling: one entry of
    results.json, and its two retrainings (trained later, all together)."""
    seed = args.seed + run
    layers, preds, (train_pred, train_f), (test_pred, test_f) = decode_layers(
        model, data, y_corrupt, args, f"MASC p={p:g} run {run}")
    model_acc = dict(train_corrupt=accuracy(train_pred, y_corrupt),
                     train_true=accuracy(train_pred, data.train_y),
                     test=accuracy(test_pred, data.test_y))
    best = best_layers(layers)
    masc, masc_true = best["masc_test"], best["masc_test_true"]
    gain = lambda acc: (100 * (acc - model_acc["test"]) / model_acc["test"]
                        if model_acc["test"] > 0 else None)
    test_acc = history["test_acc"]
    entry = dict(corruption=p, run=run, seed=seed,
                 fraction_changed=1 - accuracy(y_corrupt, data.train_y),
                 epochs_trained=len(history["train_acc"]),
                 reached_stop_acc=history["train_acc"][-1] >= args.stop_acc,
                 model_acc=model_acc, layers=layers, best_layer=best["layer"], best_masc_test=masc,
                 improvement_pct=gain(masc), best_layer_true=best["layer_true"],
                 best_masc_test_true=masc_true, improvement_pct_true=gain(masc_true),
                 early_stop_test_acc=max(test_acc),
                 early_stop_epoch=1 + test_acc.index(max(test_acc)), history=history)
    posthoc = p == 0 and bool(args.posthoc_corruption)
    entry["posthoc"] = latent_memorization(train_f, test_f, data, args, seed) if posthoc else None
    del train_f, test_f  # the features of every layer: free them before the init control's
    entry["init_control"], entry["posthoc_init_control"] = init_control(data, y_corrupt, args,
                                                                        seed, posthoc)
    entry["retrain"], retrainings = None, []
    if not args.no_retrain:
        entry["retrain"], new_labels, val_idx, eval_idx = relabel(test_pred, data, y_corrupt,
                                                                   preds, seed)
        for kind in ("corrupt", "true"):  # one retraining per kind of subspaces
            retrainings.append(Retraining(
                f"retrain p={p:g} run {run} ({kind} subspaces)", model.state_dict(),
                new_labels[kind], named_generator(data.train_x.device, "retrain", (seed, kind)),
                val_idx=val_idx, eval_idx=eval_idx, report=entry["retrain"][f"{kind}_subspaces"]))
    return entry, retrainings

# ----------------------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's exit status 2, without the usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)

class ShowDefaults(argparse.HelpFormatter):  # --help: each default its help does not give
    def _get_help_string(self, action):
        d = action.default
        if "default" in action.help.lower() or d is False or d is argparse.SUPPRESS:  # or a switch
            return action.help
        if isinstance(d, list):  # as typed: 0.2,0.8
            d = ",".join(map(str, d)) or None
        return f"{action.help} (default: {'none' if d is None else d})"

def bounded(kind, low, high=math.inf, open_low=False):  # in [low, high], or (low, high]
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}")
        finite = kind is int or math.isfinite(value)  # inf is no flag's meaning
        if not (finite and low <= value <= high) or (open_low and value == low):  # and NaN fails
            wanted = f"{'>' if open_low else '>='} {low}" if high == math.inf else \
                f"in {'(' if open_low else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value + 0  # -0.0 is 0.0: "--corruption 0,-0" repeats a degree
    return parse

def number_list(text):
    values = [bounded(float, 0, 1)(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values

positive_int, positive_float = bounded(int, 1), bounded(float, 0, open_low=True)
fraction = bounded(float, 0, 1, open_low=True)  # of the variance, or a training accuracy

def build_parser():
    p = OneLineParser(description="Corrupted labels, MASC of every layer, relabel and retrain.",
                      formatter_class=ShowDefaults)
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="training dataset")
    g.add_argument("--model", choices=["mlp", "cnn", "alexnet"], default="mlp", help="network")
    g.add_argument("--corruption", type=number_list, default=[0.8],
                   help="corruption degree p, or a comma list of them")
    g.add_argument("--runs", type=bounded(int, 1, 1000), default=1,
                   help="runs per degree (seed + run)")
    g.add_argument("--train-size", type=positive_int, default=None,
                   help="train on N class-balanced training images, drawn from --seed "
                   "(default: all)")
    g.add_argument("--posthoc-corruption", type=number_list, default=[],
                   help="latent memorization: degrees applied after training the p=0 model")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=500, help="maximum training epochs")
    g.add_argument("--stop-acc", type=fraction, default=None,
                   help="stop at this training accuracy (default: the authors', 1.0 for the MLP)")
    g.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                   help="default: the authors' per model (SGD for the MLP, Adam otherwise)")
    g.add_argument("--lr", type=positive_float, default=None, help="default: per model")
    g.add_argument("--batch-size", type=positive_int, default=None, help="default: per model")
    g.add_argument("--save-every", type=positive_int, default=10, help="epochs per checkpoint")
    g.add_argument("--models-at-once", type=positive_int, default=None,
                   help="models trained together as one stacked model (default: all; 1 on a CPU)")
    g.add_argument("--decode-every", type=positive_int, default=None,
                   help="every E epochs, record each model's MASC test accuracy per layer "
                   "(default: never)")
    g = p.add_argument_group("decoding")
    g.add_argument("--variance", type=fraction, default=0.99, help="explained by each subspace")
    g.add_argument("--no-retrain", action="store_true", help="skip relabelling and retraining")
    g.add_argument("--retrain-epochs", type=positive_int, default=30, help="at most")
    g.add_argument("--patience", type=bounded(int, 0), default=3,
                   help="of the retraining; 0: no early stopping, keep the last epoch (Figure 31)")
    g = p.add_argument_group("system")
    g.add_argument("--data-dir", default="data", help="where datasets are (or get downloaded)")
    g.add_argument("--out-dir", default="runs/masc", help="config.json, results.json, models/")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cuda, cuda:N or cpu (default: cuda if available)")
    g.add_argument("--seed", type=bounded(int, -2**63, 2**63 - 1), default=0,
                   help="base seed; run r uses seed + r")
    g.add_argument("--overwrite", action="store_true", help="retrain models of other settings")
    return p

def another_scripts_run(path):  # a readable config.json without keys every run of ours wrote
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return False
    return isinstance(saved, dict) and not {"corruption", "model", "runs"} <= saved.keys()

def check_args(args):  # checks argparse cannot make; defaults that depend on other flags
    tf32_forced = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") not in ("", "0")
    if tf32_forced and args.device.startswith("cuda"):  # no flag can undo it
        raise UserError("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE makes every CUDA product TF32, which "
                        "MASC's float32 rank floor does not allow: unset it")
    try:
        torch.empty(1, device=args.device)
    except Exception as e:  # unknown or unavailable device
        raise UserError(f"--device {args.device} is not available ({first_line(e)})")
    if torch.device(args.device).type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: this script runs on cpu or cuda")
    existing = os.path.abspath(os.path.join(args.out_dir, "models"))
    while not os.path.exists(existing):  # the part of the path that exists must be a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):  # models/ too: else found after hours of training
        raise UserError(f"--out-dir {args.out_dir}: {existing} exists and is not a directory")
    if another_scripts_run(os.path.join(args.out_dir, "config.json")):  # --overwrite included:
        raise UserError(f"--out-dir {args.out_dir} holds another script's run (its config.json "
                        "is not this script's): use another --out-dir")  # its files are not ours
    if len({f"{p:g}" for p in args.corruption}) < len(args.corruption):  # one file per degree
        raise UserError(f"--corruption repeats a degree (to 6 digits): {args.corruption}")
    dataset = DATASETS[args.dataset]
    args.num_classes = dataset.classes
    if args.model == "alexnet" and dataset.shape[1:] not in ((32, 32), (64, 64)):
        raise UserError("--model alexnet needs 32x32 or 64x64 images (cifar10, cifar100, "
                        f"tinyimagenet), not {args.dataset}")
    if args.decode_every and args.decode_every > args.epochs:  # it would never decode
        raise UserError(f"--decode-every {args.decode_every} exceeds --epochs {args.epochs}")
    if args.posthoc_corruption and 0.0 not in args.corruption:
        raise UserError("--posthoc-corruption decodes the p=0 model: add 0 to --corruption")
    optimizer, lr, batch_size = model_defaults(args.model, args.dataset)
    args.optimizer = args.optimizer or optimizer
    args.lr, args.batch_size = args.lr or lr, args.batch_size or batch_size
    args.stop_acc = args.stop_acc or (1.0 if args.model == "mlp" else dataset.stop_acc)
    # on a CPU, stacked models train no faster than one after another (see convolutions_for)
    cpu = torch.device(args.device).type == "cpu"
    args.models_at_once = args.models_at_once or (1 if cpu else len(args.corruption) * args.runs)

def set_cuda_flags(device):  # the chosen GPU; cuDNN's fastest algorithms for repeated shapes
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True

def run(args, folder):  # folder: the out-dir's RunFolderLock, released by the caller
    check_args(args)
    folder.take()  # before anything in it is loaded (check_args only asked whose it is)
    set_cuda_flags(torch.device(args.device))
    data = load_data(args)
    t0 = time.time()
    specs = [(p, r) for p in args.corruption for r in range(args.runs)]
    shape = DATASETS[args.dataset].shape
    template = build_model(args.model, shape, args.num_classes, args.seed).to(args.device)
    jobs = {spec: memorization_job(*spec, template, data, args) for spec in specs}
    folder.take(create=True)  # before the first write
    # written once every checkpoint was accepted: a refused command leaves the folder as it was
    keep_other_results(args.out_dir, vars(args))
    save_atomically(os.path.join(args.out_dir, "config.json"), vars(args))
    results = {"config": vars(args), "script_sha256": script_sha256(), "runs": []}
    memorized = memorize(jobs, template, data, args)
    del jobs  # their weights and optimizer moments: decoding needs only `memorized`
    if torch.device(args.device).type == "cuda":  # cuSOLVER's handle, made by the first eigh,
        torch.cuda.empty_cache()  # is allocated outside PyTorch's cache, which training filled
    retrainings = []
    for p, r in specs:
        entry, retrain = decode_run(args, data, p, r, *memorized[p, r])
        results["runs"].append(entry)
        retrainings += retrain
        save_atomically(os.path.join(args.out_dir, "results.json"), results)
    retrain_all(retrainings, template, data, args)  # fills each entry's "retrain" reports
    results["seconds"] = round(time.time() - t0, 1)
    save_atomically(os.path.join(args.out_dir, "results.json"), results)
    print(f"{args.model}-{args.dataset}, {args.runs} run(s) per degree, {results['seconds']} s on "
          f"{args.device}")
    print(summary_table(results["runs"], args.corruption))
    if args.decode_every:
        print(dynamics_table(results["runs"]))
    if args.posthoc_corruption:
        print(posthoc_table(results["runs"]))
    print(f"wrote {os.path.join(args.out_dir, 'results.json')}")
    return results

def out_of_memory(error):
    """CUDA's OutOfMemoryError; the RuntimeErrors of a failed allocation in a CUDA kernel launch
    ("CUDA error: out of memory") or a library's handle (cuBLAS, cuSOLVER, cuDNN: ALLOC_FAILED),
    or of the CPU allocator."""
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or any(text in first_line(error)  # not a wrapped error's later lines
                   for text in ("can't allocate memory", "out of memory", "ALLOC_FAILED")))

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with RunFolderLock(args.out_dir) as folder:
            return run(args, folder)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        # on CUDA the default stacks every model at once
        sys.stderr.write(f"error: {first_line(e)}; stack fewer models (--models-at-once), run "
                         "fewer degrees or runs at a time, or free memory, and run the command "
                         "again: it reuses the finished models and resumes the others\n")
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: no traceback, and how to go on
        sys.stderr.write("\ninterrupted: the same command reuses the finished models and resumes "
                         "the others from their last checkpoints\n")
        sys.exit(130)

if __name__ == "__main__":
    main()
