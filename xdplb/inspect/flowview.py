"""``xdplb flows`` output: flow rows as columns, JSON lines, and an aligned table.

Rows are built column by column from the numpy table (values repeated across rows, such as
addresses and VIP fields, are rendered once per distinct value), so a million rows print
in seconds. The JSON row schema is documented in docs/cli.md and must stay stable.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from tabulate import tabulate

from xdplb.abi.codec import PROTO_NAMES
from xdplb.abi.layout import Forwarding
from xdplb.inspect.catalog import Catalog, forwarding, mode_text
from xdplb.inspect.flowtable import STATE_NAMES, FlowTable
from xdplb.inspect.render import fmt_seconds, fmt_si

CHUNK = 65536  # rows formatted and written at a time


@dataclass(frozen=True)
class Column:
    name: str
    values: list[Any]
    kind: str  # int | float | str (JSON-safe text, no quoting needed) | any (few distinct)


def ipv4_strings(addrs: np.ndarray) -> list[str]:
    """Dotted quads of u32 addresses, each distinct address formatted once."""
    uniq, inv = np.unique(addrs, return_inverse=True)
    buf = uniq.astype(">u4").tobytes()
    ntoa = socket.inet_ntoa
    table = np.array([ntoa(buf[i : i + 4]) for i in range(0, len(buf), 4)], dtype=object)
    return table[inv].tolist()


def by_value(codes: np.ndarray, render: Callable[[int], Any]) -> list[Any]:
    """``render(code)`` for every row, calling it once per distinct code."""
    uniq, inv = np.unique(codes, return_inverse=True)
    table = np.empty(len(uniq), dtype=object)
    table[:] = [render(int(u)) for u in uniq.tolist()]
    return table[inv].tolist()


def columns(t: FlowTable, cat: Catalog,
            rates: tuple[np.ndarray, np.ndarray] | None = None,
            ts: float | None = None) -> list[Column]:
    """The flow rows of ``t`` (in its order), as documented for ``flows --json``. With a
    watch timestamp ``ts`` the rate fields are added (null without ``rates``)."""
    k, f = t.keys, t.flows
    n = len(t)
    vip_code = (k["dst"].astype(np.uint64) << 24) | (k["dport"].astype(np.uint64) << 8) | k["proto"]
    vip_names = {(v.address, v.port, v.proto): v.name for v in cat.vips.values()}

    def vip_name(code: int) -> str | None:
        addr = socket.inet_ntoa((code >> 24).to_bytes(4, "big"))
        return vip_names.get((addr, (code >> 8) & 0xFFFF, code & 0xFF))

    backends = cat.backends
    bids = f["backend_id"]
    modes = f["mode"]
    # fullnat's source: mode, address and port in one code, each distinct pair formatted once
    src_code = np.where(modes == Forwarding.FULLNAT,
                        (f["nat_addr"].astype(np.uint64) << 16) | f["nat_port"], 1 << 48)

    def source(code: int) -> str | None:
        if code >> 48:
            return None
        return f"{socket.inet_ntoa((code >> 16).to_bytes(4, 'big'))}:{code & 0xFFFF}"

    cols = [
        Column("proto", by_value(k["proto"], lambda p: PROTO_NAMES.get(p, str(p))), "str"),
        Column("client", ipv4_strings(k["src"]), "str"),
        Column("client_port", k["sport"].tolist(), "int"),
        Column("vip", by_value(vip_code, vip_name), "any"),
        Column("vip_address", ipv4_strings(k["dst"]), "str"),
        Column("vip_port", k["dport"].tolist(), "int"),
        Column("backend_id", bids.tolist(), "int"),
        Column("backend", by_value(bids, lambda b: backends[b].address if b in backends
                                   else None), "any"),
        Column("backend_port", by_value(bids, lambda b: backends[b].port if b in backends
                                        else None), "any"),
        # a backup server's flow (backup: true): it stays there when a primary comes back
        Column("backup", by_value(bids, lambda b: b in cat.backups), "any"),
        Column("forwarding", by_value(modes, lambda m: forwarding(m)[0]), "str"),
        Column("encap", by_value(modes, lambda m: forwarding(m)[1]), "any"),
        Column("source", by_value(src_code, source), "any"),
        Column("tcp_state", by_value(f["tcp_state"], lambda s: STATE_NAMES.get(s, str(s))),
               "str"),
        *(Column(c, f[c].tolist(), "int")
          for c in ("fwd_packets", "fwd_bytes", "rev_packets", "rev_bytes")),
        Column("age_s", t.age_s().tolist(), "float"),
        Column("idle_s", t.idle_s().tolist(), "float"),
    ]
    if ts is not None:
        cols.append(Column("ts", [ts] * n, "float"))
        for name, arr in zip(("packets_per_s", "bytes_per_s"), rates or (None, None),
                             strict=True):
            cols.append(Column(name, arr.tolist() if arr is not None else [None] * n, "any"))
    return cols


_FORMATS = {"int": "%d", "float": "%.3f", "str": '"%s"', "any": "%s"}


def write_jsonl(cols: list[Column], out: IO[str]) -> None:
    """One JSON object per row. ``any`` columns are JSON-encoded per distinct value."""
    template = "{" + ", ".join(f'"{c.name}": {_FORMATS[c.kind]}' for c in cols) + "}\n"
    values = [_encode_any(c.values) if c.kind == "any" else c.values for c in cols]
    n = len(values[0]) if values else 0
    for start in range(0, n, CHUNK):
        part = zip(*(v[start : start + CHUNK] for v in values), strict=True)
        out.write("".join([template % row for row in part]))


def _encode_any(values: list[Any]) -> list[str]:
    cache: dict[Any, str] = {}
    out = []
    for v in values:
        s = cache.get(v)
        if s is None:
            s = cache[v] = json.dumps(round(v, 3) if isinstance(v, float) else v)
        out.append(s)
    return out


# --- the table ---------------------------------------------------------------------------


def table(cols: list[Column]) -> str:
    """The human view of flow rows, one line each."""
    c = {col.name: col.values for col in cols}
    rows: Iterable[list[Any]] = (
        [c["proto"][i], f"{c['client'][i]}:{c['client_port'][i]}",
         f"{c['vip_address'][i]}:{c['vip_port'][i]}",
         f"{c['backend'][i]}:{c['backend_port'][i]}{' (backup)' if c['backup'][i] else ''}"
         if c["backend"][i] else "(gone)",
         mode_text(c["forwarding"][i], c["encap"][i]), c["source"][i] or "-",
         "-" if c["tcp_state"][i] == "none" else c["tcp_state"][i],
         c["fwd_packets"][i], c["fwd_bytes"][i], c["rev_packets"][i], c["rev_bytes"][i],
         fmt_seconds(c["age_s"][i]), fmt_seconds(c["idle_s"][i]),
         *([fmt_si(c["packets_per_s"][i]), fmt_si(c["bytes_per_s"][i])]
           if "bytes_per_s" in c else [])]
        for i in range(len(c["proto"]))
    )
    headers = ["PROTO", "CLIENT", "VIP", "BACKEND", "MODE", "SOURCE", "STATE", "PKTS>",
               "BYTES>", "<PKTS", "<BYTES", "AGE", "IDLE"]
    if "bytes_per_s" in c:
        headers += ["PKT/S", "B/S"]
    return tabulate(list(rows), headers=headers, tablefmt="plain")
