"""Tests of toy_capacity.py against hand-worked and brute-force computations."""
import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

import toy_capacity as toy
from conftest import assert_one_line_error, main_error, run_script


def small_args(**overrides):
    return toy.Config(device="cpu", **overrides)


def test_projector_is_convex_combination_of_labels():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 3, generator=g)
    V = torch.randn(2, 4, 3, generator=g)
    L = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 2], [2, 2, 0, 1]]), 3).float()
    w = toy.projector(h, V, torch.eye(4).expand(2, 4, 4))  # one-hot per prototype: the weights
    out = toy.projector(h, V, L)
    # brute force: inverse distances normalised to one
    for m in range(2):
        for i in range(5):
            inv = np.array([1 / np.linalg.norm(h[m, i].numpy() - V[m, j].numpy())
                            for j in range(4)])
            expected_w = inv / inv.sum()
            np.testing.assert_allclose(w[m, i].numpy(), expected_w, rtol=1e-4)
            np.testing.assert_allclose(out[m, i].numpy(), expected_w @ L[m].numpy(), rtol=1e-4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 5))
    assert (out >= 0).all()


def test_fixed_augmentations_touch_only_noise_and_never_change():
    args = small_args(dim=12, signal_dim=4)
    cell = toy.Cell(5, 3, 0, toy.make_world(0, args)["centres"], args)
    points, labels = cell.fit_x, cell.fit_y
    assert points.shape == (15, 12) and labels.shape == (15,)
    delta = points - cell.x.repeat_interleave(3, 0)
    assert torch.all(delta[:, :4] == 0)
    assert torch.all(delta[:, 4:] != 0)
    # augmentations share their image's label
    assert torch.equal(labels, cell.labels.repeat_interleave(3))
    table = points.clone()
    for _ in range(20):  # every training batch is a row of the same fixed table
        x, y = cell.batch(8, args)
        match = (x.unsqueeze(1) == table.unsqueeze(0)).all(-1)
        assert match.any(1).all()
        assert torch.equal(y, labels[match.float().argmax(1)])
    assert torch.equal(cell.fit_x, table)


def test_online_augmentations_are_fresh_and_touch_only_noise():
    args = small_args(dim=12, signal_dim=4, sigma=2.0)
    cell = toy.Cell(3, None, 0, toy.make_world(0, args)["centres"], args)  # None: online
    x1, _ = cell.batch(256, args)
    same_signal = (x1[:, :4].unsqueeze(1) == cell.x[:, :4].unsqueeze(0)).all(-1)
    assert same_signal.any(1).all()  # signal coordinates are exactly those of a training point
    base = cell.x[same_signal.float().argmax(1)]
    added = x1[:, 4:] - base[:, 4:]
    assert (added != 0).all()  # every noise coordinate got fresh noise
    assert added.std().item() == pytest.approx(2.0, rel=0.1)  # N(0, sigma^2)
    x2, _ = cell.batch(256, args)
    same_point = (x1[:, None, :4] == x2[None, :, :4]).all(-1)  # pairs showing the same point
    assert same_point.any() and not (x1[:, None, 4:] == x2[None, :, 4:]).all(-1)[same_point].any()


def brute_force_invariance(h1, h2, h):
    m = len(h)
    ratios = []
    for i in range(m):
        num = np.sum((h1[i] - h2[i]) ** 2)
        den = np.mean([np.sum((h[i] - h[j]) ** 2) for j in range(m) if j != i])
        ratios.append(num / den)
    return np.mean(ratios)


def test_invariance_matches_direct_computation():
    rng = np.random.default_rng(1)
    h, h1, h2 = (rng.normal(size=(7, 5)) for _ in range(3))
    got = toy.normalized_invariance(torch.tensor(h1), torch.tensor(h2), torch.tensor(h)).item()
    assert got == pytest.approx(brute_force_invariance(h1, h2, h), rel=1e-9)


def test_invariance_is_zero_when_encoder_ignores_noise_block():
    args = small_args(dim=10, signal_dim=3, test_points=50)
    world = toy.make_world(0, args)
    cell = toy.Cell(4, 2, 0, world["centres"], args)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(1, 10, 10, generator=g)
    W[..., 3:] = 0  # zero the noise columns
    _, inv, nts = toy.evaluate([cell], {0: world}, W, args)
    assert inv.item() == 0.0 and nts.item() == 0.0
    W2 = torch.randn(1, 10, 10, generator=g)
    _, inv2, _ = toy.evaluate([cell], {0: world}, W2, args)
    assert inv2.item() > 0.1


def test_noise_to_signal_hand_worked():
    W = torch.zeros(1, 4, 4)
    W[0, :, :2] = 1.0  # signal columns: squared norm 4 each
    W[0, :, 2:] = 2.0  # noise columns: squared norm 16 each
    assert toy.noise_to_signal(W, 2).item() == pytest.approx(2.0)


def brute_force_knn(ref, ref_y, q, q_y, k, classes):
    refn = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    preds = []
    for row in qn @ refn.T:
        votes = np.bincount(ref_y[np.argsort(-row)[:k]], minlength=classes)
        preds.append(np.argmax(votes))  # the first maximum: ties go to the smallest class
    return np.mean(np.array(preds) == q_y)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(2)
    ref, q = rng.normal(size=(30, 4)), rng.normal(size=(11, 4))
    ref_y, q_y = rng.integers(0, 3, 30), rng.integers(0, 3, 11)
    got = toy.knn_accuracy(torch.tensor(ref)[None], torch.tensor(ref_y)[None],
                           torch.tensor(q)[None], torch.tensor(q_y)[None], 5, 3)
    assert got.item() == pytest.approx(brute_force_knn(ref, ref_y, q, q_y, 5, 3))


def test_knn_share_is_exact_in_float64():
    """1 hit in 800 is stored rounded to 4 decimals: float32's 0.00124999997 gave 0.0012."""
    ref = torch.eye(2, dtype=torch.float64).repeat(10, 1)  # 10 points on each axis
    queries = torch.tensor([[1.0, 0.0]]).repeat(800, 1).double()  # all nearest to axis 0
    query_labels = torch.ones(800, dtype=torch.long)
    query_labels[0] = 0  # one right answer
    got = toy.knn_accuracy(ref[None], torch.arange(20)[None] % 2, queries[None],
                           query_labels[None], 5, 2)
    assert got.item() == 1 / 800 and round(got.item(), 4) == 0.0013


def test_evaluate_gives_each_cell_its_own_measures_whatever_the_chunk():
    """Nine cells cross the default chunk of eight; cell 8's K-NN and invariance recomputed."""
    args = small_args(dim=10, signal_dim=4, probe_points=60, test_points=40, knn_k=5)
    worlds = {s: toy.make_world(s, args) for s in (0, 1, 2)}
    cells = [toy.Cell(4, b, s, worlds[s]["centres"], args) for b in (1, 2, 3) for s in (0, 1, 2)]
    W = torch.randn(9, 10, 10, generator=torch.Generator().manual_seed(0))
    results = [toy.evaluate(cells, worlds, W, args, chunk) for chunk in (1, 4, 8)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)
    knn, invariance, _ = results[-1]
    assert len(set(knn.tolist())) > 3  # the cells differ
    last, world = cells[8], worlds[cells[8].seed]
    embed = lambda x: (x @ W[8].T).double().numpy()
    expected = brute_force_knn(embed(world["probe_x"]), world["probe_z"].numpy(),
                               embed(world["test_x"]), world["test_z"].numpy(), 5, args.classes)
    assert knn[8].item() == pytest.approx(expected)
    views = [world["test_x"] + toy.augmentation_noise(
        40, args, toy.named_generator("cpu", "invariance", last.seed, t)) for t in (1, 2)]
    h1, h2, h = (embed(v) for v in (*views, world["test_x"]))
    assert invariance[8].item() == pytest.approx(brute_force_invariance(h1, h2, h), rel=1e-4)


def test_reference_probes_are_knn_of_the_raw_points_and_of_their_class_coordinates():
    args = small_args(dim=10, signal_dim=4, probe_points=60, test_points=40, knn_k=5)
    worlds = {s: toy.make_world(s, args) for s in (0, 3)}
    rows = toy.reference_probes(worlds, args)
    assert [r["seed"] for r in rows] == [0, 3]
    for r, w in zip(rows, worlds.values()):
        probe = lambda columns: brute_force_knn(
            w["probe_x"][:, columns].double().numpy(), w["probe_z"].numpy(),
            w["test_x"][:, columns].double().numpy(), w["test_z"].numpy(), 5, args.classes)
        assert r["knn_input"] == round(probe(slice(None)), 4)
        assert r["knn_class_coordinates"] == round(probe(slice(0, 4)), 4)


def test_fit_is_the_share_of_fitted_points_the_projector_labels_right(monkeypatch):
    """Prototypes on the points, with their labels: fit 1; labels shifted by one: fit 0. Online
    cells are measured on fit_views fresh augmentations of each point (noise coordinates only)."""
    args = small_args(dim=10, signal_dim=4, fit_views=3)
    centres = toy.make_world(0, args)["centres"]
    fixed, online = toy.Cell(5, 3, 0, centres, args), toy.Cell(5, None, 0, centres, args)
    eye = torch.eye(10)[None]
    V = fixed.fit_x[None]  # 15 prototypes, one on each fixed view
    right = torch.nn.functional.one_hot(fixed.fit_y, args.classes).float()[None]
    wrong = torch.nn.functional.one_hot((fixed.fit_y + 1) % args.classes, args.classes)
    assert toy.fit_accuracy([fixed], eye, V, right, args).item() == 1.0
    assert toy.fit_accuracy([fixed], eye, V, wrong.float()[None], args).item() == 0.0
    seen, real = [], toy.projector
    monkeypatch.setattr(toy, "projector", lambda h, *rest: seen.append(h) or real(h, *rest))
    signal = torch.zeros(1, 10, 10)
    signal[0, :4, :4] = torch.eye(4)  # an encoder that ignores the noise: the views fit as well
    right = torch.nn.functional.one_hot(online.labels, args.classes).float()[None]
    V = online.x[None] @ signal.transpose(1, 2)
    assert toy.fit_accuracy([online], signal, V, right, args).item() == 1.0
    assert toy.fit_accuracy([online], eye, online.x[None], right, args).item() < 1.0
    h = seen[-1]  # the identity encoder: h is the measured points themselves
    assert h.shape == (15, 10)
    base = online.x.repeat(3, 1)
    assert torch.equal(h[:, :4], base[:, :4]) and (h[:, 4:] != base[:, 4:]).all()


def test_initial_encoder_and_prototypes_are_as_documented():
    """W ~ N(0, 1/d), the same for a seed's cells; each prototype is one training point's initial
    embedding plus N(0, 0.1^2) noise (0.8 away from it in d = 64, where points lie about 10
    apart); one-hot labels."""
    args = small_args()
    worlds = {s: toy.make_world(s, args) for s in (0, 1)}
    cells = [toy.Cell(64, b, s, worlds[s]["centres"], args) for s in (0, 1) for b in (1, 16)]
    W, V, onehots = toy.init_models(cells, args)
    assert torch.equal(W[0], W[1]) and not torch.equal(W[0], W[2])
    assert W.std().item() == pytest.approx(1 / math.sqrt(args.dim), rel=0.03)
    assert W.mean().abs().item() < 0.01
    for m, cell in enumerate(cells):
        h = cell.x @ W[m].T
        nearest = torch.cdist(V[m], h).min(1).values  # to the closest training point's embedding
        assert nearest.max().item() < 1.2 and nearest.mean().item() == pytest.approx(0.8, rel=0.1)
        assert torch.cdist(h, h).sum().item() / (64 * 63) > 8
        assert torch.equal(onehots[m].sum(1), torch.ones(args.capacity))
        assert set(onehots[m].unique().tolist()) == {0.0, 1.0}
    # uniform over the C classes: 5,000 prototypes give each class 500 +- 21 (binomial std)
    _, _, onehots = toy.init_models(cells[:1], small_args(capacity=5000))
    counts = onehots[0].sum(0)
    assert len(counts) == args.classes and (counts - 500).abs().max().item() < 100


def numpy_loss(W, V, labels, x, y):
    """-log g(Wx)_y averaged over the batch, with g as Appendix E writes it."""
    total = 0.0
    for xi, yi in zip(x, y):
        inv = 1 / np.linalg.norm(W @ xi - V, axis=1)
        total -= np.log((inv / inv.sum()) @ labels[:, yi])
    return total / len(x)


def numerical_gradient(f, a, eps=1e-6):
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        step = np.zeros_like(a)
        step[i] = eps
        grad[i] = (f(a + step) - f(a - step)) / (2 * eps)
    return grad


def test_two_training_steps_match_a_numpy_gradient_and_momentum_per_cell():
    """Two cells, each with its own fixed batch: each must move by its own loss's gradient alone
    (the sum over cells must not mix them), with SGD momentum 0.9: p1 = p0 - lr g0,
    p2 = p1 - lr (0.9 g0 + g1)."""
    rng = np.random.default_rng(0)
    args = small_args(dim=3, classes=3, capacity=2, batch_size=4, steps=2, lr=0.1)
    W0, V0 = rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 2, 3))
    carried = [[0, 1], [2, 1]]  # each cell's two prototypes' labels, and those it is asked to fit
    labels = np.eye(3)[carried]
    batches = [(rng.normal(size=(4, 3)), rng.choice(c, 4)) for c in carried]

    class FixedBatch:  # a cell whose every batch is the same
        def __init__(self, x, y):
            self.x, self.y = torch.tensor(x), torch.tensor(y)

        def batch(self, size, args):
            assert size == 4
            return self.x, self.y
    W, V = toy.train([FixedBatch(*b) for b in batches], torch.tensor(W0), torch.tensor(V0),
                     torch.tensor(labels), args)
    for m, (x, y) in enumerate(batches):
        grads = lambda W_, V_: (
            numerical_gradient(lambda a: numpy_loss(a, V_, labels[m], x, y), W_),
            numerical_gradient(lambda a: numpy_loss(W_, a, labels[m], x, y), V_))
        gW0, gV0 = grads(W0[m], V0[m])
        W1, V1 = W0[m] - 0.1 * gW0, V0[m] - 0.1 * gV0
        gW1, gV1 = grads(W1, V1)
        np.testing.assert_allclose(W[m].numpy(), W1 - 0.1 * (0.9 * gW0 + gW1), rtol=1e-6)
        np.testing.assert_allclose(V[m].numpy(), V1 - 0.1 * (0.9 * gV0 + gV1), rtol=1e-6)


def test_short_sweep_shows_the_claim(tmp_path, capsys):
    """Fitting random labels without augmentation diversity is malign; with B >= 16, benign. The
    printed table holds what results.json holds."""
    results = toy.main(["--n", "16", "--augs", "1,16", "--seeds", "0,1", "--device", "cpu",
                        "--out-dir", str(tmp_path)])
    gain = lambda b: np.mean([r["knn"] - r["knn_init"] for r in results if r["augs"] == b])
    assert gain(1) <= 0.02
    assert gain(16) >= 0.10
    for seed in (0, 1):  # one W0 per seed: its cells share the INIT probe
        assert len({r["knn_init"] for r in results if r["seed"] == seed}) == 1
    assert results[0]["knn_init"] != results[1]["knn_init"]
    fit1 = np.mean([r["fit"] for r in results if r["augs"] == 1])
    assert fit1 >= 0.8  # 16 points are within capacity: memorized
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["n"] == [16]
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.split()[0] == "16")
    for b in (1, 16):  # mean and sample std over the seeds, and the mean fit, from the file
        cells = [r for r in saved["cells"] if r["augs"] == b]
        gains = [r["knn"] - r["knn_init"] for r in cells]
        fit = np.mean([r["fit"] for r in cells])
        assert f"{np.mean(gains):+.3f}±{np.std(gains, ddof=1):.3f} fit {fit:.2f}" in row
    assert [r["seed"] for r in saved["reference_probes"]] == [0, 1]
    for r in saved["reference_probes"]:  # the noise coordinates hide the classes from K-NN
        assert r["knn_input"] + 0.3 < r["knn_class_coordinates"]
    for r in results:
        assert set(r) == {"n", "augs", "seed", "fit", "knn", "knn_init", "invariance",
                          "noise_to_signal"}


def test_few_prototypes_fit_only_their_labels_points_and_online_is_benign(tmp_path):
    """The projector's output is a convex combination of its prototypes' labels, so it never
    predicts a class no prototype carries: with K = 4 (at most 4 of 10 classes), a cell's fit is
    at most the share of its points whose random label a prototype carries; K = 64 fits the 16
    unaugmented points (memorized, malign). The online column gains over INIT whatever K."""
    runs = {K: toy.main(["--n", "16", "--augs", "1,online", "--seeds", "0,1", "--capacity",
                         str(K), "--device", "cpu", "--out-dir", str(tmp_path / str(K))])
            for K in (4, 64)}
    # online is None inside the script but keeps its command-line spelling in what it writes
    assert json.loads((tmp_path / "4" / "config.json").read_text())["augs"] == [1, "online"]
    assert [r["augs"] for r in runs[4]] == [1, 1, "online", "online"]
    args = small_args(capacity=4)
    cells = [toy.Cell(16, b, s, toy.make_world(s, args)["centres"], args)
             for b in (1, None) for s in (0, 1)]
    _, _, onehots = toy.init_models(cells, args)
    for cell, labels, result in zip(cells, onehots, runs[4]):
        carried = labels.sum(0) > 0
        assert result["fit"] <= carried[cell.labels].double().mean().item() < 1
    mean = lambda rows, key, b: np.mean([r[key] - (r["knn_init"] if key == "knn" else 0)
                                         for r in rows if r["augs"] == b])
    assert mean(runs[64], "fit", 1) >= 0.85
    for K in (4, 64):
        assert mean(runs[K], "knn", 1) <= 0.02  # no augmentation: nothing learnt (as above)
        assert mean(runs[K], "knn", "online") >= 0.2  # fresh noise every step: benign


def test_cells_do_not_depend_on_the_rest_of_the_grid(tmp_path):
    common = ["--n", "16", "--seeds", "0", "--steps", "50", "--device", "cpu"]
    alone = toy.main(common + ["--augs", "4", "--out-dir", str(tmp_path / "a")])
    grid = toy.main(common + ["--augs", "1,4", "--out-dir", str(tmp_path / "b")])
    assert alone[0] == [r for r in grid if r["augs"] == 4][0]


@pytest.mark.parametrize("args,fragment", [
    (["--n", "0"], "--n"),
    (["--augs", "-1"], "--augs"),
    (["--augs", "4,lots"], "--augs"),
    (["--bogus"], "unrecognized"),
    (["--capacity", "0"], "--capacity"),
    (["--signal-dim", "4"], "unrecognized"),  # the world's constants are not flags
    (["--device", "nosuchdevice"], "--device"),
    (["--device", "meta"], "cpu or cuda"),  # torch.empty works on meta, training does not
    (["--seeds", "0,0"], "repeats"),  # two identical cells: a spread of 0 "over seeds"
    (["--augs", "online,online"], "repeats"),
    # past 2**63 torch raised a TypeError with C++ frames ("Overflow when unpacking long long")
    (["--n", "100000000000000000000"], "<= 10,000,000"),
    (["--capacity", "100000000000000000000"], "<= 10,000,000"),
    (["--n", "16", "--augs", "1152921504606846976"], "<= 10,000,000"),
])
def test_bad_input_gives_one_line_error(args, fragment, tmp_path, capsys):
    err = main_error(toy, ["--device", "cpu", *args, "--out-dir", tmp_path / "out"], capsys)
    assert fragment in err
    assert not (tmp_path / "out").exists()


def test_a_json_write_stopped_by_ctrl_c_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """It wrote path.tmp, which a second identical sweep into the folder would share, and left
    it behind on Ctrl-C."""
    path = str(tmp_path / "results.json")
    toy.write_json(path, {"cells": 1})

    def stopped(obj, f, **kwargs):
        f.write('{"cells": ')
        raise KeyboardInterrupt
    monkeypatch.setattr(toy.json, "dump", stopped)
    with pytest.raises(KeyboardInterrupt):
        toy.write_json(path, {"cells": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["results.json"] and json.load(open(path)) == {"cells": 1}


def test_out_dir_below_a_file_gives_one_line_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    err = main_error(toy, ["--device", "cpu", "--out-dir", tmp_path / "afile" / "sub"], capsys)
    assert "afile" in err and "not a directory" in err


def test_an_empty_out_dir_is_the_current_folder(tmp_path, monkeypatch):
    """As for the other two scripts; it failed at the write, after the whole sweep had run."""
    monkeypatch.chdir(tmp_path)
    toy.main(["--device", "cpu", "--n", "4", "--augs", "1", "--seeds", "0", "--steps", "2",
              "--out-dir", ""])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "results.json"]


def test_a_folder_with_results_but_no_config_is_refused_unless_overwrite(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"someone": "else"}')
    small = ["--device", "cpu", "--n", "4", "--augs", "1", "--seeds", "0", "--steps", "2",
             "--out-dir", str(tmp_path)]
    err = main_error(toy, small, capsys)
    assert str(tmp_path) in err and "a results.json without config.json" in err, err
    assert [f.name for f in tmp_path.iterdir()] == ["results.json"]
    assert (tmp_path / "results.json").read_text() == '{"someone": "else"}'
    toy.main(small + ["--overwrite"])
    assert json.loads((tmp_path / "results.json").read_text())["config"]["steps"] == 2


def test_another_sweeps_folder_is_refused_and_a_failed_sweep_leaves_it_as_it_was(
        tmp_path, monkeypatch, capsys):
    """The toy replaced any folder's config.json and results.json (a benign run's, say), and
    wrote config.json before a sweep that could then fail."""
    small = ["--device", "cpu", "--n", "4", "--augs", "1", "--seeds", "0",
             "--out-dir", str(tmp_path)]
    toy.main(small + ["--steps", "2"])
    toy.main(small + ["--steps", "2"])  # the same sweep again: allowed
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert "of another sweep" in main_error(toy, small + ["--steps", "3"], capsys)
    import benign_memorization
    import masc_decode
    for script in (benign_memorization, masc_decode):  # their real configs
        theirs = json.dumps(vars(script.build_parser().parse_args([])))
        (tmp_path / "config.json").write_text(theirs)
        for overwrite in ([], ["--overwrite"]):  # it would lose a record the toy cannot redo
            err = main_error(toy, small + ["--steps", "2"] + overwrite, capsys)
            assert "another script's run" in err and "--overwrite" not in err
            assert (tmp_path / "config.json").read_text() == theirs
    on_cuda = dict(json.loads(before["config.json"]), device="cuda:1")  # other random streams
    (tmp_path / "config.json").write_text(json.dumps(on_cuda))
    assert "of another sweep" in main_error(toy, small + ["--steps", "2"], capsys)
    on_cpu0 = dict(json.loads(before["config.json"]), device="cpu:0")  # the same streams
    (tmp_path / "config.json").write_text(json.dumps(on_cpu0))
    toy.main(small + ["--steps", "2"])  # accepted
    (tmp_path / "config.json").write_bytes(before["config.json"])
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}  # results.json's new "seconds"

    out_of_memory = [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to..."),
                     RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                                  "DefaultCPUAllocator: can't allocate memory: you tried to...")]
    for error in out_of_memory + [RuntimeError("a bug")]:  # a sweep too large: one line
        def failing_sweep(args):
            raise error
        monkeypatch.setattr(toy, "run_sweep", failing_sweep)
        if error in out_of_memory:
            err = main_error(toy, small + ["--steps", "3", "--overwrite"], capsys)
            assert "does not fit in the memory of cpu" in err and "--n" in err
        else:  # anything else is a bug, with its traceback
            with pytest.raises(RuntimeError, match="a bug"):
                toy.main(small + ["--steps", "3", "--overwrite"])
        assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    monkeypatch.undo()
    toy.main(small + ["--steps", "3", "--overwrite"])
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 3

def test_augs_flag_reads_online_as_none():
    parse = lambda *argv: toy.build_parser().parse_args(list(argv)).augs
    assert parse("--augs", " 16, online,1") == [16, None, 1]
    assert parse() == toy.Config().augs == [1, 4, 16, 64, None]  # B = 1 to 64, then online


def test_bad_input_from_the_command_line(tmp_path):
    proc = run_script("toy_capacity.py", "--device", "cpu", "--n", "0",
                      "--out-dir", tmp_path / "out")
    assert_one_line_error(proc, "--n")


def test_scripts_in_tests_run_offline(tmp_path):
    """The missing-data tests rely on it: no test may download a dataset, even on a connected
    machine."""
    probe = tmp_path / "probe.py"
    probe.write_text("import urllib.request\n"
                     "try:\n    urllib.request.urlopen('http://example.com', timeout=5)\n"
                     "except Exception as e:\n    print(type(e).__name__, e)\n")
    proc = run_script(str(probe))
    assert proc.returncode == 0 and "the tests run offline" in proc.stdout, \
        proc.stdout + proc.stderr
    import socket
    with pytest.raises(OSError, match="offline"):
        socket.create_connection(("example.com", 80), timeout=5)
