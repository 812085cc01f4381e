"""Shared test set-up: 8 simulated CPU devices, caches, and loading the numbered chapters by name.

JAX reads the device count once, when its backend starts, so it is set here, before any test
module imports JAX. Eight devices let every sharding test build a real ('data', 'expert',
'model') mesh on a laptop or CI machine with no accelerator.
"""

import importlib
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Hub look-ups must fail fast and offline: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tests write nothing into the checkout: trained tokenizers are cached in the system's temporary
# directory (one cache for every test process and session: a tokenizer is trained once), and
# every run directory is a pytest tmp_path.
os.environ.setdefault("OPENMOE_CACHE_DIR", str(pathlib.Path(tempfile.gettempdir()) / "openmoe-test-cache"))
# Compiled programs are cached there too, for every test process and the self-tests they start:
# many tests build the same small train step again (a resumed run, a second config), and XLA
# then loads it instead of compiling it (the same executable, so the same numbers; test_09_train
# takes about 0.7× the time).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(os.environ["OPENMOE_CACHE_DIR"]) / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def load(name: str):
    """Import a numbered chapter, e.g. ``load("01_tokenizer")``.

    A module name cannot start with a digit, so ``import 01_tokenizer`` is a syntax error;
    ``importlib`` takes the name as a string instead, exactly as the chapters import each other.
    """
    return importlib.import_module(name)

