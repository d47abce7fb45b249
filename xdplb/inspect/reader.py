"""Which balancer instance a reader command looks at, and its pinned maps opened for reading.

Readers need no agent: everything comes from the pins (and, when the agent is alive, its
published config for VIP names and its health results).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from xdplb.abi.layout import layout_version
from xdplb.inspect.catalog import Catalog
from xdplb.inspect.flowtable import FlowTable
from xdplb.instance import pins
from xdplb.kernel.maps import KernelMaps

ATTACH_HINT = "run `xdplb attach {iface} --config pool.yaml`"


class NothingAttached(LookupError):
    """No xdplb instance where the reader looks (exit 3)."""


class Ambiguous(ValueError):
    """Several instances in this namespace and no interface named (exit 2)."""


class ForeignLayout(RuntimeError):
    """The pins were made by another xdplb build (exit 1)."""


def select_group(iface: str | None = None) -> pins.PinGroup:
    """The pin group of ``iface``, or the only one in this network namespace."""
    if iface:
        found = pins.groups_with(iface)
        if not found:
            raise NothingAttached(f"no xdplb program on {iface}; "
                                  + ATTACH_HINT.format(iface=iface))
    else:
        found = pins.groups(any_version=True)
        if not found:
            raise NothingAttached("no xdplb program in this network namespace; "
                                  + ATTACH_HINT.format(iface="IFACE"))
    current = [g for g in found if _layout_of(g) == layout_version()]
    if not current:
        g = found[0]
        raise ForeignLayout(
            f"the pins in {g.path} come from another xdplb build (layout {_layout_of(g)}, "
            f"this one reads {layout_version()}); use that build's xdplb, or "
            f"`xdplb detach {g.ifaces[0]}` to remove it")
    if len(current) > 1:
        names = ", ".join("+".join(g.ifaces) for g in current)
        raise Ambiguous(f"several xdplb instances here ({names}); name an interface")
    return current[0]


def _layout_of(group: pins.PinGroup) -> str:
    return group.path.parent.parent.name


@dataclass
class Reader:
    """An instance's maps, opened from its pins; the catalog and the flow table are read on
    first use. A context manager: closes the maps."""

    group: pins.PinGroup
    maps: KernelMaps = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.maps = pins.open_maps(self.group)
        except FileNotFoundError as e:  # the agent removed its pins meanwhile
            raise NothingAttached(f"the pins in {self.group.path} are gone (agent stopped?); "
                                  + ATTACH_HINT.format(iface=self.group.ifaces[0])) from e

    @classmethod
    def open(cls, iface: str | None = None) -> Reader:
        return cls(select_group(iface))

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog.read(self.maps, self.group)

    @cached_property
    def flows(self) -> FlowTable:
        return FlowTable.read(self.maps)

    def close(self) -> None:
        self.maps.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
