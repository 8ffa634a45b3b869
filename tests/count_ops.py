"""
Operators and FLOPs of one whole command, counted while it runs: the inputs of the README's GPU
estimates for the first commands (an eager GPU run is bound by launching operators when they are
small, by FLOPs when they are large).

    python tests/count_ops.py toy_capacity.py
    python tests/count_ops.py masc_decode.py --dataset mnist --corruption 0,0.4,0.8 \\
        --train-size 1000 --optimizer adam --epochs 50 --models-at-once 3 --device cpu

Runs SCRIPT's main(argv) under a dispatch mode that counts every ATen operator (views included:
they cost host time, not kernels) and torch's FlopCounterMode, then prints one JSON line: ops,
host syncs (aten._local_scalar_dense: .item(), float(), Python conditions on tensors; .tolist(),
nonzero and boolean indexing also wait for a GPU but dispatch no such operator, so this is a
floor), FLOPs, wall seconds and the most frequent operators. Counting slows a run: the toy's
default sweep took 3.4 times as long on a 2-core CPU.

Not collected by pytest (no test_ prefix).
"""
import collections
import importlib.util
import json
import os
import sys
import time

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


class OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_name = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(script, argv):
    spec = importlib.util.spec_from_file_location("counted_script", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an imported module: its classes can be pickled
    spec.loader.exec_module(module)
    ops, flops = OperatorCount(), FlopCounterMode(display=False)
    start = time.time()
    with flops, ops:
        module.main(argv)
    return {"ops": sum(ops.by_name.values()),
            "syncs": ops.by_name["aten._local_scalar_dense"],
            "flops": flops.get_total_flops(), "seconds": round(time.time() - start, 1),
            "top": ops.by_name.most_common(10)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        sys.stderr.write("usage: python tests/count_ops.py SCRIPT.py [its arguments]\n")
        return 2
    if not os.path.isfile(argv[0]):
        sys.stderr.write(f"count_ops.py: error: no script {argv[0]!r}\n")
        return 2
    print(json.dumps(count(argv[0], argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
