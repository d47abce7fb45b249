/* The per-packet baseline: parse Ethernet, IPv4 and TCP with full bounds checks, return
 * XDP_TX. Optional stages (compiled in with -D flags) price single ingredients of the real
 * program, to show what its cost is made of:
 *   BENCH_LOOKUP  one hash-map hit with a BENCH_KEY_LEN-byte key (perpacket.py passes the
 *                 size of xdplb's flow key)
 *   BENCH_INSERT  one insert of a new key and a BENCH_VAL_LEN-byte value (xdplb's flow entry)
 *                 into a BENCH_LRU_ENTRIES-entry LRU hash (perpacket.py passes the size of
 *                 xdplb's flow table), the way a flow table inserts: after a lookup of the
 *                 key has missed (a new flow is only known to be new by that miss, and the
 *                 update then finds the bucket in the cache). BENCH_UPDATE_ONLY: the update
 *                 alone, as this row was measured before
 *   BENCH_FIB     one bpf_fib_lookup() of the destination (xdplb does one per forward)
 *   BENCH_ENCAP   dsr/ipip's wrapping: bpf_xdp_adjust_head() by 20 bytes and an outer IPv4
 *                 header (TOS, id and DF copied, header checksum) in front of the packet */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/socket.h>

#ifndef BENCH_KEY_LEN
#define BENCH_KEY_LEN 16
#endif
#ifndef BENCH_VAL_LEN
#define BENCH_VAL_LEN 64
#endif
#ifndef BENCH_LRU_ENTRIES
#define BENCH_LRU_ENTRIES 1000000
#endif
struct bench_key {
    __u8 b[BENCH_KEY_LEN];
};
struct bench_val {
    __u8 b[BENCH_VAL_LEN];
};
#ifdef BENCH_LOOKUP
BPF_HASH(bench_table, struct bench_key, __u64, 1024);
#endif
#ifdef BENCH_INSERT
BPF_TABLE("lru_hash", struct bench_key, struct bench_val, bench_lru, BENCH_LRU_ENTRIES);
#endif

int bench_baseline(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->ihl < 5 || ip->protocol != IPPROTO_TCP)
        return XDP_PASS;
    struct tcphdr *th = (void *)ip + ip->ihl * 4;
    if ((void *)(th + 1) > data_end)
        return XDP_PASS;
    struct bench_key k = {};
    __builtin_memcpy(k.b, &ip->saddr, 8);
    __builtin_memcpy(k.b + 8, &th->source, 4);
#ifdef BENCH_LOOKUP
    if (!bench_table.lookup(&k))
        return XDP_DROP;
#endif
#ifdef BENCH_INSERT
#ifndef BENCH_UPDATE_ONLY
    if (bench_lru.lookup(&k)) /* never: every run brings a new key */
        return XDP_DROP;
#endif
    struct bench_val v = {};
    if (bench_lru.update(&k, &v))
        return XDP_DROP;
#endif
#ifdef BENCH_FIB
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.l4_protocol = ip->protocol;
    fib.tot_len = bpf_ntohs(ip->tot_len);
    fib.ipv4_src = ip->saddr;
    fib.ipv4_dst = ip->daddr;
    fib.ifindex = ctx->ingress_ifindex;
    if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
        return XDP_DROP;
#endif
#ifdef BENCH_ENCAP
    __u16 len = bpf_ntohs(ip->tot_len) + sizeof(struct iphdr);
    __u8 tos = ip->tos;
    __be16 id = ip->id, df = ip->frag_off & bpf_htons(0x4000);
    __be32 src = ip->daddr, dst = ip->saddr; /* any two addresses: the cost is the same */
    if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
        return XDP_DROP;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    struct iphdr *out = data + sizeof(*eth);
    if ((void *)(out + 1) > data_end)
        return XDP_DROP;
    eth->h_proto = bpf_htons(ETH_P_IP);
    out->version = 4;
    out->ihl = 5;
    out->tos = tos;
    out->tot_len = bpf_htons(len);
    out->id = id;
    out->frag_off = df;
    out->ttl = 64;
    out->protocol = IPPROTO_IPIP;
    out->check = 0;
    out->saddr = src;
    out->daddr = dst;
    __u16 *w = (__u16 *)out;
    __u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    out->check = ~sum;
#endif
    return XDP_TX;
}
