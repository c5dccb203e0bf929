"""A pristine workspace of tiny inputs for every command (our checkpoint, optimum-neuron's, a Transformers base and
two PEFT adapters), and helpers to corrupt copies of them, for the hostile-input tests."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "merging"))

from consolidation_helpers import adapter_state, model_state, write_optimum_neuron, write_ours  # noqa: E402
from merging_tiny_models import save_adapter, save_base  # noqa: E402


def build_workspace(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    model = model_state(torch.float32)
    adapter = adapter_state(seed=1)
    write_ours(root / "ours", 2, model=model, adapters={"default": adapter})
    write_optimum_neuron(root / "on", 2, model=model, adapter=adapter_state(seed=1, shared_lora_a=True))
    save_base(root / "base")
    save_adapter(root / "base", root / "a1", seed=1)
    save_adapter(root / "base", root / "a2", seed=2)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256 (files) or '<dir>' / '-> target' (symlinks)} of everything under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = f"-> {path.readlink()}"
        elif path.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    result = edit(data)
    path.write_text(json.dumps(data if result is None else result))


def refresh_manifest(checkpoint: Path) -> None:
    """Make our manifest agree with the files again (size and sha256), as an attacker would."""
    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for rel, entry in manifest["files"].items():
        data = (checkpoint / rel).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))


def rewrite_safetensors_header(path: Path, edit) -> None:
    """Apply ``edit`` to a safetensors file's header dict; the data bytes are kept as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
