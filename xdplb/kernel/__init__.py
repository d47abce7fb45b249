"""The kernel interfaces: bpf(2), typed maps, XDP attach over netlink, the BCC loader."""
