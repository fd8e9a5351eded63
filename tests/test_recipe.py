"""The distillation recipe: chunked KL equals the whole-logits KL, stage 1 runs on the teacher's inputs, per-stage
learning rates, early stopping that keeps the best evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnswap
import attnswap.train.distill as distill_module
from attnswap.train.distill import DistillConfig, Pair, build_pair, distill, learning_rate
from attnswap.train.checkpoints import trained_tensors
from attnswap.train.losses import attention_cross_entropy, chunked_kl, kl_divergence
from attnswap.hf.swap import attention_modules, observe_attention
from tests.test_distill import assets, make_config, one_thread_and_own_cache, train_losses  # noqa: F401  (fixtures)


@pytest.mark.parametrize("chunk", [5, 64])  # 5 splits the 2 × 11 positions unevenly
def test_chunked_kl_matches_whole_logits_kl_and_its_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(8, 50, bias=False)
    student = torch.randn(2, 11, 8, generator=g, requires_grad=True)
    teacher = torch.randn(2, 11, 8, generator=g)
    loss, agree = chunked_kl(student, teacher, head, temperature=2.0, chunk=chunk)
    loss.backward()
    chunked_grads = student.grad.clone(), head.weight.grad.clone()
    student.grad, head.weight.grad = None, None
    expected = kl_divergence(head(student), head(teacher), temperature=2.0)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(chunked_grads[0], student.grad, msg="d student hidden")
    torch.testing.assert_close(chunked_grads[1], head.weight.grad, msg="d head weight")
    assert agree == (head(student).argmax(-1) == head(teacher).argmax(-1)).sum()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_kl_of_a_frozen_head_matches_whole_logits_kl_and_its_gradient(chunk, bias):
    """A frozen head takes the fused path: its vocabulary (50) is padded to 128 rows, which must change nothing."""
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(8, 50, bias=bias).requires_grad_(False)
    if bias:
        head.bias.normal_(generator=g)
    student = torch.randn(2, 11, 8, generator=g, requires_grad=True)
    teacher = torch.randn(2, 11, 8, generator=g)
    loss, agree = chunked_kl(student, teacher, head, temperature=2.0, chunk=chunk)
    (3.0 * loss).backward()  # the saved gradient must be scaled by the incoming one
    fused_grad = student.grad.clone()
    student.grad = None
    expected = kl_divergence(head(student), head(teacher), temperature=2.0)
    (3.0 * expected).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused_grad, student.grad, msg="d student hidden")
    assert agree == (head(student).argmax(-1) == head(teacher).argmax(-1)).sum()
    with torch.no_grad():
        assert chunked_kl(student, teacher, head, temperature=2.0, chunk=chunk)[0] == pytest.approx(expected.item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled fused KL runs on CUDA")
def test_fused_kl_on_cuda_in_bf16_matches_the_fp32_whole_logits_kl():
    g = torch.Generator(device="cuda").manual_seed(0)
    head = nn.Linear(64, 50257, bias=False, device="cuda").requires_grad_(False)
    student = torch.randn(3, 700, 64, device="cuda", generator=g, requires_grad=True)
    teacher = student.detach() + 0.3 * torch.randn(3, 700, 64, device="cuda", generator=g)
    expected = kl_divergence(head(student), head(teacher))
    expected.backward()
    expected_grad, student.grad = student.grad.clone(), None
    head.to(torch.bfloat16)
    loss, _ = chunked_kl(student, teacher, head, chunk=1024)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    cosine = F.cosine_similarity(student.grad.flatten(), expected_grad.flatten(), dim=0)
    assert cosine > 0.99, f"gradient cosine {cosine.item():.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["window:w=2", "hedgehog"])  # hedgehog: a variant that cannot apply a packing mask
def test_a_compiled_model_distils_as_the_eager_one(assets, tmp_path, spec):
    """distill.compile: teacher and student through one compiled module give the eager run's losses, step by step."""
    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"compiled_{compiled}"
        before = counters["stats"]["unique_graphs"]
        distill(make_config(assets, out, variant=spec, trainable="variant+attn", steps=3, compile=compiled))
        runs[compiled], graphs[compiled] = train_losses(out), counters["stats"]["unique_graphs"] - before
    assert graphs[False] == 0 and graphs[True] >= 2, f"graphs compiled: {graphs} (teacher and student expected)"
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-6)


def test_attention_cross_entropy_is_zero_gap_at_the_target_and_skips_empty_rows():
    probs = torch.softmax(torch.randn(1, 2, 3, 4), dim=-1)
    probs[:, :, 0] = 0.0  # a query row with no allowed key
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).sum() / 4  # 4 real rows
    assert attention_cross_entropy(probs, probs) == pytest.approx(entropy.item(), rel=1e-5)
    assert attention_cross_entropy(probs, torch.full_like(probs, 0.25)) > attention_cross_entropy(probs, probs)


def test_transfer_stage_feeds_every_layer_the_teachers_inputs(assets, tmp_path):
    """Layer 1's queries during stage 1 must be the original model's, not those made by a swapped layer 0."""
    config = make_config(assets, tmp_path / "run", variant="hedgehog", transfer_steps=2, transfer_attn_ce=1.0)
    pair, _ = build_pair(config, torch.device("cpu"))
    ids = torch.randint(4, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}

    def layer1_queries(name):
        def observer(module, _variant, q, k, v, ctx, state):
            if module.layer_idx == 1:
                seen[name] = q.detach().clone()
        return observer

    with observe_attention(pair.model, layer1_queries("transfer")):
        mse, ce = pair.transfer_loss(ids)
    with observe_attention(pair.model, layer1_queries("student")), torch.no_grad():
        pair.hidden_states(ids)
    original = attnswap.load_model(config.model)
    attnswap.swap(original, "full")
    with observe_attention(original, layer1_queries("original")), torch.no_grad():
        original(input_ids=ids)
    torch.testing.assert_close(seen["transfer"], seen["original"], msg="stage 1 saw the student's hidden states")
    # The check can fail: the student's own layer 1 sees other queries.
    assert (seen["student"] - seen["original"]).abs().max() > 1e-3
    assert mse.item() > 0 and ce.item() > 0
    (mse + ce).backward()
    maps = [m.attnswap.weight.grad for m in attention_modules(pair.model)]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in maps), "the feature maps get no gradient"


def test_each_stage_warms_up_and_decays_on_its_own():
    config = DistillConfig(steps=100, transfer_steps=40, lr=1e-3, transfer_lr=1e-2, warmup_steps=10,
                           min_lr_ratio=0.1)
    assert learning_rate(9, config) == pytest.approx(1e-2)  # stage 1 peak
    assert learning_rate(39, config) == pytest.approx(1e-3, rel=0.05)  # stage 1 decayed to 0.1 ×
    assert learning_rate(40, config) == pytest.approx(1e-4)  # stage 2 warms up from its first step
    assert learning_rate(49, config) == pytest.approx(1e-3)
    assert learning_rate(99, config) == pytest.approx(1e-4, rel=0.05)


def test_early_stop_ends_the_run_and_keeps_the_best_evaluation(assets, tmp_path, monkeypatch):
    real = distill_module.evaluate_blocks
    scripted = iter([0.9, 0.5, 0.7, 0.8, 0.95])  # before, then steps 2, 4, 6: best at step 2, stale twice

    def evaluate(pair, blocks, config, ranks):
        result = real(pair, blocks, config, ranks)
        return {**result, "kl": next(scripted, 1.0)}

    monkeypatch.setattr(distill_module, "evaluate_blocks", evaluate)
    snapshots = {}
    update = distill_module.BestSoFar.update

    def remember(self, step, result, pair):
        snapshots[step] = {k: v.clone() for k, v in trained_tensors(pair).items()}
        update(self, step, result, pair)

    monkeypatch.setattr(distill_module.BestSoFar, "update", remember)
    results = distill(make_config(assets, tmp_path / "run", steps=20, eval_every=2, early_stop=2))
    assert results["stopped_by"] == "early_stop" and results["steps_done"] == 6
    assert results["kept_step"] == 2 and results["kl_after"] == 0.5
    saved = attnswap.load(tmp_path / "run" / "model")
    for name, tensor in snapshots[2].items():
        torch.testing.assert_close(saved.state_dict()[name], tensor, msg=f"{name} is not step 2's")


def test_a_run_that_only_gets_worse_keeps_the_swap_as_it_started(assets, tmp_path, monkeypatch):
    real = distill_module.evaluate_blocks
    scripted = iter([0.1, 0.5, 0.6, 0.7])

    def evaluate(pair, blocks, config, ranks):
        return {**real(pair, blocks, config, ranks), "kl": next(scripted, 1.0)}

    monkeypatch.setattr(distill_module, "evaluate_blocks", evaluate)
    config = make_config(assets, tmp_path / "run", steps=20, eval_every=2, early_stop=2)
    initial = {k: v.clone() for k, v in trained_tensors(build_pair(config, torch.device("cpu"))[0]).items()}
    results = distill(config)
    assert results["stopped_by"] == "early_stop" and results["kept_step"] == 0 and results["kl_after"] == 0.1
    saved = attnswap.load(tmp_path / "run" / "model")
    for name, tensor in initial.items():
        torch.testing.assert_close(saved.state_dict()[name], tensor, msg=f"{name} moved")


def test_teacher_is_original_under_lora_too(assets, tmp_path):
    pytest.importorskip("peft")
    pair, _ = build_pair(make_config(assets, tmp_path / "run", trainable="variant+lora", lora_r=2), torch.device("cpu"))
    assert isinstance(pair, Pair)
    for param in pair.trainable.values():
        param.data.add_(0.5)
    ids = torch.randint(4, 97, (2, 16))
    original = attnswap.load_model(str(assets / "model"))
    with torch.no_grad():
        torch.testing.assert_close(pair.head(pair.teacher_hidden(ids)), original(ids).logits, atol=1e-5, rtol=0)
