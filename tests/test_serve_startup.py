"""`edgefa device serve`: what its start and its stop say and leave behind (issue 17 B.5).

Found by a new user's trial: a failed bind (address in use) still created the --store folder; a
--store pointing at a bundle folder was accepted and .lock and incoming/ written into the bundle;
SIGTERM stopped the server with no log line. Real server processes on loopback (torch made
unimportable there), the real CLI entry point; each test kills what it starts.
"""

from __future__ import annotations

import re
import socket
import time

from conftest import assert_one_error_line, run_edgefa
from edgefa.link.client import DeviceClient
from edgefa.shared.datasets import load_dataset
from test_link_live import device_server


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_address_in_use_is_one_line_and_creates_no_store(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        proc = run_edgefa("device", "serve", "--listen", address, "--store", tmp_path / "store",
                          without_torch=True, timeout=60)
    assert_one_error_line(proc, f"cannot listen on {address}", "in use")
    assert not (tmp_path / "store").exists()


def test_a_bundle_as_the_store_is_refused_and_left_as_it_was(tiny_bundle):
    before = files(tiny_bundle)
    proc = run_edgefa("device", "serve", "--listen", "127.0.0.1:0", "--store", tiny_bundle,
                      without_torch=True, timeout=60)
    assert_one_error_line(proc, f"--store {tiny_bundle}: that is a bundle", "a folder the server owns",
                          f"edgefa deploy {tiny_bundle}")
    assert files(tiny_bundle) == before and not (tiny_bundle / "incoming").exists()


def test_sigterm_is_one_log_line_saying_what_it_kept(tiny_bundle, digits_npz, tmp_path):
    data = load_dataset(str(digits_npz))
    with device_server(tmp_path / "store", listen="127.0.0.1:0", extra=("--checkpoint-every", "1000")) as srv:
        with DeviceClient(srv.url) as dev:
            dev.deploy(tiny_bundle)
            dev.finetune(data.X, data.y, 3)
        srv.stop()                                  # SIGTERM
        assert srv.proc.returncode == 0
        deadline = time.monotonic() + 10
        while "stopped (" not in srv.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = srv.stderr()
    stops = [line for line in log.splitlines() if "stopped (" in line]
    # the host's finetune ends with a checkpoint; the stop says so rather than writing another
    assert len(stops) == 1 and re.fullmatch(r"edgefa device server: stopped \(SIGTERM\); "
                                            r"(checkpointed at step 3|the checkpoint at step 3 is current)",
                                            stops[0]), log
