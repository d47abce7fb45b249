/* Address/port rewriting with checksum updates, TTL decrement, and the next hop
 * through bpf_fib_lookup (XDP_TX, XDP_REDIRECT or back to the kernel). */
#pragma once

#include "csum.h"

static __always_inline void xl_count(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        *v += 1;
}

/* Hand the packet to the kernel untouched, counted as ``idx`` (its outcome). */
static __always_inline int xl_pass(__u32 idx)
{
    xl_count(idx);
    return XDP_PASS;
}

/* The IPv4 address at *addr (saddr or daddr) and the header checksum: all that a fragment
 * without the L4 header needs. */
static __always_inline void xl_set_addr(struct iphdr *ip, __be32 *addr, __be32 new_addr)
{
    ip->check = xl_csum_replace4(ip->check, *addr, new_addr);
    *addr = new_addr;
}

/* Rewrite the IPv4 address at *addr (saddr or daddr) and, when new_port != 0, the port at
 * *port. The L4 checksum covers the address through the pseudo-header. */
static __always_inline void xl_rewrite(struct xl_pkt *p, __be32 *addr, __be32 new_addr,
                                       __be16 *port, __be16 new_port)
{
    __be32 old_addr = *addr;
    __u16 l4_old = *p->l4_check;
    __u16 l4 = xl_csum_replace4(l4_old, old_addr, new_addr);

    xl_set_addr(p->ip, addr, new_addr);
    if (new_port && new_port != *port) {
        l4 = xl_csum_replace2(l4, *port, new_port);
        *port = new_port;
    }
    if (p->proto == IPPROTO_UDP)
        l4 = xl_udp_fixup(l4_old, l4);
    *p->l4_check = l4;
}

/* TTL 1 or less: the next hop would discard it, so the sender gets Time Exceeded and
 * traceroute through a VIP shows the balancer's hop. To a VIP the program sends it (the
 * kernel, with no route to its own VIP, would answer "net unreachable"); a reply goes to
 * the kernel untouched, which routes it and sends the error itself. */
static __always_inline int xl_ttl_expired(struct iphdr *ip)
{
    return ip->ttl <= 1;
}

static __always_inline void xl_decrement_ttl(struct iphdr *ip)
{
    /* TTL shares a 16-bit checksum word with the protocol byte. */
    xl_set_byte(&ip->ttl, ip->ttl - 1, &ip->check);
}

/* May a packet too long for its next hop be answered with "fragmentation needed"? It must
 * have DF set (else the kernel fragments it) and a plain IPv4 header and transport header
 * to quote (an error quotes the header and 8 bytes). */
static __always_inline int xl_may_bounce(struct xl_pkt *p)
{
    return (p->ip->frag_off & bpf_htons(XL_IP_DF)) && !p->frag && !p->options && p->sport;
}

/* Look the next hop up for the packet as it will be once rewritten (from ``saddr`` to
 * ``daddr``; the packet itself is not touched yet, so that an error can still quote it as
 * sent) and, when the flow has a cache for this direction, remember it. ``overhead``:
 * bytes an encapsulation will add, so that the MTU check and the MTU reported hold for the
 * packet that leaves. ``mode`` (XL_MODE_*) is how it will leave: in nat the kernel can
 * take over a packet we cannot send ourselves; in the other modes it cannot (it knows
 * nothing of the mode, and the balancer's own source address arriving on a port is a
 * martian to it), and dsr/l2 also needs the backend on a local segment (the lookup names a
 * gateway in ipv4_dst). Returns the hop to use, or NULL: the kernel must take the packet
 * (nat) or it is dropped (the others), counted, or, with ``*too_big`` set to the MTU the
 * sender must use, the sender gets "fragmentation needed". */
static __always_inline struct xl_next_hop *xl_resolve(struct xdp_md *ctx, struct xl_pkt *p,
                                                      struct xl_next_hop *nh,
                                                      struct xl_next_hop *tmp, __u64 now,
                                                      __be32 saddr, __be32 daddr,
                                                      __u16 overhead, __u8 mode,
                                                      __u16 *too_big)
{
    struct bpf_fib_lookup fib = {};
    struct iphdr *ip = p->ip;
    __u32 in = ctx->ingress_ifindex;

    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    fib.tot_len = bpf_ntohs(ip->tot_len) + overhead;
    fib.ipv4_src = saddr;
    fib.ipv4_dst = daddr;
    fib.ifindex = in;

    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    xl_count(XL_C_FIB_LOOKUP);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
        if (nh)
            nh->ns = 0;
        xl_count(XL_C_FIB_MISS);
        if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && xl_may_bounce(p) &&
            fib.mtu_result > overhead) {
            *too_big = fib.mtu_result - overhead; /* mtu_result shares tot_len's place */
            return NULL;
        }
        /* NO_NEIGH: the kernel resolves ARP and forwards; FRAG_NEEDED without DF: it
         * fragments; others: it decides (ICMP...). */
        xl_count(mode == XL_MODE_NAT ? XL_C_PASS_FIB : XL_C_DROP_NEXT_HOP);
        return NULL;
    }
    if (mode == XL_MODE_DSR_L2 && fib.ipv4_dst != daddr) {
        if (nh)
            nh->ns = 0;
        xl_count(XL_C_DROP_NOT_ON_LINK);
        return NULL;
    }
    __u32 egress = fib.ifindex;
    __u32 tx_slot = XL_NO_TX_SLOT;
    if (egress != in) {
        __u32 *slot = tx_ports.lookup(&egress);
        if (!slot) {
            if (nh)
                nh->ns = 0;
            xl_count(mode == XL_MODE_NAT ? XL_C_PASS_FOREIGN_EGRESS : XL_C_DROP_NEXT_HOP);
            return NULL;
        }
        tx_slot = *slot;
    }
    struct xl_next_hop *h = nh ? nh : tmp;
    h->ns = now;
    h->in_ifindex = in;
    h->out_ifindex = egress;
    h->tx_slot = tx_slot;
    __builtin_memcpy(h->daddr, &daddr, 4);
    h->max_len = bpf_ntohs(ip->tot_len);
    h->tos = ip->tos;
    __builtin_memcpy(h->dmac, fib.dmac, ETH_ALEN);
    __builtin_memcpy(h->smac, fib.smac, ETH_ALEN);
    return h;
}

/* The next hop of a packet about to be rewritten to (saddr, daddr): the flow's cached one
 * (``nh``, NULL when the packet has no flow entry) while it is fresh, else by
 * bpf_fib_lookup. The cache is used only for packets from the same ingress, to the same
 * destination (a flow's backend id may now name another address), with the same TOS (routes
 * may depend on it) and no longer than the one whose lookup filled it, so the lookup's MTU
 * check still holds. NULL: see xl_resolve. */
static __always_inline struct xl_next_hop *xl_route_mode(struct xdp_md *ctx, struct xl_pkt *p,
                                                         struct xl_next_hop *nh,
                                                         struct xl_next_hop *tmp, __u64 now,
                                                         __be32 saddr, __be32 daddr,
                                                         __u16 overhead, __u8 mode,
                                                         __u16 *too_big)
{
    __u32 zero = 0;
    struct xl_meta *m = NULL;

    if (nh && nh->ns) /* only a filled cache needs its TTL: new flows skip the load */
        m = meta.lookup(&zero);
    if (!m || now - nh->ns >= m->next_hop_ttl_ns || nh->in_ifindex != ctx->ingress_ifindex ||
        *(__be32 *)nh->daddr != daddr || bpf_ntohs(p->ip->tot_len) > nh->max_len || p->ip->tos != nh->tos)
        return xl_resolve(ctx, p, nh, tmp, now, saddr, daddr, overhead, mode, too_big);
    return nh;
}

/* xl_route_mode for a packet that leaves as it is rewritten (nat: the kernel may take it). */
static __always_inline struct xl_next_hop *xl_route(struct xdp_md *ctx, struct xl_pkt *p,
                                                    struct xl_next_hop *nh,
                                                    struct xl_next_hop *tmp, __u64 now,
                                                    __be32 saddr, __be32 daddr,
                                                    __u16 *too_big)
{
    return xl_route_mode(ctx, p, nh, tmp, now, saddr, daddr, 0, XL_MODE_NAT, too_big);
}

/* Send a rewritten packet by its next hop ``h`` (NULL: to the kernel, as routed). TTL was
 * checked (> 1) by the caller; it is decremented only when we forward ourselves: a packet
 * handed to the kernel is decremented by the kernel's own forwarding. */
static __always_inline int xl_out(struct ethhdr *eth, struct xl_next_hop *h)
{
    __builtin_memcpy(eth->h_dest, h->dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, h->smac, ETH_ALEN);
    if (h->tx_slot == XL_NO_TX_SLOT) {
        xl_count(XL_C_TX);
        return XDP_TX;
    }
    xl_count(XL_C_REDIRECT);
    return tx_devs.redirect_map(h->tx_slot, 0);
}

static __always_inline int xl_send(struct xl_pkt *p, struct xl_next_hop *h)
{
    if (!h)
        return XDP_PASS;
    xl_decrement_ttl(p->ip);
    return xl_out(p->eth, h);
}

/* dsr/ipip: the packet (TTL decremented: the balancer is a hop) wrapped in an outer IPv4
 * header from ``src`` (the balancer's own address, so that ICMP errors about it come back
 * here) to the backend ``dst``, TOS and DF copied from the inner header, and sent by ``h``
 * (whose lookup covered the outer header). ``p`` is stale afterwards. */
static __always_inline int xl_send_ipip(struct xdp_md *ctx, struct xl_pkt *p,
                                        struct xl_next_hop *h, __be32 src, __be32 dst)
{
    struct iphdr *in = p->ip;
    xl_decrement_ttl(in);
    __u16 len = bpf_ntohs(in->tot_len) + XL_IPIP_OVERHEAD;
    __u8 tos = in->tos;
    __be16 id = in->id;
    __be16 df = in->frag_off & bpf_htons(XL_IP_DF);
    if (bpf_xdp_adjust_head(ctx, -XL_IPIP_OVERHEAD))
        return XDP_ABORTED; /* no headroom: never on a driver that runs XDP */
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *out = data + sizeof(*eth);
    if ((void *)(out + 1) > data_end)
        return XDP_ABORTED;
    eth->h_proto = bpf_htons(ETH_P_IP);
    out->version = 4;
    out->ihl = 5;
    out->tos = tos;
    out->tot_len = bpf_htons(len);
    out->id = id;
    out->frag_off = df;
    out->ttl = XL_OUTER_TTL;
    out->protocol = IPPROTO_IPIP;
    out->check = 0;
    out->saddr = src;
    out->daddr = dst;
    out->check = xl_csum_words((__u16 *)out, 10);
    xl_count(XL_C_IPIP_ENCAP);
    return xl_out(eth, h);
}
