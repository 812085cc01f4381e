"""Plumbing: what a user of the book relies on but a reader of it need not read to learn MoE.

Each module opens with the guarantee it gives, and each guarantee has tests:
  files         a file is replaced whole or not at all; a cache entry that no longer loads is
                built again
  cli           one command line for every chapter: flags that mean one thing, help that says
                what each does, and a user's mistake as one `error: ...` line, never a traceback
  runs          one run per directory, locked while it trains; a run is resumed only with its
                own identity (a fine-tune's includes its base's fingerprint); nothing a run
                wrote is lost, and nothing else there is touched
  checkpoints   orbax checkpoints: atomic saves, room checked first, a damaged one set aside
  health        a diverged run stops before a NaN reaches a checkpoint; a stalled one says so
  host          the host's memory: glibc told to keep freed memory, and how much there is
  tensor_files  torch `.bin` (safe unpickling, no torch), safetensors and T5X zarr, read a
                block of rows at a time; loaded arrays handed to buffers a step updates in place
  report        text tables whose columns line up, and reports written as text and strict JSON
This package imports no chapter (only the standard library and the pinned dependencies);
tests/test_layout.py checks it. Chapters import it with ordinary imports: `from support import cli`.
"""
