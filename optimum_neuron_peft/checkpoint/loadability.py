"""Never publish what Transformers or PEFT would not load: the key set of a consolidated directory, checked against
the keys the library itself expects.

The expected keys come from the libraries, not from our own idea of them: a model built by
``AutoModelForCausalLM.from_config`` on the meta device (no memory, a fraction of a second even for 8B) from the
checkpoint's ``config.json``, and for an adapter, ``peft.get_peft_model`` of that model with the adapter's
``adapter_config.json`` as PEFT reads it, then ``get_peft_model_state_dict`` (what ``PeftModel.from_pretrained``
loads). The torch-free engine takes the same sets from `known_keys` where it can derive them (pinned to the
libraries by tests), else from a child process (`ExpectedModelKeys`). Without a ``config.json`` (optimum-neuron
writes adapter-only checkpoints without one), an adapter gets the structural check that needs no model: one
``base_model.model.`` prefix, ``lora_A``/``lora_B`` pairs, only targeted modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError
from ..transformations.names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_WRAPPER_PREFIX

_SHOWN = 3  # example keys named in an error


def _meta_model(config_file: Path):
    import torch
    import transformers

    try:
        fields = json.loads(Path(config_file).read_text(encoding="utf-8"))
        config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{config_file}: expected a Transformers config with a known model_type ({err})") from None
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def expected_model_keys(config_file: Path) -> tuple[set[str], set[str]]:
    """``(required, allowed)`` state-dict keys of ``AutoModelForCausalLM`` for ``config_file``: tied weights (e.g.
    ``lm_head.weight`` with ``tie_word_embeddings``) are allowed but not required, as Transformers re-ties them."""
    model = _meta_model(config_file)
    allowed = set(model.state_dict())
    owned = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return allowed & owned, allowed


def expected_adapter_keys(config_file: Path, adapter_dir: Path) -> set[str]:
    """Keys ``PeftModel.from_pretrained`` loads for the adapter config in ``adapter_dir`` on that model."""
    import peft

    try:
        lora = peft.PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG_NAME}: PEFT cannot read it ({err})") from None
    model = peft.get_peft_model(_meta_model(config_file), lora)
    return set(peft.get_peft_model_state_dict(model))


def _mismatch(where: Path, what: str, keys: set[str], required: set[str], allowed: set[str]) -> None:
    unexpected, missing = sorted(keys - allowed), sorted(required - keys)
    if not unexpected and not missing:
        return
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} keys it does not expect (e.g. {unexpected[:_SHOWN]})")
    if missing:
        parts.append(f"{len(missing)} keys it expects are missing (e.g. {missing[:_SHOWN]})")
    raise CheckpointError(f"{where}: {what} would not load this output: {' and '.join(parts)}")


def check_model_keys(keys: Iterable[str], config_file: Path, where: Path) -> None:
    """One-line `CheckpointError` unless ``keys`` is what ``AutoModelForCausalLM`` loads for ``config_file``."""
    required, allowed = expected_model_keys(config_file)
    _mismatch(where, "AutoModelForCausalLM.from_pretrained", set(keys), required, allowed)


def check_adapter_keys(keys: Iterable[str], adapter_dir: Path, config_file: Path | None, shown_as: Path | None = None) -> None:
    """One-line `CheckpointError` unless ``keys`` (of ``adapter_dir``'s weights) is what PEFT loads: exactly the
    expected set when ``config_file`` gives the base architecture, else the structural rules (module docstring).
    ``shown_as``: the directory to name in the error (the published one, when ``adapter_dir`` is temporary)."""
    expected = expected_adapter_keys(config_file, adapter_dir) if config_file is not None else None
    check_adapter_keys_against(keys, adapter_dir, expected, shown_as)


def check_adapter_keys_against(keys: Iterable[str], adapter_dir: Path, expected: set[str] | None, shown_as: Path | None = None) -> None:
    """`check_adapter_keys` with PEFT's keys already known (`known_keys.expected_adapter_keys`, torch-free), or
    None for the structural check only."""
    keys = set(keys)
    where = (shown_as or adapter_dir) / ADAPTER_WEIGHTS_NAME
    check_adapter_structure(keys, adapter_dir, where)
    if expected is not None:
        _mismatch(where, "PeftModel.from_pretrained", keys, expected, expected)


# PEFT's saved LoRA keys: ``<module>.lora_A.weight`` (linears, also ``.bias`` with lora_bias) and
# ``<module>.lora_embedding_A`` (embeddings, a ParameterDict entry); A and B come in pairs.
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<lora>lora_(?:embedding_)?[AB])(?:\.weight|\.bias)?")
_PAIRS = ({"lora_A", "lora_B"}, {"lora_embedding_A", "lora_embedding_B"})


def check_adapter_structure(keys: set[str], adapter_dir: Path, where: Path) -> None:
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG_NAME}: expected the adapter's config ({err})") from None
    targets = config.get("target_modules") if isinstance(config, dict) else None
    saved_whole = bool(config.get("modules_to_save")) if isinstance(config, dict) else False
    pairs: dict[str, set[str]] = {}
    for key in sorted(keys):
        if not key.startswith(PEFT_WRAPPER_PREFIX) or key.startswith(PEFT_WRAPPER_PREFIX * 2):
            raise CheckpointError(f"{where}: PEFT would not load key {key!r}: expected the prefix '{PEFT_WRAPPER_PREFIX}' exactly once")
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            if saved_whole:  # a module of modules_to_save, saved whole
                continue
            raise CheckpointError(f"{where}: PEFT would not load key {key!r}: not a LoRA tensor and the config saves no module whole")
        module = match["module"][len(PEFT_WRAPPER_PREFIX) :]
        if not targeted(targets, module):
            raise CheckpointError(f"{where}: key {key!r} is for module {module!r}, which target_modules {targets} does not target")
        pairs.setdefault(module, set()).add(match["lora"])
    unpaired = sorted(m for m, loras in pairs.items() if loras not in _PAIRS)
    if unpaired:
        raise CheckpointError(f"{where}: expected a lora_A and a lora_B for every module, found only one for {unpaired[:_SHOWN]}")


def targeted(target_modules, module: str) -> bool:
    """PEFT's matching: a string is a regex over the full module name, a list matches a name or a name's suffix."""
    if target_modules in (None, "all-linear"):
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in target_modules)


def mismatch_error(keys: Iterable[str], required: Iterable[str], allowed: Iterable[str], where: Path) -> None:
    """`check_model_keys` with the expected sets already computed (by `expected_model_keys_in_subprocess`)."""
    _mismatch(where, "AutoModelForCausalLM.from_pretrained", set(keys), set(required), set(allowed))


class ExpectedModelKeys:
    """`expected_model_keys` (or, given ``adapter_config``, `expected_adapter_keys` of that published config) for
    the torch-free engine, which keeps torch out of its own process (seconds of imports): derived from the configs
    where `known_keys` can (pinned to the libraries by tests), else read from a cache keyed by the configs' bytes and
    the library versions, else computed by a child process started now, on the other core while the bytes are
    copied. `result()` gives ``(required, allowed)`` (the same set twice for an adapter)."""

    def __init__(self, config_file: Path, adapter_config: dict | None = None) -> None:
        import hashlib
        import os
        import subprocess
        import sys
        import tempfile
        from importlib.metadata import PackageNotFoundError, version

        from .known_keys import expected_adapter_keys, expected_keys_from_config

        self._config_file = Path(config_file)
        self._adapter = adapter_config is not None
        self._child = None
        self._adapter_dir = None
        try:
            data = self._config_file.read_bytes()
            versions = version("transformers") + (f" {version('peft')}" if self._adapter else "")
            adapter_bytes = json.dumps(adapter_config, sort_keys=True).encode() if self._adapter else b""
            key = hashlib.sha256(data + versions.encode() + adapter_bytes).hexdigest()
        except (OSError, PackageNotFoundError) as err:
            raise CheckpointError(f"{config_file}: cannot compute the keys Transformers expects ({err})") from None
        try:
            config = json.loads(data)
            if self._adapter:
                keys = expected_adapter_keys(config, adapter_config)
                known = None if keys is None else (keys, keys)
            else:
                known = expected_keys_from_config(config)
        except ValueError:  # not JSON: Transformers (the child) reports it
            known = None
        if known is not None:
            self._cached = {"required": sorted(known[0]), "allowed": sorted(known[1])}
            return
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimum-neuron-peft" / "expected-keys"
        self._cache_file = cache / f"{key}.json"
        self._cached = _read_json(self._cache_file)
        if self._cached is None:
            argv = [str(config_file)]
            if self._adapter:  # PEFT reads the config from a directory
                self._adapter_dir = tempfile.mkdtemp(prefix="onp-adapter-config-")
                (Path(self._adapter_dir) / "adapter_config.json").write_text(json.dumps(adapter_config), encoding="utf-8")
                argv = ["--adapter", str(config_file), self._adapter_dir]
            self._child = subprocess.Popen(
                [sys.executable, "-m", __name__, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )

    def result(self) -> tuple[set[str], set[str]]:
        found = self._cached
        if found is None:
            out, err = self._child.communicate()
            self._remove_adapter_dir()
            if self._child.returncode != 0:
                last = (err.strip().splitlines() or ["no output"])[-1]
                if self._adapter and self._child.returncode == 2:  # our CheckpointError: as the torch engine says it
                    raise CheckpointError(last)
                raise CheckpointError(f"{self._config_file}: could not compute the keys Transformers expects ({last})")
            found = json.loads(out)
            _write_json_atomically(self._cache_file, found)
        return set(found["required"]), set(found["allowed"])

    def cancel(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        self._remove_adapter_dir()

    def _remove_adapter_dir(self) -> None:
        if self._adapter_dir is not None:
            import shutil

            shutil.rmtree(self._adapter_dir, ignore_errors=True)
            self._adapter_dir = None


def _read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(found, dict) and all(isinstance(found.get(k), list) for k in ("required", "allowed"))
    return found if ok else None


def _write_json_atomically(path: Path, value: dict) -> None:
    import os
    import tempfile

    try:  # a cache: failing to write it costs only time next run
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle)
        os.replace(tmp, path)
    except OSError:
        pass


if __name__ == "__main__":  # the child of `ExpectedModelKeys`: CONFIG_FILE, or --adapter CONFIG_FILE ADAPTER_DIR
    import sys

    try:
        if sys.argv[1] == "--adapter":
            keys = expected_adapter_keys(Path(sys.argv[2]), Path(sys.argv[3]))
            required, allowed = keys, keys
        else:
            required, allowed = expected_model_keys(Path(sys.argv[1]))
    except CheckpointError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"required": sorted(required), "allowed": sorted(allowed)}))
