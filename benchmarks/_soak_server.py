"""Device server of benchmarks/soak.py: `edgefa device serve --listen` through the library, with
an injected clock and the set-up the soak's disk-full phase needs. Runs without torch.

    python benchmarks/_soak_server.py --store DIR [--listen 127.0.0.1:0] [--clock-rate R]
                                      [--checkpoint-every N] [--threads N]

It builds the server the way `edgefa device serve` does (link/server.py serve_device: open_profiler,
DeviceService, serve; here with the injected clock) and prints the same ready line on stdout
("edgefa device server: listening on H:P").

* Clock. With --clock-rate R the clock the profiler and the server read advances R times faster
  than real time (86400: a day per second), so whatever grows with uptime (timelines, idle
  timers, windows kept per hour) grows R times faster. It is passed as `Profiler(clock_ns=...)`
  and `serve(clock=...)` where this edgefa has those keywords (checked with inspect.signature);
  where it does not, the real clock is used and the log says so. One stderr line names what was
  applied; soak.py copies it into its JSON.
* Disk full. soak.py makes the store "full" for a phase by lowering this process's RLIMIT_FSIZE
  with prlimit(2) while it runs: any write that would take a file past the limit fails with EFBIG
  ("File too large"), as a write on a full disk fails with ENOSPC. By default the kernel also sends
  SIGXFSZ, which kills the process, and a full disk sends no signal; so SIGXFSZ is ignored here,
  and the write's error is what the server sees, as on a full disk.
"""

import sys

sys.modules["torch"] = None  # type: ignore[assignment]  # the device side never imports torch

import argparse  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgefa first

from edgefa.errors import EdgefaError  # noqa: E402
from edgefa.link.server import serve_device  # noqa: E402
from edgefa.link.service import ServiceConfig  # noqa: E402


class ScaledClock:
    """A clock that starts at the real time and then advances `rate` times faster than it."""

    def __init__(self, rate: float):
        self.rate = rate
        self._ns0, self._s0 = time.perf_counter_ns(), time.monotonic()

    def ns(self) -> int:
        """In the units of time.perf_counter_ns (what the profiler reads)."""
        return self._ns0 + int((time.perf_counter_ns() - self._ns0) * self.rate)

    def seconds(self) -> float:
        """In the units of time.monotonic (what the server reads)."""
        return self._s0 + (time.monotonic() - self._s0) * self.rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--clock-rate", type=float, default=1.0)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = ap.parse_args()
    if not args.clock_rate > 0:
        raise SystemExit("_soak_server: --clock-rate must be > 0")

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # see the docstring: a write past RLIMIT_FSIZE fails, no kill

    def say(line: str) -> None:
        print(f"edgefa device server: {line}", file=sys.stderr, flush=True)

    clock = ScaledClock(args.clock_rate)
    say(f"clock rate {args.clock_rate:g}: " + ("real clock" if args.clock_rate == 1.0 else
        "applied to the profiler (clock_ns) and the server's timeouts (clock)"))

    def ready(line: str) -> None:
        print(f"edgefa device server: {line}", flush=True)   # stdout, one line: what soak.py waits for

    serve_device(ServiceConfig(args.store, args.checkpoint_every, None, args.threads),
                 listen_address=args.listen, ready=ready, log=say, clock=clock.seconds, clock_ns=clock.ns)


if __name__ == "__main__":
    try:
        main()
    except EdgefaError as exc:      # as edgefa.cli.main does: one line, exit status 2
        print(f"edgefa: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
