/* UDP packet generator of the end-to-end benchmark, run with BPF_PROG_TEST_RUN in live-frames
 * mode on the client's interface: every run sends a frame out of that interface (XDP_TX) as an
 * XDP frame, the way a NIC hands buffers to its driver, so the balancer's interface receives
 * it without a socket buffer. Each frame gets the next source port of GEN_FLOWS (-D flag), so
 * the traffic is many flows. The UDP checksum is 0 (none). */
#include <uapi/linux/bpf.h>

#define GEN_FRAME 64
#define GEN_SPORT_OFF 34 /* UDP source port in an untagged IPv4 frame without options */
#define GEN_SPORT_BASE 10000

struct gen_frame {
    __u8 b[GEN_FRAME];
};

BPF_ARRAY(gen_tmpl, struct gen_frame, 1);
BPF_PERCPU_ARRAY(gen_seq, __u32, 1);

int bench_gen(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 zero = 0;
    if (data + GEN_FRAME > data_end)
        return XDP_ABORTED;
    struct gen_frame *t = gen_tmpl.lookup(&zero);
    __u32 *n = gen_seq.lookup(&zero);
    if (!t || !n)
        return XDP_ABORTED;
    /* Pages come back to the generator's pool with whatever the receivers left in them (a
     * balancer rewrites addresses and MACs): write the whole frame every time. */
    __builtin_memcpy(data, t->b, GEN_FRAME);
    __u16 *sport = data + GEN_SPORT_OFF;
    *sport = bpf_htons(GEN_SPORT_BASE + *n % GEN_FLOWS);
    *n += 1;
    return XDP_TX;
}
