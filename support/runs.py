"""Plumbing: a run directory holds one run, and loses nothing.

Guarantees:
  - one run per directory: a second process is refused at its start while the first trains (the
    kernel's lock, released however the holder ends, SIGKILL included: never a stale lock);
  - a run resumes only as itself: its identity is its config outside the resumable fields, so a
    changed model, data or seed is refused (whatever the spelling of the directory's path), and
    each change of a resumable field (the schedule, the mesh, ...) is appended to
    config_history.jsonl;
  - every check comes before the first change to the directory, and `overwrite` deletes the
    run's own files (RUN_FILES) and nothing else that lives there;
  - config.json and metrics.jsonl are replaced atomically, and metrics.jsonl always ends with
    one line per step up to the checkpoint the run resumes from;
  - `params_fingerprint` changes when any one parameter value does, is the same on any mesh
    and host count, and never copies the parameters whole.
A run's config arrives here as a dataclass, written to config.json as one flat record; this
module knows no chapter's config class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import pathlib
import shutil
import socket
import sys
from collections.abc import Iterator, Set

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from support import checkpoints, cli, files

# What a run writes into its directory, and all that `overwrite` deletes: anything else there
# (notes, 11's routing_analysis/, ...) is never touched.
RUN_FILES = ("config.json", "config_history.jsonl", "metrics.jsonl", "checkpoints",
             "unreadable_checkpoints")


class RunError(cli.Refused):
    """A run stopped for a reason the user can act on; the message says what to do."""


# ------------------------------------------------------------------------------------------------
# A content hash of parameters: which base a fine-tune started from
# ------------------------------------------------------------------------------------------------

FINGERPRINT_MULTIPLIERS = (2654435761, 40503)  # two weightings of each position
FINGERPRINT_BLOCK_ELEMENTS = 1 << 20


def _block_sums(block: np.ndarray, offsets: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """[2] uint32: Σ bits × (index·m | 1) mod 2³² over one block of a leaf of `shape`, where
    `index` is the element's flat position in the whole leaf (mod 2³²), starting at `offsets`.
    numpy's uint32 arithmetic wraps, which is exactly the mod 2³² wanted."""
    bits = np.ascontiguousarray(block).view(f"uint{8 * block.itemsize}").astype(np.uint32)
    index = np.zeros((), np.uint32)
    for axis, (offset, size) in enumerate(zip(offsets, block.shape)):
        stride = np.uint32(math.prod(shape[axis + 1:]) % 2**32)
        positions = (np.arange(offset, offset + size, dtype=np.uint64) % 2**32).astype(np.uint32)
        index = index + (positions * stride).reshape((size,) + (1,) * (block.ndim - axis - 1))
    return np.array([np.sum(bits * (index * np.uint32(m) | np.uint32(1)), dtype=np.uint32)
                     for m in FINGERPRINT_MULTIPLIERS], np.uint32)


def _leaf_sums(x) -> np.ndarray:
    """[2] uint32: this host's share of a leaf's sums (a jax.Array's or a numpy array's). Each
    block counts once (the replica 0 of a replicated one), read a slab of rows at a time."""
    sums = np.zeros(2, np.uint32)
    blocks = (((np.asarray(s.data), tuple(i.start or 0 for i in s.index))  # on a CPU: no copy
               for s in x.addressable_shards if not s.replica_id) if isinstance(x, jax.Array)
              else [(np.asarray(x), (0,) * np.ndim(x))])
    for block, offsets in blocks:
        block, offsets = np.atleast_1d(block), offsets or (0,)  # a scalar: one element at 0
        rows = max(1, FINGERPRINT_BLOCK_ELEMENTS // max(1, math.prod(block.shape[1:])))
        for start in range(0, len(block), rows):
            sums += _block_sums(block[start:start + rows], (offsets[0] + start, *offsets[1:]), x.shape)
    return sums


def params_fingerprint(params) -> str:
    """A content hash of a pytree of arrays, for a run's identity (13: the base it started from).

    Per leaf: its shape, dtype and two sums mod 2³² of its bits times odd weights of their
    positions, so changing any one value, or swapping two, changes it; then sha256 of those. It
    tells one checkpoint from another, not a forger's from the real one: sums of 32-bit words
    can cancel (negating every f32 of a leaf with an even count leaves them).

    Sums add up over blocks, so each host sums the blocks it holds and the hosts' sums are added
    (a numpy leaf, or an array on one host only, is summed where it is): the hash is the same on
    any mesh. On a CPU the arrays are read in place, a slab of a few MiB at a time; on an
    accelerator each device's block is copied to the host in turn.
    """
    leaves = jax.tree.leaves(params)
    sums = np.stack([_leaf_sums(x) for x in leaves]) if leaves else np.zeros((0, 2), np.uint32)
    if jax.process_count() > 1:  # add up the hosts' blocks of arrays spread over several hosts
        spread = [isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves]
        added = np.sum(multihost_utils.process_allgather(sums), axis=0, dtype=np.uint32)
        sums = np.where(np.array(spread, bool)[:, None], added, sums)
    text = json.dumps([[list(x.shape), str(x.dtype), v.tolist()] for x, v in zip(leaves, sums)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# The run directory's lock
# ------------------------------------------------------------------------------------------------

def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


@contextlib.contextmanager
def run_lock(run_dir: pathlib.Path) -> Iterator[None]:
    """Hold run_dir/run.lock while training, so that a second process is refused at its start.

    The lock is the kernel's (flock) on an open file, released when the process ends in any way,
    SIGKILL included: a killed run never leaves a stale lock behind. The file names the holder.
    """
    path = run_dir / "run.lock"
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise ValueError(f"cannot write {str(path)!r} ({error.strerror}); the run directory must "
                         "be writable: fix its permissions or choose another --run-dir") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunError(f"run directory {str(run_dir)!r} is in use by {holder}; wait for it "
                           "to finish, or stop it (it resumes from its last checkpoint), or "
                           "choose another --run-dir") from None
        except OSError as error:  # a file system without locks (some bucket mounts)
            print(f"warning: {path} cannot be locked ({error.strerror}); make sure no other "
                  "process trains in this directory", file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {now()}\n")
        handle.flush()
        yield


# ------------------------------------------------------------------------------------------------
# A run's config.json: its config dataclass as one flat JSON record
# ------------------------------------------------------------------------------------------------

def _is_dtype(value) -> bool:
    return isinstance(value, (type, np.dtype))  # jnp.bfloat16 is a type, jnp.dtype(...) a dtype


def flat_record(config) -> dict:
    """A config dataclass as one flat JSON record: the fields of a dataclass held in a field
    `model` appear as "model.<name>", and dtypes by name ("bfloat16")."""
    record = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            record.update({f"{field.name}.{k}": v for k, v in flat_record(value).items()})
        else:
            record[field.name] = jnp.dtype(value).name if _is_dtype(value) else value
    return record


def from_flat_record(cls: type, record: dict):
    """The inverse of flat_record for the dataclass `cls`; nested classes and dtype fields are
    known from its defaults. A field `cls` does not have is a TypeError (the record is foreign)."""
    values = {}
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else None
        prefix = field.name + "."
        if dataclasses.is_dataclass(default):
            nested = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
            values[field.name] = from_flat_record(type(default), nested)
        elif field.name in record:
            value = record[field.name]
            values[field.name] = jnp.dtype(value) if _is_dtype(default) else value
    unknown = [k for k in record if k.split(".")[0] not in values]
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {unknown}")
    return cls(**values)


def saved_record(run_dir: pathlib.Path, cls: type) -> dict | None:
    """The config.json of the run in run_dir, as flat_record writes a `cls` today (None if
    there is none); one that is not such a record is a one-line error, and is left alone."""
    path = run_dir / "config.json"
    if not path.exists():
        return None
    return flat_record(read_config(cls, path))


def read_config(cls: type, path: str | os.PathLike):
    """The `cls` config of the run whose config.json is at `path`; a file that is not one (damaged,
    or written by another version of this program) is a one-line ValueError, and left alone."""
    try:
        return from_flat_record(cls, json.loads(pathlib.Path(path).read_text()))
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"{path} cannot be read as this program's run config ({cli.one_line(error)}); it is "
            "damaged, or was written by another version of this program. Choose another "
            "--run-dir, or train this one again from scratch with --overwrite") from error


def identity_differences(saved: dict, record: dict, resumable: Set[str]) -> dict:
    """{field: (saved, now)} for the fields outside `resumable` that `record` changes."""
    return {k: (saved.get(k), v) for k, v in record.items()
            if k not in resumable and saved.get(k) != v}


def finished_summary(run_dir: str | os.PathLike, config, *, resumable: Set[str],
                     steps: int) -> dict | None:
    """The summary of the run `config` describes if run_dir holds it finished (a checkpoint at
    `steps` or later), from the files alone; None when there is training to do (or a problem
    that the run's start will report)."""
    run_dir = pathlib.Path(run_dir)
    try:
        saved = saved_record(run_dir, type(config))
        saved_steps = checkpoints.step_dirs(run_dir)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        evals = [{k: v for k, v in json.loads(line).items() if k.startswith("eval/")}
                 for line in lines]
    except (OSError, ValueError):
        return None
    if (not saved or identity_differences(saved, flat_record(config), resumable) or not saved_steps
            or saved_steps[-1] < steps):
        return None
    return {"run_dir": str(run_dir), "steps": saved_steps[-1], "complete": True, "losses": {},
            "eval": next((e for e in reversed(evals) if e), {}), "checkpoints": saved_steps}


def check(run_dir: pathlib.Path, config, *, resumable: Set[str], overwrite: bool) -> dict | None:
    """Refuse a run_dir that cannot hold the run `config` describes, changing nothing; return
    its saved record (None when it holds none, or `overwrite` will delete it)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is a file, not a directory; pass a "
                         "directory path to --run-dir")
    saved = None if overwrite else saved_record(run_dir, type(config))
    if saved and (locked := identity_differences(saved, flat_record(config), resumable)):
        raise ValueError(
            f"run directory {run_dir} holds a different run (field: (saved, now) = {locked}); "
            f"only {sorted(resumable)} may change when resuming. Choose another --run-dir, or "
            f"pass --overwrite to delete this run's files ({', '.join(RUN_FILES)}) and start "
            "again here")
    for path in (run_dir / "config.json", run_dir / "metrics.jsonl"):
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"cannot write {path}: it is a directory or read-only; move it "
                             "away or choose another --run-dir")
    return saved


def write_config(run_dir: pathlib.Path, record: dict, saved: dict | None, overwrite: bool) -> None:
    """Delete the previous run's files if `overwrite`, append the changed resumable fields to
    config_history.jsonl, and (atomically) write config.json: each change said in one line."""
    removed = [name for name in RUN_FILES if overwrite and (run_dir / name).exists()]
    for path in (run_dir / name for name in removed):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        print(f"--overwrite: deleted {', '.join(removed)} from {run_dir} (nothing else)")
    if changed := {k: [saved.get(k), v] for k, v in record.items() if saved and saved.get(k) != v}:
        with open(run_dir / "config_history.jsonl", "a") as history:
            history.write(json.dumps({"time": now(), "changed": changed}) + "\n")
        print(f"resuming {run_dir} with changed settings (recorded in config_history.jsonl): "
              + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    files.replace_file(run_dir / "config.json", json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def claim(run_dir: str | os.PathLike, config, *, resumable: Set[str], overwrite: bool,
          writer: bool = True) -> Iterator[None]:
    """Make run_dir hold the run `config` describes, for as long as the `with` block lasts.

    Every host checks the directory; the `writer` (the first host) creates it, takes its lock,
    checks again holding it (another process may have started in between), and writes the
    config. Nothing is written before every check has passed.
    """
    run_dir = pathlib.Path(run_dir)
    check(run_dir, config, resumable=resumable, overwrite=overwrite)
    if not writer:
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"run_dir={str(run_dir)!r} cannot be created ({error.strerror}); "
                         "choose a writable --run-dir") from error
    with run_lock(run_dir):
        saved = check(run_dir, config, resumable=resumable, overwrite=overwrite)
        write_config(run_dir, flat_record(config), saved, overwrite)
        yield


def cut_metrics(path: pathlib.Path, last_step: int) -> None:
    """Leave metrics.jsonl with exactly one line per step 1..last_step, in order: lines past the
    restored checkpoint are dropped (the run redoes those steps), and so is a line a kill cut
    short."""
    lines = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(step, int) and 1 <= step <= last_step:
            lines[step] = line
    files.replace_file(path, "".join(lines[step] + "\n" for step in sorted(lines)))


def summary_lines(summary: dict) -> list[str]:
    """The end-of-run report: train loss smoothed over ten steps, validation loss and accuracy."""
    lines, losses = [], list(summary["losses"].items())
    if summary.get("complete"):
        lines.append(f"{summary['run_dir']} is complete: {summary['steps']} steps. Its loss curve "
                     f"is {summary['run_dir']}/metrics.jsonl; pass a larger --steps to train further.")
    elif losses:
        window = max(1, min(10, len(losses) // 2))
        first, last = (f"step{'s' * (window > 1)} {part[0][0]}"
                       + (f"-{part[-1][0]}" if window > 1 else "")
                       + f": {sum(loss for _, loss in part) / len(part):.3f}"
                       for part in (losses[:window], losses[-window:]))
        lines.append(f"\n{len(losses)} steps in {summary['seconds']:.0f} s; train loss"
                     f"{f' (mean of {window} steps)' if window > 1 else ''}, {first} -> {last}")
    lines += [f"  {name:24} " + (f"{value:.1%}" if name.endswith("accuracy") else f"{value:.3f}")
              for name, value in summary["eval"].items()]
    if summary.get("stalled_since"):
        lines.append(f"warning: the gradient has been exactly zero since step "
                     f"{summary['stalled_since']}: the run stalled; lower --peak-lr")
    if "sample" in summary:
        lines.append(f"sample: {summary['sample']!r}")
    lines.append(f"checkpoints at steps {summary['checkpoints']} in {summary['run_dir']}/checkpoints")
    return lines
