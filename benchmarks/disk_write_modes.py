"""How fast this disk takes a large sequential file, written each way moeprep's file sink could, in one run.

    python benchmarks/disk_write_modes.py --dir /tmp/moeprep-bench --gb 4

Writes --gb GB of random bytes in 64 MiB pieces into a file under --dir, each mode in turn and --rounds times
(alternating): buffered writes + one fsync; buffered writes with a flush (fdatasync + drop from the page
cache) every 512 MiB, as ``file_sink.BufferedFile`` does; O_DIRECT pwrites from page-aligned memory, as
``file_sink.DirectFile`` does. Prints GB/s per mode (median) and each against buffered + fsync.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from pathlib import Path

PIECE = 64 << 20
FLUSH = 512 << 20


def buffered(path: Path, total: int, data: memoryview) -> None:
    with path.open("wb") as f:
        for _ in range(total // PIECE):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_behind(path: Path, total: int, data: memoryview) -> None:
    with path.open("wb") as f:
        flushed = 0
        for _ in range(total // PIECE):
            f.write(data)
            if f.tell() - flushed >= FLUSH:
                f.flush()
                os.fdatasync(f.fileno())
                os.posix_fadvise(f.fileno(), flushed, f.tell() - flushed, os.POSIX_FADV_DONTNEED)
                flushed = f.tell()
        f.flush()
        os.fsync(f.fileno())


def direct(path: Path, total: int, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for i in range(total // PIECE):
            os.pwrite(fd, data, i * PIECE)
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moeprep-bench"))
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    total = int(args.gb * 1e9) // PIECE * PIECE
    page_aligned = mmap.mmap(-1, PIECE)
    page_aligned.write(os.urandom(PIECE))
    data = memoryview(page_aligned)
    path = args.dir / "write-modes.bin"
    modes = {"buffered_fsync": buffered, "write_behind": write_behind, "o_direct": direct}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, write in modes.items():
            path.unlink(missing_ok=True)
            os.sync()
            start = time.perf_counter()
            write(path, total, data)
            seconds[mode].append(time.perf_counter() - start)
    path.unlink(missing_ok=True)
    gb_s = {mode: total / 1e9 / statistics.median(s) for mode, s in seconds.items()}
    result = {
        "gb": total / 1e9,
        "rounds": args.rounds,
        "gb_per_s": gb_s,
        "ratio_to_buffered_fsync": {mode: v / gb_s["buffered_fsync"] for mode, v in gb_s.items()},
        "seconds_all": seconds,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
