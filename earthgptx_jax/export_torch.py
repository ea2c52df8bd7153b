"""Export a trained run to PyTorch (and back), verified by parity before anything is kept.

    python -m earthgptx_jax.export_torch --workdir=RUN --out=FOLDER [--step=N]
    python -m earthgptx_jax.export_torch --import_folder=FOLDER --workdir=NEW_RUN [--step=N]

The folder layout, the parity check and the import are in export.py; this is the command line.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from earthgptx_jax import cli, export, paths

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (export: read; import: written)")
_OUT = flags.DEFINE_string("out", None, "export: the folder to write (must not exist)")
_IMPORT_FOLDER = flags.DEFINE_string("import_folder", None,
                                     "import: an exported folder to turn into a workdir")
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default newest usable); "
                             "import: the step to write (default 0)")


def run() -> int:
  paths.resolve_flags("workdir", "out", "import_folder")
  workdir, out, folder, step = _WORKDIR.value, _OUT.value, _IMPORT_FOLDER.value, _STEP.value
  try:
    if not workdir:
      raise export.ExportError("--workdir: required")
    if folder:
      if out:
        raise export.ExportError("--out: not used with --import_folder (the workdir is the output)")
      export.import_folder(folder, workdir, step or 0)
      print(f"imported {folder} -> {workdir}")
      return 0
    if not out:
      raise export.ExportError("--out: required for export")
    config, params, step = export.load_workdir(workdir, step)
    tokenizer = pathlib.Path(workdir) / export.TOKENIZER_DIR
    export.export(config, params, out, tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
    print(f"exported step {step} of {workdir} -> {out}")
    return 0
  except (export.ExportError, ValueError) as e:  # ValueError: a config or tensor that does not fit
    print(f"error: {e}", file=sys.stderr)
    return 1


def main(argv):
  del argv
  cli.quiet_library_logs()
  sys.exit(run())


if __name__ == "__main__":
  app.run(main)
