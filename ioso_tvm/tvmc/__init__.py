"""The ``tvmc`` command line (compile, run, tune), following upstream TVM's flag names; entry point ``cli.main``."""
