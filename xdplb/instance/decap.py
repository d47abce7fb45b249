"""Where the IPIP decapsulation program (``xdplb decap``) keeps its pins in bpffs.

    /sys/fs/bpf/xdplb-decap/<decap version>/<netns>/<iface>/{prog,decap_addrs,decap_counters}

A tree of its own, beside the balancer's ``/sys/fs/bpf/xdplb``: the balancer's readers and
``xdplb detach --all`` take every directory three levels under that root for a balancer
instance, so a ``decap`` directory there would be listed as one (and removed as stale). The
network namespace is named as the balancer's pins name it (interface names repeat across
namespaces, bpffs does not); the version is the digest of bpf/decap.c's maps, so a program
never finds maps of another layout under its name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from xdplb.abi.decap import MAPS, decap_version
from xdplb.instance import pins

ROOT_NAME = "xdplb-decap"
PROG_PIN = "prog"


@dataclass(frozen=True)
class DecapPins:
    """The pin directory of the decap program on one interface."""

    path: Path

    @property
    def iface(self) -> str:
        return self.path.name

    @property
    def prog(self) -> Path:
        return self.path / PROG_PIN

    def map_path(self, name: str) -> Path:
        return self.path / name

    def complete(self) -> bool:
        """Program and every map pinned (an interrupted attach may leave less)."""
        return self.prog.exists() and all(self.map_path(m.name).exists() for m in MAPS)

    def exists(self) -> bool:
        return self.path.is_dir()

    def remove(self) -> None:
        """Unpin everything and prune empty parents (objects still in use stay alive)."""
        if self.path.is_dir():
            shutil.rmtree(self.path)
        root = pins.BPFFS / ROOT_NAME
        parent = self.path.parent
        while parent == root or root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                return
            parent = parent.parent


def ns_dir(ns: str | None = None, version: str | None = None) -> Path:
    return pins.BPFFS / ROOT_NAME / (version or decap_version()) / (ns or pins.netns_name())


def for_iface(iface: str, ns: str | None = None) -> DecapPins:
    return DecapPins(ns_dir(ns) / iface)


def all_in_ns(ns: str | None = None) -> list[DecapPins]:
    """Decap pin directories of this network namespace (current version), by interface."""
    d = ns_dir(ns)
    return [DecapPins(p) for p in sorted(d.iterdir()) if p.is_dir()] if d.is_dir() else []


def every_version(iface: str, ns: str | None = None) -> list[DecapPins]:
    """Decap pin directories of ``iface`` of every version (an older xdplb's too), the
    current version's first."""
    root = pins.BPFFS / ROOT_NAME
    others = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    found = [for_iface(iface, ns)]
    found += [DecapPins(ns_dir(ns, v) / iface) for v in others if v != decap_version()]
    return [d for d in found if d.exists()]
