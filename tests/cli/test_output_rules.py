"""The output-directory rules (utils/atomic.py) and the CLI's error contract: the lock, leftovers of dead and live
runs, umask permissions, --debug, Ctrl-C while a command's modules are imported."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optimum_neuron_peft import cli
from optimum_neuron_peft.errors import OutputBusyError
from optimum_neuron_peft.utils.atomic import atomic_output_dir, lock_path, output_lock

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_are_removed_only_when_their_owner_is_dead(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}-abc"
    live_owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.tmp-{live_owner.pid}-def"
        for leftover in (dead, live):
            leftover.mkdir()
            (leftover / "model.safetensors").write_bytes(b"partial")
        with atomic_output_dir(out) as tmp:
            (tmp / "x").write_text("1")
        assert not dead.exists()  # its owner is gone
        assert (live / "model.safetensors").read_bytes() == b"partial"  # another live run's work is never destroyed
        assert (out / "x").read_text() == "1"
    finally:
        live_owner.kill()
        live_owner.wait()


def test_second_run_fails_at_once_naming_output_and_pid(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time; from optimum_neuron_peft.utils.atomic import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); sys.stdin.readline()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(OutputBusyError, match=rf"{out}: another run \(pid {holder.pid}\) is writing"):
            with atomic_output_dir(out):
                pass
    finally:
        holder.communicate(b"\n")
    assert not lock_path(out).exists()  # the holder removed its lock file when done
    with atomic_output_dir(out) as tmp:  # and the output is free again
        (tmp / "x").write_text("1")
    assert not lock_path(out).exists() and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_lock_is_reentrant_in_process_and_removes_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        with output_lock(out):  # the command holds it, the library's atomic write takes it again
            pass
        assert lock_path(out).exists()
    assert not (tmp_path / "a").exists()  # nothing was published: the parents it created are gone


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_published_directory_gets_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == 0o777 & ~umask


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["consolidate", str(tmp_path / "missing"), str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(Exception, match="missing"):
        cli.main([*argv, "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(Exception, match="missing"):
        cli.main(argv)


def test_ctrl_c_while_a_command_module_is_imported(tmp_path, capsys, monkeypatch):
    module = tmp_path / "interrupted_command.py"
    module.write_text("raise KeyboardInterrupt  # as if Ctrl-C arrived while torch was being imported\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "consolidate", ("interrupted_command", "help"))
    assert cli.main(["consolidate", "x"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_unexpected_error_is_one_line(capsys, monkeypatch, tmp_path):
    module = tmp_path / "broken_command.py"
    module.write_text("def add_arguments(p):\n    pass\n\ndef run(args):\n    raise RuntimeError('line one\\nline two')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "verify", ("broken_command", "help"))
    assert cli.main(["verify"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: RuntimeError: line one line two") and "--debug" in err


def test_a_write_error_without_a_file_name_names_the_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        with atomic_output_dir(out) as tmp:
            (tmp / "partial").write_text("x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a failed write() raises: no file name
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out)
    assert [p.name for p in tmp_path.iterdir()] == []  # temporary and lock removed, nothing published


def test_two_real_runs_into_one_output(tmp_path, capsys):
    """The second run fails at once naming the first; the first is untouched and publishes a complete output."""
    sys.path.insert(0, str(REPO / "tests" / "checkpoint"))
    import torch
    from consolidation_helpers import model_state, write_ours

    from optimum_neuron_peft.checkpoint.engine_common import SLEEP_ENV

    write_ours(tmp_path / "ckpt", 2, model=model_state(torch.float32))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "optimum_neuron_peft", "consolidate", str(tmp_path / "ckpt"), str(out)]
    first = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO), SLEEP_ENV: "0.1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, first.communicate()
        assert cli.main(["consolidate", str(tmp_path / "ckpt"), str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {out}: another run (pid {first.pid}) is writing this output directory; wait for it "
                       "to finish or choose another output\n")  # fmt: skip
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert stdout.startswith("consolidated ")
    assert cli.main(["verify", str(tmp_path / "ckpt"), str(out)]) == 0  # complete and bit-exact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
