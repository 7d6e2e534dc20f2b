"""Several devices at once: an inventory file, and one worker thread per device.

    # devices.toml
    [[device]]
    name = "nano-1"
    url = "/dev/ttyUSB0"             # any pyserial URL: socket://10.0.0.7:7700, ...
    key_file = "keys/nano-1.key"     # optional, relative to this file
    baud = 115200                    # optional

Each device gets its own client and thread; a device that fails is reported, and the others carry
on. The threads spend their time waiting on I/O, so the GIL is no bottleneck.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import EdgefaError
from .client import ClientConfig, DeviceClient, read_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib


@dataclass(frozen=True)
class DeviceEntry:
    name: str
    url: str
    key_file: Path | None = None
    baud: int = 115200

    def client(self) -> DeviceClient:
        return DeviceClient(self.url, ClientConfig(key=read_key(self.key_file), baudrate=self.baud))


@dataclass
class FleetResult:
    device: DeviceEntry
    ok: bool
    result: dict | None
    error: str | None
    seconds: float


def load_inventory(path: str | Path) -> list[DeviceEntry]:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise EdgefaError(f"{path}: cannot read the inventory ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgefaError(f"{path}: not valid TOML ({exc})") from None
    rows = doc.get("device")
    if not isinstance(rows, list) or not rows:
        raise EdgefaError(f"{path}: no [[device]] entries")
    entries, names = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("url"), str):
            raise EdgefaError(f"{path}: device {i + 1} needs a url")
        name = str(row.get("name", row["url"]))
        if name in names:
            raise EdgefaError(f"{path}: device name '{name}' appears twice")
        names.add(name)
        key = row.get("key_file")
        baud = row.get("baud", 115200)
        if type(baud) is not int or baud <= 0:
            raise EdgefaError(f"{path}: device '{name}': baud must be a positive integer")
        entries.append(DeviceEntry(name, row["url"], (path.parent / key) if key else None, baud))
    return entries


def run_fleet(entries: list[DeviceEntry], action: Callable[[DeviceEntry, DeviceClient], dict],
              max_workers: int = 16) -> list[FleetResult]:
    """Run `action(entry, client)` on every device at once; results in inventory order."""
    def one(entry: DeviceEntry) -> FleetResult:
        t0 = time.perf_counter()
        try:
            with entry.client() as client:
                result = action(entry, client)
            return FleetResult(entry, True, result, None, time.perf_counter() - t0)
        except EdgefaError as exc:
            return FleetResult(entry, False, None, str(exc), time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=min(max_workers, len(entries))) as pool:
        return list(pool.map(one, entries))
