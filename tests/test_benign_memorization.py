"""Tests of benign_memorization.py: probes and augmentation against independent computations,
then end-to-end runs on tiny fake CIFAR files in the real pickle layout."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

import benign_memorization as bm
from conftest import REPO, _PATCH, assert_one_line_error, run_script, write_cifar

# ----------------------------------------------------------------------------- K-NN


def brute_knn(ref, ref_y, q, k, exclude_self=False):
    """Cosine K-NN by sorting every similarity; vote ties to the smallest class (numpy argmax)."""
    refn = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    classes = ref_y.max() + 1
    preds = []
    for i, row in enumerate(qn @ refn.T):
        order = [j for j in np.argsort(-row, kind="stable") if not (exclude_self and j == i)]
        preds.append(np.argmax(np.bincount(ref_y[order[:k]], minlength=classes)))
    return np.array(preds)


@pytest.mark.parametrize("k", [1, 4, 5])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_matches_brute_force(k, exclude_self):
    rng = np.random.default_rng(k)
    ref = rng.normal(size=(60, 8))
    ref_y = rng.integers(0, 4, 60)
    q = ref if exclude_self else rng.normal(size=(25, 8))
    expected = brute_knn(ref, ref_y, q, k, exclude_self)
    for chunk in (None, 7):  # chunking must not change anything
        got = bm.knn_predict(torch.tensor(ref, dtype=torch.float32), torch.tensor(ref_y), torch.tensor(q, dtype=torch.float32),
                             k=k, exclude_self=exclude_self, chunk=chunk)
        np.testing.assert_array_equal(got.numpy(), expected)


def test_knn_vote_ties_go_to_the_smallest_class():
    # query at angle 0; neighbours: two of class 3 (closest), two of class 1, one far away of class 0
    angles = np.array([0.1, -0.1, 0.2, -0.2, 3.0])
    ref = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    ref_y = torch.tensor([3, 3, 1, 1, 0])
    got = bm.knn_predict(torch.tensor(ref), ref_y, torch.tensor([[1.0, 0.0]]), k=4)
    assert got.item() == 1  # 2 votes each for 1 and 3
    assert bm.knn_predict(torch.tensor(ref), ref_y, torch.tensor([[1.0, 0.0]]), k=2).item() == 3


def test_knn_exclude_self_ignores_own_label():
    # every point's nearest other neighbours carry the other label: with itself, k=1 would be trivial
    ref = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    y = torch.tensor([0, 1, 0, 1])
    assert torch.equal(bm.knn_predict(ref, y, ref, k=1), y)
    assert torch.equal(bm.knn_predict(ref, y, ref, k=1, exclude_self=True), torch.tensor([1, 0, 1, 0]))

# ----------------------------------------------------------------------------- augmentation


def reference_augment(x, p):
    """The same parameters applied image by image with torchvision's functional ops."""
    jitter_ops = [lambda im, i: TF.adjust_brightness(im, p["brightness"][i].item()),
                  lambda im, i: TF.adjust_contrast(im, p["contrast"][i].item()),
                  lambda im, i: TF.adjust_saturation(im, p["saturation"][i].item()),
                  lambda im, i: TF.adjust_hue(im, p["hue"][i].item())]
    out = []
    for i in range(len(x)):
        im = TF.resized_crop(x[i], int(p["top"][i]), int(p["left"][i]), int(p["height"][i]), int(p["width"][i]),
                             list(x.shape[-2:]), antialias=True)
        if p["flip"][i]:
            im = TF.hflip(im)
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                im = jitter_ops[op](im, i)
        if p["gray"][i]:
            im = TF.rgb_to_grayscale(im, 3)
        out.append(im)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_batched_augmentation_equals_torchvision_per_image(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, *shape, generator=g)
    p = bm.augment_params(torch.rand(48, bm.NUM_UNIFORMS, generator=g), *shape)
    torch.testing.assert_close(bm.apply_augment(x, p), reference_augment(x, p), atol=1e-5, rtol=0)


def test_augment_batch_shape_range_and_independence():
    x = torch.rand(1, 3, 32, 32).expand(64, -1, -1, -1).contiguous()
    out = bm.augment_batch(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(64)).min() > 0  # same image, 64 different augmentations
    # an image's augmentation depends only on its own draw, not on the other images in the batch
    a = bm.augment_batch(torch.stack([x[0], torch.zeros(3, 32, 32)]), torch.Generator().manual_seed(2))
    b = bm.augment_batch(torch.stack([x[0], torch.ones(3, 32, 32)]), torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0])


def test_augmentation_frequencies_and_crop_ranges():
    n = 40000
    p = bm.augment_params(torch.rand(n, bm.NUM_UNIFORMS, generator=torch.Generator().manual_seed(3)), 32, 32)
    assert p["flip"].float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert p["gray"].float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert p["jitter"].float().mean().item() == pytest.approx(0.8, abs=0.01)
    area = p["height"] * p["width"] / (32 * 32)
    assert area.min() >= 0.06 and area.max() <= 1.0  # scale (0.08, 1), up to rounding of h and w
    ratio = p["width"] / p["height"]
    assert ratio.min() >= 0.65 and ratio.max() <= 1.5  # (3/4, 4/3), up to rounding on a 32-pixel grid
    assert (p["top"] >= 0).all() and (p["top"] + p["height"] <= 32).all()
    assert (p["left"] >= 0).all() and (p["left"] + p["width"] <= 32).all()
    for key, lo, hi in (("brightness", 0.2, 1.8), ("contrast", 0.2, 1.8), ("saturation", 0.2, 1.8), ("hue", -0.2, 0.2)):
        assert p[key].min() >= lo and p[key].max() <= hi
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(n, 4))  # a permutation per image
    # the crop distribution matches torchvision's own sampler
    torch.manual_seed(0)
    tv = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(20000)], dtype=torch.float32)
    tv_area = tv[:, 2] * tv[:, 3] / 1024
    assert area.mean().item() == pytest.approx(tv_area.mean().item(), abs=0.01)
    assert area.std().item() == pytest.approx(tv_area.std().item(), abs=0.01)

# ----------------------------------------------------------------------------- labels and mixup


def test_labels_fixed_and_reproducible_from_seed():
    clean = torch.arange(5000) % 10
    a, b, c = (bm.draw_labels(clean, 10, True, s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a == clean).float().mean().item() == pytest.approx(0.1, abs=0.02)  # unrelated to the truth
    assert torch.bincount(a, minlength=10).min() > 400  # uniform over the classes
    assert torch.equal(bm.draw_labels(clean, 10, False, 0), clean)


def test_mixup_mixes_images_and_targets_with_one_lambda():
    y = torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    g = torch.Generator().manual_seed(0)
    mixed = 0
    for _ in range(50):
        xm, ym = bm.mixup(y.clone(), y, 0.8, g)  # images equal to targets: one lambda, one permutation
        torch.testing.assert_close(ym.sum(1), torch.ones(16))
        assert torch.equal(xm, ym)
        mixed += not torch.equal(ym, y)
    assert 30 <= mixed <= 48  # about 80% of batches mixed
    xm, ym = bm.mixup(y.clone(), y, 0.0, g)
    assert torch.equal(ym, y)

# ----------------------------------------------------------------------------- end to end

ARGS = ["--epochs", "3", "--eval-every", "1", "--batch-size", "32", "--projector-width", "64", "--knn-k", "5"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(str(root), "cifar10", n_train=64, n_test=32)
    return root


def test_end_to_end_results_hold_every_layer(cifar, tmp_path, patch_md5):
    out = tmp_path / "run"
    results = bm.main(ARGS + ["--data-dir", str(cifar), "--out-dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["config"]["dataset"] == "cifar10" and saved["config"]["projector_width"] == 64
    assert saved["init"]["epoch"] == 0 and saved["final"]["epoch"] == 3
    for row in (saved["init"], saved["final"]):
        for key in ("knn_clean", "knn_noisy"):
            assert list(row[key]) == bm.LAYERS
            assert all(0 <= v <= 1 for v in row[key].values())
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["test_acc"] <= 1
    assert saved["init"]["loss"] is None and saved["final"]["loss"] > 0 and saved["final"]["img_per_s"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["labels"], bm.draw_labels(ckpt["labels"] * 0, 10, True, 0))
    # the printed probes are those of the model in the checkpoint (an independent recomputation)
    train, test = bm.load_dataset("cifar10", str(cifar))
    model = bm.build_model(bm.build_parser().parse_args(ARGS), 10, 32)
    model.load_state_dict(ckpt["model"])
    probe_set = bm.make_probe_set(train, test, ckpt["labels"], None, 0, torch.device("cpu"))
    again = bm.probe(model, probe_set, bm.build_parser().parse_args(ARGS), torch.autocast("cpu", enabled=False))
    assert again["knn_clean"] == saved["final"]["knn_clean"] and again["train_acc"] == saved["final"]["train_acc"]


def test_cross_entropy_and_clean_labels_run(cifar, tmp_path, patch_md5):
    results = bm.main(["--epochs", "1", "--batch-size", "32", "--projector-width", "32", "--knn-k", "5", "--loss", "ce",
                       "--labels", "clean", "--augment", "none", "--mixup", "0",
                       "--data-dir", str(cifar), "--out-dir", str(tmp_path)])
    assert math.isfinite(results["final"]["loss"])


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]


def test_killed_run_resumes_to_the_same_result(cifar, tmp_path):
    """SIGKILL mid-run, run the same command again: same metrics as an uninterrupted run, exactly."""
    args = ["--epochs", "4", "--eval-every", "1", "--batch-size", "32", "--projector-width", "64", "--knn-k", "5",
            "--data-dir", str(cifar)]
    whole = run_script("benign_memorization.py", *args, "--out-dir", tmp_path / "whole", patch_md5=True)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", _PATCH, os.path.join(REPO, "benign_memorization.py"), *args, "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the epoch-2 probe has been logged
        log = out / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(out / "ckpt.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < 4
    resumed = run_script("benign_memorization.py", *args, "--out-dir", out, patch_md5=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert strip_timing([a["init"], a["final"]]) == strip_timing([b["init"], b["final"]])
    log_a = [json.loads(r) for r in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert strip_timing(log_a) == strip_timing(log_b)
    # the same command once more: the run is complete, nothing changes
    again = run_script("benign_memorization.py", *args, "--out-dir", out, patch_md5=True)
    assert again.returncode == 0 and json.loads((out / "results.json").read_text()) == b


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cifar, tmp_path, patch_md5, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = bm.compute_loss

    def poisoned(out_, target, kind):  # two steps per epoch: the loss turns NaN in epoch 3
        calls["n"] += 1
        loss = real(out_, target, kind)
        return loss * float("nan") if calls["n"] > 4 else loss
    monkeypatch.setattr(bm, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        bm.main(ARGS + ["--epochs", "5", "--data-dir", str(cifar), "--out-dir", str(out)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "nan" in err.lower() and "epoch 3" in err and "epoch 2" in err
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 2

# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,fragment", [
    (["--dataset", "mnist"], "--dataset"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--mixup", "1.5"], "--mixup"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
    (["--batch-size", "1000"], "--batch-size"),
])
def test_bad_input_gives_one_line_error(args, fragment, cifar, tmp_path):
    proc = run_script("benign_memorization.py", "--data-dir", cifar, "--out-dir", tmp_path / "out", *args, patch_md5=True)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file(cifar, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(run_script("benign_memorization.py", "--out-dir", f, patch_md5=True), "--out-dir")


def test_missing_data_offline_names_dataset_and_folder(tmp_path):
    proc = run_script("benign_memorization.py", "--data-dir", tmp_path / "nodata", "--out-dir", tmp_path / "out")
    assert_one_line_error(proc, "CIFAR-10", str(tmp_path / "nodata"))
    assert not (tmp_path / "out").exists()
    proc = run_script("benign_memorization.py", "--dataset", "tinyimagenet", "--data-dir", tmp_path / "nodata",
                      "--out-dir", tmp_path / "out")
    assert_one_line_error(proc, "Tiny ImageNet", str(tmp_path / "nodata"))


def test_corrupt_checkpoint_is_refused_and_left_untouched(cifar, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    (out / "log.jsonl").write_text("precious\n")
    proc = run_script("benign_memorization.py", *ARGS, "--data-dir", cifar, "--out-dir", out, patch_md5=True)
    assert_one_line_error(proc, "ckpt.pt")
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint"
    assert (out / "log.jsonl").read_text() == "precious\n"


def test_checkpoint_from_another_config_is_refused_unless_overwrite(cifar, tmp_path, patch_md5):
    out = tmp_path / "run"
    bm.main(ARGS + ["--epochs", "1", "--data-dir", str(cifar), "--out-dir", str(out)])
    before = (out / "ckpt.pt").read_bytes()
    proc = run_script("benign_memorization.py", *ARGS, "--epochs", "1", "--lr", "0.1", "--data-dir", cifar,
                      "--out-dir", out, patch_md5=True)
    assert_one_line_error(proc, "--overwrite", "lr")
    assert (out / "ckpt.pt").read_bytes() == before
    results = bm.main(ARGS + ["--epochs", "1", "--lr", "0.1", "--overwrite", "--data-dir", str(cifar), "--out-dir", str(out)])
    assert results["config"]["lr"] == 0.1


def test_tinyimagenet_folder_layout_is_decoded_and_cached(tmp_path):
    from conftest import write_tinyimagenet
    (x_tr, y_tr), (x_va, y_va) = write_tinyimagenet(str(tmp_path), classes=3, per_class=4, val_per_class=2)
    (tx, ty), (vx, vy) = bm.load_dataset("tinyimagenet", str(tmp_path))
    assert tx.shape == (12, 3, 64, 64) and tx.dtype == torch.uint8 and vx.shape == (6, 3, 64, 64)
    assert sorted(ty.tolist()) == sorted(y_tr.tolist()) and sorted(vy.tolist()) == sorted(y_va.tolist())
    # JPEG is lossy: each decoded image is close to the image of its own class that was written
    for img, label in zip(vx, vy):
        err = [(img.float() - torch.tensor(x).float()).abs().mean() for x, y in zip(x_va, y_va)]
        assert y_va[int(np.argmin(err))] == label
    assert (tmp_path / "tiny-imagenet-200" / "uint8_cache.pt").exists()
    (tx2, ty2), _ = bm.load_dataset("tinyimagenet", str(tmp_path))
    assert torch.equal(tx, tx2) and torch.equal(ty, ty2)
