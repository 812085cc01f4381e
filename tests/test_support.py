"""Tests for support/'s guarantees, each on its own, without a chapter: atomic files, the shared
command line, the run directory's identity and lock, the health checks, checkpoints set aside.

(09's end-to-end guarantees, with real processes killed, are in test_09_faults.py.)
"""

import argparse
import dataclasses
import gc
import hashlib
import json
import logging
import os
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from support import checkpoints, cli, files, health, host, runs


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def test_replace_file_is_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    files.replace_file(path, "old")
    files.replace_file(path, b"new")
    assert path.read_bytes() == b"new"

    # A write that fails half-way (here: the rename) leaves the old file and no partial one.
    def failing_replace(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError):
        files.replace_file(path, "newer")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ---------------------------------------------------------------------------------------------
# cli
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """A config as the chapters write theirs: one commented line per field."""

    steps: int = 10          # optimizer steps
    peak_lr: float = 0.01    # lr on the plateau
    remat: bool = False      # recompute each block; this comment
    #                          continues on the next line
    name: str = "run"        # 100% of the name


def test_field_flags_take_their_help_from_the_comments():
    parser = cli.ArgumentParser()
    cli.add_field_flags(parser, Example, examples={"laptop": {"steps": 480, "peak_lr": 0.03,
                                                              "remat": False, "name": "x"}})
    help_text = " ".join(parser.format_help().split())
    assert "--steps INT optimizer steps (laptop: 480)" in help_text
    assert "recompute each block; this comment continues on the next line" in help_text
    assert "100% of the name" in help_text  # a % in a comment is not a format directive
    assert vars(parser.parse_args(["--remat", "TRUE", "--peak-lr", "1e-3"])) == {
        "remat": True, "peak_lr": 1e-3}  # flags not given stay out: the config's value stays


@pytest.mark.parametrize("argv, message", [
    (["--remat", "maybe"], "'maybe' is not a boolean: write true or false"),
    (["--peak-lr", "nan"], "'nan' is not a finite number"),
    (["--steps", "ten"], "'ten' is not an int"),
    (["--step", "3"], "unrecognized arguments: --step 3"),  # no prefix matching
])
def test_a_bad_flag_is_one_line(argv, message, capsys):
    parser = cli.ArgumentParser(prog="example.py")
    cli.add_field_flags(parser, Example)
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err  # one line, not argparse's usage
    assert err.startswith("error: ") and message in err and err.endswith("(see example.py --help)\n")


@pytest.mark.parametrize("error, line", [
    (ValueError("steps=0 must be >= 1"), "error: steps=0 must be >= 1"),
    (FileNotFoundError(2, "No such file or directory", "model.bin"),
     "error: No such file or directory (model.bin)"),
    (runs.RunError("run directory x is in use"), "error: run directory x is in use"),
])
def test_user_errors_are_one_line(error, line):
    with pytest.raises(SystemExit) as stopped, cli.user_errors():
        raise error
    assert stopped.value.code == line


def test_ctrl_c_is_a_message_and_status_130(capsys):
    with pytest.raises(SystemExit) as stopped, cli.user_errors("interrupted; run it again"):
        raise KeyboardInterrupt
    assert stopped.value.code == 130 and capsys.readouterr().err == "\ninterrupted; run it again\n"


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError), cli.user_errors():
        1 / 0


def test_one_line_cuts_the_middle_of_a_long_message():
    line = cli.one_line(OSError("x" * 400 + " File too large"))
    assert line.startswith("OSError: xxx") and line.endswith("File too large") and " ... " in line


# ---------------------------------------------------------------------------------------------
# run_dir
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 8
    dtype: object = jnp.float32


@dataclasses.dataclass(frozen=True)
class Run:
    model: Inner = Inner()
    run_dir: str = "run"
    steps: int = 4
    seed: int = 0


RESUMABLE = {"steps", "run_dir"}


def test_a_config_is_one_flat_json_record(tmp_path):
    run = Run(model=Inner(width=16, dtype=jnp.bfloat16))
    record = runs.flat_record(run)
    assert record == {"model.width": 16, "model.dtype": "bfloat16", "run_dir": "run", "steps": 4,
                      "seed": 0}
    assert runs.from_flat_record(Run, json.loads(json.dumps(record))) == run
    with pytest.raises(TypeError, match=r"no fields \['preset'\]"):
        runs.from_flat_record(Run, dict(record, preset="tiny"))
    # A config.json of another version (or damaged) is a one-line error that says what to do.
    path = tmp_path / "config.json"
    for text in (json.dumps(dict(record, preset="tiny")), "{not json"):
        path.write_text(text)
        with pytest.raises(ValueError, match="another version of this program.*--overwrite"):
            runs.read_config(Run, path)


def claim(directory, config, overwrite=False):
    with runs.claim(directory, config, resumable=RESUMABLE, overwrite=overwrite):
        return sorted(p.name for p in pathlib.Path(directory).iterdir())


def test_a_run_directory_holds_one_run(tmp_path):
    run = Run(run_dir=str(tmp_path))
    assert claim(tmp_path, run) == ["config.json", "run.lock"]
    # Resumable fields may change (and are recorded); the identity may not.
    claim(tmp_path, dataclasses.replace(run, steps=8))
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["changed"] for h in history] == [{"steps": [4, 8]}]
    with pytest.raises(ValueError, match=r"holds a different run .*'seed': \(0, 1\)"):
        claim(tmp_path, dataclasses.replace(run, seed=1))
    # A config.json this program cannot read is refused, and kept.
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json cannot be read"):
        claim(tmp_path, run)
    assert (tmp_path / "config.json").read_text() == "{not json"


def test_a_second_holder_of_the_lock_is_refused(tmp_path):
    with runs.run_lock(tmp_path):
        with pytest.raises(runs.RunError, match=f"in use by process {os.getpid()} "):
            with runs.run_lock(tmp_path):
                pass
    with runs.run_lock(tmp_path):  # released with its holder
        pass


def test_overwrite_deletes_the_runs_files_only(tmp_path, capsys):
    for name in ("metrics.jsonl", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(runs.flat_record(Run(seed=1))))
    assert claim(tmp_path, Run(), overwrite=True) == ["config.json", "notes.txt", "run.lock"]
    assert "deleted config.json, metrics.jsonl, checkpoints" in capsys.readouterr().out


def test_a_finished_run_is_read_from_its_files(tmp_path):
    run = Run(run_dir=str(tmp_path))
    claim(tmp_path, run)
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 3, "eval/text/loss": 2.0}) + "\n" + json.dumps({"step": 4}) + "\n")
    summary = runs.finished_summary(tmp_path, run, resumable=RESUMABLE, steps=4)
    assert summary["complete"] and summary["eval"] == {"eval/text/loss": 2.0}
    assert runs.finished_summary(tmp_path, run, resumable=RESUMABLE, steps=5) is None
    assert runs.finished_summary(tmp_path, dataclasses.replace(run, seed=1),
                                    resumable=RESUMABLE, steps=4) is None


# ---------------------------------------------------------------------------------------------
# health
# ---------------------------------------------------------------------------------------------

def test_divergence_names_the_step_and_the_way_back():
    health.stop_if_diverged(3, 2.0, 1.0, True, run_dir="r", peak_lr=0.01, saved_step=2)  # finite
    for loss, grad_norm, finite in ((float("nan"), 1.0, True), (2.0, float("inf"), True),
                                    (2.0, 1.0, False)):
        with pytest.raises(health.TrainingDiverged, match="diverged at step 3.*newest checkpoint, "
                                                          "step 2.*--peak-lr 0.001"):
            health.stop_if_diverged(3, loss, grad_norm, finite, run_dir="r", peak_lr=0.01,
                                    saved_step=2)


def test_a_stall_is_reported_once_after_stall_steps():
    watch, warnings = health.StallWatch(), []
    for step, grad_norm in enumerate([1.0] + [0.0] * (2 * health.STALL_STEPS) + [1.0], start=1):
        warnings.append(watch.observe(step, 1.0, grad_norm))
    reported = [step for step, w in enumerate(warnings, start=1) if w]
    assert reported == [1 + health.STALL_STEPS] and "since step 2" in warnings[reported[0] - 1]
    assert watch.since is None  # the last gradient moved again


# ---------------------------------------------------------------------------------------------
# checkpoints and host
# ---------------------------------------------------------------------------------------------

def test_a_damaged_or_non_finite_checkpoint_is_set_aside(tmp_path, capsys):
    params, opt_state = {"w": jnp.arange(4.0)}, {"v": jnp.ones(2)}
    manager = checkpoints.manager(tmp_path, keep_last=5, keep_period=100)
    checkpoints.save(manager, 1, params, opt_state, {"step": 1})
    checkpoints.save(manager, 2, {"w": jnp.full(4, jnp.nan)}, opt_state, {"step": 2})
    checkpoints.save(manager, 3, params, opt_state, {"step": 3})
    for data in (tmp_path / "checkpoints" / "3").rglob("d/*"):  # cut short, as by a full disk
        data.write_bytes(data.read_bytes()[:1])
    step, restored, _ = checkpoints.restore_newest_readable(manager, tmp_path, params, opt_state)
    assert step == 1 and np.array_equal(restored["w"], params["w"])
    aside = sorted(p.name.split("-")[0] for p in (tmp_path / "unreadable_checkpoints").iterdir())
    assert aside == ["2", "3"]  # kept, not deleted
    err = capsys.readouterr().err
    assert "checkpoint step 3 cannot be read" in err and "checkpoint step 2 holds NaN or inf" in err
    manager.close()
    assert checkpoints.saved_steps(tmp_path) == (1,)
    only_params = checkpoints.restore_params(tmp_path, 1, params)
    assert np.array_equal(only_params["w"], params["w"])


def test_after_a_failed_orbax_call_its_abandoned_work_stays_silent(monkeypatch):
    # What a failed write leaves behind reports itself when collected, even at exit; the one line
    # the caller prints is all the user sees. After a success, nothing stays silenced.
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(warnings, "filters", warnings.filters[:])
    levels = {name: logging.getLogger(name).level for name in ("absl", "asyncio")}

    async def write_fragment():
        pass

    with checkpoints.quiet_orbax():
        pass
    with pytest.warns(RuntimeWarning, match="never awaited"):
        write_fragment()
        gc.collect()
    try:
        with pytest.raises(OSError), checkpoints.quiet_orbax():
            raise OSError("No space left on device")
        with warnings.catch_warnings(record=True) as caught:
            write_fragment()
            gc.collect()
        assert not [w for w in caught if "never awaited" in str(w.message)]
    finally:  # the failure leaves orbax's loggers at CRITICAL, for the rest of the process
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    manager = checkpoints.manager(tmp_path, keep_last=5, keep_period=100)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda _: argparse.Namespace(free=8))
    with pytest.raises(OSError, match="the checkpoint needs about"):
        checkpoints.save(manager, 1, {"w": jnp.zeros(1024)}, {}, {"step": 1})
    assert checkpoints.saved_steps(tmp_path) == ()
    manager.close()


def test_freed_memory_is_kept_only_where_asked(monkeypatch):
    monkeypatch.setenv("OPENMOE_MALLOC", "default")
    assert host.keep_freed_memory_mapped() is False  # the off-switch changes nothing


def test_memory_of_a_cpu_device_is_the_hosts():
    assert host.memory_bytes(jax.devices("cpu")[0]) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------
# runs.params_fingerprint: a content hash of parameters, the same on any mesh
# ---------------------------------------------------------------------------------------------

def fingerprint_oracle(params) -> str:
    """The hash computed whole on the device: per leaf, Σ bits × (flat index · m | 1) mod 2³²."""
    def sums(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
        index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
        return [int(jnp.sum(bits * (index * jnp.uint32(m) | 1), dtype=jnp.uint32))
                for m in runs.FINGERPRINT_MULTIPLIERS]
    leaves = jax.tree.leaves(params)
    text = json.dumps([[list(x.shape), str(x.dtype), sums(x)] for x in leaves])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_tree():
    rng = np.random.default_rng(0)
    return {"a": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32), "c": jnp.float32(3.5),
            "b": jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.bfloat16),
            "d": jnp.asarray(rng.normal(size=(16, 4, 8)), jnp.float32)}


def test_the_fingerprint_is_the_whole_leaf_formula_on_any_mesh(monkeypatch):
    monkeypatch.setattr(runs, "FINGERPRINT_BLOCK_ELEMENTS", 7)  # many slabs per block
    params = fingerprint_tree()
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    specs = {"a": P("x", "y"), "b": P(None, "x"), "c": P(), "d": P("y", None, "x")}
    sharded = {name: jax.device_put(x, NamedSharding(mesh, specs[name])) for name, x in params.items()}
    assert runs.params_fingerprint(params) == runs.params_fingerprint(sharded) == fingerprint_oracle(params)


def test_the_fingerprint_changes_with_any_one_value():
    params = fingerprint_tree()
    changed = {**params, "a": params["a"].at[7, 11].add(1e-6)}
    swapped = {**params, "d": params["d"][::-1]}
    prints = {runs.params_fingerprint(p) for p in (params, changed, swapped)}
    assert len(prints) == 3
