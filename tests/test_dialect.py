"""The three scripts speak one dialect: the same seeded-generator helper, the same bad-input path
(one line on stderr; exit 2 for a malformed flag, 1 for anything else), and results that name the
script file that produced them."""
import errno
import hashlib
import inspect
import json
import os

import pytest
import torch
import torchvision

import benign_memorization as bm
import masc_decode as m
import toy_capacity as toy
from conftest import (REPO, lock_held_by_another_process, main_error, run_script, write_cifar,
                      write_mnist, write_tinyimagenet)

SCRIPTS = {"benign_memorization.py": bm, "masc_decode.py": m, "toy_capacity.py": toy}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_named_generators_are_named_streams(name):
    module = SCRIPTS[name]
    assert list(inspect.signature(module.named_generator).parameters) == ["device", "keys"]
    draw = lambda *keys: torch.rand(4, generator=module.named_generator("cpu", *keys))
    assert torch.equal(draw("labels", 0), draw("labels", 0))  # a name is a fixed stream
    assert not torch.equal(draw("labels", 0), draw("labels", 1))
    assert not torch.equal(draw("labels", 0), draw("order", 0))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_docstrings_commands_write_to_different_folders(name):
    """Run one after another, each usage command must start its own run: one that shared the
    default --out-dir with an earlier one of other settings was refused (the toy's second, the
    second and third of benign and of masc, whose models share names in models/)."""
    module = SCRIPTS[name]
    usage = module.__doc__.split("Usage:")[1].replace("\\\n", " ")
    commands = [line.split("#")[0].split() for line in usage.splitlines()
                if line.strip().startswith(f"python {name}")]
    default = module.build_parser().parse_args([]).out_dir
    folders = [c[c.index("--out-dir") + 1] if "--out-dir" in c else default for c in commands]
    assert len(commands) == 3 and len(set(folders)) == 3, folders


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bad_flag_exits_2_and_bad_input_exits_1(name, tmp_path, capsys):
    module = SCRIPTS[name]
    with pytest.raises(SystemExit) as malformed:
        module.main(["--no-such-flag", "--out-dir", str(tmp_path / "a")])
    assert malformed.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    err = main_error(module, ["--device", "nosuchdevice", "--out-dir", tmp_path / "b"], capsys)
    assert err.startswith("error: --device nosuchdevice is not available")
    with pytest.raises(SystemExit) as bad:
        module.main(["--device", "nosuchdevice", "--out-dir", str(tmp_path / "c")])
    assert bad.value.code == 1
    assert not any((tmp_path / d).exists() for d in "abc")


def script_sha256(name):
    with open(os.path.join(REPO, name), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_results_name_the_script_that_made_them(tmp_path):
    results = toy.main(["--n", "4", "--augs", "1", "--seeds", "0", "--steps", "2",
                        "--device", "cpu", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["script_sha256"] == script_sha256("toy_capacity.py") and saved["cells"] == results
    assert m.script_sha256() == script_sha256("masc_decode.py")
    assert bm.script_sha256() == script_sha256("benign_memorization.py")


def test_every_device_default_is_cuda_in_the_suite_as_on_a_gpu_machine(tmp_path):
    """conftest makes --device default to cuda in every parser a test builds, in-process and in a
    subprocess: a test that left its device to the default would fail here as it would with a GPU
    (CUDA unavailable) or run on CUDA there, so the suite means the same on both machines."""
    modules = [module.__name__ for module in SCRIPTS.values()]
    assert [m.build_parser().parse_args([]).device for m in SCRIPTS.values()] == ["cuda"] * 3
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys; sys.path.insert(0, {REPO!r})\n"
                     f"for name in {modules!r}:\n"
                     "    print(__import__(name).build_parser().parse_args([]).device)\n")
    proc = run_script(str(probe))
    assert proc.returncode == 0 and proc.stdout.split() == ["cuda"] * 3, proc.stderr


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_an_exception_without_a_message_still_gives_one_line(name, tmp_path, monkeypatch, capsys):
    """A device whose allocation fails with an empty message indexed splitlines()[0] of nothing:
    an IndexError traceback instead of the one-line error."""
    module, real_empty = SCRIPTS[name], torch.empty

    def empty(*shape, device=None, **kwargs):
        if device is not None and str(device) == "cpu:7":
            raise RuntimeError()
        return real_empty(*shape, device=device, **kwargs)
    monkeypatch.setattr(torch, "empty", empty)
    err = main_error(module, ["--device", "cpu:7", "--out-dir", tmp_path / "run"], capsys)
    assert err == "error: --device cpu:7 is not available (RuntimeError)"
    assert not (tmp_path / "run").exists()

    def empty_with_message(*shape, device=None, **kwargs):  # as Python's last traceback line
        if device is not None and str(device) == "cpu:7":
            raise RuntimeError("no device 7\nat line 2")
        return real_empty(*shape, device=device, **kwargs)
    monkeypatch.setattr(torch, "empty", empty_with_message)
    err = main_error(module, ["--device", "cpu:7", "--out-dir", tmp_path / "run"], capsys)
    assert err == "error: --device cpu:7 is not available (RuntimeError: no device 7)"


@pytest.mark.parametrize("name", ["benign_memorization.py", "masc_decode.py"])
def test_a_failed_download_names_its_error_once(name, tmp_path, monkeypatch):
    """Python's own one-line form: the type once (a message-less error read "(RuntimeError:
    RuntimeError)"), and the type before a message that alone would not say what failed."""
    module = SCRIPTS[name]
    dataset, cls = ("cifar10", "CIFAR10") if module is bm else ("mnist", "MNIST")
    for error, shown in ((RuntimeError(), "(RuntimeError)"), (KeyError("x"), "(KeyError: 'x')")):
        def fail(*args, **kwargs):
            raise error
        monkeypatch.setattr(torchvision.datasets, cls, fail)
        with pytest.raises(module.UserError) as refused:
            module.load_torchvision(dataset, str(tmp_path))
        assert shown in str(refused.value) and "could not be downloaded" in str(refused.value)
        monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fail)
        with pytest.raises(module.UserError) as refused:
            module.load_tinyimagenet(str(tmp_path))
        assert shown in str(refused.value) and "could not be downloaded" in str(refused.value)


def unwritable_run(name, tmp_path):  # arguments that reach the first write into --out-dir
    if name == "toy_capacity.py":
        return ["--n", "4", "--augs", "1", "--seeds", "0", "--steps", "1"]
    data = tmp_path / "data"
    if name == "masc_decode.py":
        write_mnist(str(data), "MNIST", n_train=40, n_test=20)
        return ["--train-size", "20", "--epochs", "1", "--data-dir", data]
    write_cifar(str(data), "cifar10", n_train=40, n_test=20)
    return ["--epochs", "1", "--batch-size", "16", "--projector-width", "8", "--knn-k", "3",
            "--invariance-size", "0", "--data-dir", data]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_an_out_dir_that_cannot_be_made_gives_one_line(name, tmp_path, monkeypatch, capsys,
                                                       patch_md5):
    """os.makedirs of --out-dir fails (no permission, a read-only disk): one line naming the
    folder's problem, not a traceback."""
    out, real_makedirs = tmp_path / "run", os.makedirs

    def makedirs(path, *args, **kwargs):
        if os.path.abspath(path).startswith(str(out)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, "makedirs", makedirs)
    err = main_error(SCRIPTS[name], unwritable_run(name, tmp_path) + [
        "--device", "cpu", "--out-dir", out], capsys)
    assert "Permission denied" in err and str(out) in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_line_of_a_script_is_under_100_characters(name):
    with open(os.path.join(REPO, name)) as f:
        long = [n for n, line in enumerate(f, 1) if len(line.rstrip("\n")) >= 100]
    assert not long, f"{name}: lines {long}"


@pytest.mark.parametrize("name", ["benign_memorization.py", "masc_decode.py"])
def test_tiny_imagenet_on_a_read_only_data_dir_loads_without_a_cache(name, tmp_path,
                                                                     monkeypatch, capsys):
    """Shared dataset storage is often read-only: its cache cannot be written, which ended the
    run in a traceback; the images are used without it (and decoded again next time)."""
    module, real_save = SCRIPTS[name], torch.save
    write_tinyimagenet(str(tmp_path))
    cache = tmp_path / "tiny-imagenet-200" / "uint8_cache.pt"

    def save(obj, f):  # a path, or the open file the scripts' atomic write passes
        path = str(getattr(f, "name", f))
        if path.startswith(str(cache)):
            raise OSError(30, "Read-only file system", path)
        return real_save(obj, f)
    monkeypatch.setattr(torch, "save", save)
    uncached = module.load_tinyimagenet(str(tmp_path))
    assert "warning: could not write" in capsys.readouterr().err and not cache.exists()
    monkeypatch.setattr(torch, "save", real_save)
    cached = module.load_tinyimagenet(str(tmp_path))
    assert cache.exists() and not cache.with_suffix(".pt.tmp").exists()
    assert all(torch.equal(a, b) for a, b in zip(sum(uncached, ()), sum(cached, ())))


@pytest.mark.parametrize("name", ["benign_memorization.py", "masc_decode.py"])
def test_ctrl_c_says_how_to_resume_instead_of_a_traceback(name, tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(SCRIPTS[name], "run", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].main(["--device", "cpu", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 130  # as a shell reports SIGINT
    assert capsys.readouterr().err.strip().startswith("interrupted: the same command")


@pytest.mark.parametrize("name", ["benign_memorization.py", "masc_decode.py"])
def test_a_damaged_tiny_imagenet_annotation_or_cache_gives_one_line(name, tmp_path, monkeypatch):
    """A truncated val_annotations.txt line (IndexError) and a cache without its tensors
    (KeyError) ended in tracebacks."""
    module = SCRIPTS[name]
    write_tinyimagenet(str(tmp_path))
    base = tmp_path / "tiny-imagenet-200"
    with open(base / "val" / "val_annotations.txt", "a") as f:
        f.write("val_99.JPEG")
    with pytest.raises(module.UserError, match="incomplete"):
        module.load_tinyimagenet(str(tmp_path))
    torch.save({"train_x": torch.zeros(1)}, base / "uint8_cache.pt")
    with pytest.raises(module.UserError, match="unreadable"):
        module.load_tinyimagenet(str(tmp_path))


def test_the_run_folder_lock_is_the_same_class_in_both_long_running_scripts():
    assert inspect.getsource(bm.RunFolderLock) == inspect.getsource(m.RunFolderLock)


@pytest.mark.parametrize("name", ["benign_memorization.py", "masc_decode.py"])
def test_run_folder_lock_is_taken_once_the_folder_exists(name, tmp_path, monkeypatch, capsys):
    """A folder that does not exist yet is not made before the first write (bad input leaves no
    folder behind); take(create=True) makes and locks it, so another process cannot, and while
    another process holds it take() is refused. A folder that was absent at the first take and
    holds another command's config.json at the second is refused, locks or not. A file system
    without locks only warns; without os.lockf (Windows) nothing is locked."""
    module = SCRIPTS[name]
    lock = module.RunFolderLock(str(tmp_path / "new"))
    lock.take()
    assert not (tmp_path / "new").exists()
    lock.take(create=True)
    with pytest.raises(AssertionError):  # the holder could not take it: this process has it
        with lock_held_by_another_process(tmp_path / "new" / "run.lock"):
            pass
    lock.release()
    with lock_held_by_another_process(tmp_path / "new" / "run.lock"):
        with pytest.raises(module.UserError, match="another process is running in"):
            module.RunFolderLock(str(tmp_path / "new")).take()
    with module.RunFolderLock(str(tmp_path / "new")) as again:  # the holder gone: free to take
        again.take()
    monkeypatch.chdir(tmp_path)  # --out-dir "": the current folder, as save_atomically has it
    with module.RunFolderLock("") as here:
        here.take(create=True)
        assert (tmp_path / "run.lock").exists() and here.file is not None

    def no_locks(fd, how, size):  # as on an NFS mount without a lock service
        raise OSError(errno.ENOLCK, "No locks available")
    for folder in ("race", "nfs", "windows"):
        if folder == "nfs":
            monkeypatch.setattr(os, "lockf", no_locks)
        if folder == "windows":
            monkeypatch.delattr(os, "lockf")
        race = module.RunFolderLock(str(tmp_path / folder))
        race.take()  # absent: nothing yet
        (tmp_path / folder).mkdir()  # another command's run appears meanwhile
        (tmp_path / folder / "config.json").write_text("{}")
        with pytest.raises(module.UserError, match="another command started a run in"):
            race.take(create=True)
        assert race.file is None
        with module.RunFolderLock(str(tmp_path / folder)) as resumed:  # existed: its run
            resumed.take()
            resumed.take(create=True)
        assert (tmp_path / folder / "run.lock").exists() == (folder != "windows")
    assert capsys.readouterr().err.count("warning: could not lock") == 2  # once per lock


def test_masc_runs_in_the_current_folder_with_an_empty_out_dir(tmp_path, monkeypatch):
    write_mnist(str(tmp_path / "data"), "MNIST", n_train=100, n_test=40)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    m.main(["--dataset", "mnist", "--model", "mlp", "--corruption", "0.5", "--epochs", "1",
            "--no-retrain", "--device", "cpu", "--data-dir", str(tmp_path / "data"),
            "--out-dir", ""])
    assert sorted(os.listdir(tmp_path / "here")) == ["config.json", "models", "results.json",
                                                     "run.lock"]
