"""Plumbing: a run's checkpoints on disk, through orbax. The layout of a run's checkpoints
lives in this file alone:
    RUN/checkpoints/<step>/state   {"params": [leaves], "opt_state": [leaves]}  (orbax arrays)
    RUN/checkpoints/<step>/meta    {"step": ..., "data_rows_consumed": ...}     (JSON)
Leaves are stored as lists in the order of `jax.tree.leaves`, so the files do not depend on the
classes of the pytrees that hold them.

Guarantees:
  - a save is whole or absent: orbax writes under a temporary name and renames; a save killed
    half-way leaves a temporary directory, which the next manager of the run removes;
  - a save that cannot fit on the disk is refused before orbax writes a byte;
  - a checkpoint that cannot be read back, or that holds a NaN or an inf, is moved to
    RUN/unreadable_checkpoints/ (never deleted) and the one before it is tried;
  - reading a run (10's loader, 11's analysis) never changes it, and says nothing: its
    managers are read-only and orbax's notes about that are silenced;
  - a failing save or restore reaches the user as one line that says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import sys
import time
import warnings
from collections.abc import Iterator

import jax

from support import cli, health


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Around an orbax call whose failure the caller reports in one line.

    Orbax logs such an error with its traceback (absl), and notes that a checkpoint directory
    is read-only; its abandoned reads and writes report a failure again when collected, once per
    array (asyncio's "exception was never retrieved", tensorstore's "Event loop is closed",
    and, when the process exits, "coroutine ... was never awaited"). All are silenced while it
    works and, if it fails, for the rest of the process: the one line the caller prints carries
    the cause.
    """
    logs = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels, report_unraisable = [log.level for log in logs], sys.unraisablehook
    filters = warnings.filters[:]

    def drop_closed_loop_reports(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            report_unraisable(unraisable)

    for log in logs:
        log.setLevel(logging.CRITICAL)
    sys.unraisablehook = drop_closed_loop_reports
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    yield
    for log, level in zip(logs, levels):  # reached only on success: nothing was abandoned
        log.setLevel(level)
    sys.unraisablehook, warnings.filters[:] = report_unraisable, filters


def manager(run_dir: str | os.PathLike, *, keep_last: int, keep_period: int):
    """Orbax's manager of RUN/checkpoints, keeping the newest `keep_last` checkpoints plus every
    step divisible by `keep_period`; it removes what a killed save left behind."""
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, keep_period=keep_period,
                                           enable_async_checkpointing=False, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "checkpoints", options=options)


@contextlib.contextmanager
def read_only(run_dir: str | os.PathLike):
    """Orbax's view of RUN/checkpoints for reading: nothing in the run is changed."""
    import orbax.checkpoint as ocp
    with quiet_orbax(), ocp.CheckpointManager(
            pathlib.Path(run_dir).absolute() / "checkpoints",
            options=ocp.CheckpointManagerOptions(read_only=True)) as reader:
        yield reader


def step_dirs(run_dir: str | os.PathLike) -> list[int]:
    """The steps of RUN/checkpoints/<step>/ directories, sorted, read without orbax (a save cut
    short leaves a temporary name, which this skips)."""
    directory = pathlib.Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def saved_steps(run_dir: str | os.PathLike) -> tuple[int, ...]:
    """The steps of a run that have a complete checkpoint, oldest first."""
    if not (pathlib.Path(run_dir) / "checkpoints").is_dir():
        return ()
    with read_only(run_dir) as reader:
        return tuple(sorted(reader.all_steps()))


def save(manager, step: int, params, opt_state, meta: dict) -> None:
    """Params and optimizer state (as leaves: every host writes its own shards) and `meta`.
    A disk without room for the state is an OSError before orbax starts writing."""
    import orbax.checkpoint as ocp
    state = {"params": jax.tree.leaves(params), "opt_state": jax.tree.leaves(opt_state)}
    needed = sum(x.nbytes for x in jax.tree.leaves(state))
    free = shutil.disk_usage(manager.directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"the checkpoint needs about {needed / 2**20:.0f} MiB, "
                                    f"{free / 2**20:.0f} MiB are free")
    with quiet_orbax():
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()


def _like(leaves) -> list:
    return [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]


def restore(manager, step: int, params, opt_state):
    """Checkpoint `step` as (params, opt_state), shaped and sharded like the two given trees."""
    import orbax.checkpoint as ocp
    params_leaves, params_def = jax.tree.flatten(params)
    opt_leaves, opt_def = jax.tree.flatten(opt_state)
    target = {"params": _like(params_leaves), "opt_state": _like(opt_leaves)}
    with quiet_orbax():
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return (jax.tree.unflatten(params_def, restored["state"]["params"]),
            jax.tree.unflatten(opt_def, restored["state"]["opt_state"]))


def restore_newest_readable(manager, run_dir: str | os.PathLike, params, opt_state, *,
                            writer: bool = True):
    """(step, params, opt_state) of the newest checkpoint that reads back whole and finite,
    shaped like the given trees; (0, params, opt_state) as given when there is none.

    A checkpoint that fails to restore, or holds a NaN or an inf, is moved to RUN/unreadable_checkpoints/
    (by the `writer`, the first host) and the one before it is tried: nothing is deleted, and
    the run continues from the newest state it can trust.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore(manager, step, params, opt_state)
            problem = None if bool(jax.jit(health.all_finite)(restored)) else "holds NaN or inf"
        except Exception as error:  # orbax and tensorstore raise many types for a damaged file
            problem = f"cannot be read ({cli.one_line(error)})"
        if problem is None:
            return (step, *restored)
        aside = pathlib.Path(run_dir) / "unreadable_checkpoints" / f"{step}-{time.time():.0f}"
        if writer:
            aside.parent.mkdir(exist_ok=True)
            os.replace(pathlib.Path(manager.directory) / str(step), aside)
        print(f"warning: checkpoint step {step} {problem}; moved it to {aside} and trying the "
              "one before it", file=sys.stderr)
        manager.reload()
    return 0, params, opt_state


def restore_params(run_dir: str | os.PathLike, step: int, params):
    """Only the parameters saved at `step` (orbax's partial restore: the optimizer state stays
    on disk), shaped and placed like `params` (arrays or jax.ShapeDtypeStructs with shardings)."""
    import orbax.checkpoint as ocp
    leaves, treedef = jax.tree.flatten(params)
    target = {"params": _like(leaves)}
    restore_args = {"params": [ocp.ArrayRestoreArgs(sharding=x.sharding) for x in leaves]}
    with read_only(run_dir) as reader:
        restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    return jax.tree.unflatten(treedef, restored["state"]["params"])


@contextlib.contextmanager
def resumable_write(what: str, manager) -> Iterator[None]:
    """Around a write that may fail mid-run (a full disk, a quota): one line saying what, why,
    and that the same command resumes from the newest complete checkpoint."""
    saved_step = manager.latest_step()
    try:
        yield
    except Exception as error:  # a full disk surfaces from orbax in several types
        raise cli.Refused(f"could not write {what} ({cli.one_line(error)}); make room or fix "
                          f"permissions, then run the same command again: it resumes from step "
                          f"{saved_step or 0}, the newest complete checkpoint") from error
