"""xdplb: an XDP/eBPF L3/L4 load balancer with Maglev consistent hashing."""

__version__ = "0.1.0"
