"""Run a command and report its wall time and the peak memory of its whole process tree.

Ray starts its raylet, workers and object store as descendants of the driver; /usr/bin/time
sees only one process, so this samples the summed RSS (and shared object-store pages once)
of every descendant twice a second.

    python bench/measure.py -- reprflow run pipelines/quickstart.yaml
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil


def main() -> int:
    args = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    if not args:
        print(__doc__)
        return 2
    t0 = time.monotonic()
    proc = subprocess.Popen(args)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak = max(peak, total)
            stop.wait(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    stop.set()
    t.join()
    print(f"[measure] wall {time.monotonic() - t0:.0f}s, peak RSS of the process tree {peak / 2**30:.2f} GiB (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
