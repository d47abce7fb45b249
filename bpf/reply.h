/* Backend -> client: the reverse NAT. Its table (rev_nat) is written by the agent, never by
 * the program, so nothing per flow can be lost while the flow lives:
 * - A reply with ports (options or not) is rewritten when the forward flow it answers is
 *   tracked. The endpoint entry (backend address, port, protocol) lists the VIPs the
 *   endpoint serves; the flow key is rebuilt for each (client from the reply's destination)
 *   and the first whose flow names this backend wins, else the first tracked at all (a
 *   backend's late replies after its flow moved on). Untracked: passed untouched, as the
 *   host's own connections to a backend (health checks) must be.
 * - Fragments carry no ports past the first, so they are rewritten without the flow table,
 *   by the address entry (backend address, any port, protocol): only when the address
 *   serves a single VIP address. A first fragment also needs its port mapped to a single
 *   VIP port and its TCP/UDP header in full. Any other fragment from a backend address is
 *   dropped (drop_reply_fragment): a reply never leaves with the backend's address.
 * Needs nat.h and flow.h. */
#pragma once

/* rev_nat's entry for (addr, port, proto); port XL_REV_ANY_PORT: the address entry. */
static __always_inline struct xl_rev_nat *xl_rev_lookup(__be32 addr, __be16 port, __u8 proto)
{
    struct xl_rev_key k = {};
    __builtin_memcpy(k.addr, &addr, 4);
    k.port = port;
    k.proto = proto;
    k.family = XL_FAMILY_IPV4;
    return rev_nat.lookup(&k);
}

/* The tracked flow a reply to client:cport answers and the VIP it goes back to (*target),
 * or NULL. */
static __always_inline struct xl_flow *xl_reply_flow(__be32 client, __be16 cport, __u8 proto,
                                                     struct xl_rev_nat *rn,
                                                     struct xl_rev_target **target)
{
    struct xl_flow_key fk = {};
    struct xl_flow *first = NULL;
    __builtin_memcpy(fk.src, &client, 4);
    fk.sport = cport;
    fk.proto = proto;
    fk.family = XL_FAMILY_IPV4;
#pragma unroll
    for (int i = 0; i < XL_REV_TARGETS; i++) {
        if (i >= rn->count)
            break;
        struct xl_rev_target *t = &rn->targets[i];
        __builtin_memcpy(fk.dst, t->vip_addr, 4);
        fk.dport = t->vip_port;
        struct xl_flow *f = xl_flow_find(&fk);
        if (!f)
            continue;
        if (f->backend_id == t->backend_id) {
            *target = t;
            return f;
        }
        if (!first) {
            first = f;
            *target = t;
        }
    }
    return first;
}

/* Backend -> client reply of a tracked flow: rewrite the source back to the VIP. */
static __always_inline int xl_reply(struct xdp_md *ctx, struct xl_pkt *p, struct xl_flow *f,
                                    struct xl_rev_target *t)
{
    if (xl_ttl_expired(p->ip))
        return xl_pass(XL_C_PASS_TTL);
    __u64 now = bpf_ktime_get_coarse_ns();
    struct xl_next_hop *nh = xl_flow_seen(f, p, now, 1);
    xl_count(XL_C_REPLY);
    struct xl_next_hop tmp;
    __u16 too_big = 0;
    struct xl_next_hop *h = xl_route(ctx, p, nh, &tmp, now, *(__u32 *)t->vip_addr,
                                     p->ip->daddr, &too_big);
    if (too_big) /* to the backend, from the client: its own packet quoted */
        return xl_icmp_frag_needed(ctx, p, too_big);
    xl_rewrite(p, &p->ip->saddr, *(__u32 *)t->vip_addr, p->sport, t->vip_port);
    return xl_send(p, h);
}

/* A fragment's TCP/UDP header, when it is the first fragment and holds the whole header
 * (ports and checksum): fills p's port and checksum pointers. */
static __always_inline int xl_first_fragment_l4(struct xdp_md *ctx, struct xl_pkt *p)
{
    void *data_end = (void *)(long)ctx->data_end;
    struct iphdr *ip = p->ip;
    void *l4 = (void *)ip + ip->ihl * 4;
    void *end = (void *)ip + bpf_ntohs(ip->tot_len); /* within the frame: parse_l3 checked */
    struct udphdr *uh = l4; /* TCP has its ports where UDP has them */
    if ((void *)(uh + 1) > data_end || (void *)(uh + 1) > end)
        return 0;
    p->sport = &uh->source;
    p->dport = &uh->dest;
    p->l4_check = &uh->check;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end || (void *)(th + 1) > end)
            return 0;
        p->l4_check = &th->check;
    }
    return 1;
}

/* A fragment from a backend address (TCP/UDP): rewritten if it can be rewritten right,
 * else dropped; see the top of this file. */
static __always_inline int xl_reply_fragment(struct xdp_md *ctx, struct xl_pkt *p)
{
    struct iphdr *ip = p->ip;
    struct xl_rev_nat *an = xl_rev_lookup(ip->saddr, XL_REV_ANY_PORT, p->proto);
    if (!an)
        return xl_pass(XL_C_PASS_NOT_VIP);
    __be32 vip = *(__u32 *)an->targets[0].vip_addr;
    struct xl_rev_nat *en = NULL;
    int first = !(ip->frag_off & bpf_htons(XL_IP_OFFMASK));
    if (an->count == 1 && first && xl_first_fragment_l4(ctx, p))
        en = xl_rev_lookup(ip->saddr, *p->sport, p->proto);
    if (an->count != 1 ||
        (first && !(en && en->count == 1 && *(__u32 *)en->targets[0].vip_addr == vip))) {
        xl_count(XL_C_DROP_REPLY_FRAGMENT);
        return XDP_DROP;
    }
    if (xl_ttl_expired(ip))
        return xl_pass(XL_C_PASS_TTL);
    xl_count(XL_C_REPLY_FRAGMENT);
    if (en) /* the first fragment: its L4 checksum covers the whole datagram; incremental */
        xl_rewrite(p, &ip->saddr, vip, p->sport, en->targets[0].vip_port);
    else
        xl_set_addr(ip, &ip->saddr, vip);
    /* Already rewritten: a fragment is never bounced (xl_may_bounce), so the lookup is for
     * the packet as it now is. */
    struct xl_next_hop tmp;
    __u16 too_big = 0;
    return xl_send(p, xl_route(ctx, p, NULL, &tmp, bpf_ktime_get_coarse_ns(), ip->saddr,
                               ip->daddr, &too_big));
}

/* A packet from a possible backend address that is not VIP traffic: a reply, a reply's
 * fragment, or none of ours (passed untouched). */
static __always_inline int xl_from_backend(struct xdp_md *ctx, struct xl_pkt *p)
{
    if (p->options && !xl_ip_header_ok(p->ip, (void *)(long)ctx->data_end, p->ip->ihl * 2))
        return xl_pass(XL_C_PASS_BAD_IP_CSUM);
    if (p->frag && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP))
        return xl_reply_fragment(ctx, p);
    if (p->sport && xl_maybe(p->ip->daddr, XL_ADDR_MAYBE_LB_SOURCE)) {
        struct xl_flow_key fk;
        struct xl_flow *f = xl_fnat_find(p->ip->daddr, *p->dport, p->ip->saddr, *p->sport,
                                         p->proto, &fk);
        if (f)
            return xl_fnat_reply(ctx, p, f, &fk);
    }
    if (p->sport) {
        struct xl_rev_nat *rn = xl_rev_lookup(p->ip->saddr, *p->sport, p->proto);
        struct xl_rev_target *t = NULL;
        struct xl_flow *f = rn ? xl_reply_flow(p->ip->daddr, *p->dport, p->proto, rn, &t)
                               : NULL;
        if (f && t)
            return xl_reply(ctx, p, f, t);
    }
    return xl_pass(XL_C_PASS_NOT_VIP);
}
