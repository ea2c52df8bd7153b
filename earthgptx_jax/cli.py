"""What every entry point does first, in one place."""

from absl import flags, logging


def quiet_library_logs() -> None:
  """Library INFO lines (Orbax, grain, TFDS, XLA's backend probe) bury a CLI's own output:
  warnings and up only, unless the user asked with --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
