/* ICMP errors about balanced traffic, steered and translated like the flow they are about
 * (as Katran and Cilium do): routers and hosts signal "unreachable", "time exceeded" and
 * "fragmentation needed" with a copy of the offending packet's headers, and the socket that
 * sent it matches the error by that copy. Through NAT, both the copy and the error's
 * addresses must be translated, or no socket ever recognises it.
 * - To a VIP address, quoting a packet the VIP sent (a reply, VIP -> client): to the flow's
 *   backend, with the outer destination and the quoted source (and port) rewritten back to
 *   the backend (xl_icmp_to_backend).
 * - Toward a client, quoting a packet the client sent to a backend (after its DNAT), from a
 *   router on the backends' side or from the backend itself: the quoted destination (and
 *   port) rewritten to the VIP, and the error's source too when it is the backend
 *   (xl_icmp_to_client).
 * Errors about no tracked flow pass to the kernel untouched. */
#pragma once

#define XL_ICMP_PARAMETERPROB 12

/* The quoted IPv4 header (no options, TCP or UDP, not a later fragment) of an ICMP error,
 * with the first 8 bytes of its payload in the packet; NULL when there is none. */
static __always_inline struct iphdr *xl_icmp_quote(struct xdp_md *ctx, struct xl_pkt *p)
{
    struct icmphdr *ic = p->icmp;
    if (!ic || (ic->type != XL_ICMP_DEST_UNREACH && ic->type != XL_ICMP_TIME_EXCEEDED &&
                ic->type != XL_ICMP_PARAMETERPROB))
        return NULL;
    void *data_end = (void *)(long)ctx->data_end;
    void *end = (void *)p->ip + bpf_ntohs(p->ip->tot_len); /* parse_l3: within the frame */
    struct iphdr *in = (void *)(ic + 1);
    if ((void *)(in + 1) + 8 > data_end || (void *)(in + 1) + 8 > end)
        return NULL;
    if (in->version != 4 || in->ihl != 5 || (in->frag_off & bpf_htons(XL_IP_OFFMASK)) ||
        (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP))
        return NULL;
    return in;
}

/* Rewrite a quoted address (and port, unless new_port is 0): the quoted header's checksum,
 * a quoted UDP checksum (its pseudo-header holds the address), and the ICMP checksum over
 * every word that changed. */
static __always_inline void xl_quote_rewrite(struct icmphdr *ic, struct iphdr *in,
                                             __be32 *addr, __be32 new_addr, __be16 *port,
                                             __be16 new_port)
{
    __u16 sum = ic->checksum;
    __be32 old_addr = *addr;
    __u16 old_check = in->check;
    xl_set_addr(in, addr, new_addr);
    sum = xl_csum_replace4(sum, old_addr, new_addr);
    sum = xl_csum_replace2(sum, old_check, in->check);
    __be16 old_port = *port;
    if (new_port && new_port != old_port) {
        *port = new_port;
        sum = xl_csum_replace2(sum, old_port, new_port);
    }
    if (in->protocol == IPPROTO_UDP) {
        struct udphdr *uh = (void *)(in + 1); /* xl_icmp_quote: 8 bytes there */
        __u16 old_u = uh->check;
        __u16 u = xl_csum_replace4(old_u, old_addr, new_addr);
        if (*port != old_port)
            u = xl_csum_replace2(u, old_port, *port);
        u = xl_udp_fixup(old_u, u);
        uh->check = u;
        sum = xl_csum_replace2(sum, old_u, u);
    }
    ic->checksum = xl_icmp_fixup(sum);
}

/* To a VIP address, about a packet the VIP sent: to the backend of that packet's flow. */
static __always_inline int xl_icmp_to_backend(struct xdp_md *ctx, struct xl_pkt *p,
                                              struct iphdr *in)
{
    struct udphdr *q = (void *)(in + 1); /* TCP's ports sit where UDP's do */
    struct xl_flow_key fk = {};
    /* the quote is the VIP's packet to the client: its flow is the reverse */
    xl_flow_key_of(&fk, in->daddr, in->saddr, q->dest, q->source, in->protocol);
    struct xl_flow *f = in->saddr == p->ip->daddr ? xl_flow_find(&fk) : NULL;
    __u32 bid = f ? f->backend_id : 0;
    struct xl_backend *be = f ? backends.lookup(&bid) : NULL;
    /* nat flows only: a fullnat or dsr backend's packets did not leave as the quote shows */
    if (!be || f->mode != XL_MODE_NAT || !(be->flags & XL_BACKEND_VALID) ||
        *(__u32 *)be->vip_addr != in->saddr ||
        be->vip_port != q->source || be->vip_proto != in->protocol) {
        return xl_pass(XL_C_PASS_NOT_VIP);
    }
    if (xl_ttl_expired(p->ip))
        return xl_pass(XL_C_PASS_TTL);
    __be32 to = *(__u32 *)be->addr;
    struct xl_next_hop tmp;
    __u16 too_big = 0; /* an error has no transport header: never bounced */
    struct xl_next_hop *h = xl_route(ctx, p, NULL, &tmp, bpf_ktime_get_coarse_ns(),
                                     p->ip->saddr, to, &too_big);
    xl_set_addr(p->ip, &p->ip->daddr, to);
    xl_quote_rewrite(p->icmp, in, &in->saddr, to, &q->source, be->port);
    xl_count(XL_C_ICMP_TO_BACKEND);
    return xl_send(p, h);
}

/* fullnat: an error about a packet of flow ``fk`` as it left (from our address and the
 * flow's port to the backend), from a router on the way or the backend itself: to the
 * client, quoting the client's packet as the client sent it (to VIP:port). */
static __always_inline int xl_icmp_fnat_to_client(struct xdp_md *ctx, struct xl_pkt *p,
                                                  struct iphdr *in, struct xl_flow_key *fk)
{
    struct udphdr *q = (void *)(in + 1);
    if (xl_ttl_expired(p->ip))
        return xl_pass(XL_C_PASS_TTL);
    __be32 vip = *(__u32 *)fk->dst, client = *(__u32 *)fk->src;
    int from_backend = p->ip->saddr == in->daddr;
    struct xl_next_hop tmp;
    __u16 too_big = 0;
    struct xl_next_hop *h = xl_route(ctx, p, NULL, &tmp, bpf_ktime_get_coarse_ns(),
                                     from_backend ? vip : p->ip->saddr, client, &too_big);
    if (from_backend)
        xl_set_addr(p->ip, &p->ip->saddr, vip);
    xl_set_addr(p->ip, &p->ip->daddr, client);
    xl_quote_rewrite(p->icmp, in, &in->saddr, client, &q->source, fk->sport);
    xl_quote_rewrite(p->icmp, in, &in->daddr, vip, &q->dest, fk->dport);
    xl_count(XL_C_ICMP_TO_CLIENT);
    return xl_send(p, h);
}

/* Toward a client, about a packet it sent to a backend of a tracked flow: translated back
 * to the VIP. fullnat's errors come to our own address instead (xl_icmp_fnat_to_client). */
static __always_inline int xl_icmp_to_client(struct xdp_md *ctx, struct xl_pkt *p,
                                             struct iphdr *in)
{
    struct udphdr *q = (void *)(in + 1);
    if (in->saddr == p->ip->daddr && xl_maybe(in->saddr, XL_ADDR_MAYBE_LB_SOURCE)) {
        struct xl_flow_key fk;
        if (xl_fnat_find(in->saddr, q->source, in->daddr, q->dest, in->protocol, &fk))
            return xl_icmp_fnat_to_client(ctx, p, in, &fk);
    }
    struct xl_rev_nat *rn = in->saddr == p->ip->daddr ?
                            xl_rev_lookup(in->daddr, q->dest, in->protocol) : NULL;
    struct xl_rev_target *t = NULL;
    struct xl_flow *f = rn ? xl_reply_flow(in->saddr, q->source, in->protocol, rn, &t) : NULL;
    if (!f || !t)
        return xl_pass(XL_C_PASS_NOT_VIP);
    if (xl_ttl_expired(p->ip))
        return xl_pass(XL_C_PASS_TTL);
    __be32 vip = *(__u32 *)t->vip_addr;
    int from_backend = p->ip->saddr == in->daddr;
    struct xl_next_hop tmp;
    __u16 too_big = 0;
    struct xl_next_hop *h = xl_route(ctx, p, NULL, &tmp, bpf_ktime_get_coarse_ns(),
                                     from_backend ? vip : p->ip->saddr, p->ip->daddr,
                                     &too_big);
    if (from_backend)
        xl_set_addr(p->ip, &p->ip->saddr, vip);
    xl_quote_rewrite(p->icmp, in, &in->daddr, vip, &q->dest, t->vip_port);
    xl_count(XL_C_ICMP_TO_CLIENT);
    return xl_send(p, h);
}

/* dsr/ipip: "fragmentation needed" from a router between us and a backend, about an outer
 * packet we sent (from our address, protocol 4): the path to the backend is smaller than we
 * knew. In DSR we never see the backend's SYN-ACK, so we cannot clamp the MSS: the client
 * must learn it, so it gets "fragmentation needed" quoting its own packet (the inner one,
 * which the router quoted after the outer header), with the MTU less the outer header,
 * from the VIP. Is it such an error? The MTU for the client, or 0 (the caller goes on). */
static __always_inline __u16 xl_icmp_tunnel_mtu(struct xdp_md *ctx, struct xl_pkt *p)
{
    struct icmphdr *ic = p->icmp;
    if (ic->type != XL_ICMP_DEST_UNREACH || ic->code != XL_ICMP_FRAG_NEEDED)
        return 0;
    void *data_end = (void *)(long)ctx->data_end;
    void *end = (void *)p->ip + bpf_ntohs(p->ip->tot_len); /* parse_l3: within the frame */
    struct iphdr *outer = (void *)(ic + 1);
    struct iphdr *in = outer + 1;
    if ((void *)(in + 1) + 8 > data_end || (void *)(in + 1) + 8 > end)
        return 0;
    if (outer->version != 4 || outer->ihl != 5 || outer->protocol != IPPROTO_IPIP ||
        outer->saddr != p->ip->daddr || in->version != 4 || in->ihl != 5 ||
        (in->frag_off & bpf_htons(XL_IP_OFFMASK)) ||
        (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP))
        return 0;
    __u16 mtu = bpf_ntohs(ic->un.frag.mtu);
    if (mtu < XL_IPIP_OVERHEAD + 68) /* none given (an old router), or nonsense */
        return 0;
    struct udphdr *q = (void *)(in + 1);
    struct xl_flow_key fk = {};
    xl_flow_key_of(&fk, in->saddr, in->daddr, q->source, q->dest, in->protocol);
    struct xl_flow *f = xl_flow_find(&fk);
    __u32 bid = f ? f->backend_id : 0;
    struct xl_backend *be = f && f->mode == XL_MODE_DSR_IPIP ? backends.lookup(&bid) : NULL;
    if (!be || *(__u32 *)be->addr != outer->daddr)
        return 0;
    return mtu - XL_IPIP_OVERHEAD;
}

/* Send xl_icmp_tunnel_mtu's answer: the client gets "fragmentation needed" with ``mtu``. */
static __always_inline int xl_icmp_tunnel_send(struct xdp_md *ctx, struct xl_pkt *p, __u16 mtu)
{
    void *data_end;
    struct iphdr *in = (void *)(p->icmp + 1) + sizeof(struct iphdr);
    /* The quoted client packet becomes the frame's packet (an Ethernet header in front of
     * it, in the bytes before it), and then the error that quotes it. */
    int strip = (int)((void *)in - (void *)p->ip);
    __u8 ours[ETH_ALEN], theirs[ETH_ALEN];
    __builtin_memcpy(ours, p->eth->h_dest, ETH_ALEN);
    __builtin_memcpy(theirs, p->eth->h_source, ETH_ALEN);
    if (bpf_xdp_adjust_head(ctx, strip))
        return XDP_ABORTED;
    void *data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    struct xl_pkt e = {};
    e.eth = data;
    e.ip = data + ETH_HLEN;
    if ((void *)e.ip + XL_ICMP_QUOTE > data_end)
        return XDP_ABORTED;
    /* The builder swaps them: the error is addressed to our MAC, as the kernel wants it if
     * it must route it; sent by us, the next hop's MACs replace both */
    __builtin_memcpy(e.eth->h_dest, theirs, ETH_ALEN);
    __builtin_memcpy(e.eth->h_source, ours, ETH_ALEN);
    e.eth->h_proto = bpf_htons(ETH_P_IP);
    if (xl_icmp_build(ctx, &e, XL_ICMP_DEST_UNREACH, XL_ICMP_FRAG_NEEDED,
                      bpf_htonl(mtu)))
        return XDP_ABORTED;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    e.eth = data;
    e.ip = data + ETH_HLEN;
    if ((void *)(e.ip + 1) > data_end)
        return XDP_ABORTED;
    struct xl_next_hop tmp;
    __u16 too_big = 0;
    struct xl_next_hop *h = xl_route(ctx, &e, NULL, &tmp, bpf_ktime_get_coarse_ns(),
                                     e.ip->saddr, e.ip->daddr, &too_big);
    xl_count(XL_C_ICMP_TO_CLIENT);
    if (!h)
        return XDP_PASS; /* the kernel routes it (from the VIP: no address of ours) */
    return xl_out(e.eth, h);
}
