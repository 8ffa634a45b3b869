"""Shared fixtures: tiny fake datasets written in the real on-disk formats, and a script runner.

The fake datasets are read by the scripts' real loading code (torchvision's dataset classes and the
Tiny ImageNet folder reader). Images are class templates plus noise, so a model can learn them.
torchvision checks the md5 sums of the CIFAR and STL10 files, which fake files cannot match: tests
patch that check (in-process with monkeypatch, in subprocesses through `run_script(...,
patch_md5=True)`).
"""
import contextlib
import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def class_images(n, classes, shape, seed, noise=40, template_seed=1234):
    """uint8 images (n, *shape) whose class is visible: a per-class template plus noise.

    Templates depend on template_seed only, so train and test splits (other `seed`s) share them.
    """
    templates = np.random.default_rng([template_seed, classes]).integers(
        0, 256, size=(classes, *shape))
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = templates[labels] + rng.normal(0, noise, size=(n, *shape))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_cifar(root, name="cifar10", n_train=100, n_test=50, seed=0):
    """CIFAR-10 (cifar-10-batches-py, five data batches) or
    CIFAR-100 (cifar-100-python) pickles."""
    classes = 10 if name == "cifar10" else 100
    x_tr, y_tr = class_images(n_train, classes, (3, 32, 32), seed)
    x_te, y_te = class_images(n_test, classes, (3, 32, 32), seed + 1)

    def dump(path, obj):
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if name == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        for b, part in enumerate(np.array_split(np.arange(n_train), 5)):
            dump(os.path.join(folder, f"data_batch_{b + 1}"),
                 {"data": x_tr[part].reshape(len(part), -1), "labels": y_tr[part].tolist()})
        dump(os.path.join(folder, "test_batch"),
             {"data": x_te.reshape(n_test, -1), "labels": y_te.tolist()})
        dump(os.path.join(folder, "batches.meta"),
             {"label_names": [f"class{i}" for i in range(10)]})
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            dump(os.path.join(folder, split), {"data": x.reshape(len(x), -1),
                                               "fine_labels": y.tolist(),
                                               "coarse_labels": (y // 5).tolist()})
        dump(os.path.join(folder, "meta"), {"fine_label_names": [f"c{i}" for i in range(100)],
                                            "coarse_label_names": [f"s{i}" for i in range(20)]})
    return (x_tr, y_tr), (x_te, y_te)


def write_mnist(root, name="MNIST", n_train=200, n_test=100, seed=0):
    """MNIST or FashionMNIST idx files in <root>/<name>/raw (uncompressed, as torchvision leaves
    them)."""
    folder = os.path.join(root, name, "raw")
    os.makedirs(folder, exist_ok=True)
    out = []
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = class_images(n, 10, (28, 28), s)
        with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + x.tobytes())
        with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + y.astype(np.uint8).tobytes())
        out.append((x, y))
    return out


def write_tinyimagenet(root, classes=4, per_class=6, val_per_class=3, seed=0):
    """The tiny-imagenet-200 archive layout: wnids.txt, train/<wnid>/images/*.JPEG,
    val/val_annotations.txt."""
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
    from torchvision.io import encode_jpeg
    base = os.path.join(root, "tiny-imagenet-200")
    wnids = [f"n{idx:08d}" for idx in range(classes)]
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    x_tr, y_tr = class_images(classes * per_class, classes, (3, 64, 64), seed)
    x_va, y_va = class_images(classes * val_per_class, classes, (3, 64, 64), seed + 1)

    def save(path, image, gray=False):
        t = torch.from_numpy(image)
        if gray:  # the real archive holds some single-channel JPEGs
            t = t[:1]
        with open(path, "wb") as f:
            f.write(encode_jpeg(t, quality=95).numpy().tobytes())

    for i, (img, y) in enumerate(zip(x_tr, y_tr)):
        folder = os.path.join(base, "train", wnids[y], "images")
        os.makedirs(folder, exist_ok=True)
        save(os.path.join(folder, f"{wnids[y]}_{i}.JPEG"), img, gray=(i == 0))
    os.makedirs(os.path.join(base, "val", "images"), exist_ok=True)
    lines = []
    for i, (img, y) in enumerate(zip(x_va, y_va)):
        save(os.path.join(base, "val", "images", f"val_{i}.JPEG"), img)
        lines.append(f"val_{i}.JPEG\t{wnids[y]}\t0\t0\t63\t63")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return (x_tr, y_tr), (x_va, y_va)


def write_stl10(root, n_train=40, n_test=40, seed=0):
    """stl10_binary: column-major 3x96x96 uint8 images, labels 1..10
    (torchvision subtracts one)."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        x, y = class_images(n, 10, (3, 96, 96), s)
        x.transpose(0, 1, 3, 2).tofile(os.path.join(folder, f"{split}_X.bin"))
        (y + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
    # real: 100,000
    class_images(1, 10, (3, 96, 96), seed + 2)[0].tofile(os.path.join(folder, "unlabeled_X.bin"))
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(f"class{i}" for i in range(10)) + "\n")


def skip_md5(fpath, md5=None):
    """Stands in for torchvision's md5 check: a fake file only has to exist."""
    return os.path.isfile(fpath)


# Code run before a script in a test's subprocess: the network is off (a test must never download a
# real dataset, even on a connected machine), optionally torchvision's md5 check is patched, and
# optionally the process kills itself with SIGKILL right after its N-th write of a named file.
_OFFLINE = """
import socket
def _no_network(*args, **kwargs):
    raise OSError("the tests run offline")
socket.getaddrinfo = socket.create_connection = _no_network
"""
_MD5 = """
import os, torchvision.datasets.cifar, torchvision.datasets.stl10
for module in (torchvision.datasets.cifar, torchvision.datasets.stl10):
    module.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
"""
_KILL = """
import os, signal
_replace, _writes = os.replace, [0]
def _replace_then_die(src, dst):
    _replace(src, dst)
    if os.path.basename(str(dst)) == {name!r}:
        _writes[0] += 1
        if _writes[0] == {count}:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = _replace_then_die
"""
# As on a machine with a GPU: every --device defaults to "cuda" (the scripts' default wherever
# torch.cuda.is_available()), so a test that does not name its device fails here as it would there.
_CUDA_DEFAULT = """
import argparse
_add_argument = argparse._ActionsContainer.add_argument
def _cuda_default(self, *names, **kwargs):
    if "--device" in names:
        kwargs["default"] = "cuda"
    return _add_argument(self, *names, **kwargs)
argparse._ActionsContainer.add_argument = _cuda_default
"""
_RUN = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_script(script, *args, patch_md5=False, kill_after=None, timeout=600, cwd=None):
    """Run one of the repository's scripts as a user would, offline; optionally with torchvision's
    md5 check patched, and killed by SIGKILL after kill_after = (file name, N) writes of that
    file."""
    prelude = _OFFLINE + _CUDA_DEFAULT + (_MD5 if patch_md5 else "")
    if kill_after:
        prelude += _KILL.format(name=kill_after[0], count=kill_after[1])
    cmd = [sys.executable, "-c", prelude + _RUN, os.path.join(REPO, script), *map(str, args)]
    # this process's thread count: CPU kernels may sum in another order on another count, and a
    # test may compare a subprocess's numbers with its own
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env=env)


@contextlib.contextmanager
def lock_held_by_another_process(path):
    """A live process of its own holding the scripts' lock (os.lockf) on path, as a second run
    would (if another process holds it, the holder fails at once rather than waiting)."""
    code = ("import os, sys, time\nf = open(sys.argv[1], 'a')\n"
            "os.lockf(f.fileno(), os.F_TLOCK, 0)\n"
            "print('held', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches the network in-process either."""
    import socket

    def no_network(*args, **kwargs):
        raise OSError("the tests run offline")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.fixture(autouse=True)
def device_defaults_to_cuda(monkeypatch):
    """In-process too: the parsers built during a test default to --device cuda (see above)."""
    import argparse
    add_argument = argparse._ActionsContainer.add_argument

    def cuda_default(self, *names, **kwargs):
        if "--device" in names:
            kwargs["default"] = "cuda"
        return add_argument(self, *names, **kwargs)
    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", cuda_default)


def assert_one_line_error(proc, *fragments):
    """A non-zero exit with a single error line on stderr (no traceback) that names the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment.lower() in err.lower(), err


def help_entries(parser):
    """--help's text of each flag, on one line: {"--epochs": "--epochs EPOCHS training ..."}."""
    entries, flag = {}, None
    for line in re.sub(r"\x1b\[[0-9;]*m", "", parser.format_help()).splitlines():  # no colours
        if line.startswith("  -"):  # an option's first line, indented by two
            flag = next(word.rstrip(",") for word in line.split() if word.startswith("--"))
            entries[flag] = line.strip()
        elif line.startswith("   ") and flag:  # its help, wrapped
            entries[flag] += " " + line.strip()
        else:  # a group's title, or a blank line
            flag = None
    return entries


def main_error(module, args, capsys):
    """Run a script's main() in-process on bad input; assert it exits non-zero with one stderr
    line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(a) for a in args])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def check_runs_writing_the_dataset_cache_at_once(load_tinyimagenet, tmp_path, monkeypatch):
    """A job array's first runs all decode Tiny ImageNet and write its cache. With one temporary
    file for all, a second run's open truncated the first's half-written file, and a second run
    killed then left the first to rename a file with a hole of zeros: a corrupt cache. Here the
    first run (this one) is half-way through its write when a second (another pid) starts and is
    stopped after a few bytes; the cache must be whole and no temporary file left."""
    import io
    write_tinyimagenet(str(tmp_path), classes=2, per_class=2, val_per_class=1)
    real_save, pid = torch.save, os.getpid()

    def killed_after_a_few_bytes(obj, f):
        f.write(b"a few bytes")
        raise KeyboardInterrupt

    def save_with_a_second_run_between(obj, f):
        whole = io.BytesIO()
        real_save(obj, whole)
        half = len(whole.getvalue()) // 2
        f.write(whole.getvalue()[:half])
        with monkeypatch.context() as second:
            second.setattr(os, "getpid", lambda: pid + 1)
            second.setattr(torch, "save", killed_after_a_few_bytes)
            with pytest.raises(KeyboardInterrupt):
                load_tinyimagenet(str(tmp_path))
        f.write(whole.getvalue()[half:])
    with monkeypatch.context() as first:
        first.setattr(torch, "save", save_with_a_second_run_between)
        (tx, _), (_, vy) = load_tinyimagenet(str(tmp_path))
    base = tmp_path / "tiny-imagenet-200"
    cache = torch.load(base / "uint8_cache.pt")
    assert torch.equal(cache["train_x"], tx) and torch.equal(cache["val_y"], vy)
    assert not [f for f in os.listdir(base) if f.endswith(".tmp")]


def check_a_write_stopped_by_ctrl_c_leaves_no_temporary_file(save_atomically, tmp_path,
                                                             monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_atomically(path, {"epoch": 1})

    def stopped(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(torch, "save", stopped)
        with pytest.raises(KeyboardInterrupt):
            save_atomically(path, {"epoch": 2})
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.load(path) == {"epoch": 1}


@pytest.fixture
def patch_md5(monkeypatch):
    import torchvision.datasets.cifar
    import torchvision.datasets.stl10
    for module in (torchvision.datasets.cifar, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", skip_md5)
