/* Packet parsing with full bounds checks: Ethernet (+ one 802.1Q tag), IPv4, TCP/UDP,
 * ICMP. Nothing here writes to the packet. */
#pragma once

#define XL_IP_DF 0x4000
#define XL_IP_MF 0x2000
#define XL_IP_OFFMASK 0x1fff

enum xl_parse_result {
    XL_P_OK = 0,        /* consistent headers (L4: parsed unless a fragment) */
    XL_P_NOT_IPV4 = 1,  /* ARP, IPv6, QinQ, ...: not ours */
    XL_P_MALFORMED = 2, /* truncated or inconsistent: the kernel judges it */
};

struct xl_vlan_hdr {
    __be16 tci;
    __be16 proto;
};

/* Filled in by the parsers below; the caller need not zero it. */
struct xl_pkt {
    struct ethhdr *eth;
    struct iphdr *ip;
    __be16 *sport;   /* NULL unless TCP/UDP and not a fragment */
    __be16 *dport;
    __sum16 *l4_check;
    struct tcphdr *tcp; /* NULL unless TCP */
    struct icmphdr *icmp; /* NULL unless ICMP and not a fragment */
    __u32 len;       /* frame length, for byte counters */
    __u8 proto;
    __u8 frag;       /* MF set or offset != 0 */
    __u8 options;    /* IHL > 5 */
    __u8 vlan;       /* one 802.1Q tag */
};

/* Ethernet and IPv4: enough to tell whether the packet can be ours at all (most traffic is
 * not, and then its L4 header is none of our business). */
static __always_inline int xl_parse_l3(struct xdp_md *ctx, struct xl_pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    __u32 off = sizeof(*eth);

    p->len = data_end - data;
    if ((void *)(eth + 1) > data_end)
        return XL_P_MALFORMED;
    p->eth = eth;
    __be16 h_proto = eth->h_proto;
    p->vlan = h_proto == bpf_htons(ETH_P_8021Q);
    if (p->vlan) {
        struct xl_vlan_hdr *vh = data + off;
        if ((void *)(vh + 1) > data_end)
            return XL_P_MALFORMED;
        h_proto = vh->proto;
        off += sizeof(*vh);
    }
    /* A second tag (QinQ) lands here too: not parsed, passed. */
    if (h_proto != bpf_htons(ETH_P_IP))
        return XL_P_NOT_IPV4;

    struct iphdr *ip = data + off;
    if ((void *)(ip + 1) > data_end)
        return XL_P_MALFORMED;
    __u32 ihl = ip->ihl * 4;
    __u32 tot = bpf_ntohs(ip->tot_len);
    if (ip->version != 4 || ihl < sizeof(*ip) || tot < ihl)
        return XL_P_MALFORMED;
    if ((void *)ip + tot > data_end)
        return XL_P_MALFORMED;
    p->ip = ip;
    p->proto = ip->protocol;
    p->options = ihl > sizeof(*ip);
    p->frag = (ip->frag_off & bpf_htons(XL_IP_MF | XL_IP_OFFMASK)) != 0;
    return XL_P_OK;
}

/* TCP/UDP/ICMP of a packet xl_parse_l3() accepted: fills the port and checksum pointers
 * (ICMP: its header) unless it is a fragment (no trustworthy L4 header) or another
 * protocol. */
static __always_inline int xl_parse_l4(struct xdp_md *ctx, struct xl_pkt *p)
{
    void *data_end = (void *)(long)ctx->data_end;
    struct iphdr *ip = p->ip;
    p->sport = p->dport = NULL;
    p->l4_check = NULL;
    p->tcp = NULL;
    p->icmp = NULL;
    if (p->frag)
        return XL_P_OK;
    __u32 ihl = ip->ihl * 4;
    __u32 tot = bpf_ntohs(ip->tot_len);
    void *l4 = (void *)ip + ihl;
    __u32 l4_len = tot - ihl;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return XL_P_MALFORMED;
        __u32 doff = th->doff * 4;
        if (doff < sizeof(*th) || doff > l4_len)
            return XL_P_MALFORMED;
        p->tcp = th;
        p->sport = &th->source;
        p->dport = &th->dest;
        p->l4_check = &th->check;
    } else if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end)
            return XL_P_MALFORMED;
        __u32 ulen = bpf_ntohs(uh->len);
        if (ulen < sizeof(*uh) || ulen > l4_len)
            return XL_P_MALFORMED;
        p->sport = &uh->source;
        p->dport = &uh->dest;
        p->l4_check = &uh->check;
    } else if (ip->protocol == IPPROTO_ICMP) {
        struct icmphdr *ic = l4;
        if ((void *)(ic + 1) > data_end || l4_len < sizeof(*ic))
            return XL_P_MALFORMED;
        p->icmp = ic;
    }
    return XL_P_OK;
}
