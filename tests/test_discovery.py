"""Finding the coordinator by DNS SRV record, against a real DNS server on loopback."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from rexcore.protocol.discovery import (
    CoordinatorNotFoundError,
    discover_coordinator,
    pick_srv_target,
)
from tests.conftest import rexd_env


class SrvServer:
    """A UDP DNS server answering SRV queries from ``records`` (name -> SRV texts)."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text()
            self.queries.append(name)
            texts = self.records.get(name)
            if texts and question.rdtype == dns.rdatatype.SRV:
                response.answer.append(dns.rrset.from_text_list(name, 60, "IN", "SRV", texts))
            elif not texts:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def srv() -> Iterator[SrvServer]:
    server = SrvServer()
    yield server
    server.close()


def test_an_explicit_url_or_rex_coordinator_wins_without_any_lookup(srv: SrvServer) -> None:
    assert discover_coordinator("http://c:8981", dns_server=srv.address) == "http://c:8981"
    assert discover_coordinator(None, dns_server=srv.address,
                                environ={"REX_COORDINATOR": "http://e:1"}) == "http://e:1"
    assert srv.queries == []


def test_srv_name_resolves_to_the_lowest_priority_target(srv: SrvServer) -> None:
    srv.records["_rex._tcp.build.example."] = [
        "20 100 8981 backup.example.", "10 5 9000 coordinator.example.",
    ]
    url = discover_coordinator("srv:_rex._tcp.build.example.", dns_server=srv.address)
    assert url == "http://coordinator.example:9000"
    assert srv.queries == ["_rex._tcp.build.example."]


def test_rex_coordinator_may_name_an_srv_record_too(srv: SrvServer) -> None:
    srv.records["_rex._tcp.ci.example."] = ["0 0 7000 ci-coordinator.example."]
    url = discover_coordinator(None, dns_server=srv.address,
                               environ={"REX_COORDINATOR": "srv:_rex._tcp.ci.example."})
    assert url == "http://ci-coordinator.example:7000"


def test_a_missing_record_is_a_clear_error(srv: SrvServer) -> None:
    with pytest.raises(CoordinatorNotFoundError, match="_rex._tcp.nowhere.example"):
        discover_coordinator("srv:_rex._tcp.nowhere.example.", dns_server=srv.address)


def test_equal_priorities_are_chosen_by_weight() -> None:
    records = [(1, 90, "heavy", 1), (1, 10, "light", 2), (5, 1000, "later", 3)]
    rng = random.Random(7)
    picks = [pick_srv_target(records, rng)[0] for _ in range(2000)]
    assert "later" not in picks
    assert 0.85 < picks.count("heavy") / len(picks) < 0.95


def test_rexd_worker_finds_its_coordinator_by_srv_record_and_joins(srv: SrvServer,
                                                                    tmp_path) -> None:
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "rexcore.cli.rexd", "serve", "--data-dir", str(tmp_path / "c"),
         "--http", "127.0.0.1:0", "--workers", "0"],
        stderr=subprocess.PIPE, text=True, env=rexd_env(REXCORE_DISABLE_PLUGIN_AUTOLOAD="1"),
    )
    worker = None
    lines: list[str] = []
    assert coordinator.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(coordinator.stderr), daemon=True)
    reader.start()

    def wait_for(text: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = [line for line in list(lines) if text in line]
            if found:
                return found[0]
            if coordinator.poll() is not None or (worker is not None and worker.poll() is not None):
                break
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} from the coordinator:\n{''.join(lines)}")

    try:
        port = int(wait_for("native listening on http://").rsplit(":", 1)[1])
        srv.records["_rex._tcp.pool.example."] = [f"0 0 {port} 127.0.0.1."]
        worker = subprocess.Popen(
            [sys.executable, "-m", "rexcore.cli.rexd", "worker", "--coordinator",
             "srv:_rex._tcp.pool.example.", "--dns-server", srv.address, "--sandbox", "process",
             "--data-dir", str(tmp_path / "w")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=rexd_env(REXCORE_DISABLE_PLUGIN_AUTOLOAD="1"),
        )
        assert " joined" in wait_for(" joined")
        assert "_rex._tcp.pool.example." in srv.queries
    finally:
        for process in (worker, coordinator):
            if process is not None:
                process.terminate()
                process.wait(timeout=60)
