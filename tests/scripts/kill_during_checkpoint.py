"""Run `lm.train` on a config file and SIGKILL this process in the middle of one checkpoint write.

    python tests/scripts/kill_during_checkpoint.py CONFIG.yaml step_0000030.pt

When the checkpoint named by the second argument is being written, the process truncates the temporary
file to half of the bytes written so far (as if the rest never reached the disk) and kills itself with
SIGKILL, before the fsync and the rename: no Python cleanup code runs. Used by tests/test_faults.py.
"""

from __future__ import annotations

import os
import signal
import sys

from lm.config import Config
from lm.train import train


def main() -> None:
    config_path, target = sys.argv[1], sys.argv[2]
    real_fsync = os.fsync

    def fsync_then_die(fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(f".{target}.") and name.endswith(".tmp"):  # lm.checkpoint's temporary file
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)

    os.fsync = fsync_then_die  # lm.checkpoint calls os.fsync on the temp file before os.replace
    train(Config.from_file(config_path))
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main()
