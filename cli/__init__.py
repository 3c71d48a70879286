"""The ``horde`` command: one entry point, a subcommand per process or admin task."""
