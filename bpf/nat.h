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

/* Look the next hop up and, when the flow has a cache for this direction, remember it.
 * Returns the hop to use, or NULL when the kernel must take the packet (counted). */
static __always_inline struct xl_next_hop *xl_resolve(struct xdp_md *ctx, struct xl_pkt *p,
                                                      struct xl_next_hop *nh,
                                                      struct xl_next_hop *tmp, __u64 now)
{
    struct bpf_fib_lookup fib = {};
    struct iphdr *ip = p->ip;
    __u32 in = ctx->ingress_ifindex;

    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    fib.tot_len = bpf_ntohs(ip->tot_len);
    fib.ipv4_src = ip->saddr;
    fib.ipv4_dst = ip->daddr;
    fib.ifindex = in;

    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    xl_count(XL_C_FIB_LOOKUP);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
        /* NO_NEIGH: the kernel resolves ARP and forwards; others: it decides (ICMP...). */
        if (nh)
            nh->ns = 0;
        xl_count(XL_C_FIB_MISS);
        xl_count(XL_C_PASS_FIB);
        return NULL;
    }
    __u32 egress = fib.ifindex;
    __u32 tx_slot = XL_NO_TX_SLOT;
    if (egress != in) {
        __u32 *slot = tx_ports.lookup(&egress);
        if (!slot) {
            if (nh)
                nh->ns = 0;
            xl_count(XL_C_PASS_FOREIGN_EGRESS);
            return NULL;
        }
        tx_slot = *slot;
    }
    struct xl_next_hop *h = nh ? nh : tmp;
    h->ns = now;
    h->in_ifindex = in;
    h->out_ifindex = egress;
    h->tx_slot = tx_slot;
    h->max_len = bpf_ntohs(ip->tot_len);
    __builtin_memcpy(h->dmac, fib.dmac, ETH_ALEN);
    __builtin_memcpy(h->smac, fib.smac, ETH_ALEN);
    return h;
}

/* Send a rewritten packet on its way: by the flow's cached next hop (``nh``, NULL when the
 * packet has no flow entry) while it is fresh, else by bpf_fib_lookup. The cache is used
 * only for packets from the same ingress no longer than the one whose lookup filled it,
 * so the lookup's MTU check still holds. TTL was checked (> 1) by the caller; it is
 * decremented only when we forward ourselves: a packet handed to the kernel is
 * decremented by the kernel's own forwarding. */
static __always_inline int xl_fib_forward(struct xdp_md *ctx, struct xl_pkt *p,
                                          struct xl_next_hop *nh, __u64 now)
{
    struct iphdr *ip = p->ip;
    struct xl_next_hop *h = nh;
    struct xl_next_hop tmp;
    __u32 zero = 0;
    struct xl_meta *m = NULL;

    if (nh && nh->ns) /* only a filled cache needs its TTL: new flows skip the load */
        m = meta.lookup(&zero);
    if (!m || now - nh->ns >= m->next_hop_ttl_ns || nh->in_ifindex != ctx->ingress_ifindex ||
        bpf_ntohs(ip->tot_len) > nh->max_len) {
        h = xl_resolve(ctx, p, nh, &tmp, now);
        if (!h)
            return XDP_PASS;
    }
    xl_decrement_ttl(ip);
    __builtin_memcpy(p->eth->h_dest, h->dmac, ETH_ALEN);
    __builtin_memcpy(p->eth->h_source, h->smac, ETH_ALEN);
    if (h->tx_slot == XL_NO_TX_SLOT) {
        xl_count(XL_C_TX);
        return XDP_TX;
    }
    xl_count(XL_C_REDIRECT);
    return tx_devs.redirect_map(h->tx_slot, 0);
}
