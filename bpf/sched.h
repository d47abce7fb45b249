/* The VIP's scheduler: which slot of its ring a new flow takes (layout.Scheduler).
 * maglev: the flow hash; source-hash: the client address's hash (every flow of a client on
 * one backend); wrr / rr: the VIP's next turn in its sequence, from one counter shared by
 * all CPUs (atomic: the sequence is global, so N flows at 3:1 split exactly); random: the
 * 5-tuple hashed with another seed, a per-flow pseudo-random pick over the weighted
 * sequence (reproducible, so both data paths agree); least-conn: the fewest open
 * connections per weight. Identical to
 * xdplb/userspace/datapath.py _sched_slot(). */
#pragma once

/* least-conn (IPVS wlc): the slot of the ring's backend (the ring holds the VIP's serving
 * backends, one slot each, at most XL_LC_MAX_BACKENDS) with the fewest open connections
 * per weight, the first of equals: a before b when conns_a * weight_b < conns_b * weight_a.
 * Open = conns - conns_unseen (the agent's sweep: ends the program cannot see). */
static __always_inline __u32 xl_least_conn(void *ring, __u32 size)
{
    __u32 best = 0;
    __u64 best_conns = 0, best_weight = 0;
    for (__u32 i = 0; i < XL_LC_MAX_BACKENDS; i++) {
        if (i >= size)
            break;
        __u32 word = i / XL_RING_SLOTS_PER_WORD;
        __u64 *w = bpf_map_lookup_elem(ring, &word);
        if (!w)
            break;
        __u32 bid = (*w >> ((i % XL_RING_SLOTS_PER_WORD) * 16)) & 0xFFFF;
        struct xl_backend *be = backends.lookup(&bid);
        __u64 *c = conns.lookup(&bid);
        __u64 *u = conns_unseen.lookup(&bid);
        if (!be || !c || !u || !be->weight)
            continue;
        __s64 open = (__s64)(*c - *u);
        __u64 n = open > 0 ? (__u64)open : 0;
        if (!best_weight || n * best_weight < best_conns * be->weight) {
            best = i;
            best_conns = n;
            best_weight = be->weight;
        }
    }
    return best;
}

static __always_inline __u32 xl_sched_slot(struct xl_vip_info *vip, struct xl_flow_key *fk,
                                           __u32 h, __u32 seed, void *ring)
{
    __u32 size = vip->ring_size;
    if (!size)
        return 0;
    __u8 sched = vip->scheduler;
    if (sched == XL_SCHED_LEAST_CONN)
        return ring ? xl_least_conn(ring, size) : 0;
    if (sched == XL_SCHED_SOURCE_HASH)
        return xl_source_hash(*(__u32 *)fk->src, seed) % size;
    if (sched == XL_SCHED_WRR || sched == XL_SCHED_RR) {
        __u32 vid = vip->vip_id;
        __u64 *turn = sched_cursor.lookup(&vid);
        return turn ? __sync_fetch_and_add(turn, 1) % size : 0;
    }
    if (sched == XL_SCHED_RANDOM)
        return xl_flow_hash(*(__u32 *)fk->src, *(__u32 *)fk->dst, fk->sport, fk->dport,
                            fk->proto, seed ^ XL_RANDOM_SALT) % size;
    return h % size;
}
