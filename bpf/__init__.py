"""The XDP program's C sources, shipped as package data (xdplb.bpf) so that an installed
xdplb can compile them with BCC. Split by concern: parse.h, csum.h, hash.h, nat.h, xdplb.c."""
