"""Fault injection for 09_train.py: a run never loses data and never lies about its state.

Every run here is a real `09_train.py` process on a small config (06's tiny preset, 8 steps, a
checkpoint every 2). One trains straight through while a second process on its directory must
be refused. A copy is trained by processes that are SIGKILLed at start-up, mid-run and inside a
checkpoint write, stopped by a full disk (RLIMIT_FSIZE), and finished after its newest
checkpoint is corrupted; it must end with the straight run's losses bit for bit and exactly one
metrics line per step, as must a copy stopped and resumed twice in a row. Another run diverges
on purpose and resumes with a lower learning rate.
Every command-line error is checked, in this process, to name its field and change nothing.
"""

import dataclasses
import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from support import runs

from conftest import REPO_ROOT, load

tok = load("01_tokenizer")
model_lib = load("06_model")
train_lib = load("09_train")


def small_run(run_dir: pathlib.Path, **overrides) -> "train_lib.TrainConfig":
    base = dataclasses.replace(
        train_lib.QUICK, model=model_lib.PRESETS["tiny"], run_dir=str(run_dir), objective="lm",
        ul2_until_step=0, seq_len=32, batch_size=8, microbatches=1, steps=8, warmup_steps=2,
        eval_every=0, eval_batches=0, checkpoint_every=2, keep_last=5, keep_period=100,
        sample_tokens=0, mesh="")
    return dataclasses.replace(base, **overrides)


def flags(cfg: "train_lib.TrainConfig") -> list[str]:
    """The command line that gives exactly `cfg`: every field spelled out, the model's too (but
    its length, which is --seq-len, and its group layout, which 07 sets from the mesh)."""
    return [f"--{name.removeprefix('model.').replace('_', '-')}={value}"
            for name, value in runs.flat_record(cfg).items()
            if name not in ("model.max_seq_len", "model.group_multiple", "model.expert_replicas")]


# 09_train.py's main() behind a prelude that injects a fault. The first: the first checkpoint
# write is SIGKILLed after every file is written and before orbax renames the temporary
# directory into place. The second: no file may grow past 1 MiB (as on a full disk; a checkpoint
# of this run has a 6 MiB file), set before anything is written.
KILLED_IN_CHECKPOINT_WRITE = """
import os, signal
from orbax.checkpoint._src.path import atomicity

async def killed_before_rename(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

atomicity.AtomicRenameTemporaryPath.finalize = killed_before_rename
"""
FILES_LIMITED_TO_1_MIB = """
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
"""
# Every process reads the embedded corpus that this module saved once (identical data; building
# it from source files takes seconds per process).
PROGRAM = """
import datasets, importlib, os, pathlib, sys
corpus = {p.name: datasets.load_from_disk(p) for p in pathlib.Path(os.environ["SAVED_CORPUS"]).iterdir()}
importlib.import_module("01_tokenizer").embedded_corpus = lambda split="train", directory=None: corpus
{prelude}
importlib.import_module("09_train").main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
    """The environment of every 09_train.py process here: one CPU device, the saved corpus, and
    one persistent compilation cache (the first process compiles, the others load the same
    executables: the same computation, in a quarter of the time)."""
    directory = tmp_path_factory.mktemp("children")
    for name, dataset in tok.embedded_corpus("train").items():
        dataset.save_to_disk(directory / "corpus" / name)
    return dict(os.environ, JAX_NUM_CPU_DEVICES="1", SAVED_CORPUS=str(directory / "corpus"),
                JAX_COMPILATION_CACHE_DIR=str(directory / "compiled"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def launch(args: list[str], env: dict, prelude: str = "") -> subprocess.Popen:
    """09_train.py's main in a new process, after `prelude`."""
    return subprocess.Popen([sys.executable, "-c", PROGRAM.replace("{prelude}", prelude), *args],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_until(process: subprocess.Popen, condition) -> None:
    """Return as soon as `condition()` holds (checked every few milliseconds) while `process`
    runs; if it ends first, or never gets there, fail (and leave no process behind)."""
    deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before the awaited point:\n{process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the awaited point was never reached:\n{process.communicate()}")
        time.sleep(0.005)


def kill_when(process: subprocess.Popen, condition) -> None:
    """SIGKILL `process` as soon as `condition()` holds, and check that the signal ended it."""
    wait_until(process, condition)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the process ended before it was killed"


def read_text(path: pathlib.Path) -> str:
    return path.read_text() if path.exists() else ""


def metric_steps(run_dir: pathlib.Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_losses(run_dir: pathlib.Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def leftover_temporaries(run_dir: pathlib.Path) -> list[str]:
    return [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()]


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, child_env):
    """The small run trained straight through by one process, while a second process started on
    the same directory is refused: the config, the run directory, and that second process."""
    cfg = small_run(tmp_path_factory.mktemp("reference") / "run")
    run_dir = pathlib.Path(cfg.run_dir)
    first = launch(flags(cfg), child_env)
    wait_until(first, lambda: f"process {first.pid} " in read_text(run_dir / "run.lock"))
    second = launch(flags(cfg), child_env)
    _, second_stderr = second.communicate()
    _, stderr = first.communicate()
    assert first.returncode == 0, stderr
    return cfg, run_dir, (second.returncode, second_stderr), first.pid


def test_a_second_process_on_a_run_directory_is_refused(reference):
    cfg, run_dir, (returncode, stderr), first_pid = reference
    assert returncode == 1
    assert f"error: run directory {str(run_dir)!r} is in use by process {first_pid} " in stderr
    assert metric_steps(run_dir) == list(range(1, cfg.steps + 1))  # the first one's, once each


def test_kills_and_a_full_disk_lose_nothing(reference, child_env, tmp_path):
    ref_cfg, ref_dir, _, _ = reference
    run_dir = tmp_path / "run"
    args = flags(dataclasses.replace(ref_cfg, run_dir=str(run_dir)))

    # 1. Killed at start-up: it holds the lock, nothing is trained yet.
    kill_when(launch(args, child_env), lambda: "process" in read_text(run_dir / "run.lock"))
    # 2. Killed mid-run, as soon as the fifth step's line is written (checkpoints 2 and 4 exist).
    kill_when(launch(args, child_env),
              lambda: len(read_text(run_dir / "metrics.jsonl").splitlines()) >= 5)
    # 3. A full disk: one line that names the checkpoint and says how to go on, no traceback.
    process = launch(args, child_env, FILES_LIMITED_TO_1_MIB)
    _, stderr = process.communicate()
    assert process.returncode == 1, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: could not write checkpoint step"), stderr
    assert "File too large" in last_line
    assert "run the same command again" in last_line and "Traceback" not in stderr
    # 4. Killed inside a checkpoint write: the files are written, the rename has not happened.
    process = launch(args, child_env, KILLED_IN_CHECKPOINT_WRITE)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert leftover_temporaries(run_dir), "the kill should leave a half-written checkpoint"
    # 5. The newest complete checkpoint is corrupted (every data file cut to half its length):
    # the last process falls back to the one before it, keeps the bad one aside, and finishes.
    *_, before, newest = checkpoint_steps(run_dir)
    for data in (run_dir / "checkpoints" / str(newest)).rglob("d/*"):
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    process = launch(args, child_env)
    stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr
    assert f"checkpoint step {newest} cannot be read" in stderr and "Traceback" not in stderr
    assert f"resuming {run_dir} from step {before}" in stdout
    kept = list((run_dir / "unreadable_checkpoints").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith(f"{newest}-")

    # Exactly one metrics line per step, in order, with the straight run's losses bit for bit;
    # no half-written checkpoint is left behind.
    assert metric_steps(run_dir) == list(range(1, ref_cfg.steps + 1))
    assert metric_losses(run_dir) == metric_losses(ref_dir)
    assert leftover_temporaries(run_dir) == []
    assert checkpoint_steps(run_dir) == checkpoint_steps(ref_dir)


def test_resuming_twice_in_a_row_matches_the_straight_run(reference, child_env, tmp_path):
    # Stopped between checkpoints twice (step 3 redoes from 2, step 5 from 4), then finished:
    # a bug that shows only on a second resume (state restored into a restored trainer, the
    # data stream replayed twice) would change the losses or the metrics lines.
    ref_cfg, ref_dir, _, _ = reference
    run_dir = tmp_path / "run"
    args = flags(dataclasses.replace(ref_cfg, run_dir=str(run_dir)))
    for stop_after, resumed_from in ((3, None), (5, 2), (None, 4)):
        process = launch(args + ([f"--stop-after={stop_after}"] if stop_after else []), child_env)
        stdout, stderr = process.communicate()
        assert process.returncode == 0, stderr
        assert (f"resuming {run_dir} from step {resumed_from}" in stdout) == bool(resumed_from)
    assert metric_steps(run_dir) == list(range(1, ref_cfg.steps + 1))
    assert metric_losses(run_dir) == metric_losses(ref_dir)
    assert checkpoint_steps(run_dir) == checkpoint_steps(ref_dir)


def test_divergence_saves_nothing_non_finite_and_a_lower_lr_resumes(child_env, tmp_path):
    # A learning rate of 1e38 keeps step 1's loss finite but overflows its update: the new
    # parameters hold inf. No checkpoint may be written from that state, even one due now.
    run_dir = tmp_path / "run"
    cfg = small_run(run_dir, peak_lr=1e38, checkpoint_every=1, steps=4)
    process = launch(flags(cfg), child_env)
    _, stderr = process.communicate()
    assert process.returncode == 1
    assert re.search(r"error: training diverged at step 1: loss 9\.\d+, gradient norm [\d.]+, new "
                     r"parameters and optimizer state NaN or inf; nothing of this step was saved\. "
                     r"No checkpoint was saved yet: run the same command with --peak-lr 1e\+37",
                     stderr), stderr
    assert checkpoint_steps(run_dir) == [] and metric_steps(run_dir) == []

    # The advice can be followed: the same run with a lower peak learning rate, change recorded.
    process = launch(flags(dataclasses.replace(cfg, peak_lr=0.01, checkpoint_every=2)), child_env)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    assert checkpoint_steps(run_dir) == [2, 4]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, cfg.steps + 1))
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[0]["lr"] == pytest.approx(0.01)
    history = json.loads((run_dir / "config_history.jsonl").read_text())
    assert history["changed"] == {"peak_lr": [1e38, 0.01], "checkpoint_every": [1, 2]}
    assert json.loads((run_dir / "config.json").read_text())["peak_lr"] == 0.01


# ---------------------------------------------------------------------------------------------
# Command-line errors: one line naming the field, before anything on disk changes
# ---------------------------------------------------------------------------------------------

def snapshot(directory: pathlib.Path) -> dict[str, bytes | None]:
    """Every path under `directory` with its contents (None for a directory)."""
    return {str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
            for p in sorted(directory.rglob("*"))}


def refused(argv: list[str], capsys) -> str:
    """main(argv)'s exit message (ours, or argparse's on stderr); it must not return."""
    with pytest.raises(SystemExit) as stopped:
        train_lib.main(argv)
    return f"{stopped.value.code} {capsys.readouterr().err}"


@pytest.mark.parametrize("extra, message", [
    (["--remat", "on"], "argument --remat: 'on' is not a boolean: write true or false"),
    (["--remat", "maybe"], "argument --remat: 'maybe' is not a boolean"),
    (["--stop-after", "0"], "argument --stop-after: '0' must be an int >= 1"),
    (["--stop-after", "-3"], "argument --stop-after: '-3' must be an int >= 1"),
    (["--train-capacity-factor", "inf"], "argument --train-capacity-factor: 'inf' is not a finite"),
    (["--z-loss-weight", "nan"], "argument --z-loss-weight: 'nan' is not a finite number"),
    (["--z-loss-weight", "-1"], "ModelConfig.z_loss_weight=-1.0: must be a finite number >= 0"),
    (["--peak-lr", "0"], "TrainConfig.peak_lr=0.0: must be a finite number > 0"),
    (["--peak-lr", "nan"], "argument --peak-lr: 'nan' is not a finite number"),
    (["--step", "3"], "unrecognized arguments: --step"),  # no prefix matching of --steps
    (["--seed", "-1"], "TrainConfig.seed=-1: must be an int from 0 to 2**32 - 1"),
    (["--objective", "mlm"], "argument --objective: invalid choice: 'mlm'"),
])
def test_bad_flags_name_the_field_and_change_nothing(tmp_path, capsys, extra, message):
    (tmp_path / "notes.txt").write_text("the user's own file")
    before = snapshot(tmp_path)
    assert message in refused(flags(small_run(tmp_path / "run")) + extra, capsys)
    assert snapshot(tmp_path) == before


def test_unusable_run_directories_are_one_line_errors_that_change_nothing(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("the user's own file")
    (tmp_path / "metrics-is-a-directory" / "metrics.jsonl").mkdir(parents=True)
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / "config.json").write_text(json.dumps(runs.flat_record(small_run(other_run, seq_len=64))))
    (other_run / "notes.txt").write_text("the user's own file")
    before = snapshot(tmp_path)
    for run_dir, message in [
            (a_file, f"run_dir={str(a_file)!r} is a file, not a directory"),
            (a_file / "run", f"run_dir={str(a_file / 'run')!r} cannot be created "
                             "(Not a directory)"),
            (tmp_path / "metrics-is-a-directory", "metrics.jsonl: it is a directory or read-only"),
            (other_run, "holds a different run (field: (saved, now) = {'seq_len': (64, 32)})")]:
        assert message in refused(flags(small_run(run_dir)), capsys)
        assert snapshot(tmp_path) == before
    # --quick in a named directory follows the same rules: it deletes nothing there.
    assert "holds a different run" in refused(["--quick", *flags(small_run(other_run))], capsys)
    assert snapshot(tmp_path) == before


def test_overwrite_deletes_only_the_runs_own_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(runs.flat_record(small_run(run_dir, seq_len=64))))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "notes.txt").write_text("the user's own file")
    cfg = small_run(run_dir)
    with runs.claim(run_dir, cfg, resumable=train_lib.RESUMABLE_FIELDS, overwrite=True):
        pass
    assert "deleted config.json, metrics.jsonl, checkpoints" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "notes.txt", "run.lock"]
    assert json.loads((run_dir / "config.json").read_text())["seq_len"] == 32


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runs.fcntl, "flock", no_locks)
    with runs.run_lock(tmp_path):
        assert f"process {os.getpid()} " in (tmp_path / "run.lock").read_text()
    assert "run.lock cannot be locked (No locks available)" in capsys.readouterr().err
