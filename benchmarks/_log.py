"""Progress lines on stderr with seconds since import, so a benchmark cut off by a time limit
still shows how far it got (its table is printed only at the end)."""
import sys
import time

_START = time.perf_counter()


def progress(message: str) -> None:
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)
