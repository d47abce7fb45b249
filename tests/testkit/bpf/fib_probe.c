/* Not part of the data path: a test helper that runs bpf_fib_lookup exactly as
 * xl_fib_forward() does, on parameters carried in the frame, and writes the answer back
 * into it. tests/test_fib.py holds xdplb/userspace/fib.py (the scapy data path's FIB) to it.
 * layout.h is included only because the loader expects the data path's maps. */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>

#include "layout.h"

struct xl_fib_probe {
    __u8 eth[14];
    __be32 daddr;      /* in */
    __be32 saddr;
    __u8 tos;
    __u8 proto;
    __u16 tot_len;     /* host order; out: mtu_result */
    __s32 rc;          /* out */
    __u32 ifindex;
    __u8 smac[6];
    __u8 dmac[6];
    __be32 nexthop;    /* out: ipv4_dst after the lookup (the gateway, or daddr on link) */
} __attribute__((packed));

int xdplb_main(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct xl_fib_probe *q = data;
    if ((void *)(q + 1) > data_end)
        return XDP_ABORTED;
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.tos = q->tos;
    fib.l4_protocol = q->proto;
    fib.tot_len = q->tot_len;
    fib.ipv4_src = q->saddr;
    fib.ipv4_dst = q->daddr;
    fib.ifindex = ctx->ingress_ifindex;
    q->rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    q->tot_len = fib.mtu_result; /* FRAG_NEEDED: the MTU (a union with tot_len) */
    q->ifindex = fib.ifindex;
    __builtin_memcpy(q->smac, fib.smac, 6);
    __builtin_memcpy(q->dmac, fib.dmac, 6);
    q->nexthop = fib.ipv4_dst;
    return XDP_PASS;
}
