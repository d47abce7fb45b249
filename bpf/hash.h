/* The flow hash: MurmurHash3 x86_32 over 16 bytes
 *   saddr(4) daddr(4) sport(2) dport(2) proto(1) 0 0 0   (all in wire order),
 * read as little-endian words: identical to xdplb/hashing.py flow_hash(). */
#pragma once

static __always_inline __u32 xl_rotl32(__u32 x, __u32 r)
{
    return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 xl_mm3_block(__u32 h, __u32 k)
{
    k *= 0xcc9e2d51;
    k = xl_rotl32(k, 15);
    k *= 0x1b873593;
    h ^= k;
    h = xl_rotl32(h, 13);
    return h * 5 + 0xe6546b64;
}

static __always_inline __u32 xl_fmix32(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

static __always_inline __u32 xl_flow_hash(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport,
                                          __u8 proto, __u32 seed)
{
    __u32 h = seed;
    h = xl_mm3_block(h, saddr);
    h = xl_mm3_block(h, daddr);
    h = xl_mm3_block(h, (__u32)sport | ((__u32)dport << 16));
    h = xl_mm3_block(h, proto);
    return xl_fmix32(h ^ 16);
}

/* scheduler source-hash: MurmurHash3 x86_32 of the client address alone (4 bytes, wire
 * order), seeded: identical to xdplb/hashing.py source_hash(). */
static __always_inline __u32 xl_source_hash(__u32 saddr, __u32 seed)
{
    return xl_fmix32(xl_mm3_block(seed, saddr) ^ 4);
}

/* Prefilter slot of an address: identical to xdplb/hashing.py addr_slot(). */
static __always_inline __u32 xl_addr_slot(__u32 addr)
{
    return (addr * 0x9e3779b1u) >> (32 - XL_ADDR_FILTER_BITS);
}

/* The prefilter's ``bit`` for ``addr``: 0 means certainly not, 1 only "maybe". */
static __always_inline int xl_maybe(__be32 addr, __u8 bit)
{
    __u32 slot = xl_addr_slot(addr);
    __u8 *bits = addr_filter.lookup(&slot);
    return bits && (*bits & bit);
}
