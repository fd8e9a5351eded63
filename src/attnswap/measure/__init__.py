"""What a swap gained and lost: quality (evaluate, recall, generate), cost (bench, bench_kernel, bench_generate),
the per-layer plan and the mixture's hardening. Each command writes JSON, CSV and PNG to its own run folder."""
