"""Score saved models with lm-evaluation-harness (`lm_eval --model hf`) on a local WikiText-2 validation task, on CPU.

    python scripts/lm_eval_local.py --models teacher=models/teacher-gpt2-19m swapped=runs/lmeval_w64/model \
        --articles 8 --out benchmarks/results/lm_eval_local/results.json

Each model folder is loaded by lm-eval itself (`pretrained=DIR,trust_remote_code=True`): a folder written by
attnswap.save runs with its variant through its auto_map modelling file. Needs `pip install 'attnswap[eval]'`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "scripts" / "lm_eval_task"
DOCS = REPO / "runs" / "lm_eval_local" / "wikitext2_valid_docs.jsonl"  # the path the task YAML names
TASK = "wikitext2_valid_local"


def write_documents(articles: int) -> int:
    """The first ``articles`` articles of WikiText-2 validation (a top-level ' = Title = ' line starts one)."""
    lines = (REPO / "data" / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
    docs: list[list[str]] = []
    for line in lines:
        if re.fullmatch(r" = [^=].* = \n", line):
            docs.append([])
        if docs:
            docs[-1].append(line)
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text("".join(json.dumps({"page": "".join(doc).strip()}) + "\n" for doc in docs[:articles]))
    return min(articles, len(docs))


def score(name: str, directory: str, out: Path) -> dict:
    command = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
               f"pretrained={directory},trust_remote_code=True,dtype=float32", "--tasks", TASK, "--include_path",
               str(TASK_DIR.relative_to(REPO)), "--device", "cpu", "--batch_size", "1",
               "--output_path", str(out / name)]
    subprocess.run(command, cwd=REPO, check=True)
    produced = sorted((out / name).rglob("results_*.json"))[-1]
    results = json.loads(produced.read_text())["results"][TASK]
    return {"model": directory, "command": " ".join(command),
            "metrics": {k.split(",")[0]: v for k, v in results.items() if k.endswith(",none") and "stderr" not in k}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="NAME=DIR pairs")
    parser.add_argument("--articles", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import lm_eval
    import torch
    import transformers

    from attnswap.hf.models import git_commit

    n_docs = write_documents(args.articles)
    pairs = dict(pair.split("=", 1) for pair in args.models)
    rows = {name: score(name, directory, REPO / "runs" / "lm_eval_local") for name, directory in pairs.items()}
    record = {"task": TASK, "documents": f"first {n_docs} articles of data/wikitext-2/wiki.valid.tokens",
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "commit": git_commit(),
              "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}, "device": "cpu", "dtype": "float32",
              "models": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items()))


if __name__ == "__main__":
    main()
