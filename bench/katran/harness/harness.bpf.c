// Benchmark harness for BPF_PROG_TEST_RUN (our own code, not Katran's).
//
// bench_wrapper: restores the packet before every iteration (BPF_PROG_TEST_RUN
// with repeat > 1 does not), optionally gives it a never-seen source address
// bytes 2-3 + source port from a sequence counter, then tail-calls the program
// under test through bench_target[0].
//
// bench_empty: the baseline target.
// bench_lru_insert / bench_lru_lookup_insert / bench_hash_insert: context
// micro-benchmarks, one kernel map write of a Katran-shaped flow key.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define HEAD 64

struct bench_packet {
	__u64 head[HEAD / 8];
	__u32 vary;     // 1: new source for every iteration
	__u32 seq;      // next source (bytes 28-29, 34-35 of the frame)
	__u32 orig_len; // frame length the wrapper puts back
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct bench_packet);
	__uint(max_entries, 1);
} bench_packet SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} bench_target SEC(".maps");

// Same shapes as Katran's struct flow_key (40 bytes) / struct real_pos_lru
// (16 bytes), defined here independently.
struct fkey {
	__u32 src[4];
	__u32 dst[4];
	__u32 ports;
	__u8 proto;
	__u8 pad[3];
};
struct fval {
	__u32 pos;
	__u32 pad;
	__u64 atime;
};

// max_entries is set from user space (Katran's per-core LRU size).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct fkey);
	__type(value, struct fval);
	__uint(max_entries, 1);
} bench_lru SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct fkey);
	__type(value, struct fval);
	__uint(max_entries, 1);
} bench_hash SEC(".maps");

SEC("xdp")
int bench_wrapper(struct xdp_md *ctx)
{
	__u32 k = 0;
	struct bench_packet *s = bpf_map_lookup_elem(&bench_packet, &k);
	if (!s)
		return XDP_ABORTED;
	// Put data back where it was: the target may have pushed headers
	// (Katran's IPIP encap: -20). Called every time, delta 0 included, so
	// the baseline pays the same helper call.
	__u64 len = (__u64)((void *)(long)ctx->data_end - (void *)(long)ctx->data);
	asm volatile("" : "+r"(len)); // keep the subtraction 64-bit, pointer - pointer
	int delta = (int)len - (int)s->orig_len;
	if (bpf_xdp_adjust_head(ctx, delta))
		return XDP_ABORTED;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + HEAD > end)
		return XDP_ABORTED;
	__u64 *d = data;
#pragma unroll
	for (int i = 0; i < HEAD / 8; i++)
		d[i] = s->head[i];
	if (s->vary) {
		__u32 seq = s->seq;
		s->seq = seq + 1;
		__u8 *b = data;
		b[28] = seq >> 24;
		b[29] = seq >> 16;
		b[34] = seq >> 8;
		b[35] = seq;
	}
	bpf_tail_call(ctx, &bench_target, 0);
	return XDP_ABORTED;
}

SEC("xdp")
int bench_empty(struct xdp_md *ctx)
{
	return XDP_PASS;
}

static __always_inline int flow_key(struct xdp_md *ctx, struct fkey *key)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *b = data;
	if (data + 38 > end)
		return -1;
	key->src[0] = *(__u32 *)(b + 26);
	key->dst[0] = *(__u32 *)(b + 30);
	key->ports = *(__u32 *)(b + 34);
	key->proto = b[23];
	return 0;
}

SEC("xdp")
int bench_lru_insert(struct xdp_md *ctx)
{
	struct fkey key = {};
	struct fval val = {.pos = 1};
	if (flow_key(ctx, &key))
		return XDP_ABORTED;
	if (bpf_map_update_elem(&bench_lru, &key, &val, BPF_ANY))
		return XDP_ABORTED;
	return XDP_PASS;
}

SEC("xdp")
int bench_lru_lookup_insert(struct xdp_md *ctx)
{
	struct fkey key = {};
	struct fval val = {.pos = 1};
	if (flow_key(ctx, &key))
		return XDP_ABORTED;
	if (bpf_map_lookup_elem(&bench_lru, &key))
		return XDP_DROP; // must miss: the flow is new
	if (bpf_map_update_elem(&bench_lru, &key, &val, BPF_ANY))
		return XDP_ABORTED;
	return XDP_PASS;
}

SEC("xdp")
int bench_hash_insert(struct xdp_md *ctx)
{
	struct fkey key = {};
	struct fval val = {.pos = 1};
	if (flow_key(ctx, &key))
		return XDP_ABORTED;
	if (bpf_map_update_elem(&bench_hash, &key, &val, BPF_ANY))
		return XDP_ABORTED;
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
