"""Tests for xdplb.config: the reference pool.yaml, defaults, and every class of error."""

from __future__ import annotations

import pickle
import textwrap
from ipaddress import IPv4Address
from pathlib import Path

import pydantic
import pytest

from xdplb.abi.layout import MAX_BACKENDS, MAX_RING_SLOTS, MAX_VIPS, REV_TARGETS
from xdplb.config import (
    Backend,
    Config,
    ConfigError,
    ConfigProblem,
    HealthCheck,
    Vip,
    check_backends_not_local,
    load_config,
    parse_config,
    yamlread,
)

# The reference file from docs/config.md, verbatim.
EXAMPLE = """\
vips:
  - name: web                 # unique
    address: 10.200.0.10
    port: 80
    protocol: tcp             # tcp | udp
    backends:
      - address: 10.20.0.11
        weight: 3             # default 1; 0 = takes no new flows (drain)
      - address: 10.20.0.12
        port: 8080            # optional: rewrite the port too (default: the VIP's port)
    health_check:             # optional, default type none
      type: tcp               # tcp | http | none
      path: /healthz          # http only (default /); expect 200-399 unless expect_status given
      expect_status: 200      # optional, http only (int, or list of ints)
      interval: 2s            # duration: "2s", "500ms", "1m" or a number of seconds; default 2s
      timeout: 1s             # default 1s, must be < interval
      rise: 2                 # default 2, >= 1
      fall: 3                 # default 3, >= 1
maglev:
  table_size: 65537           # prime; default 65537
  seed: 0                     # 0 .. 2**32-1, default 0
flows:
  max_entries: 1000000        # flow table size, default 1000000
  next_hop_cache_ms: 100      # how long a flow reuses its FIB lookup, default 100 (0: never)
  udp_idle_timeout: 60s       # a UDP flow idle this long is over, default 60s (0: never)
"""

# A valid VIP whose lines the error tests below count from: line 1 is "vips:".
MINIMAL = """\
vips:
  - name: web
    address: 10.200.0.10
    port: 80
    protocol: tcp
    backends:
      - address: 10.20.0.11
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pool.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def errors(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc_info:
        load_config(write(tmp_path, text))
    return str(exc_info.value)


def assert_error(message: str, line: int, path: str, fragment: str) -> None:
    """One line of ``message`` names pool.yaml, ``line``, ``path`` and contains ``fragment``."""
    prefix = f"pool.yaml:{line}: {path}: " if path else f"pool.yaml:{line}: "
    hits = [m for m in message.splitlines() if prefix in m and fragment in m]
    assert hits, f"no line with {prefix!r} and {fragment!r} in:\n{message}"


# --- valid configurations ------------------------------------------------------------------------


def test_example_parses_with_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, EXAMPLE))
    (vip,) = cfg.vips
    assert vip.name == "web"
    assert vip.address == IPv4Address("10.200.0.10")
    assert vip.key == (IPv4Address("10.200.0.10"), 80, "tcp")
    b0, b1 = vip.backends
    assert (b0.address, b0.port, b0.weight) == (IPv4Address("10.20.0.11"), None, 3)
    assert (b1.address, b1.port, b1.weight) == (IPv4Address("10.20.0.12"), 8080, 1)
    assert [b.target_port(vip) for b in vip.backends] == [80, 8080]
    hc = vip.health_check
    assert (hc.type, hc.path, hc.expect_status) == ("tcp", "/healthz", (200,))
    assert (hc.interval, hc.timeout, hc.rise, hc.fall) == (2.0, 1.0, 2, 3)
    assert (cfg.maglev.table_size, cfg.maglev.seed) == (65537, 0)
    assert (cfg.flows.max_entries, cfg.flows.next_hop_cache_ms) == (1_000_000, 100)
    assert cfg.flows.udp_idle_timeout == 60.0


def test_udp_idle_timeout(tmp_path: Path) -> None:
    """A duration, or 0 for never; anything else names the field."""
    for text, want in (("0", 0.0), ("'0'", 0.0), ("500ms", 0.5), ("2m", 120.0), ("90", 90.0)):
        flows = parse_config(MINIMAL + f"flows: {{udp_idle_timeout: {text}}}\n").flows
        assert flows.udp_idle_timeout == want, text
    assert parse_config(MINIMAL).flows.udp_idle_timeout == 60.0
    for bad, fragment in (("-1", "out of range (0 or 1ms-1h)"), ("2h", "not a valid duration"),
                          ("false", "got a boolean"), ("0.0001", "out of range")):
        assert_error(errors(tmp_path, MINIMAL + f"flows:\n  udp_idle_timeout: {bad}\n"),
                     9, "flows.udp_idle_timeout", fragment)


def test_next_hop_cache_bounds(tmp_path: Path) -> None:
    assert parse_config(MINIMAL + "flows: {next_hop_cache_ms: 0}\n").flows.next_hop_cache_ms == 0
    for bad in ("-1", "10001", "0.5", "'100'"):
        assert_error(errors(tmp_path, MINIMAL + f"flows:\n  next_hop_cache_ms: {bad}\n"),
                     9, "flows.next_hop_cache_ms", "")


def test_optional_sections_default() -> None:
    cfg = parse_config(MINIMAL)
    vip = cfg.vips[0]
    assert vip.health_check == HealthCheck()
    hc = vip.health_check
    assert (hc.type, hc.path, hc.expect_status) == ("none", "/", None)
    assert (hc.interval, hc.timeout, hc.rise, hc.fall) == (2.0, 1.0, 2, 3)
    assert vip.backends[0].weight == 1
    assert vip.backends[0].target_port(vip) == 80
    assert (cfg.maglev.table_size, cfg.maglev.seed, cfg.flows.max_entries) == (65537, 0, 1_000_000)


def test_empty_sections_mean_defaults() -> None:
    cfg = parse_config(MINIMAL + "    health_check:\nmaglev:\nflows:\n")
    assert cfg.maglev.table_size == 65537
    assert cfg.flows.max_entries == 1_000_000
    assert cfg.vips[0].health_check.type == "none"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2s", 2.0), ("500ms", 0.5), ("1m", 60.0), ("1.5s", 1.5), (3, 3.0), (2.5, 2.5)],
)
def test_durations(value: object, seconds: float) -> None:
    text = MINIMAL + f"    health_check:\n      interval: {value}\n      timeout: 1ms\n"
    assert parse_config(text).vips[0].health_check.interval == seconds


def test_http_health_check_and_status_list() -> None:
    text = MINIMAL + "    health_check: {type: http, expect_status: [200, 204]}\n"
    hc = parse_config(text).vips[0].health_check
    assert (hc.type, hc.path, hc.expect_status) == ("http", "/", (200, 204))


def test_yaml_anchors_and_merge_keys() -> None:
    text = """\
    vips:
      - name: web
        address: 10.200.0.10
        port: 80
        protocol: tcp
        backends: [{address: 10.20.0.11}]
        health_check: &hc {type: http, path: /ok}
      - name: dns
        address: 10.200.0.10
        port: 53
        protocol: udp
        backends: [{address: 10.20.0.11}]
        health_check:
          <<: *hc
          type: tcp
    """
    a, b = parse_config(textwrap.dedent(text)).vips
    assert a.health_check.path == b.health_check.path == "/ok"
    assert b.health_check.type == "tcp"


def test_models_are_frozen_and_usable_directly() -> None:
    vip = Vip(
        name="web",
        address="10.0.0.1",
        port=80,
        protocol="udp",
        backends=[{"address": "10.1.0.1", "port": 53}],
    )
    assert isinstance(vip.backends[0], Backend)
    assert vip.backends[0].target_port(vip) == 53
    with pytest.raises(pydantic.ValidationError):
        vip.port = 81
    cfg = Config(vips=[vip])
    assert isinstance(cfg.vips, tuple)
    assert hash(cfg) == hash(Config(vips=[vip]))


# --- error classes -------------------------------------------------------------------------------


def test_brief_example_message(tmp_path: Path) -> None:
    text = """\
    # pool.yaml
    vips:
      - name: web
        address: 10.200.0.10
        port: 80
        protocol: tcp
        backends:
          - address: 10.20.0.11
            weight: 3
          # the next backend listens elsewhere
          - address: 10.20.0.12

            # on a high port
            port: 70000
    """
    msg = errors(tmp_path, text)
    assert msg.endswith("pool.yaml:14: vips[0].backends[1].port: 70000 is out of range (1-65535)")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        pytest.param(MINIMAL + "   port: 80\n", 8, "invalid YAML", id="bad-indent"),
        pytest.param("vips: [\n", 2, "invalid YAML", id="unclosed-flow"),
        pytest.param("vips:\n  - name: 'web\n", 3, "invalid YAML", id="unclosed-quote"),
        pytest.param("vips:\n\t- name: web\n", 2, "invalid YAML", id="tab"),
        pytest.param(MINIMAL + "    port: 81\n", 8, 'duplicate key "port"', id="duplicate-key"),
        pytest.param(MINIMAL + "---\nvips: []\n", 8, "invalid YAML", id="two-documents"),
    ],
)
def test_yaml_syntax_error(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    assert_error(errors(tmp_path, text), line, "", fragment)


@pytest.mark.parametrize(
    ("text", "line", "path", "fragment"),
    [
        pytest.param(
            MINIMAL + "extra: 1\n", 8, "extra", "unknown key 'extra' (expected one of:", id="top"
        ),
        pytest.param(
            MINIMAL.replace("    port: 80\n", "    port: 80\n    colour: red\n"),
            5,
            "vips[0].colour",
            "unknown key 'colour'",
            id="vip",
        ),
        pytest.param(
            MINIMAL + "        wieght: 2\n",
            8,
            "vips[0].backends[0].wieght",
            "unknown key 'wieght' (did you mean 'weight'?)",
            id="backend",
        ),
        pytest.param(
            MINIMAL + "    health_check:\n      type: tcp\n      intreval: 5s\n",
            10,
            "vips[0].health_check.intreval",
            "did you mean 'interval'?",
            id="health-check",
        ),
        pytest.param(
            MINIMAL + "maglev:\n  table:\n    size: 7\n",
            9,
            "maglev.table",
            "unknown key 'table'",
            id="block-value",
        ),
        pytest.param(
            MINIMAL + "flows: {max_entries: 2048, ttl: 30}\n",
            8,
            "flows.ttl",
            "unknown key 'ttl'",
            id="flows",
        ),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, line: int, path: str, fragment: str) -> None:
    assert_error(errors(tmp_path, text), line, path, fragment)


@pytest.mark.parametrize(
    ("text", "line", "path"),
    [
        pytest.param(MINIMAL.replace("    port: 80\n", ""), 2, "vips[0].port", id="vip-port"),
        pytest.param(
            MINIMAL.replace("      - address: 10.20.0.11\n", "      - weight: 2\n"),
            7,
            "vips[0].backends[0].address",
            id="backend-address",
        ),
        pytest.param("# comment\nmaglev: {seed: 1}\n", 2, "vips", id="top-level-vips"),
    ],
)
def test_missing_required_field(tmp_path: Path, text: str, line: int, path: str) -> None:
    key = path.rsplit(".", 1)[-1]
    assert_error(errors(tmp_path, text), line, path, f"missing required key {key!r}")


@pytest.mark.parametrize(
    ("old", "new", "line", "path", "fragment"),
    [
        ("port: 80", 'port: "80"', 4, "vips[0].port", "expected an integer, got a string ('80')"),
        ("port: 80", "port: 80.0", 4, "vips[0].port", "expected an integer, got a number"),
        ("port: 80", "port: yes", 4, "vips[0].port", "expected an integer, got a string"),
        ("port: 80", "port: true", 4, "vips[0].port", "expected an integer, got a boolean"),
        ("port: 80", "port: &p true", 4, "vips[0].port", "got a boolean"),
        ("port: 80", "port:", 4, "vips[0].port", "expected an integer, got null"),
        ("name: web", "name: 42", 2, "vips[0].name", "expected a string, got an integer"),
        ("name: web", "name: my web", 2, "vips[0].name", "is not a valid name"),
        ("protocol: tcp", "protocol: TCP", 5, "vips[0].protocol", "expected 'tcp' or 'udp'"),
        (
            "backends:\n      - address: 10.20.0.11",
            "backends: {address: 10.20.0.11}",
            6,
            "vips[0].backends",
            "expected a list, got a mapping",
        ),
        (
            "      - address: 10.20.0.11",
            "      - 10.20.0.11",
            7,
            "vips[0].backends[0]",
            "expected a mapping, got a string",
        ),
    ],
)
def test_wrong_type(
    tmp_path: Path, old: str, new: str, line: int, path: str, fragment: str
) -> None:
    assert old in MINIMAL
    assert_error(errors(tmp_path, MINIMAL.replace(old, new)), line, path, fragment)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    assert_error(errors(tmp_path, "- web\n"), 1, "", "expected a mapping, got a list")


SECOND_VIP = """\
  - name: {name}
    address: {address}
    port: {port}
    protocol: tcp
    backends:
      - address: 10.20.0.12
"""


def test_duplicate_vip_name(tmp_path: Path) -> None:
    text = MINIMAL + SECOND_VIP.format(name="web", address="10.200.0.11", port=80)
    assert_error(
        errors(tmp_path, text), 8, "vips[1].name", "duplicate VIP name 'web' (first used by"
    )
    assert "vips[0] on line 2" in errors(tmp_path, text)


def test_duplicate_vip(tmp_path: Path) -> None:
    text = MINIMAL + SECOND_VIP.format(name="web2", address="10.200.0.10", port=80)
    assert_error(errors(tmp_path, text), 8, "vips[1]", "duplicate VIP 10.200.0.10:80/tcp")


def test_same_address_other_port_is_fine() -> None:
    text = MINIMAL + SECOND_VIP.format(name="web2", address="10.200.0.10", port=443)
    assert len(parse_config(text).vips) == 2


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        (65536, "65536 is not prime (nearest primes: 65521, 65537)"),
        (1, "1 is out of range (3-1000003)"),
        (1_000_033, "out of range (3-1000003)"),
        ("big", "expected an integer"),
    ],
)
def test_table_size(tmp_path: Path, size: object, fragment: str) -> None:
    text = MINIMAL + f"maglev:\n  seed: 1\n  table_size: {size}\n"
    assert_error(errors(tmp_path, text), 10, "maglev.table_size", fragment)


def test_table_size_must_exceed_backend_count(tmp_path: Path) -> None:
    text = MINIMAL + "      - address: 10.20.0.12\n      - address: 10.20.0.13\n"
    msg = errors(tmp_path, text + "maglev:\n  table_size: 3\n")
    assert_error(msg, 11, "maglev.table_size", "greater than the number of backends")
    assert "VIP 'web' has 3" in msg
    cfg = parse_config(text + "maglev:\n  table_size: 5\n")
    assert cfg.maglev.table_size == 5


@pytest.mark.parametrize(
    ("old", "new", "line", "path", "fragment"),
    [
        ("port: 80", "port: 0", 4, "vips[0].port", "0 is out of range (1-65535)"),
        ("port: 80", "port: 65536", 4, "vips[0].port", "65536 is out of range (1-65535)"),
        (
            "address: 10.20.0.11",
            "address: 10.20.0.11\n        port: -5",
            8,
            "vips[0].backends[0].port",
            "-5 is out of range (1-65535)",
        ),
    ],
)
def test_port_out_of_range(
    tmp_path: Path, old: str, new: str, line: int, path: str, fragment: str
) -> None:
    assert_error(errors(tmp_path, MINIMAL.replace(old, new)), line, path, fragment)


@pytest.mark.parametrize("weight", [-1, 65536])
def test_weight_out_of_range(tmp_path: Path, weight: int) -> None:
    text = MINIMAL + f"        weight: {weight}\n"
    path = "vips[0].backends[0].weight"
    assert_error(errors(tmp_path, text), 8, path, f"{weight} is out of range (0-65535)")


def test_weight_zero_drains_and_is_valid() -> None:
    assert parse_config(MINIMAL + "        weight: 0\n").vips[0].backends[0].weight == 0


def test_duplicate_backend(tmp_path: Path) -> None:
    # Same address, and port 80 is the VIP's port, so the target is the same.
    text = MINIMAL + "      - address: 10.20.0.12\n      - address: 10.20.0.11\n        port: 80\n"
    msg = errors(tmp_path, text)
    assert_error(msg, 9, "vips[0].backends[2]", "duplicate backend 10.20.0.11:80")
    assert "vips[0].backends[0] on line 7" in msg


def test_same_backend_on_another_port_is_fine() -> None:
    text = MINIMAL + "      - address: 10.20.0.11\n        port: 8080\n"
    assert len(parse_config(text).vips[0].backends) == 2


def test_empty_backends(tmp_path: Path) -> None:
    text = MINIMAL.replace("backends:\n      - address: 10.20.0.11\n", "backends: []\n")
    assert_error(errors(tmp_path, text), 6, "vips[0].backends", "must not be empty")


def test_empty_vips(tmp_path: Path) -> None:
    assert_error(errors(tmp_path, "vips: []\n"), 1, "vips", "at least one VIP is required")


def test_empty_file(tmp_path: Path) -> None:
    assert "pool.yaml: the file is empty" in errors(tmp_path, "# nothing yet\n")


@pytest.mark.parametrize(
    ("old", "new", "line", "path", "fragment"),
    [
        (
            "address: 10.200.0.10",
            "address: 10.200.0.300",
            3,
            "vips[0].address",
            "'10.200.0.300' is not an IP address",
        ),
        (
            "address: 10.20.0.11",
            "address: backend-1",
            7,
            "vips[0].backends[0].address",
            "'backend-1' is not an IP address",
        ),
        (
            "address: 10.200.0.10",
            "address: 167772161",
            3,
            "vips[0].address",
            "expected an IP address string, got an integer",
        ),
        (
            "address: 10.200.0.10",
            "address: 0.0.0.0",
            3,
            "vips[0].address",
            "not a unicast address",
        ),
    ],
)
def test_bad_address(
    tmp_path: Path, old: str, new: str, line: int, path: str, fragment: str
) -> None:
    assert_error(errors(tmp_path, MINIMAL.replace(old, new)), line, path, fragment)


def test_ipv6_backend_for_ipv4_vip(tmp_path: Path) -> None:
    text = MINIMAL + "      - address: 2001:db8::12\n"
    msg = errors(tmp_path, text)
    assert_error(
        msg, 8, "vips[0].backends[1].address", "address family mix (IPv6 backend for IPv4 VIP)"
    )
    assert "not supported" not in msg


def test_ipv4_backend_for_ipv6_vip(tmp_path: Path) -> None:
    text = MINIMAL.replace("address: 10.200.0.10", "address: 2001:db8::10")
    msg = errors(tmp_path, text)
    assert_error(
        msg, 7, "vips[0].backends[0].address", "address family mix (IPv4 backend for IPv6 VIP)"
    )
    assert_error(msg, 3, "vips[0].address", "IPv6 is not supported by the data path yet")


def test_ipv6_vip_and_backends(tmp_path: Path) -> None:
    text = MINIMAL.replace("10.200.0.10", "2001:db8::10").replace("10.20.0.11", "2001:db8::11")
    msg = errors(tmp_path, text)
    assert_error(msg, 3, "vips[0].address", "IPv6 is not supported by the data path yet")
    assert_error(msg, 7, "vips[0].backends[0].address", "IPv6 is not supported by the data path")
    assert "mix" not in msg


@pytest.mark.parametrize(
    ("health_check", "line", "path", "fragment"),
    [
        pytest.param(
            "{path: /healthz}",
            8,
            "vips[0].health_check.path",
            "only used by type: http, but type is none",
            id="path-without-http",
        ),
        pytest.param(
            "\n      type: none\n      expect_status: 204",
            10,
            "vips[0].health_check.expect_status",
            "only used by type: http",
            id="expect-status-without-http",
        ),
        pytest.param(
            "\n      type: http\n      path: healthz",
            10,
            "vips[0].health_check.path",
            "not a valid HTTP path",
            id="relative-path",
        ),
        pytest.param(
            "\n      type: http\n      expect_status: [200, 999]",
            10,
            "vips[0].health_check.expect_status[1]",
            "999 is out of range (100-599)",
            id="status-range",
        ),
        pytest.param(
            "\n      type: tcp\n      interval: 1s\n      timeout: 1s",
            11,
            "vips[0].health_check.timeout",
            "timeout (1s) must be shorter than interval (1s)",
            id="timeout-not-below-interval",
        ),
        pytest.param(
            "\n      type: tcp\n      interval: 500ms",
            10,
            "vips[0].health_check.interval",
            "timeout (1s) must be shorter than interval (500ms)",
            id="interval-below-default-timeout",
        ),
        pytest.param(
            "\n      interval: 2 sec",
            9,
            "vips[0].health_check.interval",
            "'2 sec' is not a valid duration",
            id="duration-with-space-unit",
        ),
        pytest.param(
            "\n      timeout: fast",
            9,
            "vips[0].health_check.timeout",
            "'fast' is not a valid duration",
            id="duration-word",
        ),
        pytest.param(
            "\n      timeout: '1'",
            9,
            "vips[0].health_check.timeout",
            "'1' is not a valid duration",
            id="duration-string-without-unit",
        ),
        pytest.param(
            "\n      interval: 0",
            9,
            "vips[0].health_check.interval",
            "0 is out of range (1ms-1h)",
            id="duration-zero",
        ),
        pytest.param(
            "\n      interval: 2h",
            9,
            "vips[0].health_check.interval",
            "not a valid duration",
            id="duration-unit-h",
        ),
        pytest.param(
            "\n      rise: 0", 9, "vips[0].health_check.rise", "0 is too small", id="rise"
        ),
        pytest.param(
            "\n      type: udp",
            9,
            "vips[0].health_check.type",
            "expected 'tcp', 'http' or 'none'",
            id="type",
        ),
    ],
)
def test_health_check(
    tmp_path: Path, health_check: str, line: int, path: str, fragment: str
) -> None:
    text = MINIMAL + f"    health_check: {health_check}\n"
    assert_error(errors(tmp_path, text), line, path, fragment)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_out_of_range(tmp_path: Path, seed: int) -> None:
    text = MINIMAL + f"maglev:\n  seed: {seed}\n"
    assert_error(errors(tmp_path, text), 9, "maglev.seed", f"{seed} is out of range (0-4294967295)")


@pytest.mark.parametrize("entries", [1023, 100_000_001])
def test_max_entries_out_of_range(tmp_path: Path, entries: int) -> None:
    text = MINIMAL + f"flows:\n  max_entries: {entries}\n"
    assert_error(errors(tmp_path, text), 9, "flows.max_entries", "is out of range (1024-100000000)")


def test_max_entries_bounds_are_inclusive() -> None:
    for entries in (1024, 100_000_000):
        assert parse_config(MINIMAL + f"flows: {{max_entries: {entries}}}\n").flows.max_entries


# --- reporting -----------------------------------------------------------------------------------


def test_multiple_errors_reported_together_in_file_order(tmp_path: Path) -> None:
    text = """\
    vips:
      - name: web
        address: 10.200.0.10
        port: 80
        protocol: tcp
        backends:
          - address: 10.20.0.11
            port: 70000
          - address: nowhere
      - name: web
        address: 10.200.0.11
        port: 80
        protocol: tcp
        backends:
          - address: 10.20.0.11
      - name: dns
        address: 10.200.0.11
        port: 80
        protocol: tcp
        backends:
          - address: 10.20.0.11
    maglev:
      table_size: 100
    bogus: true
    """
    msg = errors(tmp_path, text)
    lines = msg.splitlines()
    assert len(lines) == 6, msg
    assert_error(msg, 8, "vips[0].backends[0].port", "70000 is out of range")
    assert_error(msg, 9, "vips[0].backends[1].address", "'nowhere' is not an IP address")
    # Cross-VIP checks still run on the VIPs that are valid on their own (vips[1] and vips[2]).
    assert_error(msg, 16, "vips[2]", "duplicate VIP 10.200.0.11:80/tcp")
    assert_error(msg, 23, "maglev.table_size", "100 is not prime")
    assert_error(msg, 24, "bogus", "unknown key 'bogus'")
    assert_error(msg, 10, "vips[1].name", "duplicate VIP name 'web'")
    assert [int(line.split(":")[1]) for line in lines] == [8, 9, 10, 16, 23, 24]


def test_config_error_carries_structured_problems() -> None:
    with pytest.raises(ConfigError) as exc_info:
        parse_config(MINIMAL.replace("port: 80", "port: 0"), "conf/pool.yaml")
    (problem,) = exc_info.value.errors
    assert problem == ConfigProblem(
        "conf/pool.yaml", 4, "vips[0].port", "0 is out of range (1-65535)"
    )
    assert str(exc_info.value) == str(problem)
    copy = pickle.loads(pickle.dumps(exc_info.value))
    assert copy.errors == [problem] and str(copy) == str(problem)


def test_parse_config_default_filename() -> None:
    with pytest.raises(ConfigError, match=r"^<string>:1: vips: must not be empty"):
        parse_config("vips: []\n")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc_info:
        load_config(path)
    assert str(exc_info.value) == f"{path}: config file not found"
    assert exc_info.value.errors[0].line is None


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_bytes(b"vips: \xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


# --- refused input: addresses no backend may have, capacity, and bounded YAML -------------------

TWO_VIPS = MINIMAL + """\
  - name: dns
    address: 10.200.0.11
    port: 53
    protocol: udp
    backends:
      - address: 10.20.0.12
"""


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("address: 10.20.0.11", "address: 10.200.0.10", "is this VIP's own address"),
        ("address: 10.20.0.11", "address: 10.200.0.11", "is the address of vips[1] on line 8"),
    ],
)
def test_backend_at_a_vip_address(tmp_path: Path, old: str, new: str, fragment: str) -> None:
    # Whatever the port or protocol: the data path takes any packet to a VIP address as VIP
    # traffic. Also reported when other parts of the file are invalid.
    text = TWO_VIPS.replace(old, new, 1).replace("port: 53", "port: 99999")
    msg = errors(tmp_path, text)
    assert_error(msg, 7, "vips[0].backends[0].address", fragment)
    assert_error(msg, 10, "vips[1].port", "out of range")


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("127.0.0.1", "is a loopback address"),
        ("127.1.2.3", "is a loopback address"),
        ("0.1.2.3", "is not a unicast address"),
        ("224.0.0.5", "is not a unicast address"),
        ("255.255.255.255", "is not a unicast address"),
    ],
)
def test_addresses_no_backend_or_vip_may_have(tmp_path: Path, address: str, fragment: str) -> None:
    be = MINIMAL.replace("address: 10.20.0.11", f"address: {address}")
    assert_error(errors(tmp_path, be), 7, "vips[0].backends[0].address", fragment)
    vip = MINIMAL.replace("address: 10.200.0.10", f"address: {address}")
    assert_error(errors(tmp_path, vip), 3, "vips[0].address", fragment)


def test_backend_at_a_local_address(tmp_path: Path) -> None:
    local = {IPv4Address("10.20.0.1"), IPv4Address("127.0.0.1")}
    text = MINIMAL + "      - address: 10.20.0.1\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc_info:
        load_config(path, local_addresses=local)
    assert_error(str(exc_info.value), 8, "vips[0].backends[1].address",
                 "10.20.0.1 is an address of this balancer")
    cfg = load_config(path)  # check-config does not know the balancer's addresses
    check_backends_not_local(cfg, {IPv4Address("10.20.0.2")}, str(path))  # not ours: fine
    with pytest.raises(ConfigError) as exc_info:  # at attach: lines from the file
        check_backends_not_local(cfg, local, str(path))
    assert_error(str(exc_info.value), 8, "vips[0].backends[1].address", "of this balancer")
    with pytest.raises(ConfigError, match=r"^<config>: vips\[0\]\.backends\[1\]\.address: "):
        check_backends_not_local(cfg, local)


def _pool(n_vips: int, backends_per_vip: int, table_size: int | None = None) -> str:
    lines = ["vips:"]
    for v in range(n_vips):
        lines += [f"  - name: v{v}", f"    address: 10.200.{v // 250}.{v % 250 + 1}",
                  "    port: 80", "    protocol: tcp", "    backends:"]
        lines += [f"      - address: 10.{20 + v // 250}.{v % 250}.{b % 250 + 1}\n"
                  f"        port: {1000 + b // 250}" for b in range(backends_per_vip)]
    if table_size:
        lines += ["maglev:", f"  table_size: {table_size}"]
    return "\n".join(lines) + "\n"


def _line_of(text: str, fragment: str) -> int:
    return text.count("\n", 0, text.index(fragment)) + 1


def only_error(tmp_path: Path, text: str) -> str:
    """The whole message for ``text``, naming the file ``pool.yaml``."""
    return errors(tmp_path, text).replace(f"{tmp_path}/", "")


def test_vip_capacity(tmp_path: Path) -> None:
    assert len(parse_config(_pool(MAX_VIPS, 1, 251)).vips) == MAX_VIPS
    text = _pool(MAX_VIPS + 1, 1, 251)
    msg = only_error(tmp_path, text)
    line = _line_of(text, f"- name: v{MAX_VIPS}\n")
    assert msg == (f"pool.yaml:{line}: vips[{MAX_VIPS}]: {MAX_VIPS + 1} VIPs: the data path "
                   f"holds at most {MAX_VIPS}")


def test_ring_memory_follows_the_tables(tmp_path: Path) -> None:
    """Each VIP's ring is a map of its own table size; their sum is bounded."""
    n = MAX_RING_SLOTS // 65537  # VIPs at the default size that fit
    assert len(parse_config(_pool(n, 1)).vips) == n
    text = _pool(n + 1, 1)
    msg = only_error(tmp_path, text)
    assert msg == (f"pool.yaml:1: vips: the VIPs' Maglev tables have {(n + 1) * 65537} slots in "
                   f"all ({(n + 1) * 65537 * 2 >> 20} MiB of kernel memory); the data path holds "
                   f"at most {MAX_RING_SLOTS}: give VIPs of few backends a smaller table "
                   "(vips[].maglev.table_size)")
    # The same VIPs with small tables of their own fit
    small = text.replace("    backends:\n", "    maglev: {table_size: 13}\n    backends:\n")
    cfg = parse_config(small)
    assert {cfg.table_size_of(v) for v in cfg.vips} == {13}


def test_vip_table_size_of_its_own(tmp_path: Path) -> None:
    base = MINIMAL.replace("    backends:\n", "    maglev:\n      table_size: {}\n    backends:\n")
    cfg = parse_config(base.format(1021) + "maglev:\n  table_size: 251\n")
    assert cfg.table_size_of(cfg.vips[0]) == 1021 and cfg.maglev.table_size == 251
    assert_error(errors(tmp_path, base.format(1000)), 7, "vips[0].maglev.table_size",
                 "1000 is not prime (nearest primes: 997, 1009)")
    seeded = base.format(5).replace("    maglev:", "    maglev:\n      seed: 1")
    assert_error(errors(tmp_path, seeded), 7, "vips[0].maglev.seed", "unknown key 'seed'")
    # Too small for the VIP's backends: the VIP's own key is blamed
    two = base.format(2).replace("  - address: 10.20.0.11\n",
                                 "  - address: 10.20.0.11\n      - address: 10.20.0.12\n")
    assert "2 is out of range" in errors(tmp_path, two)
    three = base.format(3).replace("- address: 10.20.0.11\n",
                                   "- address: 10.20.0.11\n      - address: 10.20.0.12\n"
                                   "      - address: 10.20.0.13\n")
    assert_error(errors(tmp_path, three), 7, "vips[0].maglev.table_size",
                 "Maglev table_size 3 must be greater than the number of backends (VIP 'web' "
                 "has 3)")


def test_backend_capacity_over_all_vips(tmp_path: Path) -> None:
    per_vip = MAX_BACKENDS // 4
    assert sum(len(v.backends) for v in parse_config(_pool(4, per_vip)).vips) == MAX_BACKENDS
    text = _pool(4, per_vip) + "      - address: 10.99.0.1\n"
    line = text.count("\n")
    assert only_error(tmp_path, text) == (
        f"pool.yaml:{line}: vips[3].backends[{per_vip}]: {MAX_BACKENDS + 1} backends over all "
        f"VIPs: the data path holds at most {MAX_BACKENDS}, and this is number "
        f"{MAX_BACKENDS + 1}")


def test_capacity_also_for_models_built_directly() -> None:
    vip = Vip(name="v", address="10.200.0.10", port=80, protocol="tcp",
              backends=[Backend(address="10.20.0.11")])
    with pytest.raises(pydantic.ValidationError, match="the data path holds at most"):
        Config(vips=[vip] * (MAX_VIPS + 1))


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("vips: " + "[\n" * 10_000 + "]\n" * 10_000, 16,
         f"nested more than {yamlread.MAX_DEPTH} levels deep"),
        ("vips:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(40)), 16, "nested more"),
        ("vips:\n  - name: " + "a" * 2000 + "\n", 2,
         f"a value of 2000 characters (at most {yamlread.MAX_VALUE_CHARS} accepted)"),
        ("vips:\n  - name: w\x00b\n", 2, "control character U+0000 in column 12"),
        ("vips:\n  - name: w\x1bb\n", 2, "control character U+001B in column 12"),
        ("vips: !!omap []\n", 1, "tag !!omap is not accepted"),
        ("vips: !!python/object:os.system {}\n", 1, "tag !!python/object:os.system"),
        ("vips: &a [*a]\n", 1, "recursive alias *a"),
        ("vips:\n  - port: 2001-13-45\n", 2, "cannot read '2001-13-45': month must be"),
        ("# " + "x" * (yamlread.MAX_LINE_CHARS) + "\n", 1, "a line of 4098 characters"),
    ],
)
def test_bounded_yaml(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc_info:
        load_config(path)
    assert_error(str(exc_info.value), line, "", fragment)
    assert len(exc_info.value.errors) == 1


def test_alias_bomb(tmp_path: Path) -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
              for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    text = "\n".join([*lines, "vips: *i"]) + "\n"
    msg = only_error(tmp_path, text)
    assert f"more than {yamlread.MAX_NODES} values once aliases are expanded" in msg
    over = next(n for n in range(1, 10) if 9**n > yamlread.MAX_NODES)  # line n: 9**n values
    assert msg.startswith(f"pool.yaml:{over}: ")  # at the alias that went over


def test_file_size_and_lines(tmp_path: Path) -> None:
    big = "# comment\n" * (yamlread.MAX_BYTES // 10 + 1)
    assert only_error(tmp_path, big) == (
        f"pool.yaml: the file is larger than {yamlread.MAX_BYTES} bytes (a pool.yaml at the "
        "data path's limits needs far less)")
    many = "\n" * yamlread.MAX_LINES
    msg = only_error(tmp_path, many)
    assert msg == f"pool.yaml: the file has more than {yamlread.MAX_LINES} lines"
    # Reading stops at the limit, whatever the file is.
    with pytest.raises(ConfigError, match="larger than"):
        load_config("/dev/zero")


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_bytes(b"vips:\n  - name: \xff\n")
    with pytest.raises(ConfigError, match=r"pool\.yaml:2: not valid UTF-8 \(byte 16\)"):
        load_config(path)


def test_backend_endpoint_serves_at_most_rev_targets_vips(tmp_path: Path) -> None:
    vips = [f"  - name: v{i}\n    address: 10.200.0.{i + 1}\n    port: {80 + i}\n"
            "    protocol: tcp\n    backends:\n      - address: 10.20.0.11\n        port: 8080\n"
            for i in range(REV_TARGETS + 1)]
    assert parse_config("vips:\n" + "".join(vips[:-1]))  # REV_TARGETS VIPs: fine
    text = "vips:\n" + "".join(vips)
    assert_error(errors(tmp_path, text), _line_of(text, f"name: v{REV_TARGETS}") + 5,
                 f"vips[{REV_TARGETS}].backends[0]",
                 f"serves more than {REV_TARGETS} VIPs")
    udp = text.replace("protocol: tcp", "protocol: udp", 1)  # another endpoint: fine
    assert parse_config(udp)
    # fullnat and dsr replies do not go by the endpoint: any number of VIPs may share it
    fnat = text.replace("    protocol: tcp\n", "    protocol: tcp\n    forwarding: fullnat\n")
    assert len(parse_config(fnat).vips) == REV_TARGETS + 1


# --- forwarding modes ------------------------------------------------------------------------


def mode_vip(*lines: str, backend: str = "      - address: 10.20.0.11\n") -> str:
    """MINIMAL with mode keys after its protocol line (line 6 on) and its one backend."""
    keys = "".join(f"    {line}\n" for line in lines)
    return MINIMAL.replace("    backends:\n      - address: 10.20.0.11\n",
                           keys + "    backends:\n" + backend)


def test_forwarding_modes_parse_with_their_defaults() -> None:
    nat = parse_config(MINIMAL).vips[0]
    assert (nat.forwarding, nat.mode, nat.encap, nat.source) == ("nat", "nat", None, None)
    dsr = parse_config(mode_vip("forwarding: dsr")).vips[0]
    assert dsr.mode == "dsr-ipip"
    assert parse_config(mode_vip("forwarding: dsr", "encap: l2")).vips[0].mode == "dsr-l2"
    fn = parse_config(mode_vip("forwarding: fullnat")).vips[0]
    assert (fn.mode, fn.source, fn.port_range) == ("fullnat", None, (1024, 32767))
    fn = parse_config(mode_vip("forwarding: fullnat", "source: 10.20.0.1",
                               "source_ports: 2000-2999")).vips[0]
    assert (fn.source, fn.port_range) == (IPv4Address("10.20.0.1"), (2000, 2999))


@pytest.mark.parametrize(("lines", "line", "path", "fragment"), [
    (("forwarding: nat", "encap: l2"), 7, "vips[0].encap", "only used with forwarding: dsr"),
    (("forwarding: dsr", "source: 10.20.0.1"), 7, "vips[0].source",
     "only used with forwarding: fullnat"),
    (("source_ports: 2000-3000",), 6, "vips[0].source_ports", "only used with forwarding"),
    (("forwarding: fullnat", "source_ports: 3000-2000"), 7, "vips[0].source_ports",
     "first <= last"),
    (("forwarding: fullnat", "source_ports: 0-10"), 7, "vips[0].source_ports", "1-65535"),
    (("forwarding: fullnat", "source_ports: lots"), 7, "vips[0].source_ports",
     "is not a port range"),
    (("forwarding: fullnat", "source: 127.0.0.1"), 7, "vips[0].source", "loopback"),
    (("forwarding: tunnel",), 6, "vips[0].forwarding", "nat"),
    (("forwarding: dsr", "encap: gre"), 7, "vips[0].encap", "ipip"),
])
def test_mode_keys_refused(tmp_path: Path, lines: tuple[str, ...], line: int, path: str,
                           fragment: str) -> None:
    assert_error(errors(tmp_path, mode_vip(*lines)), line, path, fragment)


def test_dsr_refuses_a_rewritten_port(tmp_path: Path) -> None:
    text = mode_vip("forwarding: dsr", backend="      - address: 10.20.0.11\n"
                                              "        port: 8080\n")
    assert_error(errors(tmp_path, text), 9, "vips[0].backends[0].port",
                 "dsr cannot rewrite ports")


def test_fullnat_ports_must_avoid_the_hosts_ephemeral_range(tmp_path: Path) -> None:
    """Only where the agent runs (it knows ip_local_port_range and its own addresses): the
    default source is always one of the host's, an explicit one only when it is local."""
    path = write(tmp_path, mode_vip("forwarding: fullnat", "source_ports: 30000-40000"))
    load_config(path)  # check-config elsewhere: no host to compare with
    with pytest.raises(ConfigError) as e:
        load_config(path, local_port_range=(32768, 60999))
    assert_error(str(e.value), 7, "vips[0].source_ports", "overlap the host's "
                 "ip_local_port_range 32768-60999")
    load_config(path, local_port_range=(50000, 60999))
    other = tmp_path / "other.yaml"
    other.write_text(mode_vip("forwarding: fullnat", "source: 10.20.0.9",
                              "source_ports: 30000-40000"))
    load_config(other, local_port_range=(32768, 60999))  # not the host's address
    with pytest.raises(ConfigError):
        load_config(other, local_addresses={IPv4Address("10.20.0.9")},
                    local_port_range=(32768, 60999))
    cfg = load_config(path)
    with pytest.raises(ConfigError) as e:  # as the agent checks a config given at attach
        check_backends_not_local(cfg, set(), str(path), (32768, 60999))
    assert "source_ports" in str(e.value)


def test_scheduler_default_and_names(tmp_path: Path) -> None:
    from typing import get_args

    from xdplb.config.schema import SchedulerName
    from xdplb.inspect.catalog import SCHEDULER_NAMES
    from xdplb.model.desired import SCHEDULERS

    assert parse_config(MINIMAL).vips[0].scheduler == "maglev"
    for name in get_args(SchedulerName):
        assert parse_config(mode_vip(f"scheduler: {name}")).vips[0].scheduler == name
    # the agent's and the readers' names are pool.yaml's
    assert set(SCHEDULERS) == set(get_args(SchedulerName))
    assert {v: k for k, v in SCHEDULERS.items()} == SCHEDULER_NAMES
    assert_error(errors(tmp_path, mode_vip("scheduler: fastest")), 6, "vips[0].scheduler",
                 "'fastest' is not valid (expected 'maglev', 'wrr'")


def test_least_conn_compares_at_most_64_backends(tmp_path: Path) -> None:
    many = "".join(f"      - address: 10.20.{i // 250}.{i % 250 + 1}\n" for i in range(65))
    assert_error(errors(tmp_path, mode_vip("scheduler: least-conn", backend=many)), 6,
                 "vips[0].scheduler", "least-conn compares at most 64 backends")
    text = mode_vip("scheduler: least-conn", backend=many.rsplit("      - ", 1)[0])
    assert parse_config(text).vips[0].scheduler == "least-conn"
