"""Run a command with a FUSE file whose server never answers mounted over a path (a hung lxcfs, say).

`python tests/hung_fuse.py PATH COMMAND...`, as root in a mount namespace of its own (unshare --mount):
opens /dev/fuse, mounts it over the regular file PATH, and execs COMMAND with the device still open and
never read. Every stat(), lstat() or read of PATH then waits, as on a FUSE server that has hung; the
connection ends when COMMAND exits.
"""

from __future__ import annotations

import ctypes
import os
import sys


def main() -> None:
    path, command = sys.argv[1], sys.argv[2:]
    fd = os.open("/dev/fuse", os.O_RDWR)
    os.set_inheritable(fd, True)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=100444,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"hung", os.fsencode(path), b"fuse", 0, opts) != 0:
        sys.exit(f"mount fuse on {path}: {os.strerror(ctypes.get_errno())}")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
