"""
Benign memorization (Anagnostidis et al., "The Curious Case of Benign Memorization", ICLR 2023):
train a ResNet18 (or VGG16) encoder + MLP projector on random labels under heavy augmentation and
mixup; probe every layer with K-NN against the clean and the random labels. With augmentation the
projector memorizes the labels while the encoder's K-NN probe beats its value at initialisation
(benign); without, it falls below (malign). Flags cover the paper's other experiments (README).
Images stay on the device as uint8, augmented in batches with per-image parameters (RandAugment:
per group of 8 images); bf16 and channels_last on CUDA. Each evaluation checkpoints atomically;
the same command resumes (exactly on the CPU; on CUDA to the same random streams).

Usage:
    python benign_memorization.py --dataset cifar10 --epochs 5000   # the paper's setting
    python benign_memorization.py --dataset cifar10 --augment none --mixup 0 \\
        --out-dir runs/no_da                                         # malign control
    python benign_memorization.py --augment fixed:16 --aug-labels random \\
        --out-dir runs/fixed16                                       # Figure 5
"""
import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import pathlib
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2
from tqdm import tqdm


# ----------------------------------------------------------------------------- constants

DATASETS = {"cifar10": (10, 32), "cifar100": (100, 32), "tinyimagenet": (200, 64)}  # classes, size
TRANSFER = ("cifar10", "cifar100", "stl10", "tinyimagenet")  # what --transfer probes (Figure 9)

# The authors' released setting: the defaults of the command line
EPOCHS = 5000  # their default (their README runs 10000)
BATCH_SIZE = 256  # shuffled, last partial batch dropped
LR = 3e-4  # Adam, no schedule, no weight decay
PROJECTOR_WIDTH = 65536  # their README's width: wider projectors probe better (Figure 7)
MIXUP_PROB = 0.8  # a batch is mixed with this probability, lambda ~ Beta(1, 1)
EVAL_EVERY = 50  # epochs between their K-NN probes
KNN_K = 20  # neighbours of their uniform-vote K-NN
IID_ANCHORS, IID_PARTNERS = 1000, 50  # Table 4: s = 1000 anchors, B = 50 partners each
INVARIANCE_IMAGES = 1000  # ours (the paper gives none): 3 forwards of 1000, cheap beside the K-NN

# The paper's "full" augmentation (SimCLR's without blur), drawn per image by --augment online
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's area and aspect ranges
FLIP_P, JITTER_P, GRAY_P = 0.5, 0.8, 0.2  # probabilities of flip, colour jitter, grayscale
BRIGHTNESS = CONTRAST = SATURATION = 0.8  # ColorJitter: a factor uniform in [1 - 0.8, 1 + 0.8]
HUE = 0.2  # ColorJitter: a hue shift uniform in [-0.2, 0.2] turns

# Memory bounds: they keep full-size runs (65,536-d layers of 50,000 images) inside one GPU
KNN_REF_FLOATS = 1 << 26  # a float32 chunk of the K-NN reference: 256 MB
KNN_BLOCK_FLOATS = 1 << 28  # a block of query x reference similarities: 1 GB
KNN_MAX_QUERIES = 4096  # queries per block: also bounds the vote's (queries x classes) counts
FEATURE_MEMORY_FRACTION = 0.5  # of free GPU memory for stored features; the rest: blocks, forward
CPU_FEATURE_BYTES = 4 << 30  # the same budget on the CPU: 4 GB
EXTRACT_BATCH = {"cuda": 1024, "cpu": 256}  # probe forward batch: the stem's activations bound it
RESIZE_BATCH = 1024  # images resized at a time: no float copy of a whole transfer dataset

class UserError(Exception):
    """Bad input or missing data: reported as one line, never a traceback."""

def first_line(error):  # as Python's last traceback line: "KeyError: 'n01443537'", or the type
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__

def named_seed(*keys):  # the high 60 bits of a sha256, as the other two scripts
    return int(hashlib.sha256(repr(keys).encode()).hexdigest()[:15], 16)

def named_generator(device, *keys):  # independent streams never share a sequence
    return torch.Generator(device=device).manual_seed(named_seed(*keys))


# ----------------------------------------------------------------------------- labels

def draw_labels(clean, num_classes, noise, seed):  # a fraction `noise` redrawn, uniformly
    g = named_generator("cpu", "labels", seed)
    if num_classes == "per-sample":
        return torch.randperm(len(clean), generator=g)
    labels = clean.clone()
    chosen = torch.randperm(len(clean), generator=g)[:round(noise * len(clean))]
    labels[chosen] = torch.randint(num_classes, (len(chosen),), generator=g)
    return labels


# ----------------------------------------------------------------------------- augmentation
# Per image as torchvision's RandomResizedCrop, RandomHorizontalFlip, RandomApply([ColorJitter]),
# RandomGrayscale, but batched: an image's random choices are functions of its own uniforms.

CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback
# an image's uniforms, in this order: an area and a ratio per crop try; top, left; flip; jitter
# on; the four jitter factors; a sort key per jitter operation (their random order); grayscale
UNIFORMS_LAYOUT = (CROP_TRIES, CROP_TRIES, 1, 1, 1, 1, 4, 4, 1)
NUM_UNIFORMS = sum(UNIFORMS_LAYOUT)
MASK32 = 0xFFFFFFFF  # the fixed augmentations' hash works on 32-bit values held in int64

# per image: the crop box, flip, whether to jitter, the four jitter factors, their order, grayscale
AugmentParams = collections.namedtuple("AugmentParams", "top left height width flip jitter "
                                       "brightness contrast saturation hue order gray")

def augment_params(u, height, width, scale=CROP_SCALE, ratio=CROP_RATIO):  # u: (B, NUM_UNIFORMS)
    area_u, ratio_u, top_u, left_u, flip_u, jitter_u, factor_u, order_u, gray_u = [
        part.squeeze(1) if part.shape[1] == 1 else part for part in u.split(UNIFORMS_LAYOUT, 1)]
    area = height * width * (scale[0] + (scale[1] - scale[0]) * area_u)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * ratio_u
    w = torch.round(torch.sqrt(area * torch.exp(log_r)))
    h = torch.round(torch.sqrt(area / torch.exp(log_r)))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision's loop
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height  # none fits: torchvision's fallback, largest central crop in range
    fw = width if in_ratio <= ratio[1] else round(height * ratio[1])
    fh = height if in_ratio >= ratio[0] else round(width / ratio[0])
    any_ok = ok.any(1)
    w, h = torch.where(any_ok, w, fw), torch.where(any_ok, h, fh)
    top = torch.where(any_ok, torch.floor(top_u * (height - h + 1)), (height - h) // 2)
    left = torch.where(any_ok, torch.floor(left_u * (width - w + 1)), (width - w) // 2)
    factor = lambda x, s: 1 - s + 2 * s * x  # uniform in [1 - s, 1 + s]
    return AugmentParams(top, left, h, w, flip_u < FLIP_P, jitter_u < JITTER_P,
                         factor(factor_u[:, 0], BRIGHTNESS), factor(factor_u[:, 1], CONTRAST),
                         factor(factor_u[:, 2], SATURATION), -HUE + 2 * HUE * factor_u[:, 3],
                         order_u.argsort(1), gray_u < GRAY_P)

def crop_grid(p, height, width):  # crop box p of a height x width image, resized back to its size
    """Sampled as F.interpolate(align_corners=False) on the crop, clamped to it: torchvision's.
    The output size is the input's: the grid's normalised coordinates divide by it."""
    def axis(start, size, out):
        pos = (torch.arange(out, device=start.device) + 0.5) * (size[:, None] / out) - 0.5
        pos = pos.clamp_min(0).minimum(size[:, None] - 1) + start[:, None]
        return (2 * pos + 1) / out - 1  # to grid_sample's normalised coordinates
    xs = axis(p.left, p.width, width)
    xs = torch.where(p.flip[:, None], xs.flip(1), xs)
    ys = axis(p.top, p.height, height)
    return torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)

def grayscale(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # ITU-R 601 luma

def shift_hue(x, shift):  # rotate the hue of RGB x in [0, 1] by shift (B,) turns, via HSV
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1).values
    s = c / torch.where(v > 0, v, 1.0)
    safe_c = torch.where(c > 0, c, 1.0)
    h = torch.where(v == r, (g - b) / safe_c,
                    torch.where(v == g, 2 + (b - r) / safe_c, 4 + (r - g) / safe_c))
    h = torch.where(c > 0, h, 0.0) / 6 + shift[:, None, None]
    k = (torch.stack([5 + 6 * h, 3 + 6 * h, 1 + 6 * h], 1)) % 6
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1)))

def color_jitter(x, p):  # the four operations in each image's own order, as torchvision
    per_image = lambda mask: mask[:, None, None, None]
    for stage in range(4):
        order = p.order[:, stage]
        op = torch.where(p.jitter, order, -1)  # -1: no operation
        # brightness, contrast, saturation blend with a reference: black, mean gray, gray
        factor = torch.where(op == 0, p.brightness, torch.where(
            op == 1, p.contrast, torch.where(op == 2, p.saturation, 1.0)))
        gray = grayscale(x)
        ref = torch.where(per_image(op == 1), gray.mean((1, 2, 3), keepdim=True), gray)
        ref = torch.where(per_image(op == 0), 0.0, ref)
        f = per_image(factor)
        x = (f * x + (1 - f) * ref).clamp(0, 1)
        x = torch.where(per_image(op == 3), shift_hue(x, p.hue), x)
    return x

def apply_augment(x, p):  # float images x in [0, 1]; crop, resize and flip in one grid_sample
    x = F.grid_sample(x, crop_grid(p, x.shape[-2], x.shape[-1]), mode="bilinear",
                      padding_mode="border", align_corners=False)
    x = color_jitter(x, p)
    return torch.where(p.gray[:, None, None, None], grayscale(x).expand_as(x), x)

def augmented(images, u=None):  # uint8 images as floats in [0, 1], augmented by uniforms u if any
    x = images.float() / 255
    return x if u is None else apply_augment(x, augment_params(u, *x.shape[-2:]))

def mix32(x):  # a hash of 32-bit values in int64 (products stay below 2^63)
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x

def hash_uniforms(stream, image, aug, count):  # the same whatever the batch or its order
    """Uniforms in [0, 1) of fixed augmentation `aug` of `image`: a pure function of the keys."""
    h = mix32((image.long() & MASK32) ^ (stream & MASK32))
    h = mix32((h * 0x27D4EB2D + (aug.long() & MASK32)) & MASK32)
    j = torch.arange(1, count + 1, device=image.device)
    u = mix32((h.unsqueeze(1) * 0x27D4EB2D + j * 0x165667B1) & MASK32)
    return (u >> 8).float() / (1 << 24)  # 24 random bits: exact in float32

def rand_augment(images, strength, group=8):  # the authors' RandAugment: one draw per group
    t = v2.RandAugment(num_ops=int(10 * strength // 3 + 1),
                       magnitude=min(round(100 * strength), 99), num_magnitude_bins=100)
    return torch.cat([t(chunk) for chunk in images.split(group)])


# ----------------------------------------------------------------------------- mixup

def mixup(x, y, prob, u):
    """With probability prob, mix x and y with a permutation of themselves. u: the coin, lambda
    (Beta(1, 1) is uniform), a sort key per image. Unmixed takes lambda = 1: no sync, no branch."""
    lam = torch.where(u[0] < prob, u[1], 1.0)
    perm = u[2:].argsort()
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


# ----------------------------------------------------------------------------- training points

class TrainingSet:
    """Point m is image source[m] with label labels[m], seen through `augment`: "online" (drawn
    afresh at each access), "fixed" (view aug_id[m]), "randaugment" (at `strength`) or "none"."""

    def __init__(self, images, source, labels, classes, augment, aug_id=None, stream=0,
                 strength=None):
        self.images, self.source, self.labels, self.num_classes = images, source, labels, classes
        self.augment, self.aug_id, self.stream, self.strength = augment, aug_id, stream, strength
        # An epoch is as many points as images (or all, if fewer), from a fresh permutation: n*B
        # fixed or S*B i.i.d. points (make_training_set, below) keep the n images' step budget
        # (Section 5.1)
        self.points_per_epoch = min(len(source), len(images))

    def __len__(self):
        return len(self.source)

    def fixed_uniforms(self, idx):
        return hash_uniforms(self.stream, self.source[idx], self.aug_id[idx], NUM_UNIFORMS)

    def view(self, idx):  # as the network must fit them: fixed augmentation if any, else none
        u = None if self.aug_id is None else self.fixed_uniforms(idx)
        return augmented(self.images[self.source[idx]], u)

    def batch(self, idx, online_uniforms=None):  # RandAugment runs here: eager, on uint8 images
        """uint8 images, one-hot targets and the uniforms of the augmentation the step applies."""
        images = self.images[self.source[idx]]
        targets = F.one_hot(self.labels[idx], self.num_classes).float()
        if self.augment == "randaugment":
            return rand_augment(images, self.strength), targets, None
        if self.augment == "fixed":
            return images, targets, self.fixed_uniforms(idx)
        return images, targets, online_uniforms if self.augment == "online" else None

def balanced_anchors(clean, count, seed):
    """Table 4's S anchor images, drawn at random but class-balanced (S // C per class, one more
    for S mod C random classes), so that every class has as many partner images per anchor."""
    if count >= len(clean):
        raise UserError(f"--subset {count} leaves no other training images "
                        f"(the dataset has {len(clean)})")
    g = named_generator("cpu", "anchors", seed)
    order = torch.randperm(len(clean), generator=g)
    by_class = order[torch.argsort(clean[order], stable=True)]  # by class, random within each
    counts = torch.bincount(clean[by_class])
    rank = torch.arange(len(clean)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    class_order = torch.randperm(len(counts), generator=g)  # which classes get the remainder
    key = rank * len(counts) + class_order[clean[by_class]]
    return by_class[torch.argsort(key)[:count]]

def iid_partners(clean, anchors, per_anchor, seed):
    """Table 4: per anchor, B = per_anchor distinct non-anchor images of its class, (S, B), dealt
    cyclically from the class's shuffled pool: an image serves floor/ceil(m B / pool) anchors."""
    g = named_generator("cpu", "iid", seed)
    is_anchor = torch.isin(torch.arange(len(clean)), anchors)
    partners = torch.empty(len(anchors), per_anchor, dtype=torch.long)
    for c in clean[anchors].unique().tolist():
        pool = ((clean == c) & ~is_anchor).nonzero().squeeze(1)
        pool = pool[torch.randperm(len(pool), generator=g)]
        mine = (clean[anchors] == c).nonzero().squeeze(1)
        if len(pool) < per_anchor:
            raise UserError(f"--augment iid:{per_anchor}: class {c} has only {len(pool)} images "
                            f"outside the --subset {len(anchors)} anchors")
        dealt = torch.arange(len(mine) * per_anchor) % len(pool)
        partners[mine] = pool[dealt].view(len(mine), per_anchor)
    return partners

def augment_kind(text):  # (kind, value): B for fixed and iid, s for randaugment, or None
    kind, _, value = text.partition(":")
    return kind, None if not value else float(value) if kind == "randaugment" else int(value)

def make_training_set(args, train, num_classes, device):
    images, clean = train
    per_sample = args.num_classes == "per-sample"  # num_classes is then the image count
    labels = draw_labels(clean, "per-sample" if per_sample else num_classes, args.label_noise,
                         args.seed)
    n = len(clean)
    kind, value = augment_kind(args.augment)
    aug_id = None
    anchors = balanced_anchors(clean, args.subset, args.seed) if args.subset else None
    if kind == "iid":  # Table 4: B same-class partner images stand in for an anchor's views
        partners = iid_partners(clean, anchors, value, args.seed)
        source, point_labels = partners.flatten(), labels[anchors].repeat_interleave(value)
    elif args.subset:  # Table 4 without i.i.d. augmentations: the same anchors alone
        source, point_labels = anchors, labels[anchors]
    elif kind == "fixed":  # Figure 5: point i*B + b is fixed augmentation b of image i
        source = torch.arange(n).repeat_interleave(value)
        aug_id = torch.arange(value, device=device).repeat(n)
        point_labels = labels[source] if args.aug_labels == "same" else draw_labels(
            torch.zeros_like(source), num_classes, 1.0, (args.seed, "per augmentation"))
    else:
        source, point_labels = torch.arange(n), labels
    return TrainingSet(images.to(device), source.to(device), point_labels.to(device), num_classes,
                       "none" if kind == "iid" else kind, aug_id,  # iid: partners as stored
                       stream=named_seed("fixed augmentations", args.seed),
                       strength=value if kind == "randaugment" else None)


# ----------------------------------------------------------------------------- model

def resnet18_stages(stem_stride):  # CIFAR stem: a 3x3 conv (stride 1; 2 for 64x64), no max-pool
    r = torchvision.models.resnet18(weights=None)
    r.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
    # as torchvision initialises its own convs (the default init would move the INIT baseline)
    nn.init.kaiming_normal_(r.conv1.weight, mode="fan_out", nonlinearity="relu")
    stem = ("stem", nn.Sequential(r.conv1, r.bn1, r.relu))
    return [stem] + [(f"layer{i}", getattr(r, f"layer{i}")) for i in range(1, 5)], 512

def vgg16_stages(stem_stride):  # VGG16-BN's conv stack, cut after each of its five max-pools
    features = torchvision.models.vgg16_bn(weights=None).features
    features[0].stride = (stem_stride, stem_stride)
    stages, start = [], 0
    for i, layer in enumerate(features):
        if isinstance(layer, nn.MaxPool2d):
            stages.append((f"block{len(stages) + 1}", features[start:i + 1]))
            start = i + 1
    return stages, 512

class Network(nn.Module):  # stages -> average pool (embedding) -> projector Linear-ReLU-Linear
    def __init__(self, stages, embed_dim, width, num_classes):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.projector = nn.Sequential(nn.Linear(embed_dim, width, bias=False), nn.ReLU(True),
                                       nn.Linear(width, num_classes, bias=False))

    def layer_names(self):
        return ["input", *self.stages, "embedding", "projector", "output"]

    def forward(self, x, taps=None):  # the C-dim output; a dict taps receives every layer, flat
        if taps is not None:
            taps["input"] = x.flatten(1)
        for name, stage in self.stages.items():
            x = stage(x)
            if taps is not None:
                taps[name] = x.flatten(1)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if taps is None:
            return self.projector(x)
        taps["embedding"], taps["projector"] = x, self.projector[:2](x)
        taps["output"] = self.projector[2](taps["projector"])
        return taps["output"]

def build_model(args, num_classes, resolution):
    # initialisation on the CPU, identical on every device; this also seeds the global generator
    # that RandAugment then draws from (its state is in each checkpoint)
    torch.manual_seed(args.seed)
    stride = 1 if resolution <= 32 else 2  # the paper restores stride 2 for 64x64 Tiny ImageNet
    stages, dim = (vgg16_stages if args.arch == "vgg16" else resnet18_stages)(stride)
    return Network(stages, dim, args.projector_width, num_classes)


# ----------------------------------------------------------------------------- training step

def step_uniforms(batch, online, mix, generator, device):
    """A step's random numbers in one draw (per image: online augmentation, mixup partner key; per
    batch: mixup's coin, lambda), outside the compiled step: a resumed run draws the same."""
    per_image = NUM_UNIFORMS * online + mix
    u = torch.rand(batch * per_image + 2 * mix, generator=generator, device=device)
    rows = u[:batch * per_image].view(batch, per_image)
    aug_u = rows[:, :NUM_UNIFORMS] if online else None
    mix_u = torch.cat([u[batch * per_image:], rows[:, -1]]) if mix else None
    return aug_u, mix_u

def compute_loss(out, target, kind):
    out = out.float()  # the loss in float32, whatever the forward's precision
    return F.mse_loss(out, target) if kind == "mse" else F.cross_entropy(out, target)

@dataclass(frozen=True)
class StepSettings:  # fixed for the run
    mixup_prob: float
    loss: str  # "mse" (to the one-hot or mixed target) or "ce"
    bf16: bool  # bf16 autocast of the forward
    channels_last: bool  # NHWC convolutions: faster on CUDA only

def step_loss(model, images, targets, aug_u, mix_u, settings):
    """Augmentation, mixup, forward, loss: a pure function of tensors, so torch.compile makes one
    graph of an eager step's thousand small operators (about 490 in the augmentation)."""
    x = augmented(images, aug_u)
    if mix_u is not None:
        x, targets = mixup(x, targets, settings.mixup_prob, mix_u)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=settings.bf16):
        out = model(x)
    return compute_loss(out, targets, settings.loss)

def finite_weights(model):  # the loss comes before each step: the last one shows in the weights
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())

def train_epoch(model, opt, data, gen, batch_size, step, settings):  # no host sync: loss on device
    dev = data.labels.device
    perm = torch.randperm(len(data), generator=gen, device=dev)
    steps = data.points_per_epoch // batch_size
    loss_sum = torch.zeros((), device=dev)
    for s in range(steps):
        # gen and torch's global generator (RandAugment's) draw in step order: resumes are exact
        aug_u, mix_u = step_uniforms(batch_size, data.augment == "online",
                                     settings.mixup_prob > 0, gen, dev)
        images, targets, aug_u = data.batch(perm[s * batch_size:(s + 1) * batch_size], aug_u)
        loss = step(model, images, targets, aug_u, mix_u, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach()
    return loss_sum / steps


# ----------------------------------------------------------------------------- probes

def mm_out_float32(device):
    """Whether torch.mm(fp16, fp16, out_dtype=torch.float32) runs: CUDA kernels only, and ROCm
    and TunableOp (PYTORCH_TUNABLEOP_ENABLED=1) refuse fp16 in, float32 out."""
    return (device.type == "cuda" and torch.version.hip is None
            and not torch.cuda.tunable.is_enabled())

def similarity_blocks(ref, queries, chunk=None, ref_chunk=None):
    """(start, block): float32 cosine similarities of each chunk of queries to every reference row:
    fp16's spacing near 0.9 (4.9e-4) exceeds the usual gap between the 20th and 21st neighbours
    (about 1e-4). One reference chunk is cast at a time (no 13 GB float32 copy of 50,000 x 65,536);
    CUDA multiplies fp16 straight into float32 (exact products, float32 sums, as after a cast):
    6.6 TB less traffic per evaluation (where mm_out_float32 allows)."""
    n, dim = ref.shape
    ref_chunk = ref_chunk or max(1, KNN_REF_FLOATS // dim)
    chunk = chunk or max(1, min(KNN_MAX_QUERIES, KNN_BLOCK_FLOATS // max(n, 1),
                                KNN_REF_FLOATS // dim))  # the float32 queries: as a ref chunk
    parts = range(0, n, ref_chunk)
    norm = torch.cat([ref[a:a + ref_chunk].float().norm(dim=1) for a in parts])
    inv_norm = norm.clamp_min(1e-12).reciprocal()  # not the queries': 1/|q| keeps a row's order
    half = ref.dtype == queries.dtype and ref.dtype in (torch.float16, torch.bfloat16)
    direct = half and mm_out_float32(ref.device)
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        q = q if direct else q.float()
        block = torch.empty(q.shape[0], n, device=q.device)
        for a in parts:
            r = ref[a:a + ref_chunk]
            block[:, a:a + ref_chunk] = (torch.mm(q, r.T, out_dtype=torch.float32) if direct
                                         else q @ r.float().T)
        yield start, block.mul_(inv_norm)

def vote(sim, labels, k, num_classes):  # top-k majority; ties go to the smallest class (sklearn)
    idx = sim.topk(k, dim=1).indices
    votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    votes.scatter_add_(1, labels[idx], torch.ones_like(idx, dtype=votes.dtype))
    return votes.argmax(1)

def knn_predict(train_feats, train_labels, query_feats, k=KNN_K, chunk=None, ref_chunk=None):
    """Cosine K-NN, uniform majority vote; memory is bounded by the chunks, not the matrices."""
    k, num_classes = min(k, train_feats.shape[0]), int(train_labels.max()) + 1
    return torch.cat([vote(sim, train_labels, k, num_classes) for _, sim in
                      similarity_blocks(train_feats, query_feats, chunk, ref_chunk)])

def knn_noisy(feats, labels, k=KNN_K, groups=None, chunk=None, ref_chunk=None):
    """Training points against each other: leave-one-out predictions (no point votes for its group:
    other views of its image would vote its label) and self-inclusive ones, as scikit-learn's."""
    n, num_classes = feats.shape[0], int(labels.max()) + 1
    groups = torch.arange(n, device=feats.device) if groups is None else groups  # one per point
    loo_k = min(k, n - int(groups.unique(return_counts=True)[1].max()))  # the points left to vote
    loo, own = [], []
    for start, sim in similarity_blocks(feats, feats, chunk, ref_chunk):
        own.append(vote(sim, labels, min(k, n), num_classes))
        same_group = groups[start:start + sim.shape[0], None] == groups[None, :]
        loo.append(vote(sim.masked_fill_(same_group, -float("inf")), labels, loo_k, num_classes))
    return torch.cat(loo), torch.cat(own)

def accuracy(pred, labels):  # in float64: float32 stores 1260 / 8000 as 0.1574999988
    return (pred == labels).double().mean().item()

def normalized_invariance(h_aug1, h_aug2, h_clean):
    """Eq. 2 averaged over points: ||q(T1 x) - q(T2 x)||^2 / mean_{x' != x} ||q(x) - q(x')||^2, via
    sum_j ||q_i - q_j||^2 = m ||q_i||^2 - 2 q_i . sum_j q_j + sum_j ||q_j||^2: exact, O(m D)."""
    m = h_clean.shape[0]
    sq = h_clean.pow(2).sum(1)
    pair_sum = m * sq - 2 * h_clean @ h_clean.sum(0) + sq.sum()
    numerator = (h_aug1 - h_aug2).pow(2).sum(1)
    return (numerator / (pair_sum / (m - 1)).clamp_min(1e-12)).mean().item()  # a constant map: 0

def linear_probe(train_f, train_y, test_f, test_y, steps=100, weight_decay=1e-4):
    """Test accuracy of an L-BFGS logistic regression on standardised features (Appendix A)."""
    train_f, test_f = train_f.float(), test_f.float()
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    x, xt = (train_f - mean) / std, (test_f - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    W = torch.zeros(x.shape[1], classes, device=x.device, requires_grad=True)
    b = torch.zeros(classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, train_y) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return accuracy((xt @ W + b).argmax(1), test_y)

def layer_outputs(model, x, bf16, channels_last):  # the probes' forward pass
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    taps = {}
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        model(x, taps)
    return taps

class Runtime:
    """The run's precision and memory format (the training step's too), and how the probes run:
    bf16 autocast with fp16 features (L2-normalised, so in [-1, 1], where fp16 has 3 more
    mantissa bits than bf16) or float32 throughout; optionally torch.compile'd."""

    def __init__(self, device, bf16, compiled=False):
        self.bf16, self.compiled = bf16, compiled
        self.channels_last = device.type == "cuda"  # NHWC convolutions are faster on CUDA only
        self.feature_dtype = torch.float16 if bf16 else torch.float32
        self.forward = torch.compile(layer_outputs) if compiled else layer_outputs

@torch.no_grad()
def extract(model, count, load, layers, rt, normalize=True, batch=None):
    """Flattened features of `layers` for `count` images; load(a, b) returns float images a..b-1.
    L2-normalised in rt.feature_dtype for the K-NN probes, or raw float32 (normalize=False)."""
    dev = next(model.parameters()).device
    batch = batch or EXTRACT_BATCH[dev.type]  # check_args allows cpu and cuda only
    dtype = rt.feature_dtype if normalize else torch.float32
    out = {}
    for start in range(0, count, batch):
        x = load(start, min(start + batch, count))
        size = len(x)
        if rt.compiled and size < batch:  # one input shape: the compiled forward never recompiles
            x = torch.cat([x, x.new_zeros(batch - size, *x.shape[1:])])  # (eval mode: rows apart)
        taps = rt.forward(model, x, rt.bf16, rt.channels_last)
        for name in layers:
            f = taps[name][:size]
            f = (F.normalize(f.float(), dim=1) if normalize else f).to(dtype)
            if name not in out:
                out[name] = torch.empty(count, f.shape[1], dtype=dtype, device=dev)
            out[name][start:start + size] = f
    return out

def layer_groups(dims, count, budget_bytes, bytes_per_value):  # each group's features in budget
    groups, used = [[]], 0
    for name, dim in dims.items():
        size = dim * count * bytes_per_value
        if groups[-1] and used + size > budget_bytes:
            groups, used = groups + [[]], 0
        groups[-1].append(name)
        used += size
    return groups

def probe_budget(device):  # bytes for the stored features of one group of layers
    if device.type != "cuda":
        return CPU_FEATURE_BYTES
    # blocks PyTorch caches after the last evaluation are free to it, though not to the driver
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(FEATURE_MEMORY_FRACTION * (torch.cuda.mem_get_info(device)[0] + cached))

def layer_dims(model, resolution):
    x = torch.zeros(2, 3, resolution, resolution, device=next(model.parameters()).device)
    taps = layer_outputs(model, x, False, False)  # shapes only: eager, float32
    return {name: taps[name].shape[1] for name in model.layer_names()}

def from_uint8(images):
    return lambda a, b: images[a:b].float().div_(255)

@dataclass
class ProbeSet:  # what the probes look at, fixed for the whole run
    train_x: torch.Tensor  # clean training images (uint8): the K-NN's labelled references
    train_clean: torch.Tensor  # their true labels
    test_x: torch.Tensor  # test images: the K-NN's queries
    test_clean: torch.Tensor
    data: TrainingSet  # the training points, for the memorization probes
    clean_classes: int  # classes of the true labels (test_acc needs as many outputs)
    mem_idx: torch.Tensor  # the probed training points
    mem_is_train: bool  # point mem_idx[i] shows image train_x[i] as stored: reuse its features
    mem_labels: torch.Tensor  # their training labels
    noisy_probe: bool  # False with one class per image: its noisy K-NN is undefined
    inv_x: torch.Tensor = None  # images of the invariance measure (None: not measured)
    inv_u1: torch.Tensor = None  # the uniforms of each image's two fixed augmentations
    inv_u2: torch.Tensor = None

def invariance(model, ps, dims, rt):  # Eq. 2, every layer, two fixed augmentations per image
    x = ps.inv_x
    view = lambda u: lambda a, b: augmented(x[a:b], u[a:b])
    loads = [from_uint8(x), view(ps.inv_u1), view(ps.inv_u2)]
    out = {}
    for group in layer_groups(dims, 3 * len(x), probe_budget(x.device), 4):  # 4: float32 bytes
        clean, a1, a2 = (extract(model, len(x), load, group, rt, normalize=False)
                         for load in loads)
        out.update({name: normalized_invariance(a1[name], a2[name], clean[name])
                    for name in group})
    return out

@torch.no_grad()
def probe(model, ps, args, rt, linear):
    """Every layer's K-NN clean (clean training images -> test) and noisy (training points, their
    labels); train and test accuracy; linear probe if asked; invariance. Noisy probes are null
    with one class per image: a unique label never wins with its point left out, always with it."""
    model.eval()
    dims = layer_dims(model, ps.train_x.shape[-1])
    loads = {"train": (len(ps.train_x), from_uint8(ps.train_x)),
             "test": (len(ps.test_x), from_uint8(ps.test_x))}
    if not ps.mem_is_train:
        loads["mem"] = (len(ps.mem_idx), lambda a, b: ps.data.view(ps.mem_idx[a:b]))
    count = sum(c for c, _ in loads.values())
    result = dict(train_acc=None, test_acc=None, knn_clean={}, knn_noisy={}, knn_noisy_self={})
    mem_groups = ps.data.source[ps.mem_idx]  # the image each point shows
    budget = probe_budget(ps.train_x.device)
    for group in layer_groups(dims, count, budget, rt.feature_dtype.itemsize):
        f = {key: extract(model, c, load, group, rt) for key, (c, load) in loads.items()}
        mem = f["train"] if ps.mem_is_train else f["mem"]
        for name in group:
            if not all(torch.isfinite(part[name]).all() for part in f.values()):
                raise UserError(f"the {name} layer's outputs are not finite: the model diverged "
                                "(try a lower --lr, with --overwrite or another --out-dir); "
                                "stopped before its checkpoint")
            pred = knn_predict(f["train"][name], ps.train_clean, f["test"][name], args.knn_k)
            result["knn_clean"][name] = accuracy(pred, ps.test_clean)
            if ps.noisy_probe:
                loo, own = knn_noisy(mem[name], ps.mem_labels, args.knn_k, mem_groups)
                result["knn_noisy"][name] = accuracy(loo, ps.mem_labels)
                result["knn_noisy_self"][name] = accuracy(own, ps.mem_labels)
            if name == "output":  # normalising does not move the argmax
                result["train_acc"] = accuracy(mem[name].float().argmax(1), ps.mem_labels)
                if mem[name].shape[1] == ps.clean_classes:
                    result["test_acc"] = accuracy(f["test"][name].float().argmax(1), ps.test_clean)
            if name == "embedding" and linear:
                result["linear_probe"] = linear_probe(f["train"][name], ps.train_clean,
                                                      f["test"][name], ps.test_clean)
        del f
    if not ps.noisy_probe:
        result["knn_noisy"] = result["knn_noisy_self"] = None
    if ps.inv_x is not None:
        result["invariance"] = invariance(model, ps, dims, rt)
    model.train()
    return result

@torch.no_grad()
def transfer_probe(model, sets, args, rt):  # the embedding's K-NN and linear probe on `sets`
    model.eval()
    out = {}
    for name, ((tx, ty), (qx, qy)) in sets.items():
        ft, fq = (extract(model, len(x), from_uint8(x), ["embedding"], rt)["embedding"]
                  for x in (tx, qx))
        out[name] = {"knn": accuracy(knn_predict(ft, ty, fq, args.knn_k), qy)}
        if args.linear_probe != "off":  # which turns off every linear probe
            out[name]["linear"] = linear_probe(ft, ty, fq, qy)
    model.train()
    return out

def random_subset(n, size, key, seed):  # fixed and sorted; all of range(n) if size is None or >= n
    if size is None or size >= n:
        return torch.arange(n)
    g = named_generator("cpu", "probe", key, seed)
    return torch.randperm(n, generator=g)[:size].sort().values

def make_probe_set(args, train, test, data, clean_classes, device):
    train_idx = random_subset(len(train[0]), args.probe_size, "train", args.seed)
    test_idx = random_subset(len(test[0]), args.probe_size, "test", args.seed)
    mem_is_train = data.aug_id is None and torch.equal(data.source.cpu(),
                                                       torch.arange(len(train[0])))
    mem_idx = train_idx if mem_is_train else random_subset(  # mem_is_train: point i is image i
        len(data), len(train_idx), "memorization", args.seed)
    mem_idx = mem_idx.to(device)
    ps = ProbeSet(train[0][train_idx].to(device), train[1][train_idx].to(device),
                  test[0][test_idx].to(device), test[1][test_idx].to(device), data, clean_classes,
                  mem_idx, mem_is_train, data.labels[mem_idx], args.num_classes != "per-sample")
    if args.invariance_size:
        inv_idx = random_subset(len(train[0]), args.invariance_size, "invariance", args.seed)
        stream = named_seed("invariance", args.seed)  # hash_uniforms keeps its low 32 bits
        ps.inv_x, inv_idx = train[0][inv_idx].to(device), inv_idx.to(device)
        ps.inv_u1, ps.inv_u2 = (hash_uniforms(stream, inv_idx, torch.full_like(inv_idx, t),
                                              NUM_UNIFORMS) for t in (0, 1))
    return ps


# ----------------------------------------------------------------------------- data, checkpoints

def save_atomically(path, content, shared=False):  # via a temporary file and a rename
    """A killed run never leaves half a file. shared: a file that other runs may write at the same
    time (the dataset cache, from several hosts) gets a temporary file of its own; a run folder's
    files, which its lock guards, use path.tmp, so a killed write's leftover is overwritten."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp" if shared else path + ".tmp"  # unique across hosts
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode())
            else:
                torch.save(content, f)
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

def checkpoint_bytes(args, num_classes, resolution):  # float32 weights and Adam's two moments
    with torch.device("meta"):  # shapes only: Figure 8's per-sample model is 13 GB of weights
        return 12 * sum(p.numel() for p in build_model(args, num_classes, resolution).parameters())

def existing_part(path):  # the longest leading part of path that exists
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path

def load_torchvision(name, root):  # CIFAR-10/100, STL10: (train, test), each (uint8 NCHW, labels)
    cifar = "https://www.cs.toronto.edu/~kriz/cifar.html"
    cls, pretty, folder, url = {
        "cifar10": (torchvision.datasets.CIFAR10, "CIFAR-10", "cifar-10-batches-py", cifar),
        "cifar100": (torchvision.datasets.CIFAR100, "CIFAR-100", "cifar-100-python", cifar),
        "stl10": (torchvision.datasets.STL10, "STL10", "stl10_binary",
                  "https://cs.stanford.edu/~acoates/stl10/")}[name]
    splits = []
    for split in ("train", "test"):
        try:
            ds = cls(root, download=True, **({"split": split} if name == "stl10" else
                                             {"train": split == "train"}))
        except Exception as e:
            raise UserError(f"{pretty} in {os.path.join(root, folder)} is missing or damaged and "
                            f"could not be downloaded ({first_line(e)}); "
                            f"download it from {url} and extract it into "
                            f"{os.path.abspath(root)}/")
        data = torch.as_tensor(ds.data)
        data = data.permute(0, 3, 1, 2) if data.shape[-1] == 3 else data  # CIFAR stores NHWC
        labels = torch.as_tensor(ds.targets if name != "stl10" else ds.labels, dtype=torch.long)
        splits.append((data.contiguous(), labels))
    return tuple(splits)

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
            raise UserError(f"Tiny ImageNet not found in {base} and could not be downloaded "
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
        folder = torchvision.datasets.ImageFolder(os.path.join(base, "train"))
        refuse_stray_folders(os.path.join(base, "train"), folder.classes)
        with open(os.path.join(base, "val", "val_annotations.txt")) as f:
            val = [(os.path.join(base, "val", "images", parts[0]), folder.class_to_idx[parts[1]])
                   for parts in (line.split("\t") for line in f if line.strip())]
        (tx, ty), (vx, vy) = decode(folder.samples), decode(val)
    except (OSError, KeyError, IndexError, RuntimeError) as e:  # RuntimeError: a bad image
        raise UserError(f"Tiny ImageNet in {base} is incomplete ({first_line(e)}); expected the "
                        "tiny-imagenet-200 archive layout")
    try:
        save_atomically(cache, {"train_x": tx, "train_y": ty, "val_x": vx, "val_y": vy},
                        shared=True)  # a job array's first runs all decode and write it
    except UserError as e:  # a read-only dataset folder (shared storage): not fatal
        tqdm.write(f"warning: {e}; the images are decoded again next time", file=sys.stderr)
    return (tx, ty), (vx, vy)

def check_data(name, splits):
    """Files that load but do not hold the dataset (another image size, a label out of range,
    labels not one per image, no images) would end in a traceback deep in a run, after its folder
    is written: refused before."""
    classes, size = {**DATASETS, "stl10": (10, 96)}[name]
    for split, (x, y) in zip(("training", "test"), splits):
        problem = (f"its images are {tuple(x.shape[1:])}, not {(3, size, size)}"
                   if tuple(x.shape[1:]) != (3, size, size)
                   else f"{len(x)} images but {len(y)} labels" if len(x) != len(y)
                   else "no images" if len(y) == 0
                   else f"labels outside 0-{classes - 1}"
                   if y.min() < 0 or y.max() >= classes else None)
        if problem:
            raise UserError(f"the {name} {split} set does not hold {name}: {problem}")

def load_dataset(name, root, resolution=None):  # as load_torchvision's, resized if asked
    splits = load_tinyimagenet(root) if name == "tinyimagenet" else load_torchvision(name, root)
    check_data(name, splits)
    if resolution is None or splits[0][0].shape[-1] == resolution:
        return splits
    resize = lambda x: torch.cat([v2.functional.resize(c, [resolution, resolution], antialias=True)
                                  for c in x.split(RESIZE_BATCH)])
    return tuple((resize(x), y) for x, y in splits)

def load_transfer(args, resolution, device):  # resized to the training size, capped as the probes
    sets = {}
    for name in args.transfer:
        (tx, ty), (qx, qy) = load_dataset(name, args.data_dir, resolution)
        train_idx = random_subset(len(tx), args.probe_size, ("transfer train", name), args.seed)
        test_idx = random_subset(len(qx), args.probe_size, ("transfer test", name), args.seed)
        sets[name] = ((tx[train_idx].to(device), ty[train_idx].to(device)),
                      (qx[test_idx].to(device), qy[test_idx].to(device)))
    return sets

RESUMABLE_KEYS = {"epochs", "device", "compile", "data_dir", "out_dir", "overwrite"}

def refuse_other_config(saved, config, what):
    diff = sorted(k for k in set(saved) | set(config)
                  if k not in RESUMABLE_KEYS and saved.get(k) != config.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in diff[:3])
        old_default = saved.get("mixup") == MIXUP_PROB and config.get("augment") == "none"
        if diff == ["mixup"] and old_default:
            shown += (f"; --augment none mixed at {MIXUP_PROB} before 2026-11-30: "
                      f"--mixup {MIXUP_PROB} resumes it")
        raise UserError(f"{what} was made with another config ({shown}); pass --overwrite to "
                        "start over or use another --out-dir")

def read_config(path):
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError):  # not JSON, not UTF-8, absurdly nested
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is unreadable; move it away or pass --overwrite to start over")
    return saved

def refuse_to_replace_a_record(out_path):  # a fresh start rewrites log.jsonl and results.json
    with contextlib.suppress(OSError):
        with open(out_path("log.jsonl"), "rb") as f:
            evaluations = sum(1 for line in f if line.strip())
        if evaluations > 1:  # more than INIT: epochs whose checkpoint was deleted (to save disk)
            raise UserError(f"{out_path('log.jsonl')} records {evaluations - 1} evaluations "
                            "after INIT but ckpt.pt is gone: starting afresh would replace "
                            "them; pass --overwrite or use another --out-dir")
    if os.path.exists(out_path("results.json")):
        raise UserError(f"{out_path('results.json')} holds a finished run but ckpt.pt is gone: "
                        "starting afresh would replace it; pass --overwrite or use another "
                        "--out-dir")

def load_checkpoint(path, config, overwrite):  # None: start afresh. Refuses a corrupt one
    if not os.path.exists(path) or overwrite:
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
        if {"model", "optimizer", "labels", "epoch", "rng", "history"} - set(ckpt):
            raise KeyError  # reported by its type only, as every failure here
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); it was left "
                        "untouched: move it away or pass --overwrite to start over")
    was, now = torch.device(saved["device"]).type, torch.device(config["device"]).type
    if was != now:  # a CPU generator's state cannot continue a CUDA one's sequence, nor back
        raise UserError(f"{path} was written on {was}: its random state cannot continue on {now}; "
                        f"resume with --device {saved['device']} or start over with --overwrite")
    refuse_other_config(saved, config, path)
    if ckpt["epoch"] > config["epochs"]:  # --epochs may extend a run, not cut it short
        raise UserError(f"{path} is at epoch {ckpt['epoch']}, beyond --epochs {config['epochs']}; "
                        "raise --epochs, or pass --overwrite to start over")
    return ckpt

def refuse_a_run_that_cannot_finish(args, ckpt, data, train_count, num_classes, resolution):
    """What only the data can tell, before anything is written: a checkpoint trained on other
    labels, a batch or a K-NN larger than the data, a disk without room for the checkpoint."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if ckpt and not torch.equal(ckpt["labels"], data.labels.cpu()):  # same config, other streams
        raise UserError(f"{ckpt_path} was trained on other random labels (another dataset, or "
                        "an earlier version of this script, which drew them differently: "
                        "finish it with that version); pass --overwrite to start over")
    if args.batch_size > data.points_per_epoch:
        raise UserError(f"--batch-size {args.batch_size} exceeds the {data.points_per_epoch} "
                        "points of an epoch")
    if args.knn_k >= min(train_count, args.probe_size or train_count):
        raise UserError(f"--knn-k {args.knn_k} needs more probed training images")
    size = checkpoint_bytes(args, num_classes, resolution)
    free = shutil.disk_usage(existing_part(args.out_dir)).free  # on the disk it will be made on
    for replaced in (ckpt_path, ckpt_path + ".tmp"):  # the old one, and a killed write's leftover
        free += os.path.getsize(replaced) if os.path.exists(replaced) else 0
    if free < 2 * size:  # the atomic write holds the old checkpoint and the new one
        raise UserError(f"a checkpoint of this model takes {size / 1e9:.2f} GB and writing it "
                        f"needs twice that; the disk of {args.out_dir} has "
                        f"{free / 1e9:.2f} GB free")

def discard_the_old_run(out_path):  # --overwrite: what a fresh start would otherwise resume
    for name in ("ckpt.pt", "log.jsonl", "results.json"):
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(out_path(name))
        except OSError as e:  # no permission
            raise UserError(f"--overwrite could not remove {out_path(name)} ({first_line(e)})")

def restore_training_state(ckpt, model, opt, gen, device):  # every random state restored
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    gen.set_state(ckpt["rng"]["gen"])
    if ckpt["rng"]["cuda"] is not None:  # load_checkpoint checked the device type is the same
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

def set_cuda_flags(device, fp32):
    """The chosen GPU (compiled kernels too); cuDNN autotuning; fp32: TF32 off in convolutions
    (cuDNN's default is on) and matrix products."""
    if device.type != "cuda":
        return
    if device.index is not None:
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    if fp32:  # the legacy switches: the per-operator ones would break later legacy reads
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

def script_sha256():  # which version of this file made a result, once copied elsewhere
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()

def format_eval(row):
    show = lambda v, fmt: "-" if v is None else format(v, fmt)
    head = (f"epoch {row['epoch']} | loss {show(row['loss'], '.4f')} | train_acc "
            f"{row['train_acc']:.3f} | test_acc {show(row['test_acc'], '.3f')} | linear "
            f"{show(row.get('linear_probe'), '.3f')} | {show(row['img_per_s'], '.0f')} img/s")
    names = list(row["knn_clean"])
    width = max(9, *(len(n) + 1 for n in names))
    lines = [head, " " * 15 + "".join(n.rjust(width) for n in names)]
    for key in ("knn_clean", "knn_noisy", "knn_noisy_self", "invariance"):
        if row.get(key) is not None:
            lines.append(key.ljust(15) + "".join(f"{row[key][n]:.3f}".rjust(width) for n in names))
    for name, t in row.get("transfer", {}).items():
        linear = f", linear {t['linear']:.3f}" if "linear" in t else ""
        lines.append(f"transfer {name}: knn {t['knn']:.3f}{linear}")
    return "\n".join(lines)


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

def bounded(kind, low, high=math.inf):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}")
        finite = kind is int or math.isfinite(value)  # inf is no flag's meaning
        if not (finite and low <= value <= high):  # NaN fails every comparison
            wanted = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value
    return parse

def dataset_list(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in TRANSFER for n in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(TRANSFER)}, got {text!r}")
    return names

SIZE_LIMIT = 2**24  # of W, C and B: far past the paper's, and a product of two fits an int64

def augmentation(text):  # --augment, normalised
    kind, _, value = text.partition(":")
    try:
        if kind in ("online", "none") and not value:
            return kind
        if kind in ("fixed", "iid") and (value or kind == "iid"):
            return f"{kind}:{bounded(int, 1, SIZE_LIMIT)(value or str(IID_PARTNERS))}"
        if kind == "randaugment" and value:
            return f"{kind}:{bounded(float, 0, 1)(value):g}"
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}")
    raise argparse.ArgumentTypeError(
        f"expected online, none, fixed:B, iid[:B] or randaugment:s, got {text!r}")

def build_parser():
    p = OneLineParser(description="Random labels under augmentation, K-NN probes of every layer.",
                      formatter_class=ShowDefaults)
    largest = 2**63 - 1  # an int64: counts become tensor sizes
    count, rate, probability = bounded(int, 1, largest), bounded(float, 0), bounded(float, 0, 1)
    class_count = lambda text: text if text == "per-sample" else bounded(int, 2, SIZE_LIMIT)(text)
    image_count = lambda text: 0 if text == "0" else bounded(int, 2, largest)(text)
    g = p.add_argument_group("data and labels")
    g.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10", help="training set")
    g.add_argument("--data-dir", default="data", help="where datasets are (or get downloaded)")
    g.add_argument("--label-noise", type=probability, default=1.0,
                   help="randomize this fraction of the labels (0: clean labels; Figure 12)")
    g.add_argument("--num-classes", type=class_count,
                   help="random labels over C >= 2 classes (default: the dataset's), or "
                   "'per-sample' (Figure 8)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["resnet18", "vgg16"], default="resnet18", help="encoder")
    g.add_argument("--projector-width", type=bounded(int, 1, SIZE_LIMIT), default=PROJECTOR_WIDTH,
                   help="hidden width W of the projector (Figure 7)")
    g.add_argument("--loss", choices=["mse", "ce"], default="mse", help="MSE to one-hot, or CE")
    g = p.add_argument_group("training points")
    g.add_argument("--augment", type=augmentation, default="online",
                   help="online: a fresh crop, flip, colour jitter and grayscale at every step; "
                        "none; fixed:B: B draws per image, the same every epoch (Figure 5); "
                        f"iid:B: B same-class images per anchor, unaugmented (Table 4, B = "
                        f"{IID_PARTNERS}); randaugment:s: RandAugment at strength s (Figure 11)")
    g.add_argument("--aug-labels", choices=["same", "random"], default="same",
                   help="with fixed:B: views share their image's label, or each has its own")
    g.add_argument("--subset", type=count,
                   help="S class-balanced anchor images: alone, train on them only (Table 4's "
                        f"baseline); with iid:B, its anchors (default: none; {IID_ANCHORS} with "
                        "iid:B)")
    g.add_argument("--mixup", type=probability,
                   help="probability of mixing a batch, lambda ~ Beta(1, 1) "
                        f"(default {MIXUP_PROB}; 0 with none, fixed:B and iid:B)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=count, default=EPOCHS, help="training epochs")
    g.add_argument("--batch-size", type=count, default=BATCH_SIZE,
                   help="batch size (last partial batch dropped)")
    g.add_argument("--lr", type=rate, default=LR, help="Adam; no schedule, no weight decay")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=count, default=EVAL_EVERY,
                   help="epochs per probe and checkpoint")
    g.add_argument("--knn-k", type=count, default=KNN_K, help="neighbours of the K-NN probes")
    g.add_argument("--probe-size", type=count, help="probed train and test images (default: all)")
    g.add_argument("--invariance-size", type=image_count, default=INVARIANCE_IMAGES,
                   help="invariance images: >= 2 (each is compared with the others), 0 to skip")
    g.add_argument("--linear-probe", choices=["every", "final", "off"], default="every",
                   help="linear probe of the embedding at every eval, at init and end, or never")
    g.add_argument("--transfer", type=dataset_list, default=[],
                   help="probe the embedding at init and end on these datasets (Figure 9)")
    g = p.add_argument_group("system")
    g.add_argument("--out-dir", default="runs/benign", help="config, log, results, checkpoint")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--seed", type=bounded(int, -2**63, largest), default=0,
                   help="seed of labels, initialisation and order")
    g.add_argument("--compile", action="store_true", help="torch.compile the step and the probes")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast with fp16 probe features, or float32 (auto: bf16 on CUDA)")
    g.add_argument("--overwrite", action="store_true", help="start over, discarding ckpt and logs")
    return p

def another_scripts_run(path):  # a readable config.json without keys every run of ours wrote
    try:
        saved = read_config(path)
    except UserError:  # missing or unreadable: not known to be another script's
        return False
    return not {"augment", "projector_width", "knn_k"} <= saved.keys()

def check_args(args):  # checks argparse cannot make; defaults that depend on other flags
    tf32_forced = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") not in ("", "0")
    if tf32_forced and args.precision == "fp32" and args.device.startswith("cuda"):
        raise UserError("--precision fp32 runs IEEE float32, which "
                        "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE (TF32 whatever the flags) forbids")
    try:
        torch.empty(1, device=args.device)
    except Exception as e:  # unknown or unavailable device
        raise UserError(f"--device {args.device} is not available ({first_line(e)})")
    if torch.device(args.device).type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: this script runs on cpu or cuda")
    existing = existing_part(args.out_dir)  # must be a folder
    if not os.path.isdir(existing):
        raise UserError(f"--out-dir {args.out_dir}: {existing} exists and is not a directory")
    if another_scripts_run(os.path.join(args.out_dir, "config.json")):  # --overwrite included:
        raise UserError(f"--out-dir {args.out_dir} holds another script's run (its config.json "
                        "is not this script's): use another --out-dir")  # its files are not ours
    kind, _ = augment_kind(args.augment)
    if args.aug_labels == "random" and kind != "fixed":
        raise UserError("--aug-labels random labels each fixed view: it needs --augment fixed:B")
    if args.aug_labels == "random" and args.label_noise < 1:
        raise UserError("--aug-labels random draws every view's label at random: it ignores "
                        "--label-noise, which must stay 1")
    classes = DATASETS[args.dataset][0]
    if args.label_noise < 1 and args.num_classes not in (None, classes):
        raise UserError(f"--label-noise keeps true labels: the random ones need {classes} classes")
    if args.num_classes == "per-sample" and args.aug_labels == "random":
        raise UserError("--aug-labels random is undefined with --num-classes per-sample")
    if args.num_classes == "per-sample" and (args.subset is not None or kind == "iid"):
        raise UserError("--num-classes per-sample gives every image of the dataset its class: "
                        "it does not combine with --subset or --augment iid:B")
    if args.subset is not None and kind == "fixed":
        raise UserError("--subset picks anchors for iid:B or Table 4's baseline, not for fixed:B")
    args.subset = IID_ANCHORS if kind == "iid" and args.subset is None else args.subset
    if args.precision == "auto":
        args.precision = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    if args.mixup is None:  # mixing would make the n*B fixed points infinitely many (Section 5.1)
        # and is itself an augmentation: "none" is the paper's "without DA"
        args.mixup = 0.0 if kind in ("fixed", "iid", "none") else MIXUP_PROB

def run(args, folder):  # folder: the out-dir's RunFolderLock, released by the caller
    check_args(args)
    folder.take()  # before anything in it is loaded (check_args only asked whose it is)
    device = torch.device(args.device)
    set_cuda_flags(device, fp32=args.precision == "fp32")
    config = dict(vars(args))
    out_path = lambda name: os.path.join(args.out_dir, name)
    ckpt_path = out_path("ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, config, args.overwrite)
    if not ckpt and not args.overwrite:
        # killed before its first checkpoint, or the checkpoint deleted: config.json still guards
        if os.path.exists(out_path("config.json")):
            refuse_other_config(read_config(out_path("config.json")), config,
                                out_path("config.json"))
        refuse_to_replace_a_record(out_path)  # config.json deleted too: the record still guards
    clean_classes, resolution = DATASETS[args.dataset]
    train, test = load_dataset(args.dataset, args.data_dir)
    transfer_sets = load_transfer(args, resolution, device)  # fail now, not after days of training
    num_classes = len(train[1]) if args.num_classes == "per-sample" else \
        args.num_classes or clean_classes
    data = make_training_set(args, train, num_classes, device)
    refuse_a_run_that_cannot_finish(args, ckpt, data, len(train[0]), num_classes, resolution)
    folder.take(create=True)  # before the first write
    if args.overwrite:
        discard_the_old_run(out_path)
    save_atomically(out_path("config.json"), json.dumps(config, indent=2))

    probe_set = make_probe_set(args, train, test, data, clean_classes, device)
    rt = Runtime(device, bf16=args.precision == "bf16", compiled=args.compile)
    model = build_model(args, num_classes, resolution).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)  # one kernel per update
    gen = named_generator(device, "train", args.seed)
    step = torch.compile(step_loss, fullgraph=True) if args.compile else step_loss
    settings = StepSettings(args.mixup, args.loss, rt.bf16, rt.channels_last)
    history, start = [], 1
    if ckpt:
        restore_training_state(ckpt, model, opt, gen, device)
        history, start = ckpt["history"], ckpt["epoch"] + 1
        print(f"resuming {args.out_dir} from epoch {ckpt['epoch']}")

    def evaluate(epoch, loss, img_per_s):  # probe, log, checkpoint (where a resume restarts)
        ends = epoch in (0, args.epochs)
        linear = args.linear_probe == "every" or (args.linear_probe == "final" and ends)
        row = {"epoch": epoch, "loss": loss, "img_per_s": img_per_s,
               **probe(model, probe_set, args, rt, linear)}
        if transfer_sets and ends:
            row["transfer"] = transfer_probe(model, transfer_sets, args, rt)
        history.append(row)
        tqdm.write(format_eval(row))
        # before the checkpoint: killed in between, a resume redoes this epoch and rewrites the
        # log (after the checkpoint, a run killed at its last epoch would keep a short log)
        save_atomically(out_path("log.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        rng = {"torch": torch.get_rng_state(), "gen": gen.get_state(), "cuda": cuda_rng}
        save_atomically(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "labels": data.labels.cpu(), "epoch": epoch, "rng": rng,
                                    "config": config, "history": history})

    if not history:
        evaluate(0, None, None)
    losses, images, seconds = [], 0, 0.0  # since the last evaluation
    bar = tqdm(range(start, args.epochs + 1), initial=start - 1, total=args.epochs, desc="epochs")
    for epoch in bar:
        t0 = time.time()
        loss = train_epoch(model, opt, data, gen, args.batch_size, step, settings).item()
        if not (args.compile and epoch == start):  # whose time is mostly compiling the step
            seconds += time.time() - t0
            images += (data.points_per_epoch // args.batch_size) * args.batch_size
        if not math.isfinite(loss) or not finite_weights(model):  # before this epoch's checkpoint
            what = f"training loss became {loss}" if not math.isfinite(loss) else \
                "weights became nan or inf"
            raise UserError(f"the {what} at epoch {epoch}; stopped (try a lower --lr, with "
                            "--overwrite or another --out-dir). The last good checkpoint, "
                            f"epoch {history[-1]['epoch']}, is in {ckpt_path}")
        losses.append(loss)
        img_per_s = images / seconds if seconds else None
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_per_s or 0:.0f}")
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            evaluate(epoch, sum(losses) / len(losses), img_per_s)
            losses, images, seconds = [], 0, 0.0
    bar.close()

    init, final = history[0], history[-1]
    results = {"config": config, "script_sha256": script_sha256(), "init": init, "final": final}
    save_atomically(out_path("results.json"), json.dumps(results, indent=2))
    print(f"embedding K-NN (clean): init {init['knn_clean']['embedding']:.3f} -> final "
          f"{final['knn_clean']['embedding']:.3f}; memorization {final['train_acc']:.3f}")
    print(f"wrote {out_path('results.json')}")
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
    again = "the same command without --overwrite" if args.overwrite else "the same command"
    try:
        with RunFolderLock(args.out_dir) as folder:
            return run(args, folder)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # no working C++ compiler, say
        reason = first_line(getattr(e, "inner_exception", e))  # e's first line: the backend
        sys.stderr.write(f"error: --compile failed ({reason}); run the same command without it\n")
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        sys.stderr.write(f"error: {first_line(e)}; with more free memory, {again} resumes "
                         "from the last evaluation's checkpoint\n")
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: no traceback, and how to go on
        sys.stderr.write(f"\ninterrupted: {again} resumes from the last evaluation's "
                         "checkpoint\n")
        sys.exit(130)

if __name__ == "__main__":
    main()
