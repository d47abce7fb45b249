/* Frames the kernel would not route. XDP runs before the stack's own checks, so without
 * these rules a balancer behind a flooding switch or on a promiscuous NIC would forward
 * copies of frames meant for other hosts, and rewrite packets the kernel would discard.
 * Each such frame is passed to the kernel untouched (it drops or handles it) and counted.
 * Only frames that may be ours are judged: other traffic never pays for this. */
#pragma once

/* The IPv4 header checksum of a header without options (20 bytes) is right. Headers with
 * options are dropped when they are to a VIP, and checked on the reply path (reply.h). */
static __always_inline int xl_ip_csum_ok(struct iphdr *ip)
{
    return xl_csum_words((__u16 *)ip, sizeof(*ip) / 2) == 0;
}

/* Is the frame for another host's unicast MAC than the one of the interface it came in on
 * (``ingress``)? Unknown interfaces (not in if_macs) are not judged. */
static __always_inline int xl_foreign_mac(struct xl_pkt *p, __u32 ingress)
{
    __u32 slot = ingress % XL_IF_MACS;
    struct xl_if_mac *own = if_macs.lookup(&slot);
    if (!own || own->ifindex != ingress)
        return 0;
    __u8 *d = p->eth->h_dest;
    return *(__u32 *)d != *(__u32 *)own->mac || *(__u16 *)(d + 4) != *(__u16 *)(own->mac + 4);
}

/* The rule a frame that may be ours breaks, as the counter of its outcome; 0: none. */
static __always_inline __u32 xl_guard(struct xl_pkt *p, __u32 ingress)
{
    struct iphdr *ip = p->ip;
    if (p->vlan) /* no VLAN is served: the kernel (its VLAN device) takes tagged frames */
        return XL_C_PASS_VLAN;
    if (p->eth->h_dest[0] & 1) /* group bit: broadcast or multicast */
        return XL_C_PASS_GROUP_MAC;
    if (xl_foreign_mac(p, ingress)) /* the kernel drops it (PACKET_OTHERHOST) */
        return XL_C_PASS_FOREIGN_MAC;
    __u8 first = *(__u8 *)&ip->saddr;
    if (first == 0 || first == 127 || first >= 224) /* this host, loopback, 224/3 */
        return XL_C_PASS_MARTIAN;
    if (!p->options && !xl_ip_csum_ok(ip))
        return XL_C_PASS_BAD_IP_CSUM;
    return 0;
}
