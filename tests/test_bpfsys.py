"""The bpf(2) layer (xdplb.bpfsys) and XDP attachment over netlink (xdplb.xdp_link).

Real kernel objects, no BCC. Every test releases what it made (fds, pins, namespaces), also
when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from xdplb.kernel import bpfsys as bs
from xdplb.kernel import xdp_link as xl

pytestmark = pytest.mark.root

PID = os.getpid()


def u32(i: int) -> bytes:
    return struct.pack("<I", i)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def fds() -> Iterator[list[bs.Fd]]:
    """Collects fds to close at teardown."""
    held: list[bs.Fd] = []
    yield held
    for fd in held:
        fd.close()


@pytest.fixture
def own(fds: list[bs.Fd]):
    def _own(fd: bs.Fd) -> bs.Fd:
        fds.append(fd)
        return fd

    return _own


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A private directory on bpffs, emptied and removed at teardown."""
    path = Path(f"/sys/fs/bpf/xdplb-test-{PID}")
    path.mkdir(exist_ok=True)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def veth_ns() -> Iterator[str]:
    """A fresh namespace xlt-sys-<pid> holding an up veth pair xv0 <-> xv1."""
    ns = f"xlt-sys-{PID}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # stale from a crash
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "add", "xv0", "type", "veth", "peer", "name", "xv1")
        _ip("-n", ns, "link", "set", "xv0", "up")
        _ip("-n", ns, "link", "set", "xv1", "up")
        yield ns
    finally:
        # Deleting the namespace removes the veths and with them any attached program.
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in namespace `ns`."""
    pr_netns.pushns(ns)
    try:
        yield
    finally:
        pr_netns.popns()


# --- maps -----------------------------------------------------------------------------------


def test_fd_is_an_int_and_closes_once() -> None:
    fd = bs.map_create(bs.BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    assert isinstance(fd, int) and os.fstat(fd)
    with fd:
        assert not fd.closed
    assert fd.closed
    fd.close()  # idempotent


def test_hash_ops(own) -> None:
    m = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 8, 64, name="xlt_hash"))
    info = bs.map_info(m)
    assert (info.type, info.key_size, info.value_size, info.max_entries, info.name) == (
        bs.BPF_MAP_TYPE_HASH,
        4,
        8,
        64,
        "xlt_hash",
    )
    assert info.id > 0 and info.map_flags == 0 and not info.percpu

    assert bs.map_lookup(m, u32(1), 8) is None
    bs.map_update(m, u32(1), b"A" * 8)
    assert bs.map_lookup(m, u32(1), 8) == b"A" * 8
    with pytest.raises(bs.BpfError) as exc:
        bs.map_update(m, u32(1), b"B" * 8, bs.BPF_NOEXIST)
    assert exc.value.errno == errno.EEXIST and exc.value.op == "map_update"
    with pytest.raises(bs.BpfError) as exc:
        bs.map_update(m, u32(2), b"B" * 8, bs.BPF_EXIST)
    assert exc.value.errno == errno.ENOENT
    bs.map_update(m, u32(1), b"C" * 8, bs.BPF_EXIST)
    assert bs.map_lookup(m, u32(1), 8) == b"C" * 8

    for i in range(2, 10):
        bs.map_update(m, u32(i), struct.pack("<Q", i))
    keys = list(bs.map_keys(m, 4))
    assert sorted(keys) == [u32(i) for i in range(1, 10)]
    first = bs.map_get_next_key(m, None, 4)
    assert first in keys
    assert bs.map_get_next_key(m, keys[-1], 4) is None

    assert bs.map_delete(m, u32(5)) is True
    assert bs.map_delete(m, u32(5)) is False
    assert bs.map_lookup(m, u32(5), 8) is None

    # Sizes are checked against the map before the kernel copies anything.
    with pytest.raises(ValueError):
        bs.map_lookup(m, b"\0" * 8, 8)
    with pytest.raises(ValueError):
        bs.map_lookup(m, u32(1), 4)
    with pytest.raises(ValueError):
        bs.map_update(m, u32(1), b"short")
    with pytest.raises(ValueError):
        bs.map_get_next_key(m, None, 8)


def test_full_hash_reports_e2big(own) -> None:
    m = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 2))
    bs.map_update(m, u32(1), u32(1))
    bs.map_update(m, u32(2), u32(2))
    with pytest.raises(bs.BpfError) as exc:
        bs.map_update(m, u32(3), u32(3))
    assert exc.value.errno == errno.E2BIG
    assert "map_update" in str(exc.value)


def test_array_ops(own) -> None:
    m = own(bs.map_create(bs.BPF_MAP_TYPE_ARRAY, 4, 12, 8, name="xlt_arr"))
    assert bs.map_lookup(m, u32(3), 12) == bytes(12)  # arrays are preallocated zeros
    bs.map_update(m, u32(3), b"x" * 12)
    assert bs.map_lookup(m, u32(3), 12) == b"x" * 12
    assert bs.map_lookup(m, u32(8), 12) is None  # out of range reads as absent
    assert list(bs.map_keys(m, 4)) == [u32(i) for i in range(8)]
    with pytest.raises(bs.BpfError) as exc:
        bs.map_delete(m, u32(3))
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(bs.BpfError) as exc:
        bs.map_update(m, u32(3), b"y" * 12, bs.BPF_NOEXIST)
    assert exc.value.errno == errno.EEXIST


def test_possible_cpus_matches_sysfs() -> None:
    spec = Path("/sys/devices/system/cpu/possible").read_text().strip()
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    assert bs.possible_cpus() == len(cpus) >= (os.cpu_count() or 1)


def test_percpu_array(own) -> None:
    ncpu = bs.possible_cpus()
    # value_size 4 pads to 8 per CPU in the buffer
    m = own(bs.map_create(bs.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 4, 4, name="xlt_pcpu"))
    info = bs.map_info(m)
    assert info.percpu and info.value_buf_size == 8 * ncpu

    blob = bs.map_lookup(m, u32(1), 4)
    assert blob == bytes(8 * ncpu)
    assert bs.map_lookup(m, u32(1), 4, percpu=True) == blob

    vals = [u32(100 + c) for c in range(ncpu)]
    bs.map_update(m, u32(1), bs.percpu_blob(vals, 4))
    got = bs.map_lookup(m, u32(1), 4)
    assert got is not None and bs.percpu_values(got, 4) == vals

    with pytest.raises(ValueError, match="percpu_blob"):
        bs.map_update(m, u32(1), u32(7))  # a single value is not a per-CPU buffer
    with pytest.raises(ValueError):
        bs.map_lookup(m, u32(1), 4, percpu=False)
    with pytest.raises(ValueError):
        bs.percpu_blob([*vals, u32(0)], 4)  # one value too many

    chunks = list(bs.map_lookup_batch(m, 4, 4))
    keys = [k for ks, _ in chunks for k in ks]
    values = [v for _, vs in chunks for v in vs]
    assert keys == [u32(i) for i in range(4)]
    assert bs.percpu_values(values[1], 4) == vals
    assert all(bs.percpu_values(values[i], 4) == [bytes(4)] * ncpu for i in (0, 2, 3))


def test_percpu_values_helpers() -> None:
    assert bs.percpu_stride(1) == 8 and bs.percpu_stride(8) == 8 and bs.percpu_stride(12) == 16
    blob = b"abc" + bytes(5) + b"def" + bytes(5)
    assert bs.percpu_values(blob, 3) == [b"abc", b"def"]
    with pytest.raises(ValueError):
        bs.percpu_values(b"x" * 9, 3)


def test_lru_hash(own) -> None:
    m = own(bs.map_create(bs.BPF_MAP_TYPE_LRU_HASH, 8, 4, 1024, name="xlt_lru"))
    assert bs.map_info(m).type == bs.BPF_MAP_TYPE_LRU_HASH
    keys = [struct.pack("<Q", i) for i in range(500)]
    vals = [u32(i * 3) for i in range(500)]
    bs.map_update_batch(m, keys, vals)
    got = {
        k: v
        for ks, vs in bs.map_lookup_batch(m, 8, 4, batch=64)
        for k, v in zip(ks, vs, strict=True)
    }
    assert got == dict(zip(keys, vals, strict=True))
    assert bs.map_lookup(m, keys[7], 4) == vals[7]
    assert bs.map_delete(m, keys[7]) is True
    assert bs.map_lookup(m, keys[7], 4) is None


def test_lru_percpu_hash_batch(own) -> None:
    ncpu = bs.possible_cpus()
    m = own(bs.map_create(bs.BPF_MAP_TYPE_LRU_PERCPU_HASH, 4, 16, 256))
    keys = [u32(i) for i in range(100)]
    vals = [bs.percpu_blob([struct.pack("<QQ", i, c) for c in range(ncpu)], 16) for i in range(100)]
    bs.map_update_batch(m, keys, vals)
    got = {
        k: v
        for ks, vs in bs.map_lookup_batch(m, 4, 16, batch=16)
        for k, v in zip(ks, vs, strict=True)
    }
    assert got == dict(zip(keys, vals, strict=True))


def test_batch_lookup_100k(own) -> None:
    n = 100_000
    m = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 8, n, name="xlt_big"))
    keys = [u32(i) for i in range(n)]
    vals = [struct.pack("<II", i, i ^ 0xA5A5A5A5) for i in range(n)]
    bs.map_update_batch(m, keys, vals)

    seen: dict[bytes, bytes] = {}
    chunks = 0
    for ks, vs in bs.map_lookup_batch(m, 4, 8, batch=4096):
        assert len(ks) == len(vs) <= 4096 * 2  # may grow past `batch` only for a big bucket
        seen.update(zip(ks, vs, strict=True))
        chunks += 1
    assert len(seen) == n and chunks > 1
    assert seen == dict(zip(keys, vals, strict=True))

    # The map is full: one more distinct key does not fit.
    with pytest.raises(bs.BpfError) as exc:
        bs.map_update_batch(m, [u32(n)], [bytes(8)])
    assert exc.value.errno == errno.E2BIG

    assert bs.map_delete_batch(m, keys[:50_000]) == 50_000
    left = {k for ks, _ in bs.map_lookup_batch(m, 4, 8) for k in ks}
    assert left == set(keys[50_000:])


def test_batch_lookup_grows_on_enospc(own, monkeypatch: pytest.MonkeyPatch) -> None:
    """batch=1 meets hash buckets holding several entries: the kernel says ENOSPC."""
    m = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 4096))
    keys = [u32(i) for i in range(4000)]  # ~4000 keys in 4096 buckets: collisions are certain
    bs.map_update_batch(m, keys, keys)
    errs: list[int] = []
    real = bs._bpf

    def spy(cmd: int, attr: bs._BpfAttr) -> tuple[int, int]:
        ret, err = real(cmd, attr)
        if cmd == bs.BPF_MAP_LOOKUP_BATCH:
            errs.append(err)
        return ret, err

    monkeypatch.setattr(bs, "_bpf", spy)
    got: dict[bytes, bytes] = {}
    sizes: list[int] = []
    for ks, vs in bs.map_lookup_batch(m, 4, 4, batch=1):
        got.update(zip(ks, vs, strict=True))
        sizes.append(len(ks))
    assert got == {k: k for k in keys}
    # Only the chunks of crowded buckets exceed batch=1; the count drops back after each.
    assert max(sizes) > 1 and sizes.count(1) > len(sizes) // 2
    assert errno.ENOSPC in errs and errs[-1] == errno.ENOENT


def test_batch_fallback_unsupported_map_type(own) -> None:
    """DEVMAP has no batch ops (ENOTSUPP): get_next_key + lookup and per-element updates."""
    m = own(bs.map_create(bs.BPF_MAP_TYPE_DEVMAP, 4, 4, 8))
    lo = 1  # loopback is ifindex 1 in every namespace
    bs.map_update_batch(m, [u32(0), u32(5)], [u32(lo), u32(lo)])
    chunks = list(bs.map_lookup_batch(m, 4, 4, batch=1))
    assert chunks == [([u32(0)], [u32(lo)]), ([u32(5)], [u32(lo)])]
    # DEVMAP deletes of an empty slot succeed (the kernel just swaps in NULL), so use one key.
    assert bs.map_delete_batch(m, [u32(0)]) == 1
    assert [k for ks, _ in bs.map_lookup_batch(m, 4, 4) for k in ks] == [u32(5)]


def test_batch_fallback_on_einval(own, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel refusing the batch commands (EINVAL) still gets every entry."""
    m = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 10_000))
    real = bs._bpf

    def no_batch(cmd: int, attr: bs._BpfAttr) -> tuple[int, int]:
        if cmd in (bs.BPF_MAP_LOOKUP_BATCH, bs.BPF_MAP_UPDATE_BATCH, bs.BPF_MAP_DELETE_BATCH):
            return -1, errno.EINVAL
        return real(cmd, attr)

    monkeypatch.setattr(bs, "_bpf", no_batch)
    keys = [u32(i) for i in range(10_000)]
    vals = [u32(i * 2) for i in range(10_000)]
    bs.map_update_batch(m, keys, vals)
    chunks = list(bs.map_lookup_batch(m, 4, 4, batch=3000))
    assert [len(ks) for ks, _ in chunks] == [3000, 3000, 3000, 1000]
    got = {k: v for ks, vs in chunks for k, v in zip(ks, vs, strict=True)}
    assert got == dict(zip(keys, vals, strict=True))
    assert bs.map_delete_batch(m, keys[:10] + [u32(99_999)]) == 10


def test_update_batch_noexist_goes_element_wise(own) -> None:
    # BPF_MAP_UPDATE_BATCH takes only BPF_ANY/BPF_F_LOCK; other flags must still work.
    m = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 16))
    bs.map_update_batch(m, [u32(1), u32(2)], [u32(1), u32(2)], bs.BPF_NOEXIST)
    with pytest.raises(bs.BpfError) as exc:
        bs.map_update_batch(m, [u32(3), u32(2)], [u32(3), u32(9)], bs.BPF_NOEXIST)
    assert exc.value.errno == errno.EEXIST
    assert bs.map_lookup(m, u32(3), 4) == u32(3)  # written before the failing element
    assert bs.map_lookup(m, u32(2), 4) == u32(2)
    bs.map_update_batch(m, [u32(2)], [u32(7)], bs.BPF_EXIST)
    assert bs.map_lookup(m, u32(2), 4) == u32(7)


def test_delete_batch_skips_absent_keys(own) -> None:
    m = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 64))
    bs.map_update_batch(m, [u32(i) for i in range(10)], [u32(i) for i in range(10)])
    doomed = [u32(100), u32(1), u32(101), u32(2), u32(3), u32(102)]
    assert bs.map_delete_batch(m, doomed) == 3
    assert sorted(bs.map_keys(m, 4)) == [u32(i) for i in (0, *range(4, 10))]
    assert bs.map_delete_batch(m, []) == 0


# --- pins and ids ---------------------------------------------------------------------------


def test_pin_and_obj_get(own, pin_dir: Path) -> None:
    m = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 8, name="xlt_pin"))
    bs.map_update(m, u32(1), u32(11))
    path = pin_dir / "map"
    bs.obj_pin(m, path)
    assert path.exists()

    again = own(bs.obj_get(path))
    assert int(again) != int(m)
    assert bs.map_info(again) == bs.map_info(m)
    assert bs.map_lookup(again, u32(1), 4) == u32(11)
    bs.map_update(again, u32(2), u32(22))
    assert bs.map_lookup(m, u32(2), 4) == u32(22)  # same map

    ro = own(bs.obj_get(path, bs.BPF_F_RDONLY))
    assert bs.map_lookup(ro, u32(2), 4) == u32(22)
    with pytest.raises(bs.BpfError) as exc:
        bs.map_update(ro, u32(3), u32(33))
    assert exc.value.errno == errno.EPERM

    with pytest.raises(bs.BpfError) as exc:
        bs.obj_pin(m, path)
    assert exc.value.errno == errno.EEXIST and str(path) in str(exc.value)
    with pytest.raises(bs.BpfError) as exc:
        bs.obj_get(pin_dir / "missing")
    assert exc.value.errno == errno.ENOENT and exc.value.op == "obj_get"

    by_id = own(bs.map_get_fd_by_id(bs.map_info(m).id))
    assert bs.map_lookup(by_id, u32(1), 4) == u32(11)
    assert bs.map_info(m).id in set(bs.map_ids())


def test_pin_outside_bpffs_fails(own, tmp_path: Path) -> None:
    m = own(bs.map_create(bs.BPF_MAP_TYPE_ARRAY, 4, 4, 1))
    with pytest.raises(bs.BpfError) as exc:
        bs.obj_pin(m, tmp_path / "map")
    assert exc.value.errno == errno.EPERM


def test_bad_name_and_bad_create() -> None:
    with pytest.raises(ValueError):
        bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 8, name="x" * 16)
    with pytest.raises(ValueError):
        bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 8, name="a-b")
    with pytest.raises(bs.BpfError) as exc:
        bs.map_create(bs.BPF_MAP_TYPE_HASH, 0, 4, 8)
    assert exc.value.errno == errno.EINVAL and exc.value.op == "map_create"


# --- programs -------------------------------------------------------------------------------


def test_load_xdp_pass_and_prog_info(own, pin_dir: Path) -> None:
    prog = own(bs.load_xdp_pass())
    info = bs.prog_info(prog)
    assert info.type == bs.BPF_PROG_TYPE_XDP and info.name == "xdplb_pass"
    assert len(info.tag) == 16 and int(info.tag, 16) != 0
    assert info.load_time > 0 and info.map_ids == [] and info.id > 0
    assert info.id in set(bs.prog_ids())

    same = own(bs.prog_get_fd_by_id(info.id))
    assert bs.prog_info(same).id == info.id

    bs.obj_pin(prog, pin_dir / "prog")
    pinned = own(bs.obj_get(pin_dir / "prog"))
    assert bs.prog_info(pinned).tag == info.tag

    with pytest.raises(bs.BpfError) as exc:
        bs.prog_get_fd_by_id(0xFFFFFFF0)
    assert exc.value.errno == errno.ENOENT


def test_info_rejects_the_wrong_object(own) -> None:
    m = own(bs.map_create(bs.BPF_MAP_TYPE_ARRAY, 4, 4, 1))
    prog = own(bs.load_xdp_pass())
    with pytest.raises(bs.BpfError, match="not bpf-map"):
        bs.map_info(prog)
    with pytest.raises(bs.BpfError, match="not bpf-prog"):
        bs.prog_info(m)
    with pytest.raises(bs.BpfError, match="not bpf-map"):
        bs.map_lookup(prog, u32(0), 4)
    with open("/dev/null") as f, pytest.raises(bs.BpfError):
        bs.map_info(f.fileno())


def test_prog_info_lists_maps(own) -> None:
    a = own(bs.map_create(bs.BPF_MAP_TYPE_ARRAY, 4, 4, 1))
    b = own(bs.map_create(bs.BPF_MAP_TYPE_HASH, 4, 4, 1))
    pseudo_map_fd = 1
    insns = (
        bs.insn(0x18, dst=1, src=pseudo_map_fd, imm=a)  # r1 = map a (ld_imm64, 2 slots)
        + bs.insn(0)
        + bs.insn(0x18, dst=2, src=pseudo_map_fd, imm=b)
        + bs.insn(0)
        + bs.insn(bs.BPF_MOV64_K, imm=bs.XDP_DROP)
        + bs.insn(bs.BPF_EXIT)
    )
    prog = own(bs.prog_load_xdp(insns, name="xlt_maps"))
    info = bs.prog_info(prog)
    assert sorted(info.map_ids) == sorted([bs.map_info(a).id, bs.map_info(b).id])
    assert bs.prog_test_run(prog, bytes(64)).retval == bs.XDP_DROP


def test_prog_load_error_carries_verifier_log() -> None:
    with pytest.raises(bs.BpfError) as exc:
        bs.prog_load_xdp(bs.insn(bs.BPF_EXIT), name="xlt_bad")  # r0 never written
    assert exc.value.errno == errno.EACCES and exc.value.op == "prog_load_xdp"
    assert "R0 !read_ok" in exc.value.log and "R0 !read_ok" in str(exc.value)
    with pytest.raises(ValueError):
        bs.prog_load_xdp(b"\x95\0\0")


def test_prog_test_run_pass(own) -> None:
    prog = own(bs.load_xdp_pass())
    frame = bytes(range(60))
    res = bs.prog_test_run(prog, frame)
    assert res.retval == bs.XDP_PASS and res.data_out == frame and res.ctx_out is None
    res = bs.prog_test_run(prog, frame, repeat=10_000)
    assert res.retval == bs.XDP_PASS and res.duration_ns > 0


def test_prog_test_run_short_frame_is_einval(own) -> None:
    prog = own(bs.load_xdp_pass())
    with pytest.raises(bs.BpfError) as exc:
        bs.prog_test_run(prog, bytes(10))
    assert exc.value.errno == errno.EINVAL and exc.value.op == "prog_test_run"
    assert bs.prog_test_run(prog, bytes(14)).retval == bs.XDP_PASS


def test_prog_test_run_ctx_and_small_output(own) -> None:
    prog = own(bs.load_xdp_return(bs.XDP_TX, name="xlt_tx"))
    frame = bytes(range(64))
    res = bs.prog_test_run(prog, frame, ctx_in=bs.xdp_md(len(frame), ingress_ifindex=1))
    assert res.retval == bs.XDP_TX and res.data_out == frame
    assert res.ctx_out is not None
    _, data_end, _, ingress, _, _ = struct.unpack("<6I", res.ctx_out)
    assert (data_end, ingress) == (len(frame), 1)
    with pytest.raises(bs.BpfError) as exc:  # egress_ifindex must be 0
        bs.prog_test_run(prog, frame, ctx_in=struct.pack("<6I", 0, 64, 0, 1, 0, 1))
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(bs.BpfError) as exc:
        bs.prog_test_run(prog, frame, data_out_size=16)
    assert exc.value.errno == errno.ENOSPC and "64" in str(exc.value)


# --- XDP attachment -------------------------------------------------------------------------


def test_ifindex_ifname(veth_ns: str) -> None:
    idx = xl.ifindex("xv0", netns=veth_ns)
    assert xl.ifname(idx, netns=veth_ns) == "xv0"
    with pytest.raises(xl.NoSuchInterface, match="nope0"):
        xl.ifindex("nope0", netns=veth_ns)
    with pytest.raises(xl.NoSuchInterface, match="99999"):
        xl.ifname(99999, netns=veth_ns)
    with pytest.raises(xl.XdpError, match="does not exist"):
        xl.ifindex("xv0", netns=f"xlt-missing-{PID}")
    assert not os.path.exists(f"/var/run/netns/xlt-missing-{PID}")  # not created by accident
    with inside(veth_ns):
        assert xl.ifindex("xv1") == xl.ifindex("xv1", netns=veth_ns)


def test_xdp_native_attach_state_detach(own, veth_ns: str) -> None:
    prog = own(bs.load_xdp_pass())
    prog_id = bs.prog_info(prog).id
    with inside(veth_ns):  # the calling thread's own namespace
        idx = xl.ifindex("xv0")
        assert xl.xdp_state(idx) is None
        xl.xdp_attach(idx, prog, "native")
        state = xl.xdp_state("xv0")
        assert state is not None
        assert (state.ifindex, state.prog_id, state.mode) == (idx, prog_id, "native")
        assert state.progs == {"native": prog_id}
        assert xl.xdp_state("xv1") is None
        assert xl.xdp_detach(idx) is True
        assert xl.xdp_state(idx) is None
        assert xl.xdp_detach(idx) is False


def test_xdp_generic_attach(own, veth_ns: str) -> None:
    prog = own(bs.load_xdp_pass())
    prog_id = bs.prog_info(prog).id
    xl.xdp_attach("xv1", prog, "generic", netns=veth_ns)
    state = xl.xdp_state("xv1", netns=veth_ns)
    assert state is not None and (state.prog_id, state.mode) == (prog_id, "generic")
    # Native and generic cannot both be active: the kernel's reason reaches the caller.
    other = own(bs.load_xdp_pass())
    with pytest.raises(xl.XdpError) as exc:
        xl.xdp_attach("xv1", other, "native", netns=veth_ns)
    assert exc.value.errno == errno.EEXIST and "same time" in str(exc.value)
    assert xl.xdp_detach("xv1", mode="native", netns=veth_ns) is False
    assert xl.xdp_detach("xv1", mode="generic", netns=veth_ns) is True
    assert xl.xdp_state("xv1", netns=veth_ns) is None


def test_xdp_atomic_replace_and_noexist(own, veth_ns: str) -> None:
    first = own(bs.load_xdp_pass(name="xlt_first"))
    second = own(bs.load_xdp_return(bs.XDP_DROP, name="xlt_second"))
    stranger = own(bs.load_xdp_pass(name="xlt_stranger"))
    id1, id2 = bs.prog_info(first).id, bs.prog_info(second).id

    xl.xdp_attach("xv0", first, "native", if_noexist=True, netns=veth_ns)
    with pytest.raises(xl.XdpError) as exc:
        xl.xdp_attach("xv0", second, "native", if_noexist=True, netns=veth_ns)
    assert exc.value.errno == errno.EBUSY and "already attached" in str(exc.value)

    # Replacing a program that is not the attached one is refused...
    with pytest.raises(xl.XdpError) as exc:
        xl.xdp_attach("xv0", second, "native", replace_fd=stranger, netns=veth_ns)
    assert exc.value.errno == errno.EEXIST and "xv0" in str(exc.value)
    assert xl.xdp_state("xv0", netns=veth_ns).prog_id == id1
    # ...and replacing the right one swaps atomically.
    xl.xdp_attach("xv0", second, "native", replace_fd=first, netns=veth_ns)
    state = xl.xdp_state("xv0", netns=veth_ns)
    assert state is not None and (state.prog_id, state.mode) == (id2, "native")

    with pytest.raises(xl.XdpError):
        xl.xdp_detach("xv0", expected_fd=first, netns=veth_ns)
    assert xl.xdp_state("xv0", netns=veth_ns).prog_id == id2
    assert xl.xdp_detach("xv0", expected_fd=second, netns=veth_ns) is True
    assert xl.xdp_state("xv0", netns=veth_ns) is None

    with pytest.raises(ValueError):
        xl.xdp_attach("xv0", first, "native", replace_fd=first, if_noexist=True)
    with pytest.raises(ValueError):
        xl.xdp_attach("xv0", first, "turbo", netns=veth_ns)


def test_xdp_native_unsupported_reason(own, veth_ns: str) -> None:
    prog = own(bs.load_xdp_pass())
    with pytest.raises(xl.XdpError) as exc:
        xl.xdp_attach("lo", prog, "native", netns=veth_ns)
    assert exc.value.errno == errno.EOPNOTSUPP
    assert "native mode" in str(exc.value) and "lo" in str(exc.value)
