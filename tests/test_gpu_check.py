"""tests/gpu_check.py keeps working: its smallest form passes on the CPU, a check that finds a
fault makes it exit non-zero, and a missing GPU is one line and exit status 2."""
import contextlib
import io
import warnings

import pytest
import torch

import benign_memorization as bm
import gpu_check


def test_smallest_form_passes_every_check(capsys):
    status = gpu_check.main(["--device", "cpu", "--smallest"])
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    passed, _, total = last.split()[:3]
    assert status == 0 and passed == total == str(12), out
    assert last.endswith("checks passed") and "FAIL" not in out, out
    # the checks that compile come last: a time limit on a first, compiling run cuts only them
    names = [line.split(" | ")[0] for line in out.splitlines() if " | " in line][1:]
    compiling = [i for i, name in enumerate(names) if "compiled" in name]
    assert len(names) == 12 and compiling == [10, 11], names
    # the timing rows hold the README's GPU targets: a CPU row says that it passes if it ran
    bounds = {line.split(" | ")[0].strip(): line.split(" | ")[2]
              for line in out.splitlines() if " | " in line}
    free = sorted(name for name, bound in bounds.items() if "CPU: informational" in bound)
    assert free == ["benign compiled step (b)/(a)", "benign eager step (b)/(a)",
                    "benign evaluation", "masc cnn epoch, stacked vs apart",
                    "masc mlp epoch, stacked vs apart"], free


def test_a_failing_check_exits_non_zero(capsys, monkeypatch):
    # a K-NN that always answers class 0: the fp16-against-float64 agreement check must catch it
    monkeypatch.setattr(bm, "knn_predict", lambda ref, labels, queries, *args, **kwargs:
                        torch.zeros(len(queries), dtype=torch.long, device=queries.device))
    status = gpu_check.main(["--device", "cpu", "--smallest", "--only", "knn-fp16"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "FAIL" in out and out.strip().splitlines()[-1] == "0 of 1 checks passed", out


def test_the_masc_command_check_catches_a_resume_that_loses_the_random_state(capsys,
                                                                             monkeypatch):
    """A resumed model whose batch order restarts from another state: the results differ."""
    real = gpu_check.md.load_model_checkpoint

    def forgetful(*args, **kwargs):
        ckpt = real(*args, **kwargs)
        if ckpt and "gen" in ckpt:
            ckpt["gen"] = torch.Generator().manual_seed(99).get_state()
        return ckpt
    monkeypatch.setattr(gpu_check.md, "load_model_checkpoint", forgetful)
    status = gpu_check.main(["--device", "cpu", "--smallest", "--only", "masc-main"])
    out = capsys.readouterr().out
    assert status == 1 and "resumed: results differ" in out, out


def test_without_cuda_the_default_device_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this project's machines
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cpu" in err, err


def test_an_unknown_check_is_one_line_and_status_2(capsys):
    assert gpu_check.main(["--device", "cpu", "--only", "knn-fp16,bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'knn-fp16,bogus'" in err and "resume" in err, err


def test_a_refused_in_process_run_fails_its_check_instead_of_ending_the_self_check():
    """bm.main exits on bad input (a full disk, say); SystemExit is no Exception, so it ended the
    whole self-check without its summary line."""
    with pytest.raises(RuntimeError, match="--epochs"):
        gpu_check.benign_in_process(["--device", "cpu", "--epochs", "0"])


def test_nondeterministic_ops_reads_the_ops_torchs_warnings_name():
    """A CUDA resume that differs needs a first clue, which the resume check adds to its row: the
    ops torch's warn_only mode named (here a CPU op that warns too, put_ without accumulation:
    duplicate indices race), and cuBLAS's alert, which names none."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always")
        # to stderr, as outside pytest (which records warnings instead)
        warnings.showwarning = lambda message, category, filename, lineno, *rest: err.write(
            warnings.formatwarning(message, category, filename, lineno))
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        finally:
            torch.use_deterministic_algorithms(False)
        warnings.warn("index_put_ with accumulate=False does not have a deterministic "
                      "implementation, but you set ...")
        torch.zeros(3).put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))  # mode off: silent
    assert gpu_check.nondeterministic_ops(err.getvalue() * 2) == [
        "put_", "index_put_ with accumulate=False"]
    cublas = ("UserWarning: Deterministic behavior was enabled with ... but this operation is not "
              "deterministic because it uses CuBLAS and you have set a CuBLAS config ...")
    assert gpu_check.nondeterministic_ops(cublas)[0].startswith("cuBLAS (CUBLAS_WORKSPACE")


def test_forced_tf32_on_cuda_is_a_failed_row(monkeypatch):
    """The variable masc_decode.py refuses on CUDA: the self-check says so before its checks (on
    CUDA only; the CPU has no cuBLAS)."""
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    rows = gpu_check.environment_rows(torch.device("cuda"))
    assert [r.ok for r in rows] == [False]
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" in rows[0].measured
    assert gpu_check.environment_rows(torch.device("cpu")) == []
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0")
    assert gpu_check.environment_rows(torch.device("cuda")) == []


def test_a_compiler_failure_reports_its_cause(capsys, monkeypatch):
    """torch's BackendCompilerFailed says only "backend='inductor' raised:" on its first line; the
    row gives the exception it wraps."""
    class BackendCompilerFailed(RuntimeError):
        def __init__(self):
            super().__init__("backend='inductor' raised:\nRuntimeError: no C++ compiler")
            self.inner_exception = RuntimeError("C++ compiler not found: cc exited 1")

    def failing(ctx):
        raise BackendCompilerFailed
    monkeypatch.setitem(gpu_check.CHECKS, "knn-fp16", failing)
    with contextlib.redirect_stderr(io.StringIO()):  # the traceback, printed for the owner
        status = gpu_check.main(["--device", "cpu", "--smallest", "--only", "knn-fp16"])
    out = capsys.readouterr().out
    assert status == 1 and "raised RuntimeError: C++ compiler not found: cc exited 1" in out, out


def test_a_graph_break_in_the_probe_fails_compiled_once(capsys, monkeypatch):
    """A probe forward split by a graph break compiles more graphs (its pieces, their recompiles)
    than the top-level function's cache entries show: the check counts graphs too."""
    real = bm.layer_outputs

    def broken(model, x, bf16, channels_last):
        x = x + 0  # a graph before the break, and one after it
        torch._dynamo.graph_break()
        return real(model, x, bf16, channels_last)
    monkeypatch.setattr(bm, "layer_outputs", broken)
    status = gpu_check.main(["--device", "cpu", "--smallest", "--only", "compiled-once"])
    out = capsys.readouterr().out
    assert status == 1 and "FAIL" in out and "graphs made here" in out, out
