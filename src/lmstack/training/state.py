"""The trainer's resumable state (not a model format: that is `lmstack.checkpoints`): atomic, verified,
keep-last-K, exact resume.

A checkpoint is a folder `step_000123/` holding model.safetensors (trainable weights), optimizer.pt (our own
optimizer state, read back with weights_only=True), rng.safetensors and state.json. state.json is written last
and records a sha256 of every other file, so a partial or corrupt checkpoint is detected and skipped. The whole
folder is built under a temporary name and renamed into place, so a crash or a full disk never leaves a
half-written checkpoint where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmstack.errors import LmstackError
from lmstack.io import atomic_write_dir, fsync_path, remove_stale_temps


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # state.json contents


def save_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` under `root` atomically, then prune to the newest `keep_last`."""
    final = root / f"step_{step:06d}"
    remove_stale_temps(root / "step_*")  # folders of earlier runs killed mid-save, at any step

    def build(tmp: Path) -> None:
        files = {
            "model.safetensors": lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in
                                                      model_state.items()}, str(p)),
            "optimizer.pt": lambda p: torch.save(optimizer_state, p),
            "rng.safetensors": lambda p: save_file(rng_state(), str(p)),
        }
        hashes = {}
        for name, write in files.items():
            write(tmp / name)
            fsync_path(tmp / name)
            hashes[name] = _sha256(tmp / name)
        full_state = {**state, "step": step, "files": hashes, "python_random": list(random.getstate()[1])}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
        fsync_path(tmp / "state.json")

    atomic_write_dir(final, build)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    state_file = path / "state.json"
    if not state_file.exists():
        return "state.json missing (partial write)"
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return "state.json is corrupt"
    for name, digest in state.get("files", {}).items():
        f = path / name
        if not f.exists():
            return f"{name} missing"
        if _sha256(f) != digest:
            return f"{name} fails its checksum"
    return None


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest intact checkpoint; corrupt ones are named on stderr and skipped."""
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            state = json.loads((path / "state.json").read_text())
            return Checkpoint(path=path, step=int(state["step"]), state=state)
        print(f"warning: skipping checkpoint {path}: {problem}", file=sys.stderr)
    return None


def load_checkpoint_tensors(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    """model state, optimizer state (our own file: weights_only=True), rng state."""
    model_state = load_file(str(ckpt.path / "model.safetensors"))
    optimizer_state = torch.load(ckpt.path / "optimizer.pt", weights_only=True, map_location="cpu")
    rng = load_file(str(ckpt.path / "rng.safetensors"))
    if "python_random" in ckpt.state:
        random.setstate((3, tuple(ckpt.state["python_random"]), None))
    return model_state, optimizer_state, rng


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, so a difference is named down to the one key that differs."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_diff(saved: dict[str, Any], current: dict[str, Any], ignore: set[str]) -> list[str]:
    """Keys (dotted for nested configs) whose values differ between a checkpoint's config and the current one;
    `ignore` holds top-level keys, which ignore everything under them."""
    saved = _flatten({k: v for k, v in saved.items() if k not in ignore})
    current = _flatten({k: v for k, v in current.items() if k not in ignore})
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def require_no_diff(saved: dict[str, Any], current: dict[str, Any], ignore: set[str], where: Path) -> None:
    diff = config_diff(saved, current, ignore)
    if diff:
        saved, current = _flatten(saved), _flatten(current)
        details = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in diff[:6])
        details += f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise LmstackError(f"cannot resume from {where}: the config differs in {details}; "
                           "use a new --out or the original settings")
