"""Plumbing: a training run that goes wrong stops, or says so, in words the user can act on.

Guarantees:
  - a NaN or an inf in the loss, the gradient or the new state stops the run at that step,
    before the step reaches the metrics file or a checkpoint: every checkpoint holds finite
    values, and the message names the command that continues from the newest one;
  - a run whose gradient is exactly zero (its parameters frozen where they are, the sign of a
    learning rate far too high) is reported once, when it has lasted STALL_STEPS steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from support import cli

# A step whose gradient is exactly zero changes nothing; this many in a row is a stalled run.
STALL_STEPS = 5


def all_finite(tree) -> jax.Array:
    """True when no floating-point leaf of `tree` holds a NaN or an inf (traceable: the train
    step computes it on device, for the state it returns)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


class TrainingDiverged(cli.Refused):
    """The loss, gradient or new state became NaN or inf; no checkpoint holds such a state."""


def stop_if_diverged(step: int, loss: float, grad_norm: float, state_finite: bool, *,
                     run_dir: str, peak_lr: float, saved_step: int | None) -> None:
    """Raise TrainingDiverged if this step's loss, gradient norm or new state is not finite,
    with what went wrong and the command that continues from the last good state."""
    if math.isfinite(loss) and math.isfinite(grad_norm) and state_finite:
        return
    lower = f"--peak-lr {peak_lr / 10:g}"
    if saved_step:
        advice = (f"The newest checkpoint, step {saved_step} in {run_dir}/checkpoints, holds "
                  f"finite values: run the same command with {lower} to resume from it (the "
                  "change is recorded in config_history.jsonl). If it diverges again at once, that "
                  "state is already damaged (metrics.jsonl shows the loss climbing before it): "
                  f"add --overwrite to start again with {lower}")
    else:
        advice = f"No checkpoint was saved yet: run the same command with {lower} to start again"
    raise TrainingDiverged(
        f"training diverged at step {step}: loss {loss:g}, gradient norm {grad_norm:g}, new "
        f"parameters and optimizer state {'finite' if state_finite else 'NaN or inf'}; nothing "
        f"of this step was saved. {advice}. Using --dtype float32 or checking the data can also help")


class StallWatch:
    """Watches the gradient norm, step by step, for a run whose parameters have stopped moving.
    `since` is the step the current run of exactly-zero gradients began (None while they move)."""

    def __init__(self):
        self.since: int | None = None

    def observe(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Record this step; return a warning the first time a stall reaches STALL_STEPS steps."""
        self.since = (self.since or step) if grad_norm == 0 else None
        if self.since and step - self.since + 1 == STALL_STEPS:
            return (f"warning: the gradient has been exactly zero since step {self.since} (loss "
                    f"{loss:.3f}): training has stalled, the parameters are not changing. A "
                    "learning rate far too high does this: lower --peak-lr")
        return None
