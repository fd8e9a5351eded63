"""Where does a FlexAttention window call spend its time? Host work against GPU kernels, beside flash SDPA.

    PYTHONPATH=src python3 scripts/diagnose_flex_overhead.py OUT.json    (CUDA only)

For n = 4k, 16k, 32k (12 heads × 64, bf16, batch 1, window 256), forward and forward+backward of: flash SDPA, the
window variant's ``attend``, compiled flex_attention with attnswap's cached block mask, and with
``create_block_mask``'s (a plain mask_mod without position lookups). Per case: median wall time, median time until
the call returns to Python (``cpu_issue_ms``: the host work), and the GPU kernel time from torch.profiler with the
largest kernels. A block size of 64 is tried too (flex's default tiles refuse it: recorded as an error).
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.profiler import ProfilerActivity, profile

from attnswap.kernels import flex as kflex
from attnswap.variants import AttnContext, get_variant

HEADS, HEAD_DIM, WINDOW = 12, 64, 256


def timeit(fn, reps=20, warm=3) -> dict:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    walls, issues = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        issues.append(returned - start)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sorted(((e.key[:70], round(e.self_device_time_total / 5 / 1e3, 4), e.count // 5) for e in events
                      if e.self_device_time_total > 0), key=lambda x: -x[1])[:8]
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_issue_ms": statistics.median(issues) * 1e3,
            "gpu_ms": sum(e.self_device_time_total for e in events) / 5 / 1e3, "kernels": kernels,
            "kernels_per_call": sum(e.count for e in events if e.self_device_time_total > 0) / 5}


def main(out: str) -> None:
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    results = {}
    for n in (4096, 16384, 32768):
        generator = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator,
                               requires_grad=True) for _ in range(3))
        grad_out = torch.randn_like(q)
        variant = get_variant(f"window:w={WINDOW}")
        ctx = AttnContext(scaling=HEAD_DIM**-0.5)
        index_mask, _, _ = variant.index_mask(q, k, ctx, None)
        mine = kflex.block_mask_for(index_mask, 1, HEADS, n, n, q.device, cache_key=variant.mask_key(ctx, None),
                                    per_batch=False, per_head=False)

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)

        plain = create_block_mask(sliding, None, None, n, n, device="cuda")
        plain64 = create_block_mask(sliding, None, None, n, n, device="cuda", BLOCK_SIZE=64)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        cases = {"flash": flash, "variant": lambda: variant.attend(q, k, v, ctx, None),
                 "flex_my_blockmask": lambda: compiled(q, k, v, block_mask=mine, scale=ctx.scaling),
                 "flex_create_block_mask": lambda: compiled(q, k, v, block_mask=plain, scale=ctx.scaling),
                 "flex_block64": lambda: compiled(q, k, v, block_mask=plain64, scale=ctx.scaling)}
        for name, attend in cases.items():
            def forward(attend=attend):
                with torch.no_grad():
                    attend()

            def forward_backward(attend=attend):
                for t in (q, k, v):
                    t.grad = None
                attend().backward(grad_out)

            for mode, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
                try:
                    result = timeit(fn)
                except Exception as exc:  # a case flex cannot compile is a finding, not the end of the run
                    result = {"error": str(exc)[:300]}
                results[f"{n}/{name}/{mode}"] = result
                print(n, name, mode, json.dumps(result), flush=True)
        print("mine kv_num_blocks sum", int(mine.kv_num_blocks.sum()), "full", int(mine.full_kv_num_blocks.sum()),
              "std", int(plain.kv_num_blocks.sum()), int(plain.full_kv_num_blocks.sum()), "shape",
              tuple(mine.kv_num_blocks.shape), tuple(plain.kv_num_blocks.shape), flush=True)
    with open(out, "w") as stream:
        json.dump(results, stream, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
