"""Where does a linear-attention call spend its time? Host work against GPU kernels, per variant and length.

    PYTHONPATH=src python3 scripts/diagnose_linear_scan.py OUT.json [SPEC ...] [--segment-floats N,N,...]  (CUDA only)

For n = 4k, 16k, 32k (12 heads × 64, bf16, batch 1), forward+backward of each variant's ``attend`` (default
``performer:m=256`` and ``hedgehog``), timed as ``diagnose_flex_overhead.timeit`` does: median wall time, median
time until the call returns to Python (``cpu_issue_ms``), and from torch.profiler the GPU time, the kernels launched
per call and the largest kernels; and the case's peak memory. ``--segment-floats`` repeats all of it for each size
of the scan's work space (``kernels.linear._SEGMENT_FLOATS``; default: the one in the code).
"""

import argparse
import itertools
import json

import torch
from diagnose_flex_overhead import HEAD_DIM, HEADS, timeit

from attnswap.bench_kernel import environment
from attnswap.kernels import linear
from attnswap.variants import AttnContext, get_variant

LENGTHS = (4096, 16384, 32768)


def diagnose(spec: str, n: int) -> dict:
    variant = get_variant(spec)
    state = variant.make_state(HEADS, HEAD_DIM).to("cuda", torch.float32)
    ctx = AttnContext(scaling=HEAD_DIM**-0.5)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator,
                           requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)

    def forward_backward() -> None:
        for t in (q, k, v, *state.parameters()):
            t.grad = None
        variant.attend(q, k, v, ctx, state).backward(grad_out)

    torch.cuda.reset_peak_memory_stats()
    allocated = torch.cuda.memory_allocated()
    timing = timeit(forward_backward)
    peak_mb = (torch.cuda.max_memory_allocated() - allocated) / 2**20
    return {"variant": spec, "n": n, "segment_floats": linear._SEGMENT_FLOATS, "peak_mb": peak_mb, **timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("specs", nargs="*", default=["performer:m=256", "hedgehog"])
    parser.add_argument("--segment-floats", default=str(linear._SEGMENT_FLOATS))
    args = parser.parse_args()
    rows = []
    for floats, spec, n in itertools.product(map(int, args.segment_floats.split(",")), args.specs, LENGTHS):
        linear._SEGMENT_FLOATS = floats
        rows.append(diagnose(spec, n))
        print(json.dumps({key: value for key, value in rows[-1].items() if key != "kernels"}), flush=True)
    with open(args.out, "w") as handle:
        json.dump({"environment": environment(torch.device("cuda")), "heads": HEADS, "head_dim": HEAD_DIM,
                   "dtype": "bfloat16", "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
