"""Distillation on a tiny GPT-2: KL falls, exact resume after SIGKILL, checkpoints, errors, two ranks = one process."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import attnswap
import attnswap.train.distill as distill_module
import attnswap.train.pair as pair_module
from attnswap.config import config_to_dict
from attnswap.train.distill import DistillConfig, distill
from attnswap.errors import AttnswapError
from attnswap.variants import VARIANTS, Variant
from tests.conftest import tiny_gpt2, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# --- a tiny teacher, its tokenizer and text ------------------------------------------------------
def tiny_text(n_docs: int, seed: int) -> str:
    """Documents of tokenizer words with local structure (each word mostly follows from the one before)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        word = int(torch.randint(4, 97, (1,), generator=g))
        words = []
        for _ in range(int(torch.randint(20, 60, (1,), generator=g))):
            words.append(f"w{word}")
            jump = torch.rand(1, generator=g).item() < 0.3
            word = int(torch.randint(4, 97, (1,), generator=g)) if jump else 4 + (word * 7 + 3) % 93
        docs.append(" ".join(words))
    return "\n\n".join(docs)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with weights at std 0.1 (sharper attention than the default 0.02, so swapping it matters)."""
    root = tmp_path_factory.mktemp("distill-assets")
    model = tiny_gpt2(n_positions=64)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(param.numel()))
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "train.txt").write_text(tiny_text(300, seed=0))
    (root / "valid.txt").write_text(tiny_text(40, seed=1))
    return root


@pytest.fixture(autouse=True)
def one_thread_and_own_cache(tmp_path_factory, monkeypatch):
    """One CPU thread (bit-reproducible against subprocesses, and kind to a shared 2-core machine)."""
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(assets: Path, out: Path, **overrides) -> DistillConfig:
    values = dict(model=str(assets / "model"), variant="window:w=2", trainable="variant+mlp",
                  data=str(assets / "train.txt"), val_data=str(assets / "valid.txt"), seq_len=32, batch_size=4,
                  steps=100, lr=0.01, warmup_steps=10, eval_every=0, eval_batches=2, ckpt_every=0, out=str(out))
    values.update(overrides)
    return DistillConfig(**values)


def train_losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def subprocess_env(assets: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def write_yaml(config: DistillConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def variant_class(name: str) -> type[Variant]:
    """The Variant subclass called ``name`` anywhere in attnswap/variants (registered or not yet)."""
    import attnswap.variants as package

    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"attnswap.variants.{info.name}")
        except ImportError:
            continue
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Variant) and getattr(obj, "name", None) == name:
                return obj
    pytest.skip(f"no variant class named {name!r} in src/attnswap/variants yet")


# --- learning ------------------------------------------------------------------------------------
# (spec, what trains beside the variant, lr): parameter-free variants need the layer's own weights to adapt.
HALVES_KL = {
    "window": ("window:w=2", "variant+mlp", 0.01),
    "mixture": ("mixture:candidates=win2+full", "variant", 0.05),
    "performer": ("performer:m=16,chunk=8", "variant+attn", 0.003),
    "nsa": ("nsa:block=4,top_k=2,window=4", "variant", 0.1),
}


@pytest.mark.parametrize("name", sorted(HALVES_KL))
def test_distill_halves_kl_within_100_steps(assets, tmp_path, monkeypatch, name):
    monkeypatch.setitem(VARIANTS, name, variant_class(name))
    spec, trainable, lr = HALVES_KL[name]
    results = distill(make_config(assets, tmp_path / "run", variant=spec, trainable=trainable, lr=lr))
    assert results["kl_after"] <= 0.5 * results["kl_before"], results


def test_mixture_l1_drives_useless_candidates_to_zero(assets, tmp_path, monkeypatch):
    """The teacher is full attention, so only ``full`` is useful: the L1 term pushes the others towards 0."""
    monkeypatch.setitem(VARIANTS, "mixture", variant_class("mixture"))
    from attnswap.variants.mixture import report

    useless = {}
    for l1 in (0.0, 1.0):
        out = tmp_path / f"l1_{l1}"
        distill(make_config(assets, out, variant="mixture:candidates=full+win2+stride3", trainable="variant",
                            lr=0.1, l1=l1))
        survivors = report(attnswap.load(out / "model"))
        assert all(head[0] == 1.0 for layer in survivors.values() for head in layer["normalised"]), survivors
        useless[l1] = max(w for layer in survivors.values() for head in layer["normalised"] for w in head[1:])
    assert useless[1.0] < 0.05 and useless[1.0] < 0.5 * useless[0.0], useless


def test_variant_parameters_learn_at_their_own_rate(assets, tmp_path, monkeypatch):
    """One AdamW step moves every parameter by about its lr: the mixture's logits by lr × variant_lr_scale,
    the attention projections by lr, whatever the scale."""
    monkeypatch.setitem(VARIANTS, "mixture", variant_class("mixture"))
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for file in folder.glob("*.safetensors") for k, v in load_file(file).items()}

    initial = {k: v for k, v in tensors(assets / "model").items() if ".attn.c_attn." in k}
    moved = {}
    for scale in (1.0, 10.0):
        out = tmp_path / f"scale_{scale}"
        distill(make_config(assets, out, variant="mixture:candidates=win2+full", trainable="variant+attn", steps=1,
                            warmup_steps=0, lr=1e-3, variant_lr_scale=scale))
        saved = tensors(out / "model")
        logits = torch.cat([v.flatten() for k, v in saved.items() if k.endswith(".attnswap.logits")])
        projections = torch.cat([(saved[k] - v).flatten() for k, v in initial.items() if k in saved])
        moved[scale] = (logits.abs().max().item(), projections.abs().max().item())
    assert moved[10.0][0] == pytest.approx(10 * moved[1.0][0], rel=0.02), moved
    assert moved[10.0][1] == pytest.approx(moved[1.0][1], rel=0.02), moved


def test_transfer_stage_matches_attention_outputs(assets, tmp_path, monkeypatch):
    """Hedgehog's first stage: attention MSE on the teacher's q, k, v falls; then the KL stage takes over."""
    monkeypatch.setitem(VARIANTS, "hedgehog", variant_class("hedgehog"))
    config = make_config(assets, tmp_path / "run", variant="hedgehog:chunk=8", trainable="variant", lr=0.05,
                         warmup_steps=2, steps=30, transfer_steps=20)
    distill(config)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mse = [line["attn_mse"] for line in lines if "attn_mse" in line]
    assert len(mse) == 20 and sum(mse[-5:]) < 0.5 * sum(mse[:5]), mse
    assert all("kl" in line for line in lines if "loss" in line and line["step"] > 20)


# --- the run folder ------------------------------------------------------------------------------
def test_run_folder_holds_config_metrics_checkpoint_model_results(assets, tmp_path):
    out = tmp_path / "run"
    results = distill(make_config(assets, out, steps=4, eval_every=2, ckpt_every=2))
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", "checkpoint.json",
                                               "checkpoint-0000004.safetensors", "model", "results.json"}
    assert json.loads((out / "results.json").read_text()) == results
    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 4
    for key in ("kl_before", "kl_after", "teacher", "token_budget", "seed", "torch", "transformers", "device"):
        assert key in results
    assert "command" in results
    assert results["token_budget"] == 4 * 4 * 32
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    assert [line["step"] for line in lines if "val_kl" in line] == [0, 2, 4]
    saved = attnswap.load(out / "model")
    assert saved.config.attnswap["variant"] == "window:w=2,sinks=0"
    original = attnswap.load_model(str(assets / "model"))
    assert not torch.equal(saved.transformer.h[0].mlp.c_fc.weight, original.transformer.h[0].mlp.c_fc.weight)
    assert torch.equal(saved.transformer.h[0].attn.c_attn.weight, original.transformer.h[0].attn.c_attn.weight)


def test_teacher_is_the_original_model_while_the_student_trains(assets, tmp_path):
    config = make_config(assets, tmp_path / "run", steps=3)
    pair, _ = distill_module.build_pair(config, torch.device("cpu"))
    ids = torch.randint(4, 97, (2, 16))
    original = attnswap.load_model(str(assets / "model"))
    for param in pair.trainable.values():  # as if training had moved every trained weight
        param.data.add_(0.5)
    with torch.no_grad():
        assert torch.allclose(pair.head(pair.teacher_hidden(ids)), original(ids).logits, atol=1e-5)
        assert not torch.allclose(pair.head(pair.hidden_states(ids)), original(ids).logits, atol=1e-2)


# --- checkpoints and resume ----------------------------------------------------------------------
def test_resume_after_sigkill_matches_uninterrupted_run(assets, tmp_path):
    config = make_config(assets, tmp_path / "straight", steps=60, ckpt_every=5)
    expected = distill(config)
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "attnswap.cli", "distill", "--config", str(write_yaml(config, tmp_path / "c.yaml")),
         "--out", str(killed)], env=subprocess_env(assets), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # Kill between two checkpoints, so that metrics.jsonl holds steps the resumed run must redo.
    while process.poll() is None and time.time() < deadline and not (
            (killed / "checkpoint.json").exists() and (killed / "metrics.jsonl").read_text().count('"loss"') >= 7):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr[-2000:]}"
    assert not (killed / "results.json").exists()
    step_at_kill = json.loads((killed / "checkpoint.json").read_text())["step"]
    assert 5 <= step_at_kill < 60
    resumed = distill(make_config(assets, killed, steps=60, ckpt_every=5, resume=True))
    assert resumed["kl_after"] == pytest.approx(expected["kl_after"], abs=1e-6)
    losses, straight = train_losses(killed), train_losses(tmp_path / "straight")
    assert len(losses) == 60
    assert max(abs(a - b) for a, b in zip(losses, straight)) <= 1e-6


def test_sigterm_checkpoints_and_stops_cleanly(assets, tmp_path):
    config = make_config(assets, tmp_path / "run", steps=500, ckpt_every=0)
    process = subprocess.Popen(
        [sys.executable, "-m", "attnswap.cli", "distill", "--config", str(write_yaml(config, tmp_path / "c.yaml"))],
        env=subprocess_env(assets), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 120
    while process.poll() is None and time.time() < deadline and not (
            metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-2000:]
    assert "continue with --resume true" in stderr
    step = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"]
    assert 3 <= step < 500 and len(train_losses(tmp_path / "run")) == step


def test_time_budget_stops_with_results(assets, tmp_path):
    results = distill(make_config(assets, tmp_path / "run", max_seconds=0.0))
    assert results["stopped_by"] == "max_seconds" and results["steps_done"] == 1
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"] == 1


def test_gradient_accumulation_follows_the_larger_batch(assets, tmp_path):
    distill(make_config(assets, tmp_path / "big", steps=4, batch_size=4))
    distill(make_config(assets, tmp_path / "accumulated", steps=4, batch_size=2, grad_accum=2))
    big, accumulated = train_losses(tmp_path / "big"), train_losses(tmp_path / "accumulated")
    assert max(abs(a - b) for a, b in zip(big, accumulated)) <= 1e-6, (big, accumulated)


def test_lora_trains_adapters_while_the_teacher_stays_original(assets, tmp_path):
    pytest.importorskip("peft", reason="trainable=variant+lora needs peft (pip install 'attnswap[lora]')")
    config = make_config(assets, tmp_path / "run", trainable="variant+lora", lora_r=4, lr=0.03)
    pair, _ = distill_module.build_pair(config, torch.device("cpu"))
    assert pair.trainable and all("lora_" in name for name in pair.trainable)
    results = distill(config)
    assert results["kl_after"] <= 0.5 * results["kl_before"], results
    assert attnswap.load(tmp_path / "run" / "model").config.attnswap["variant"] == "window:w=2,sinks=0"


@pytest.mark.parametrize("damage", ["record", "tensors"])
def test_corrupt_checkpoint_is_refused(assets, tmp_path, damage):
    out = tmp_path / "run"
    distill(make_config(assets, out, steps=2))
    if damage == "record":
        (out / "checkpoint.json").write_text('{"step": 2, "tens')
    else:
        tensors = out / "checkpoint-0000002.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:100])
    message = r"corrupt checkpoint .*checkpoint.json: .*; delete it or start without --resume"
    with pytest.raises(AttnswapError, match=message):
        distill(make_config(assets, out, steps=4, resume=True))


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default(assets, tmp_path):
    out = tmp_path / "run"
    distill(make_config(assets, out, steps=2, ckpt_every=1))
    record = json.loads((out / "checkpoint.json").read_text())
    del record["config"]["data_style"]  # as written before data_style existed
    (out / "checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(AttnswapError, match=r"data_style='wikitext' but the checkpoint .* data_style='plain'"):
        distill(make_config(assets, out, steps=3, ckpt_every=1, resume=True, data_style="wikitext"))
    assert distill(make_config(assets, out, steps=3, ckpt_every=1, resume=True))["steps_done"] == 3


def test_resume_refuses_a_different_run(assets, tmp_path):
    out = tmp_path / "run"
    distill(make_config(assets, out, steps=2))
    with pytest.raises(AttnswapError, match=r"lr=0.02 but the checkpoint .* lr=0.01"):
        distill(make_config(assets, out, steps=4, lr=0.02, resume=True))
    with pytest.raises(AttnswapError, match=r"already holds a run .* --resume true"):
        distill(make_config(assets, out, steps=4))


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(assets, tmp_path, monkeypatch):
    calls = {"n": 0}
    kl = pair_module.chunked_kl  # the pair's KL, which every training step takes

    def poisoned(*args, **kwargs):
        loss, agree = kl(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps only; evaluation runs without a graph
            calls["n"] += 1
            if calls["n"] == 4:
                return loss * float("nan"), agree
        return loss, agree

    monkeypatch.setattr(pair_module, "chunked_kl", poisoned)
    out = tmp_path / "run"
    with pytest.raises(AttnswapError, match=r"training diverged at step 4: loss nan"):
        distill(make_config(assets, out, steps=6, ckpt_every=2))
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 2
    assert not (out / "results.json").exists()


# --- user mistakes -------------------------------------------------------------------------------
def test_missing_data_file_names_the_path(assets, tmp_path):
    missing = tmp_path / "nowhere" / "train.txt"
    with pytest.raises(AttnswapError, match=f"no data at {missing}"):
        distill(make_config(assets, tmp_path / "run", data=str(missing)))


def test_training_on_the_test_set_is_refused(assets, tmp_path):
    with pytest.raises(AttnswapError, match="refusing to train on test data"):
        distill(make_config(assets, tmp_path / "run", data="data/wikitext-2/wiki.test.tokens"))


def test_sequence_longer_than_the_model_is_refused(assets, tmp_path):
    with pytest.raises(AttnswapError, match="sequence length 65 exceeds the model's 64 positions"):
        distill(make_config(assets, tmp_path / "run", seq_len=65))


def test_parameter_free_variant_needs_something_trainable(assets, tmp_path):
    with pytest.raises(AttnswapError, match="has no learnable parameters; .*variant\\+mlp"):
        distill(make_config(assets, tmp_path / "run", trainable="variant"))


def test_bad_config_values_are_refused():
    with pytest.raises(AttnswapError, match="trainable must be one of"):
        DistillConfig(trainable="everything")
    with pytest.raises(AttnswapError, match="steps must be >= 1"):
        DistillConfig(steps=0)


def test_cli_maps_distill_to_the_config(assets, tmp_path):
    from attnswap.cli import main

    config = write_yaml(make_config(assets, tmp_path / "run", steps=2), tmp_path / "c.yaml")
    assert main(["distill", "--config", str(config), "--steps", "1", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["steps_done"] == 1
    assert main(["distill", "--config", str(config), "--data", str(tmp_path / "missing.txt")]) == 2


# --- several ranks -------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_follow_one_process_and_resume_on_one(assets, tmp_path):
    """torchrun, 2 gloo ranks, global batch 4 (2 per rank) x 2 accumulation = one process with batch 4."""
    config = make_config(assets, tmp_path / "one", steps=5, grad_accum=2)
    distill(config)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "attnswap.cli", "distill", "--config", str(write_yaml(config, tmp_path / "c.yaml")),
               "--out", str(tmp_path / "two")]
    done = subprocess.run(command, env=subprocess_env(assets), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["world_size"] == 2
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(two) == 5 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    # The 2-rank checkpoint continues in one process exactly as the 1-process run does.
    for run in ("one", "two"):
        distill(make_config(assets, tmp_path / run, steps=8, grad_accum=2, resume=True))
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(two) == 8 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
