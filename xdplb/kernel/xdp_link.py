"""Attach, replace, detach and inspect XDP programs on interfaces over rtnetlink (pyroute2).

Everything works in the calling thread's network namespace, or in the named namespace given as
`netns=` (one of `ip netns list`; it is never created). Errors carry the kernel's own reason
(netlink extended ack), e.g. "Underlying driver does not support XDP in native mode".
"""

from __future__ import annotations

import errno
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

# The state and its decoding are shared with readers, which query it without pyroute2.
from xdplb.kernel.linkinfo import XdpState, decode_xdp

# include/uapi/linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

MODES = {
    "native": XDP_FLAGS_DRV_MODE,
    "generic": XDP_FLAGS_SKB_MODE,
    "offload": XDP_FLAGS_HW_MODE,
}

_MODE_PROG_ID = {
    "native": "IFLA_XDP_DRV_PROG_ID",
    "generic": "IFLA_XDP_SKB_PROG_ID",
    "offload": "IFLA_XDP_HW_PROG_ID",
}
NETNS_RUN_DIR = "/var/run/netns"


class XdpError(OSError):
    """A failed XDP netlink operation; the message holds the kernel's reason."""


class NoSuchInterface(XdpError):
    """The named or numbered interface does not exist in the namespace."""


def _ipr(netns: str | None) -> IPRoute:
    if netns is None:
        return IPRoute(ext_ack=True)
    if os.sep in netns or not os.path.exists(os.path.join(NETNS_RUN_DIR, netns)):
        raise XdpError(errno.ENOENT, f"network namespace {netns!r} does not exist")
    # flags=0: pyroute2 would otherwise create a namespace that does not exist yet.
    return IPRoute(netns=netns, flags=0, ext_ack=True)


def _where(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


def _resolve(ipr: IPRoute, link: int | str, netns: str | None) -> tuple[int, str]:
    """(ifindex, ifname) of `link`, a name or an index."""
    if isinstance(link, str):
        found = ipr.link_lookup(ifname=link)
        if not found:
            raise NoSuchInterface(errno.ENODEV, f"no interface {link!r}{_where(netns)}")
        return found[0], link
    try:
        msg = ipr.link("get", index=link)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            raise NoSuchInterface(
                errno.ENODEV, f"no interface with index {link}{_where(netns)}"
            ) from None
        raise XdpError(e.code, f"interface {link}: {e.args[1]}") from None
    return link, msg.get_attr("IFLA_IFNAME")


def ifindex(name: str, netns: str | None = None) -> int:
    """Index of interface `name`."""
    with _ipr(netns) as ipr:
        return _resolve(ipr, name, netns)[0]


def ifname(index: int, netns: str | None = None) -> str:
    """Name of the interface with index `index`."""
    with _ipr(netns) as ipr:
        return _resolve(ipr, index, netns)[1]


def _state(ipr: IPRoute, index: int) -> XdpState | None:
    msg = ipr.link("get", index=index)[0]
    xdp = msg.get_attr("IFLA_XDP")
    if xdp is None:
        return None
    progs = {mode: pid for mode, attr in _MODE_PROG_ID.items() if (pid := xdp.get_attr(attr))}
    return decode_xdp(index, xdp.get_attr("IFLA_XDP_ATTACHED"), xdp.get_attr("IFLA_XDP_PROG_ID"),
                      progs)


def xdp_state(link: int | str, netns: str | None = None) -> XdpState | None:
    """The attached XDP program of `link` (name or index), or None."""
    with _ipr(netns) as ipr:
        index, _ = _resolve(ipr, link, netns)
        return _state(ipr, index)


def _set_xdp(
    ipr: IPRoute,
    index: int,
    name: str,
    fd: int,
    flags: int,
    expected_fd: int | None,
    what: str,
    netns: str | None,
) -> None:
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", int(fd)), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", int(expected_fd)))
    try:
        ipr.link("set", index=index, xdp={"attrs": attrs})
    except NetlinkError as e:
        reason = e.args[1] if len(e.args) > 1 and e.args[1] else os.strerror(e.code)
        where = f"{name} (ifindex {index}){_where(netns)}"
        raise XdpError(e.code, f"{what} on {where}: {reason}") from None


def _mode_flags(mode: str) -> int:
    try:
        return MODES[mode]
    except KeyError:
        raise ValueError(f"XDP mode {mode!r}: expected one of {', '.join(MODES)}") from None


def xdp_attach(
    link: int | str,
    prog_fd: int,
    mode: str,
    replace_fd: int | None = None,
    if_noexist: bool = False,
    netns: str | None = None,
) -> None:
    """Attach `prog_fd` to `link` in `mode` ("native" or "generic"; "offload" too).

    With `replace_fd`, the swap is atomic and happens only if that program is the one
    attached (XDP_FLAGS_REPLACE); with `if_noexist`, only if nothing is attached. Without
    either, whatever is attached in that mode is replaced.
    """
    flags = _mode_flags(mode)
    if replace_fd is not None and if_noexist:
        raise ValueError("xdp_attach: replace_fd and if_noexist exclude each other")
    if if_noexist:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    if replace_fd is not None:
        flags |= XDP_FLAGS_REPLACE
    with _ipr(netns) as ipr:
        index, name = _resolve(ipr, link, netns)
        what = f"attach XDP program fd {int(prog_fd)} in {mode} mode"
        _set_xdp(ipr, index, name, prog_fd, flags, replace_fd, what, netns)


def xdp_detach(
    link: int | str,
    mode: str | None = None,
    expected_fd: int | None = None,
    netns: str | None = None,
) -> bool:
    """Detach the XDP program of `link`; False if nothing was attached.

    `mode=None` detaches whichever modes are attached. With `expected_fd`, detach only if that
    program is the attached one (else XdpError EEXIST), so another agent's program survives.
    """
    with _ipr(netns) as ipr:
        index, name = _resolve(ipr, link, netns)
        state = _state(ipr, index)
        if mode is None:
            modes = list(state.progs) if state else []
        else:
            _mode_flags(mode)
            modes = [mode] if state and mode in state.progs else []
        for m in modes:
            flags = MODES[m] | (XDP_FLAGS_REPLACE if expected_fd is not None else 0)
            _set_xdp(ipr, index, name, -1, flags, expected_fd, f"detach XDP ({m})", netns)
        return bool(modes)
