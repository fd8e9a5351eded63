"""Checkpoints of a distillation run: tensors in safetensors (nothing is unpickled), the JSON record written last,
the best evaluation carried through them, and resume refused unless every setting and input's content is the same."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from attnswap.config import config_to_dict
from attnswap.data.tokens import source_digest
from attnswap.errors import AttnswapError
from attnswap.hf.models import DEFAULT_MODEL, model_digest
from attnswap.hf.swap import variant_state_dict
from attnswap.runs import atomic_write
from attnswap.train.pair import Pair, pair_device, precision
from attnswap.train.settings import DistillConfig
from attnswap.validate import contained_file, shown

log = logging.getLogger(__name__)


CKPT_JSON = "checkpoint.json"


# What a resumed run may change: how long it runs, when it logs, evaluates and checkpoints, how (not what) it computes,
# and where its inputs lie. Every other setting must equal its checkpoint's, and so must the content of what it reads
# (run_inputs): a model or text moved elsewhere resumes, one whose bytes changed does not.
RESUME_MAY_CHANGE = ("steps", "resume", "out", "log_every", "ckpt_every", "eval_every", "early_stop", "max_seconds",
                     "device", "compile", "kl_chunk", "model", "data", "val_data")  # the last three: by content


def trained_tensors(pair: Pair) -> dict[str, torch.Tensor]:
    """What a run changes: the variant's state and every trainable tensor, by state-dict name."""
    return {**variant_state_dict(pair.model), **{k: p.detach() for k, p in pair.trainable.items()}}


def save_checkpoint(out: Path, step: int, pair: Pair, optimizer: torch.optim.Optimizer, record: dict,
                    best: "BestSoFar") -> Path:
    """Tensors to ``checkpoint-<step>.safetensors``, then ``checkpoint.json`` naming them: each written atomically,
    and the JSON last, so a crash at any moment leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    names = list(pair.trainable)
    tensors = {f"model/{k}": v for k, v in trained_tensors(pair).items()}
    tensors.update({f"best/{k}": v for k, v in best.tensors.items()})
    record = {**record, "best": best.record()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{names[index]}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    if pair_device(pair).type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(pair_device(pair))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tensor_file = out / f"checkpoint-{step:07d}.safetensors"
    atomic_write(tensor_file, lambda tmp: save_file(tensors, str(tmp)))  # a full disk: one line (runs.disk_errors)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_state["param_groups"]]
    meta = {**record, "step": step, "tensors": tensor_file.name, "param_groups": groups}
    atomic_write(out / CKPT_JSON, json.dumps(meta, indent=1))
    for old in out.glob("checkpoint-*.safetensors"):
        if old != tensor_file:
            old.unlink()
    return tensor_file


def _corrupt(path: Path, detail: str) -> AttnswapError:
    return AttnswapError(f"corrupt checkpoint {path}: {detail}; delete it or start without --resume")


def read_checkpoint(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON record and the tensors of the checkpoint in ``out`` (safetensors only: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = out / CKPT_JSON
    try:
        meta = json.loads(path.read_text())
        tensor_file = contained_file(out, meta["tensors"], f"checkpoint {path}")  # never a file outside the run
        tensors = load_file(str(tensor_file))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise _corrupt(path, f"unreadable record ({type(exc).__name__}: {shown(str(exc))})") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(path, f"unreadable tensors ({exc})") from None
    for key in ("step", "config", "param_groups"):
        if key not in meta:
            raise _corrupt(path, f"the record has no {key!r}")
    return meta, tensors


def restore_checkpoint(meta: dict, tensors: dict[str, torch.Tensor], pair: Pair, optimizer, path: Path) -> None:
    """Put the checkpoint's variant state, trained weights, optimizer state and RNG back."""
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    load_trained_tensors(pair, model_state, path)
    state = {}
    for index, name in enumerate(pair.trainable):
        prefix = f"optim/{name}/"
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[index] = entry
    groups = optimizer.state_dict()["param_groups"]
    if len(meta["param_groups"]) != len(groups):
        raise _corrupt(path, "its optimizer groups do not match")
    groups = [{**group, **saved} for group, saved in zip(groups, meta["param_groups"])]  # saved lr etc., live params
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and pair_device(pair).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], pair_device(pair))


def load_trained_tensors(pair: Pair, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``state`` (what ``trained_tensors`` returned) into the model, refusing tensors that do not fit it."""
    expected = set(trained_tensors(pair))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _corrupt(path, f"its tensors do not match this model (missing {missing[:2]}, "
                             f"unexpected {unexpected[:2]})")
    current = pair.model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if current[key].shape != value.shape:
                raise _corrupt(path, f"{key} has shape {tuple(value.shape)}, the model {tuple(current[key].shape)}")
            current[key].copy_(value)  # state_dict tensors share storage with the parameters


class BestSoFar:
    """The best evaluation (lowest validation KL) of the swap as it started (step 0) and of stage 2: its step,
    figures and trained tensors (on the CPU), and how many evaluations since have not improved on it. Carried
    through checkpoints under ``best/``."""

    def __init__(self, record: dict, tensors: dict[str, torch.Tensor]):
        saved = record.get("best") or {}
        self.step, self.result, self.stale = saved.get("step"), saved.get("result"), saved.get("stale", 0)
        self.tensors = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}

    def update(self, step: int, result: dict[str, float], pair: Pair) -> None:
        if self.result is None or result["kl"] < self.result["kl"]:
            self.step, self.result, self.stale = step, result, 0
            self.tensors = {k: v.to("cpu", copy=True) for k, v in trained_tensors(pair).items()}
        else:
            self.stale += 1

    def record(self) -> dict:
        return {"step": self.step, "result": self.result, "stale": self.stale}


def run_inputs(config: DistillConfig, device: torch.device) -> dict[str, str]:
    """The content a run depends on, as digests: the model's weights and tokenizer (file bytes), the training and
    validation texts (file bytes; a hub text by name and split), and the dtypes it computes in. Read from the files
    before anything loads, so a resume that would not continue the same run is refused first."""
    name = config.model or DEFAULT_MODEL
    weights_dtype, autocast = precision(config, device)
    return {"model weights": model_digest(name, "weights"), "tokenizer": model_digest(name, "tokenizer"),
            "training data": source_digest(config.data), "validation data": source_digest(config.val_data),
            "dtype": f"weights {weights_dtype}, autocast {str(autocast).removeprefix('torch.') if autocast else 'off'}"}


def check_resumable(record: dict, config: DistillConfig, inputs: dict[str, str], path: Path) -> None:
    """Refuse to resume unless every setting outside RESUME_MAY_CHANGE and every input's content equal the
    checkpoint's; the error lists everything that changed."""
    saved, current = record["config"], config_to_dict(config)
    defaults = config_to_dict(DistillConfig())  # a key newer than the checkpoint had its default then
    settings = [key for key in current if key not in RESUME_MAY_CHANGE and saved.get(key, defaults[key]) != current[key]]
    problems = []
    if settings:
        problems.append(f"{', '.join(f'{k}={shown(current[k])}' for k in settings)} but the checkpoint {path} was made "
                        f"with {', '.join(f'{k}={shown(saved.get(k, defaults[k]))}' for k in settings)}")
    made_from = record.get("inputs")
    if made_from is None:
        log.warning("%s records no input digests (an older attnswap); resuming on the settings alone", path)
    else:
        changed = [f"{what} ({_short_digest(made_from.get(what))} -> {_short_digest(now)})"
                   for what, now in inputs.items() if made_from.get(what) != now]
        if changed:
            problems.append(f"since the checkpoint {path} was made, these inputs changed: {', '.join(changed)}")
    if problems:
        raise AttnswapError(f"--resume: {'; '.join(problems)}; use the same settings and inputs, or another --out")


def _short_digest(value: str | None) -> str:
    if value is None:
        return "unrecorded"
    return value[:12] if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value
