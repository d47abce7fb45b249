/* fullnat: a new flow's source port, and the replies that come back to it. A flow to a
 * backend gets the balancer's address toward that backend (Backend.src) and a port from its
 * VIP's range; the reply's 5-tuple (backend -> that address and port) keys fnat_ports,
 * which names the flow. The table is a plain hash, never evicted under a live flow; an
 * entry whose flow is gone (evicted, or moved to another port) is stale: the next flow that
 * picks its port takes it over, and the agent sweeps the rest. Needs nat.h and flow.h. */
#pragma once

static __always_inline void xl_fnat_key(struct xl_fnat_key *k, __be32 lb, __be16 lb_port,
                                        __be32 be, __be16 be_port, __u8 proto)
{
    __builtin_memcpy(k->lb_addr, &lb, 4);
    __builtin_memcpy(k->be_addr, &be, 4);
    k->lb_port = lb_port;
    k->be_port = be_port;
    k->proto = proto;
    k->family = XL_FAMILY_IPV4;
}

/* Two flow keys equal? (16 bytes as two words: clang may make __builtin_memcmp a call) */
static __always_inline int xl_same_key(struct xl_flow_key *a, struct xl_flow_key *b)
{
    __u64 *x = (__u64 *)a, *y = (__u64 *)b;
    return x[0] == y[0] && x[1] == y[1];
}

/* The flow keyed ``fk`` if it still holds the port that entry ``k`` gives it, else NULL
 * (the entry is stale). */
static __always_inline struct xl_flow *xl_fnat_holder(struct xl_flow_key *fk,
                                                      struct xl_fnat_key *k)
{
    struct xl_flow *f = xl_flow_find(fk);
    if (f && f->mode == XL_MODE_FULLNAT && f->nat_port == k->lb_port &&
        *(__u32 *)f->nat_addr == *(__u32 *)k->lb_addr)
        return f;
    return NULL;
}

/* A source port for the new flow ``fk`` to ``be`` from ``src``, in XL_FNAT_TRIES tries:
 * first the port the flow's hash picks (the same in both data paths), then the VIP's next
 * ports in turn (fnat_cursor), so that a retransmitted SYN whose ports were taken tries
 * others. A port whose entry names a live flow is taken; a stale entry, or this flow's
 * own, is reused. A new flow is dropped when all its tries are held, about (share of the
 * range held)^3 of them; more tries would be better, but every one multiplies the paths the
 * verifier walks: four exceed its limit. Returns the port (network order) with its
 * entry written, or 0: exhausted, counted, the packet is dropped. */
static __always_inline __be16 xl_fnat_port(struct xl_vip_info *vip, struct xl_backend *be,
                                           struct xl_flow_key *fk, __u32 h, __be32 src)
{
    __u32 count = vip->port_count;
    __u32 vid = vip->vip_id;
    __u32 *cursor = fnat_cursor.lookup(&vid);
    if (count && cursor) {
        struct xl_fnat_key k = {};
        xl_fnat_key(&k, src, 0, *(__u32 *)be->addr, be->port, fk->proto);
        for (int i = 0; i < XL_FNAT_TRIES; i++) {
            __u32 idx = h % count;
            if (i) { /* a plain add: CPUs racing for one port are told apart by NOEXIST */
                idx = *cursor % count;
                *cursor += 1;
            }
            k.lb_port = bpf_htons((__u16)(vip->port_min + idx));
            struct xl_flow_key *owner = fnat_ports.lookup(&k);
            if (!owner) {
                if (fnat_ports.insert(&k, fk) == 0)
                    return k.lb_port;
                continue; /* another CPU took it meanwhile, or the table is full */
            }
            struct xl_flow_key o = *owner; /* a key from a map value: copied to the stack */
            if (!xl_same_key(&o, fk) && xl_fnat_holder(&o, &k)) {
                xl_count(XL_C_FNAT_PORT_TAKEN);
                continue;
            }
            if (fnat_ports.update(&k, fk) == 0)
                return k.lb_port;
        }
    }
    xl_count(XL_C_DROP_SOURCE_PORTS);
    return 0;
}

/* A reply to a fullnat flow: backend -> the flow's source address and port. Rewritten to
 * VIP -> client and routed toward the client (there the kernel may take it: its source is
 * the VIP, which is no address of this host). */
static __always_inline int xl_fnat_reply(struct xdp_md *ctx, struct xl_pkt *p,
                                         struct xl_flow *f, struct xl_flow_key *fk)
{
    /* To the balancer's own address: the kernel would deliver it here, not forward it, so
     * the program itself tells the backend its TTL ran out, from that address. */
    if (xl_ttl_expired(p->ip))
        return xl_icmp_time_exceeded(ctx, p);
    __u64 now = bpf_ktime_get_coarse_ns();
    struct xl_next_hop *nh = xl_flow_seen(f, p, now, 1);
    xl_count(XL_C_REPLY);
    struct xl_next_hop tmp;
    __u16 too_big = 0;
    __be32 vip = *(__u32 *)fk->dst, client = *(__u32 *)fk->src;
    struct xl_next_hop *hop = xl_route(ctx, p, nh, &tmp, now, vip, client, &too_big);
    if (too_big)
        return xl_icmp_frag_needed(ctx, p, too_big);
    xl_rewrite(p, &p->ip->daddr, client, p->dport, fk->sport);
    xl_rewrite(p, &p->ip->saddr, vip, p->sport, fk->dport);
    return xl_send(p, hop);
}

/* The fullnat flow that holds our address and port ``lb``:``lb_port`` toward backend
 * ``be``:``be_port``, with its key in *fk; NULL if none (or a stale entry). */
static __always_inline struct xl_flow *xl_fnat_find(__be32 lb, __be16 lb_port, __be32 be,
                                                    __be16 be_port, __u8 proto,
                                                    struct xl_flow_key *fk)
{
    struct xl_fnat_key k = {};
    xl_fnat_key(&k, lb, lb_port, be, be_port, proto);
    struct xl_flow_key *owner = fnat_ports.lookup(&k);
    if (!owner)
        return NULL;
    *fk = *owner;
    return xl_fnat_holder(fk, &k);
}
