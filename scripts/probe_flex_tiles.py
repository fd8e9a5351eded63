"""FlexAttention's backward tiles for a window with sinks: does a narrower or taller tile shorten the sinks' walk?

    PYTHONPATH=src python3 scripts/probe_flex_tiles.py --out runs/flex_tiles        (CUDA: flex has no CPU backward)

In one block mask the sinks' key block is live for every query block, and flex's backward gives each key tile one
program that walks every query tile seeing it: at 16k, window 256 + 4 sinks takes 1.12 ms forward+backward against the
plain window's 0.44 (H200, benchmarks/results/bench_kernel_64k_h200/session8). That program's time is the number of
query tiles it walks times the cost of one step, and both depend on the backward's tiles (BLOCK_M1 queries by
BLOCK_N1 keys for dK and dV; BLOCK_M2 by BLOCK_N2 for dQ), which ``kernel_options`` can set.

For each spec, length and tile setting: forward+backward of the variant's own block mask through compiled
flex_attention, timed by CUDA-graph replay (median of ``--repeats``) beside flash SDPA in the same process, and the
largest difference of the output and the three gradients from the default setting's. Writes OUT/tiles.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from attnswap.bench_kernel import dense_causal_attention, environment, time_attention_case
from attnswap.kernels.flex import block_mask_for, compiled_flex_attention
from attnswap.variants import AttnContext, get_variant

HEADS, HEAD_DIM = 12, 64
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2): flex's kernels need BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0,
# and every tile must divide the block mask's. None: flex's own choice (64, 128, 128, 64 on Hopper, head_dim 64).
TILES = {
    "default": None,
    "m64_n64": (64, 64, 64, 64),
    "m32_n64": (32, 64, 64, 32),
    "m32_n32": (32, 32, 32, 32),
    "m16_n32": (16, 32, 32, 16),
    "m128_n128": (128, 128, 128, 64),
}


def kernel_options(tiles: tuple[int, int, int, int] | None) -> dict | None:
    if tiles is None:
        return None
    return {f"bwd_{name}": size for name, size in zip(("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"), tiles)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default="window:w=256,sinks=4;window:w=256")
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--tiles", default=",".join(TILES), help=f"of {', '.join(TILES)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mask-block", type=int, default=128,
                        help="the block mask's tile; below 128 Hopper's default backward tile does not fit it, so run "
                             "with TORCHINDUCTOR_MAX_AUTOTUNE=1, whose candidates include narrower tiles")
    parser.add_argument("--out", default="runs/flex_tiles")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    flex = compiled_flex_attention("inductor")  # raises dynamo's recompile limit: one compile per tile setting
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        shape = (1, HEADS, n, HEAD_DIM)
        dense, _, _ = time_attention_case(lambda q, k, v: dense_causal_attention(q, k, v, HEAD_DIM**-0.5), shape,
                                          "forward+backward", device, dtype, 0, args.repeats, 2, cuda_graphs=True)
        rows.append({"spec": "sdpa_flash", "length": n, "graph_median_s": dense.get("graph_median_s")})
        print(json.dumps(rows[-1]), flush=True)
        for spec in args.specs.split(";"):
            variant = get_variant(spec)
            ctx = AttnContext(scaling=HEAD_DIM**-0.5)
            reference = None
            for name in args.tiles.split(","):
                options = kernel_options(TILES[name])
                row = {"spec": spec, "length": n, "tiles": name, "kernel_options": options,
                       "mask_block": args.mask_block, "max_autotune": os.environ.get("TORCHINDUCTOR_MAX_AUTOTUNE")}
                try:
                    def attend(q, k, v):
                        index_mask, _, _ = variant.index_mask(q, k, ctx, None)
                        block_mask = block_mask_for(index_mask, 1, HEADS, n, n, device, cache_key=(spec,),
                                                    per_batch=False, per_head=False, block_size=args.mask_block)
                        return flex(q, k, v, block_mask=block_mask, scale=ctx.scaling, kernel_options=options)

                    result, _, (q, k, v) = time_attention_case(attend, shape, "forward+backward", device, dtype, 0,
                                                                 args.repeats, 2, cuda_graphs=True)
                    q.grad = k.grad = v.grad = None
                    out = attend(q, k, v)
                    out.backward(torch.ones_like(out))
                    got = [out.detach().float(), *(t.grad.float() for t in (q, k, v))]
                    reference = reference or got
                    row.update(graph_median_s=result.get("graph_median_s"), median_s=result["median_s"],
                               graph_error=result.get("graph_error"),
                               speedup=dense["graph_median_s"] / result["graph_median_s"]
                               if result.get("graph_median_s") else None,
                               max_difference={label: (a - b).abs().max().item() for label, a, b
                                               in zip(("out", "dq", "dk", "dv"), got, reference)})
                except Exception as exc:  # a tile setting the kernel refuses is a result too
                    row["error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                    torch._dynamo.reset()  # a failed compile must not leave the next setting running unfused
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiles.json").write_text(json.dumps({"environment": environment(device), "args": vars(args),
                                                "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
