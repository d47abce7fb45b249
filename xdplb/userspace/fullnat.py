"""fullnat's table in Python, as bpf/fullnat.h keys and checks it: a reply's 5-tuple as it
arrives (backend -> the balancer's address and a flow's port) names the flow it answers."""

from __future__ import annotations

from xdplb.abi.layout import FAMILY_IPV4, Flow, Forwarding

_FULLNAT = Forwarding.FULLNAT


def htons(port: int) -> int:
    """A port as the program stores it (bpf_htons on a little-endian host)."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def fnat_key(lb_addr: bytes, lb_port: int, be_addr: bytes, be_port: int, proto: int) -> bytes:
    """An xl_fnat_key's bytes; ports as the program holds them (network order words)."""
    return (lb_addr + be_addr + lb_port.to_bytes(2, "little") + be_port.to_bytes(2, "little")
            + bytes((proto, FAMILY_IPV4)) + b"\0\0")


def same_holder(f: Flow, key: bytes) -> bool:
    """Does flow ``f`` still hold the address and port that entry ``key`` gives it?"""
    return f.mode == _FULLNAT and f.nat_port == int.from_bytes(key[8:10], "little") \
        and bytes(f.nat_addr) == key[0:4]
