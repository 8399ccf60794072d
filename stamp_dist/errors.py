"""How a command ends when it does not simply finish: user errors and stop requests.

Exit statuses of the ``stamp`` command (docs/RELIABILITY.md): 0 finished, 2 a user error (an ``error:``
line says what and how to fix it), 75 stopped on request with a checkpoint — run the same command to
resume (sysexits' EX_TEMPFAIL: wrappers such as the SLURM scripts requeue on it), 1 anything else.
"""

EXIT_USER_ERROR = 2
EXIT_STOPPED = 75


class StampError(Exception):
    """A problem with the user's input: the message names what is wrong and how to fix it."""


class Stopped(Exception):
    """A run stopped on a stop request (SIGTERM, SIGUSR1, Ctrl-C) after saving a checkpoint; not an error.
    The message says where it stopped and how to resume."""
