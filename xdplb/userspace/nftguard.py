"""Keeping the kernel out of what the scapy data path owns.

The scapy forwarder taps frames with AF_PACKET, which sees them before netfilter's netdev
ingress hook; the kernel still gets its own copy. For the frames the userspace data path
decides about, that copy must die there, or the kernel would forward it too (duplicates,
replies leaking with a backend's source address) or answer it (ICMP unreachable for a VIP
it has no route to). One nftables table per forwarder, with an ingress chain on each
attached interface, drops exactly those frames:

- to a VIP address: fragments and packets with IP options (the data path drops them), and
  packets to a balanced (address, protocol, port);
- from a backend's (address, protocol, port), unless addressed to one of this host's own
  addresses: replies the data path rewrites (and strays it would pass, which are lost).

Everything else (ARP, traffic to the host itself, other ports) reaches the kernel as usual.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field

TABLE_PREFIX = "xdplb_scapy_"
PRIORITY = -300  # before any filter chain on the same hook
PROTO_NAMES = {6: "tcp", 17: "udp"}


class NftError(RuntimeError):
    """nft is missing or refused the ruleset."""


@dataclass(frozen=True)
class Owned:
    """What the userspace data path owns; equal values render the same ruleset."""

    vip_addrs: frozenset[str] = frozenset()
    vips: frozenset[tuple[str, int, int]] = frozenset()  # (address, proto, port)
    backends: frozenset[tuple[str, int, int]] = frozenset()  # (address, proto, port)
    local: frozenset[str] = frozenset()  # this namespace's own IPv4 addresses


def table_name(ifindexes: list[int]) -> str:
    """One table per forwarder, named after its interfaces (by index: always a valid nft
    name, and unique in the namespace)."""
    return TABLE_PREFIX + "_".join(map(str, ifindexes))


def _set(name: str, kind: str, elements: list[str]) -> str:
    body = f"type {kind};" + (f" elements = {{ {', '.join(elements)} }};" if elements else "")
    return f"  set {name} {{ {body} }}"


def render(table: str, ifaces: list[str], owned: Owned) -> str:
    """The nft script that (re)creates ``table`` atomically (one transaction)."""
    def tuples(items: frozenset[tuple[str, int, int]]) -> list[str]:
        return [f"{a} . {PROTO_NAMES.get(p, p)} . {port}" for a, p, port in sorted(items)]

    lines = [f"table netdev {table} {{}}", f"delete table netdev {table}",
             f"table netdev {table} {{",
             _set("vip_addrs", "ipv4_addr", sorted(owned.vip_addrs)),
             _set("vips", "ipv4_addr . inet_proto . inet_service", tuples(owned.vips)),
             _set("backends", "ipv4_addr . inet_proto . inet_service", tuples(owned.backends)),
             _set("local", "ipv4_addr", sorted(owned.local))]
    for i, dev in enumerate(ifaces):
        lines += [
            f"  chain in{i} {{",
            f'    type filter hook ingress device "{dev}" priority {PRIORITY}; policy accept;',
            "    ip daddr @vip_addrs ip frag-off & 0x3fff != 0 drop",
            "    ip daddr @vip_addrs ip hdrlength != 5 drop",
            "    ip daddr . meta l4proto . th dport @vips drop",
            "    ip saddr . meta l4proto . th sport @backends ip daddr != @local drop",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nft(*args: str, script: str | None = None) -> str:
    if shutil.which("nft") is None:
        raise NftError("nft not found: the scapy data path needs nftables (apt-get install "
                       "nftables; scripts/setup.sh installs it)")
    p = subprocess.run(["nft", *args], input=script, capture_output=True, text=True,
                       timeout=30, check=False)
    if p.returncode != 0:
        raise NftError(f"nft {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


@dataclass
class Guard:
    """The table of one forwarder: ``apply()`` installs or updates it, ``remove()`` drops
    it."""

    table: str
    ifaces: list[str]
    owned: Owned | None = field(default=None, init=False)

    def apply(self, owned: Owned) -> bool:
        """Install the rules for ``owned``; False when they were in place already."""
        if owned == self.owned:
            return False
        _nft("-f", "-", script=render(self.table, self.ifaces, owned))
        self.owned = owned
        return True

    def remove(self) -> None:
        if self.owned is not None:
            remove_table(self.table)
            self.owned = None


def remove_table(table: str) -> bool:
    """Delete a table if it exists (in one transaction, so a missing one is no error)."""
    _nft("-f", "-", script=f"table netdev {table} {{}}\ndelete table netdev {table}\n")
    return True


def tables_on(ifindex: int) -> list[str]:
    """Our tables with a chain on interface ``ifindex`` (e.g. left by a forwarder that died):
    the name says which interfaces they hook (nft's JSON does not show chain devices)."""
    if shutil.which("nft") is None:
        return []
    data = json.loads(_nft("-j", "list", "tables", "netdev"))
    names = [t["table"]["name"] for t in data.get("nftables", []) if "table" in t]
    return [n for n in names if n.startswith(TABLE_PREFIX)
            and str(ifindex) in n[len(TABLE_PREFIX):].split("_")]
