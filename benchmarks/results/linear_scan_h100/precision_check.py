# PyTorch scan against the fused kernel with fp32 ("ieee") and TF32 products, commit 4d3fb0c, on the H100:
#   PYTHONPATH=src python3 benchmarks/results/linear_scan_h100/precision_check.py
# (precision_check.jsonl: the fused_ieee rows it printed, its scalar fields copied from the output.)
import sys, json, functools, torch
sys.path.insert(0, "scripts")
from diagnose_linear_scan import diagnose
from attnswap.kernels import linear_triton
serves, fused = linear_triton.serves, linear_triton.fused_causal_scan
for mode in ("pytorch", "fused_ieee", "fused_tf32"):
    linear_triton.serves = serves if mode != "pytorch" else (lambda *a: False)
    linear_triton.fused_causal_scan = functools.partial(fused, precision="tf32") if mode == "fused_tf32" else fused
    for spec in ("performer:m=256", "hedgehog"):
        for n in (4096, 16384, 32768):
            r = diagnose(spec, n); r["kernels"] = r["kernels"][:3]; r["mode"] = mode
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
