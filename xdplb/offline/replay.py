"""``xdplb replay``: every frame of a capture through one data path, nothing attached.

Frames run in order through one engine (``testrun.py``: the BPF program under
BPF_PROG_TEST_RUN, or the scapy data path in-process), so flows are carried from frame to
frame as on the wire. For each frame: the verdict, the outcome counter that explains it, the
backend, and what it did to the flow table. Frames that leave the data path (TX, redirect,
or passed to the kernel, rewritten or not) are written to the output capture.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from scapy.error import Scapy_Exception
from scapy.utils import RawPcapReader, RawPcapWriter

from xdplb.offline.engines import Engine, FrameSizeError

DLT_EN10MB = 1  # Ethernet: the only link type an XDP program sees


class CaptureError(ValueError):
    """The capture cannot be replayed (not pcap/pcapng, not Ethernet)."""


@dataclass(frozen=True)
class Record:
    """What one frame did; ``json()`` is the documented per-packet object (docs/cli.md)."""

    index: int
    verdict: str  # pass, drop, tx, redirect, aborted; "error" when no XDP program would run
    reason: str  # the outcome counter (tx, pass_not_vip, pass_ttl...), or the error
    backend: str | None
    flow: str  # created, hit, rebalanced, reply, none
    in_len: int
    out_len: int | None  # None: nothing left the data path (dropped)

    def json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        out = "-" if self.out_len is None else str(self.out_len)
        be = f" backend={self.backend}" if self.backend else ""
        return (f"#{self.index} {self.verdict} ({self.reason}) flow={self.flow}{be} "
                f"{self.in_len}->{out}")


def _timestamp(meta: object) -> tuple[int, int]:
    """(seconds, microseconds) of a pcap or pcapng record."""
    if hasattr(meta, "sec"):
        return meta.sec, meta.usec
    ticks = (meta.tshigh << 32) | meta.tslow
    per_sec = meta.tsresol
    return ticks // per_sec, (ticks % per_sec) * 1_000_000 // per_sec


def read_capture(path: Path) -> Iterator[tuple[bytes, tuple[int, int]]]:
    """(frame, timestamp) of every record of a pcap or pcapng file of Ethernet frames."""
    try:
        reader = RawPcapReader(str(path))
    except Exception as e:  # scapy raises Scapy_Exception for a foreign magic
        raise CaptureError(f"{path}: not a pcap or pcapng capture ({e})") from e
    with reader:
        for data, meta in _records(reader, path):
            # pcapng: per interface, on the record (0 is DLT_NULL, not "unknown"); pcap: file.
            linktype = meta.linktype if hasattr(meta, "linktype") else reader.linktype
            if linktype != DLT_EN10MB:
                raise CaptureError(f"{path}: link type {linktype}, only Ethernet (1) is "
                                   f"supported")
            yield data, _timestamp(meta)


def _records(reader: RawPcapReader, path: Path) -> Iterator[tuple[bytes, object]]:
    """The reader's records; a damaged file (cut short, a broken block) is a CaptureError."""
    records = iter(reader)
    while True:
        try:
            rec = next(records)
        except StopIteration:
            return
        except (Scapy_Exception, struct.error, ValueError, OSError) as e:
            raise CaptureError(f"{path}: damaged capture ({e})") from e
        yield rec


def replay(engine: Engine, capture: Path, out: Path, ingress_ifindex: int = 0
           ) -> Iterator[Record]:
    """Run every frame of ``capture`` through ``engine``, writing what leaves to ``out``."""
    writer = RawPcapWriter(str(out), linktype=DLT_EN10MB)
    writer.write_header(None)  # a valid (empty) capture even when everything is dropped
    try:
        for i, (frame, (sec, usec)) in enumerate(read_capture(capture)):
            try:
                r = engine.run(frame, ingress_ifindex)
            except FrameSizeError as e:
                yield Record(i, "error", str(e), None, "none", len(frame), None)
                continue
            left = r.verdict in ("pass", "tx", "redirect")
            if left:
                writer.write_packet(r.data, sec=sec, usec=usec)
            yield Record(i, r.verdict, r.reason, r.backend, r.effect, len(frame),
                         len(r.data) if left else None)
    finally:
        writer.close()
