"""tests/count_ops.py, the counter behind the README's GPU estimates of the first commands:
exact on a hand-worked script, and it runs a real script's main() whole."""
import json
import os

import count_ops
from conftest import REPO


def test_hand_worked_script_is_counted_exactly(tmp_path, capsys):
    script = tmp_path / "tiny.py"
    script.write_text("import torch\n\n"
                      "def main(argv):\n"
                      "    a = torch.ones(4, 8)\n"
                      "    b = torch.ones(8, 3)\n"
                      "    return float((a @ b).sum())  # mm, sum, and one host sync\n")
    assert count_ops.main([str(script)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ops"] == 5 and out["syncs"] == 1
    assert out["flops"] == 2 * 4 * 8 * 3  # one (4 x 8) @ (8 x 3) product: a multiply and an add
    assert dict(out["top"]) == {"aten.ones": 2, "aten.mm": 1, "aten.sum": 1,
                                "aten._local_scalar_dense": 1}


def test_a_real_command_grows_with_its_steps(tmp_path):
    def toy(steps):
        return count_ops.count(os.path.join(REPO, "toy_capacity.py"), [
            "--n", "16", "--augs", "1", "--seeds", "0", "--steps", str(steps), "--device", "cpu",
            "--out-dir", str(tmp_path / f"toy{steps}")])
    one, three = toy(1), toy(3)
    assert (tmp_path / "toy1" / "results.json").exists()  # the whole command ran
    per_step = (three["ops"] - one["ops"]) / 2
    assert per_step > 0 and three["flops"] > one["flops"]
    # every step of the toy issues the same operators
    assert toy(5)["ops"] - three["ops"] == 2 * per_step


def test_without_a_script_it_prints_usage_and_exits_2(capsys, tmp_path):
    assert count_ops.main([]) == 2
    assert "usage" in capsys.readouterr().err
    missing = str(tmp_path / "nosuch.py")
    assert count_ops.main([missing]) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nosuch.py" in err, err
