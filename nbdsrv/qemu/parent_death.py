"""A child program that ends with nbdsrv, started without running Python in the child.

`subprocess`'s `preexec_fn` runs Python between fork and exec, which Python documents as
unsafe in a process with threads (nbdsrv has the executor's and libvirt's), and uvloop's
subprocess refuses `umask=`. qemu-storage-daemon 7.2 has no option to exit with its parent
(`--daemonize` and `--pidfile` only). So the child sets itself up with two programs from
Debian's essential packages, each exec'ing the next, the pid staying the program's own::

    setpriv --pdeathsig TERM --      PR_SET_PDEATHSIG: SIGTERM when the thread that started
                                     the child ends; nbdsrv starts children from its event
                                     loop's thread, which ends only with the process
    sh -c 'umask 077; ...' PPID ...  files and sockets the program creates are the user's
                                     only; and if nbdsrv died before the death signal was
                                     set (the child has another parent by then), exit
                                     instead of running on as an orphan
    PROGRAM ARGS...

Start the result with `start_new_session=True` as well, so that a Ctrl-C on nbdsrv's
terminal reaches nbdsrv, which then stops its children in order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# Exit status of the guard when the parent was already gone: the program never ran.
PARENT_GONE = 125

_GUARD = f'umask 077; [ "$PPID" = "$1" ] || exit {PARENT_GONE}; shift; exec "$@"'


def dies_with_parent(argv: Sequence[str], *, parent: int | None = None) -> list[str]:
    """`argv` wrapped so that it runs with umask 077 and gets SIGTERM when we die.

    `parent` is the pid the child must still have as its parent when it starts (default:
    this process); a test passes another to see the guard refuse.
    """
    expected = os.getpid() if parent is None else parent
    guard = ["sh", "-c", _GUARD, argv[0], str(expected)]
    return ["setpriv", "--pdeathsig", "TERM", "--", *guard, *argv]
