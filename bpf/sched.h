/* The VIP's scheduler: which slot of its ring a new flow takes (layout.Scheduler).
 * maglev: the flow hash; source-hash: the client address's hash (every flow of a client on
 * one backend); wrr / rr: the VIP's next turn in its sequence, from one counter shared by
 * all CPUs (atomic: the sequence is global, so N flows at 3:1 split exactly); random: the
 * 5-tuple hashed with another seed, a per-flow pseudo-random pick over the weighted
 * sequence (reproducible, so both data paths agree). Identical to
 * xdplb/userspace/datapath.py _sched_slot(). */
#pragma once

static __always_inline __u32 xl_sched_slot(struct xl_vip_info *vip, struct xl_flow_key *fk,
                                           __u32 h, __u32 seed)
{
    __u32 size = vip->ring_size;
    if (!size)
        return 0;
    __u8 sched = vip->scheduler;
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
