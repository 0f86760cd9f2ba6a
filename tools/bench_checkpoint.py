"""Checkpoint verification cost: hashing a checkpoint file (``megadoremi.train.checkpoint.file_digest``, SHA-256,
one pass with an 8 MiB buffer) against the anchor, a plain read of the same file with the same buffer, in the
same run. Both are timed on a cold page cache where the OS allows dropping it (root: /proc/sys/vm/drop_caches),
else warm (both equally).

    python tools/bench_checkpoint.py [--size-mb 2048] [--dir /tmp] [--repeats 3] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

from megadoremi.train.checkpoint import file_digest
from megadoremi.utils.fs import drop_page_cache


def _plain_read(path: str) -> int:
    buffer, size = bytearray(8 << 20), 0
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            size += count
    return size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    path = os.path.join(args.dir, f"bench_checkpoint_{os.getpid()}.bin")
    chunk = os.urandom(64 << 20)
    try:
        with open(path, "wb") as handle:
            for _ in range(max(1, args.size_mb // 64)):
                handle.write(chunk)
        size = os.path.getsize(path)
        times = {"read": [], "hash": []}
        cold = True
        for _ in range(args.repeats):
            for name, work in (("read", _plain_read), ("hash", file_digest), ("hash", file_digest),
                               ("read", _plain_read)):  # ABBA
                cold = drop_page_cache() and cold
                started = time.perf_counter()
                work(path)
                times[name].append(time.perf_counter() - started)
    finally:
        if os.path.exists(path):
            os.remove(path)
    read_s, hash_s = statistics.median(times["read"]), statistics.median(times["hash"])
    result = {"size_mb": size / 1e6, "page_cache": "cold" if cold else "warm", "read_s": read_s, "hash_s": hash_s,
              "read_mb_per_s": size / 1e6 / read_s, "hash_mb_per_s": size / 1e6 / hash_s,
              "hash_over_read": hash_s / read_s, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "python": sys.version.split()[0]}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{size / 1e6:.0f} MB ({result['page_cache']} page cache): plain read {read_s:.2f} s "
              f"({result['read_mb_per_s']:.0f} MB/s), SHA-256 {hash_s:.2f} s ({result['hash_mb_per_s']:.0f} MB/s): "
              f"hash / read = {result['hash_over_read']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
