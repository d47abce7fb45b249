"""Run frames through the real BPF program with BPF_PROG_TEST_RUN, on private maps.

Nothing is attached and nothing live is touched: the program is compiled with unpinned
maps that only this engine fills. Next hops come from the calling process's network
namespace, as for an attached program. Used by tests, and by replay/trace tooling.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdplb import bpfsys
from xdplb.config import Config
from xdplb.maps import KernelMaps, read_counters
from xdplb.program import Program, compile_program
from xdplb.state import desired_state
from xdplb.sync import MapSync

VERDICTS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}


@dataclass(frozen=True)
class RunResult:
    verdict: str
    data: bytes
    counters: dict[str, int]  # counters this frame moved (delta)


class BpfEngine:
    """A private instance of the data path: compile once, configure, run frames."""

    def __init__(self, cfg: Config, tx_ifindexes: list[int] | None = None) -> None:
        self.program: Program = compile_program(cfg.maglev.table_size, cfg.flows.max_entries)
        self.maps = KernelMaps(self.program.map_fds, own=False)
        self.sync = MapSync(self.maps)
        self.configure(cfg)
        if tx_ifindexes:
            self.sync.set_tx_ports(tx_ifindexes)

    def configure(self, cfg: Config) -> None:
        current = self.sync.read_current()
        self.state = desired_state(cfg, current)
        self.sync.apply(self.state, current)

    def run(self, frame: bytes, ingress_ifindex: int = 0) -> RunResult:
        before = read_counters(self.maps)
        ctx = bpfsys.xdp_md(len(frame), ingress_ifindex) if ingress_ifindex else None
        res = bpfsys.prog_test_run(self.program.prog_fd, frame, ctx_in=ctx)
        after = read_counters(self.maps)
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        return RunResult(VERDICTS.get(res.retval, str(res.retval)), res.data_out, delta)

    def clear_flows(self) -> None:
        for name in ("flows", "rev_flows"):
            for k, _ in list(self.maps.raw_items(name)):
                bpfsys.map_delete(self.maps.fds[name], k)

    def close(self) -> None:
        self.program.close()
