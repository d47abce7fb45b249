"""The agent's sweep of fullnat's reply table (xdplb/agent/fnatsweep.py) on userspace maps:
entries whose flow is gone or holds another port go, live ones stay."""

from __future__ import annotations

from xdplb.abi.layout import Flow, FlowKey, FnatKey, Forwarding, addr4
from xdplb.agent import fnatsweep
from xdplb.userspace.fullnat import htons
from xdplb.userspace.usermaps import UserMaps

LB, BE = bytes([10, 20, 0, 1]), bytes([10, 20, 0, 11])


def _entry(maps: UserMaps, client_port: int, port: int, flow_port: int | None) -> FnatKey:
    """An fnat_ports entry for our ``port``; its flow holds ``flow_port`` (None: no flow)."""
    fk = FlowKey(addr4(bytes([10, 10, 0, 2])), addr4(bytes([10, 200, 0, 40])),
                 htons(client_port), htons(80), 6, 2)
    k = FnatKey(addr4(LB), addr4(BE), htons(port), htons(80), 6, 2)
    maps.update("fnat_ports", k, fk)
    if flow_port is not None:
        f = Flow()
        f.mode, f.nat_port = Forwarding.FULLNAT, htons(flow_port)
        f.nat_addr[:] = LB
        maps.update("flows", fk, f)
    return k


def test_sweep_removes_only_stale_entries():
    maps = UserMaps(1024)
    live = _entry(maps, 40000, 20000, 20000)
    _entry(maps, 40001, 20001, None)  # its flow was evicted
    _entry(maps, 40002, 20002, 20009)  # its flow moved to another port
    assert len(fnatsweep.stale_entries(maps)) == 2
    assert fnatsweep.sweep(maps) == 2
    assert [bytes(k) for k, _ in maps.raw_items("fnat_ports")] == [bytes(live)]
    assert fnatsweep.sweep(maps) == 0


def test_an_entry_taken_over_meanwhile_stays(monkeypatch):
    """Between the scan and the delete a new flow took the port: its entry is kept."""
    maps = UserMaps(1024)
    k = _entry(maps, 40001, 20001, None)
    stale = fnatsweep.stale_entries(maps)
    assert [bytes(s) for s in stale] == [bytes(k)]
    _entry(maps, 40005, 20001, 20001)  # the new flow, after the scan
    monkeypatch.setattr(fnatsweep, "stale_entries", lambda _maps: stale)
    assert fnatsweep.sweep(maps) == 0 and maps.lookup("fnat_ports", k) is not None
