/* ICMP the balancer sends itself, back by XDP_TX: the reply to an echo request to a VIP
 * address; Time Exceeded for a packet to a VIP whose TTL runs out here; "fragmentation
 * needed" for a packet with DF set that is too long for the next hop, to a client or a
 * backend (path MTU discovery). Errors come from the address the packet was sent to (the
 * VIP, or the client for a reply), as a host holding that address would answer, and quote
 * the packet as it was sent, before any rewrite: the sender's socket must recognise it. */
#pragma once

#define XL_ICMP_ECHOREPLY 0
#define XL_ICMP_DEST_UNREACH 3
#define XL_ICMP_FRAG_NEEDED 4 /* its code */
#define XL_ICMP_ECHO 8
#define XL_ICMP_TIME_EXCEEDED 11
#define XL_ICMP_TTL 64
/* An ICMP error quotes the IPv4 header (without options here) and 8 bytes of payload. */
#define XL_ICMP_QUOTE 28
#define XL_ICMP_ERR_ROOM (sizeof(struct iphdr) + sizeof(struct icmphdr))
#define XL_ICMP_ERR_LEN (ETH_HLEN + XL_ICMP_ERR_ROOM + XL_ICMP_QUOTE)

/* ICMP checksums after an incremental update: RFC 1624 gives 0x0000 for a message that sums
 * to zero (an empty echo with id and sequence 0), where only 0xffff verifies; 0xffff is
 * right for every message. */
static __always_inline __u16 xl_icmp_fixup(__u16 check)
{
    return check ? check : 0xffff;
}

/* Turn the echo request in place into its reply: MACs and addresses swapped (the IPv4
 * checksum does not change with the order of its words), a fresh TTL, type 0. */
static __always_inline int xl_icmp_echo(struct xl_pkt *p)
{
    struct ethhdr *eth = p->eth;
    struct iphdr *ip = p->ip;
    struct icmphdr *ic = p->icmp;
    __u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, mac, ETH_ALEN);
    __be32 addr = ip->saddr;
    ip->saddr = ip->daddr;
    ip->daddr = addr;
    /* TTL shares a 16-bit checksum word with the protocol byte; type with code. */
    xl_set_byte(&ip->ttl, XL_ICMP_TTL, &ip->check);
    xl_set_byte(&ic->type, XL_ICMP_ECHOREPLY, &ic->checksum);
    ic->checksum = xl_icmp_fixup(ic->checksum);
    xl_count(XL_C_ICMP_ECHO);
    xl_count(XL_C_TX);
    return XDP_TX;
}

/* The packet (no IP options, L4 header parsed) becomes, in place, the ICMP error that
 * quotes it, from its destination to its sender: room for an outer IPv4 and ICMP header is
 * made in front of its IPv4 header, which then sits where the quote goes, and the frame is
 * cut after the quote. ``rest``: the header's second word (the MTU of "fragmentation
 * needed"). 0, or -1 when the frame cannot be reshaped. */
static __always_inline int xl_icmp_build(struct xdp_md *ctx, struct xl_pkt *p, __u8 type,
                                         __u8 code, __be32 rest)
{
    __be32 sender = p->ip->saddr, dest = p->ip->daddr;
    __u8 dmac[ETH_ALEN], smac[ETH_ALEN];
    __builtin_memcpy(dmac, p->eth->h_source, ETH_ALEN);
    __builtin_memcpy(smac, p->eth->h_dest, ETH_ALEN);
    if (bpf_xdp_adjust_head(ctx, -(int)XL_ICMP_ERR_ROOM))
        return -1;
    /* Parsed L4 headers are 8 bytes or more, so the frame holds the whole quote. */
    int over = (int)(ctx->data_end - ctx->data) - (int)XL_ICMP_ERR_LEN;
    if (over > 0 && bpf_xdp_adjust_tail(ctx, -over))
        return -1;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (data + XL_ICMP_ERR_LEN > data_end)
        return -1;
    struct ethhdr *eth = data;
    __builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, smac, ETH_ALEN);
    eth->h_proto = bpf_htons(ETH_P_IP);
    struct iphdr *ip = data + ETH_HLEN;
    ip->version = 4;
    ip->ihl = sizeof(*ip) / 4;
    ip->tos = 0;
    ip->tot_len = bpf_htons(XL_ICMP_ERR_ROOM + XL_ICMP_QUOTE);
    ip->id = 0;
    ip->frag_off = 0;
    ip->ttl = XL_ICMP_TTL;
    ip->protocol = IPPROTO_ICMP;
    ip->check = 0;
    ip->saddr = dest;
    ip->daddr = sender;
    ip->check = xl_csum_words((__u16 *)ip, sizeof(*ip) / 2);
    struct icmphdr *ic = (void *)(ip + 1);
    ic->type = type;
    ic->code = code;
    ic->checksum = 0;
    ic->un.gateway = rest;
    ic->checksum = xl_csum_words((__u16 *)ic, (sizeof(*ic) + XL_ICMP_QUOTE) / 2);
    return 0;
}

/* xl_icmp_build, sent back by XDP_TX; ``counter``: the event it counts as. */
static __always_inline int xl_icmp_error(struct xdp_md *ctx, struct xl_pkt *p, __u8 type,
                                         __u8 code, __be32 rest, __u32 counter)
{
    if (xl_icmp_build(ctx, p, type, code, rest))
        return XDP_ABORTED;
    xl_count(counter);
    xl_count(XL_C_TX);
    return XDP_TX;
}

/* TTL <= 1 to a VIP: TTL exceeded in transit. */
static __always_inline int xl_icmp_time_exceeded(struct xdp_md *ctx, struct xl_pkt *p)
{
    return xl_icmp_error(ctx, p, XL_ICMP_TIME_EXCEEDED, 0, 0, XL_C_TTL_EXCEEDED);
}

/* Too long for the next hop, DF set: the sender must use ``mtu``. */
static __always_inline int xl_icmp_frag_needed(struct xdp_md *ctx, struct xl_pkt *p, __u16 mtu)
{
    return xl_icmp_error(ctx, p, XL_ICMP_DEST_UNREACH, XL_ICMP_FRAG_NEEDED, bpf_htonl(mtu),
                         XL_C_FRAG_NEEDED);
}
