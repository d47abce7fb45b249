/* Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
 * Values are taken as they sit in the packet; one's-complement sums do not care about
 * byte order as long as old and new are loaded the same way. Prefixed xl_: BCC pulls in
 * kernel headers whose csum_* helpers would collide. */
#pragma once

static __always_inline __u16 xl_csum_fold(__u32 s)
{
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (__u16)s;
}

/* The Internet checksum of ``n`` 16-bit words (a constant): over words just written with a
 * checksum field of 0 it is the value to store; over words that carry a right checksum, 0. */
static __always_inline __u16 xl_csum_words(__u16 *w, const int n)
{
    __u32 s = 0;
#pragma unroll
    for (int i = 0; i < n; i++)
        s += w[i];
    return (__u16)~xl_csum_fold(s);
}

static __always_inline __u16 xl_csum_replace2(__u16 check, __u16 old, __u16 new)
{
    __u32 s = (__u16)~check + (__u16)~old + (__u32)new;
    return (__u16)~xl_csum_fold(s);
}

static __always_inline __u16 xl_csum_replace4(__u16 check, __u32 old, __u32 new)
{
    __u32 s = (__u16)~check;
    s += (__u16)~(old & 0xffff);
    s += (__u16)~(old >> 16);
    s += new & 0xffff;
    s += new >> 16;
    return (__u16)~xl_csum_fold(s);
}

/* *b = v, b the first byte of its 16-bit word (TTL, ICMP type): the checksum at *check
 * updated for that word. */
static __always_inline void xl_set_byte(__u8 *b, __u8 v, __u16 *check)
{
    __u16 *word = (__u16 *)b;
    __u16 old = *word;
    *b = v;
    *check = xl_csum_replace2(*check, old, *word);
}

/* UDP: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff. */
static __always_inline __u16 xl_udp_fixup(__u16 old_check, __u16 new_check)
{
    if (old_check == 0)
        return 0;
    return new_check == 0 ? 0xffff : new_check;
}

/* An IPv4 header of ``words`` 16-bit words (IHL * 2: options included) has a right checksum.
 * The caller has checked that the whole header is in the frame; the bound here is for the
 * verifier. Used by the reply path (headers with options) and by decap (outer headers). */
static __always_inline int xl_ip_header_ok(struct iphdr *ip, void *data_end, __u32 words)
{
    __u16 *w = (__u16 *)ip;
    __u32 s = 0;
    /* clang proves the per-word bound from the caller's checks and drops it; the verifier
     * cannot follow that proof, so hide data_end's origin (libbpf's barrier_var). */
    asm volatile("" : "+r"(data_end));
#pragma unroll
    for (int i = 0; i < 30; i++) { /* IHL 15: 60 bytes */
        if (i >= words || (void *)(w + i + 1) > data_end)
            break;
        s += w[i];
    }
    return xl_csum_fold(s) == 0xffff;
}
