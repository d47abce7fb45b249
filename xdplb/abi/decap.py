"""The IPIP decapsulation program's maps and counters (bpf/decap.c): the one definition shared
with C, rendered into the header ``decap.h`` the program compiles against, as ``layout.py``
renders ``layout.h`` for the balancer.

A backend of a "dsr, encap ipip" balancer gets the client's packet wrapped in an outer IPv4
header (protocol 4) addressed to it; this kernel has no ipip module, so bpf/decap.c strips
the outer header in XDP. Its maps: the host's own IPv4 addresses (outer destinations it
decapsulates for) and per-CPU counters, one outcome per packet.
"""

from __future__ import annotations

import enum
import hashlib

from xdplb.abi.layout import U8, U32, U64, MapSpec, render_maps

IPPROTO_IPIP = 4
# Addresses of one network namespace: far more than a backend has (its own, the VIPs on lo).
MAX_LOCAL_ADDRS = 1024
SOURCE = "decap.c"
HEADER = "decap.h"
ENTRY = "xdplb_decap"


class DecapCounter(enum.IntEnum):
    """Per-CPU counters of bpf/decap.c: each frame bumps exactly one."""

    DECAP = 0  # IPIP to one of our addresses, outer header stripped, inner passed up
    PASS_NOT_IPV4 = 1  # not an untagged IPv4 frame (ARP, IPv6, 802.1Q, runt): untouched
    PASS_NOT_IPIP = 2  # IPv4, but not protocol 4 (or too short to tell): untouched
    PASS_NOT_LOCAL = 3  # IPIP whose outer destination is not ours (routed through): untouched
    # IPIP to one of our addresses that cannot be decapsulated: dropped (the kernel, without an
    # ipip module, could only answer "protocol unreachable" or drop it itself).
    DROP_MALFORMED = 4  # outer: version, IHL, total length vs frame; inner: version, IHL, length
    DROP_BAD_CSUM = 5  # outer header checksum wrong
    DROP_FRAGMENT = 6  # outer fragment: XDP sees no reassembled packet, the kernel cannot decap
    MAX = 7


OUTCOMES = tuple(c for c in DecapCounter if c != DecapCounter.MAX)
COUNTER_NAMES = {c: c.name.lower() for c in OUTCOMES}

# Keys of decap_addrs: the IPv4 address as the program loads it from the packet (wire-order
# bytes in a u32, i.e. int.from_bytes(packed, "little") on this little-endian host).
MAPS: tuple[MapSpec, ...] = (
    MapSpec("decap_addrs", "hash", U32, U8, "XD_MAX_LOCAL_ADDRS"),
    MapSpec("decap_counters", "percpu_array", U32, U64, "XD_COUNTER_MAX", "datapath"),
)
MAP_BY_NAME = {m.name: m for m in MAPS}


def render_header() -> str:
    """decap.h: counter and size constants, then the map declarations (private maps: the
    kernel side pins them itself after loading, bpf/decap.c never reuses a pin)."""
    out = ["/* Generated from xdplb/abi/decap.py: do not edit. */"]
    out += [f"#define XD_C_{c.name} {int(c)}" for c in DecapCounter if c != DecapCounter.MAX]
    out += [
        f"#define XD_COUNTER_MAX {int(DecapCounter.MAX)}",
        f"#define XD_MAX_LOCAL_ADDRS {MAX_LOCAL_ADDRS}",
        f"#define XD_IPPROTO_IPIP {IPPROTO_IPIP}",
    ]
    return "\n".join(out) + "\n" + render_maps(None, maps=MAPS)


def decap_version() -> str:
    """Digest of the header: decap pins are versioned by it, as the balancer's by its layout."""
    return hashlib.sha256(render_header().encode()).hexdigest()[:12]


def addr_key(packed: bytes) -> int:
    """The decap_addrs key of a packed IPv4 address."""
    return int.from_bytes(packed, "little")
