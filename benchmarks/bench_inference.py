"""Inference benchmark: FFF layers against the dense block of the same training width (also `fff-moe bench`).

    python benchmarks/bench_inference.py                 # the full table: batches 1..4096, 1 and 2 threads
    python benchmarks/bench_inference.py --quick         # a few minutes
    python benchmarks/bench_inference.py --help          # every option

Prints a table per (threads, width, batch) with medians over interleaved rounds, speedups against dense
oneDNN and nn.Linear, and the roofline ideal beside each; writes JSON (``--json``). The implementation lives in
``fff_moe_plugin/commands/bench.py`` so that the installed ``fff-moe bench`` runs the same code.
"""

import sys

from fff_moe_plugin.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
