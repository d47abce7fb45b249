/* The flow table's bookkeeping: per-packet accounting and TCP state of a tracked flow,
 * whether its connection is over, and the key a packet's own 5-tuple makes. */
#pragma once

static __always_inline void xl_stat_add(struct xl_stat *s, __u32 len, __u64 flows)
{
    if (s) {
        s->packets += 1;
        s->bytes += len;
        s->flows += flows;
    }
}

/* One more opened (or closed) flow on its VIP and backend: their open flows, counted per
 * connection (see layout.Stat). */
static __always_inline void xl_flow_count(struct xl_flow *f, int closed)
{
    __u32 vid = f->vip_id, bid = f->backend_id;
    struct xl_stat *v = vip_stats.lookup(&vid);
    struct xl_stat *b = backend_stats.lookup(&bid);
    /* least-conn's count: one for all CPUs, so atomic (a plain add would lose counts) */
    __u64 *c = conns.lookup(&bid);
    if (c)
        __sync_fetch_and_add(c, closed ? (__u64)-1 : 1);
    if (closed) {
        if (v)
            v->closed += 1;
        if (b)
            b->closed += 1;
    } else {
        if (v)
            v->opened += 1;
        if (b)
            b->opened += 1;
    }
}

/* Is a confirmed flow in TCP state ``st`` still open (UDP's is always NONE)? */
static __always_inline int xl_flow_open_state(__u8 st)
{
    return st != XL_TCP_FIN && st != XL_TCP_RST;
}

/* Coarse TCP state: enough to tell half-open, established and closing flows apart. An
 * established flow's FIN or RST closes it (counted once). */
static __always_inline void xl_tcp_track(struct xl_flow *f, struct tcphdr *th, int reply)
{
    if (!th)
        return;
    __u8 st = f->tcp_state;
    if (th->rst)
        st = XL_TCP_RST;
    else if (th->fin)
        st = XL_TCP_FIN;
    else if (th->syn && !th->ack && !reply && st != XL_TCP_ESTABLISHED)
        st = XL_TCP_SYN_SEEN;
    else if (th->ack && !th->syn && st == XL_TCP_SYN_SEEN && !reply)
        st = XL_TCP_ESTABLISHED;
    if (st != f->tcp_state) {
        if (f->tcp_state == XL_TCP_ESTABLISHED && !xl_flow_open_state(st))
            xl_flow_count(f, 1);
        f->tcp_state = st;
    }
}

/* One packet of a tracked flow (``f`` NULL: none), one direction: last seen, counters, TCP
 * state. Returns that direction's next-hop cache. Plain adds: RSS keeps a flow's direction
 * on one CPU (see layout.Flow). */
static __always_inline struct xl_next_hop *xl_flow_seen(struct xl_flow *f, struct xl_pkt *p,
                                                        __u64 now, int reply)
{
    if (!f)
        return NULL;
    f->last_ns = now;
    if (reply) {
        f->rev_packets += 1;
        f->rev_bytes += p->len;
    } else {
        f->fwd_packets += 1;
        f->fwd_bytes += p->len;
    }
    xl_tcp_track(f, p->tcp, reply);
    return reply ? &f->rev_nh : &f->fwd_nh;
}

/* May this CPU insert one more new flow now? Over meta.new_flows_per_cpu in its current
 * window it may not: the flow is balanced by the table all the same and counted (Katran's
 * LRU bypass). Asked only for dsr flows, whose replies never need the entry. */
static __always_inline int xl_insert_allowed(struct xl_meta *m, __u64 now)
{
    __u32 limit = m->new_flows_per_cpu;
    __u32 zero = 0;
    struct xl_rate_window *w = limit ? new_flow_rate.lookup(&zero) : NULL;
    if (!w)
        return 1;
    if (now - w->start_ns >= XL_RATE_WINDOW_NS) {
        w->start_ns = now;
        w->count = 0;
    }
    if (w->count >= limit) {
        xl_count(XL_C_NEW_FLOW_UNTRACKED);
        return 0;
    }
    w->count += 1;
    return 1;
}

/* The tracked flow keyed ``fk``: in flows, or, not confirmed yet, in half_open (every new
 * flow's entry goes there, so that a flood from random sources never evicts an established
 * flow). */
static __always_inline struct xl_flow *xl_flow_find(struct xl_flow_key *fk)
{
    struct xl_flow *f = flows.lookup(fk);
    if (!f)
        f = half_open.lookup(fk);
    return f;
}

/* Does this next packet of a new flow confirm it? TCP: an ACK without SYN or RST (the
 * handshake's, or the next of a flow picked up mid-stream); UDP: any. */
static __always_inline int xl_confirms(struct tcphdr *th)
{
    return !th || (th->ack && !th->syn && !th->rst);
}

/* Move unconfirmed flow ``f`` into flows; the entry to use. Should the insert fail, the
 * flow stays in half_open and is tried again on its next packet. A TCP flow confirmed is
 * established, also one picked up mid-stream (so its FIN or RST closes it). */
static __always_inline struct xl_flow *xl_promote(struct xl_flow_key *fk, struct xl_flow *f,
                                                  int tcp)
{
    struct xl_flow copy = *f;
    if (tcp)
        copy.tcp_state = XL_TCP_ESTABLISHED;
    if (flows.update(fk, &copy))
        return f;
    half_open.delete(fk);
    xl_count(XL_C_FLOW_CONFIRMED);
    xl_flow_count(&copy, 0);
    struct xl_flow *nf = flows.lookup(fk);
    return nf ? nf : f;
}

/* May ``be`` take this packet's flow? In use, not failed, and the packet's (daddr, dport,
 * proto) is its VIP: that proves the VIP without a VIP lookup. */
static __always_inline int xl_backend_serves(struct xl_backend *be, struct xl_pkt *p)
{
    return be && (be->flags & XL_BACKEND_VALID) && !(be->flags & XL_BACKEND_DOWN) &&
           *(__u32 *)be->vip_addr == p->ip->daddr && be->vip_port == *p->dport &&
           be->vip_proto == p->proto;
}

/* Is the connection this entry tracked over, so that the packet opens a new flow (balanced
 * anew: a drained backend never gets it)?
 * - TCP: a pure SYN. A client's stack sends one only when it has no connection on this
 *   5-tuple (it reused its source port), as Katran treats every SYN. Only a half-open flow
 *   keeps its backend: its SYN is a retransmission, and the backend may have answered.
 * - UDP, which has no end of connection: the flow has been idle for meta.udp_idle_ns. */
static __always_inline int xl_reopens(struct xl_flow *f, struct xl_pkt *p, __u64 now)
{
    struct tcphdr *th = p->tcp;
    if (th)
        return th->syn && !th->ack && f->tcp_state != XL_TCP_SYN_SEEN;
    __u32 zero = 0;
    struct xl_meta *m = meta.lookup(&zero);
    /* Signed: a stamp from the future (another CPU's clock read a moment later) is idle 0. */
    return m && m->udp_idle_ns && (__s64)(now - f->last_ns) >= (__s64)m->udp_idle_ns;
}

/* The packet's own 5-tuple as a flow key (forward key of a client packet, reverse key of
 * a backend's reply). */
static __always_inline void xl_flow_key_of(struct xl_flow_key *k, __be32 src, __be32 dst,
                                           __be16 sport, __be16 dport, __u8 proto)
{
    __builtin_memcpy(k->src, &src, 4);
    __builtin_memcpy(k->dst, &dst, 4);
    k->sport = sport;
    k->dport = dport;
    k->proto = proto;
    k->family = XL_FAMILY_IPV4;
}

static __always_inline void xl_packet_key(struct xl_pkt *p, struct xl_flow_key *k)
{
    xl_flow_key_of(k, p->ip->saddr, p->ip->daddr, *p->sport, *p->dport, p->proto);
}
