/* Traffic sink of the end-to-end benchmark, attached to every backend: counts and drops the
 * benchmark's UDP datagrams (destination port SINK_PORT, -D flag) as soon as they arrive, so
 * the backends cost next to nothing and the packets/s measured are what the load balancer
 * under test delivers; inside one IPIP header too (dsr/ipip, counted on the wire behind the
 * balancer). Everything else (ARP, TCP, ...) passes. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

BPF_PERCPU_ARRAY(sunk, __u64, 1);

int bench_sink(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->ihl != 5)
        return XDP_PASS;
    if (ip->protocol == IPPROTO_IPIP) { /* dsr/ipip on the wire: the datagram is inside */
        ip += 1;
        if ((void *)(ip + 1) > data_end || ip->ihl != 5)
            return XDP_PASS;
    }
    if (ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    struct udphdr *uh = (void *)(ip + 1);
    if ((void *)(uh + 1) > data_end || uh->dest != bpf_htons(SINK_PORT))
        return XDP_PASS;
    __u32 zero = 0;
    __u64 *n = sunk.lookup(&zero);
    if (n)
        *n += 1;
    return XDP_DROP;
}
