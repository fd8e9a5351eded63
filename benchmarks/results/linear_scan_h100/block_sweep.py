# The fused scan's feature block (kernels/linear_triton.BLOCK) at 32, 64 and 128, commit 3b2af8a, on the H100:
#   PYTHONPATH=src python3 benchmarks/results/linear_scan_h100/block_sweep.py > block_sweep.jsonl
import json
import sys

sys.path.insert(0, "scripts")
from diagnose_linear_scan import diagnose  # noqa: E402

from attnswap.kernels import linear_triton  # noqa: E402

for block in (32, 64, 128):
    linear_triton.BLOCK = block
    for spec in ("performer:m=256", "hedgehog"):
        for n in (16384, 32768):
            row = diagnose(spec, n)
            row["kernels"], row["block"] = row["kernels"][:1], block
            print(json.dumps({key: round(value, 2) if isinstance(value, float) else value
                              for key, value in row.items() if key != "segment_floats"}), flush=True)
