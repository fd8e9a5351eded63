"""Window + sinks as a branch merged with a pure window (kernels/far_branch.py) against one block mask.

    PYTHONPATH=src python3 scripts/probe_far_keys.py --out runs/far_keys        (CUDA: flex has no CPU backward)

For each mode and length: flash SDPA, the plain window, and the window with sinks twice: as a branch merged with
flex over the pure window by log-sum-exp, and as one block mask (FAR_KEYS_MIN_QUERIES raised past the length). Timed
by CUDA-graph replay (median of ``--repeats``) in one process; the largest difference of the branch's output and
gradients from the single mask's, and each case's largest kernels from one profiled call. Writes OUT/far_keys.json.
It decides FAR_KEYS_MIN_QUERIES in kernels/flex.py. (Session 10's calls also timed the far-key split of session 9,
since removed.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnswap.bench_kernel import dense_causal_attention, environment, time_attention_case, top_kernels
from attnswap.kernels import flex
from attnswap.variants import AttnContext, get_variant

HEADS, HEAD_DIM = 12, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--lengths", default="1024,2048,4096,16384,65536")
    parser.add_argument("--modes", default="forward+backward,forward")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", type=int, default=8, help="kernels listed per case (0: no profile)")
    parser.add_argument("--out", default="runs/far_keys")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    ctx = AttnContext(scaling=HEAD_DIM**-0.5)
    far_from = flex.FAR_KEYS_MIN_QUERIES
    sinks = get_variant(f"window:w={args.window},sinks={args.sinks}")
    cases = {
        "sdpa_flash": (lambda q, k, v: dense_causal_attention(q, k, v, ctx.scaling), far_from),
        f"window:w={args.window}": (get_variant(f"window:w={args.window}"), far_from),
        "sinks_branch": (sinks, 0),
        "sinks_one_mask": (sinks, 1 << 40),
    }
    rows = []
    for mode, n in ((mode, int(n)) for mode in args.modes.split(",") for n in args.lengths.split(",")):
        shape = (1, HEADS, n, HEAD_DIM)
        got = {}
        for name, (case, threshold) in cases.items():
            flex.FAR_KEYS_MIN_QUERIES = threshold
            attend = case if not hasattr(case, "attend") else (
                lambda q, k, v, variant=case: variant.attend(q, k, v, ctx, None))
            row = {"case": name, "length": n, "mode": mode}
            try:
                result, run, (q, k, v) = time_attention_case(attend, shape, mode, device, dtype, 0,
                                                             args.repeats, 2, cuda_graphs=True)
                row.update(graph_median_s=result.get("graph_median_s"), median_s=result["median_s"],
                           graph_error=result.get("graph_error"), peak_mb=result.get("peak_mb"))
                if args.profile:
                    row["kernels"], row["kernels_total_us"] = top_kernels(run, device, args.profile)
                if name.startswith("sinks") and mode == "forward+backward":
                    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                    out = attend(q, k, v)
                    out.backward(torch.randn(out.shape, device=device, dtype=out.dtype,
                                             generator=torch.Generator(device).manual_seed(0)))
                    got[name] = [out.detach().float(), *(t.grad.float() for t in (q, k, v))]
            except Exception as exc:  # one failed case must not lose the others
                row["error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            rows.append(row)
        timed = [row for row in rows if row["length"] == n and row.get("mode") == mode]
        flash = timed[0].get("graph_median_s")
        for row in timed:
            if flash and row.get("graph_median_s"):
                row["speedup"] = round(flash / row["graph_median_s"], 2)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
        if len(got) == 2:
            difference = {label: (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for label, a, b
                          in zip(("out", "dq", "dk", "dv"), got["sinks_branch"], got["sinks_one_mask"])}
            rows.append({"case": "sinks_branch_vs_one_mask", "length": n, "max_relative_difference": difference})
            print(json.dumps(rows[-1]), flush=True)
    flex.FAR_KEYS_MIN_QUERIES = far_from
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "far_keys.json").write_text(json.dumps({"environment": environment(device), "args": vars(args),
                                                   "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
