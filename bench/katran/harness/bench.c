// Katran new-flow cost through BPF_PROG_TEST_RUN, with a restoring wrapper.
// Our own harness code: loads Katran's balancer object unchanged, configures
// it the way KatranLb would for one VIP, and times cases in alternating rounds.
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/bpf.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

// ---- Katran's ABI (shapes from katran/lib/bpf/balancer_structs.h/consts.h,
// default build: MAX_VIPS 512, RING_SIZE 65537, MAX_REALS 4096)
#define K_MAX_VIPS 512
#define K_RING_SIZE 65537
#define K_LRU_CNTRS 0
#define K_LRU_MISS_CNTR 1
#define K_NEW_CONN_RATE_CNTR 2
#define K_FALLBACK_LRU_CNTR 3
#define K_ENCAP_FAIL_CNTR 7
#define K_CH_DROP_STATS 9
#define K_XDP_TOTAL_CNTR 16
#define K_XDP_TX_CNTR 17
#define K_XDP_DROP_CNTR 18
#define K_XDP_PASS_CNTR 19
#define K_MAX_CONN_RATE 125000
// KatranConfig defaults: LruSize 8,000,000 split over the forwarding cores.
#define K_DEFAULT_LRU_SIZE 8000000ULL

struct k_flow_key {
	uint32_t src[4];
	uint32_t dst[4];
	uint32_t ports;
	uint8_t proto;
	uint8_t pad[3];
};
struct k_real_pos_lru {
	uint32_t pos;
	uint32_t pad;
	uint64_t atime;
};
struct k_vip_definition {
	uint32_t vip[4];
	uint16_t port; // network order, as in the packet
	uint8_t proto;
	uint8_t pad;
};
struct k_vip_meta {
	uint32_t flags;
	uint32_t vip_num;
};
struct k_real_definition {
	uint32_t dst[4];
	uint8_t flags;
	uint8_t pad[3];
};
struct k_ctl_value {
	uint64_t value; // union: mac[6] in the first bytes
};
struct k_lb_stats {
	uint64_t v1, v2;
};

_Static_assert(sizeof(struct k_flow_key) == 40, "flow_key");
_Static_assert(sizeof(struct k_real_pos_lru) == 16, "real_pos_lru");
_Static_assert(sizeof(struct k_vip_definition) == 20, "vip_definition");
_Static_assert(sizeof(struct k_real_definition) == 20, "real_definition");

// ---- harness ABI (harness.bpf.c)
#define HEAD 64
struct bench_packet {
	uint8_t head[HEAD];
	uint32_t vary, seq, orig_len, pad;
};

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "FATAL: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}
#define CHECK(x, ...) do { if (!(x)) die(__VA_ARGS__); } while (0)

static int ncpus;
// -f 0: no forwarding cores, lru_mapping left empty: Katran uses its
// 1000-entry fallback_cache (what KatranLb does when no forwarding cores are given).
static bool fallback_mode;
static int cpu = 1;

// ---------------------------------------------------------------- packets
static const uint8_t MAC_CLIENT_GW[6] = {0x02, 0, 0, 0, 0, 0xaa}; // src MAC
static const uint8_t MAC_LB[6] = {0x02, 0, 0, 0, 0, 0xbb};        // dst MAC
static const uint8_t MAC_GW[6] = {0x02, 0, 0, 0, 0, 0xcc};        // ctl_array[0]

static uint16_t csum16(const uint8_t *p, int n, uint32_t sum)
{
	for (int i = 0; i + 1 < n; i += 2)
		sum += (p[i] << 8) | p[i + 1];
	if (n & 1)
		sum += p[n - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

// Ethernet + IPv4 (20 bytes, no options) + TCP (20 bytes) + payload.
// Same shape as xdproxy's bench packet (64 zero bytes of payload: 118 bytes).
#define PAYLOAD 64
#define PKT_LEN (14 + 20 + 20 + PAYLOAD)
static void build_tcp(uint8_t *p, const uint8_t src[4], uint16_t sport,
		      const uint8_t dst[4], uint16_t dport, uint8_t flags)
{
	memset(p, 0, PKT_LEN);
	memcpy(p, MAC_LB, 6);
	memcpy(p + 6, MAC_CLIENT_GW, 6);
	p[12] = 0x08; p[13] = 0x00;
	uint8_t *ip = p + 14;
	ip[0] = 0x45; ip[1] = 0;
	uint16_t tot = 20 + 20 + PAYLOAD;
	ip[2] = tot >> 8; ip[3] = tot;
	ip[4] = 0; ip[5] = 1; ip[6] = 0x40; ip[7] = 0; // DF
	ip[8] = 64; ip[9] = 6;
	memcpy(ip + 12, src, 4);
	memcpy(ip + 16, dst, 4);
	uint16_t c = csum16(ip, 20, 0);
	ip[10] = c >> 8; ip[11] = c;
	uint8_t *t = ip + 20;
	t[0] = sport >> 8; t[1] = sport; t[2] = dport >> 8; t[3] = dport;
	t[7] = 1;             // seq 1
	t[12] = 5 << 4;       // data offset 5
	t[13] = flags;
	t[14] = 64240 >> 8; t[15] = 64240 & 0xff;
	// TCP checksum (pseudo header); Katran does not check it, but be valid.
	uint32_t sum = 0;
	sum += (src[0] << 8 | src[1]) + (src[2] << 8 | src[3]);
	sum += (dst[0] << 8 | dst[1]) + (dst[2] << 8 | dst[3]);
	sum += 6 + 20 + PAYLOAD;
	c = csum16(t, 20 + PAYLOAD, sum);
	t[16] = c >> 8; t[17] = c;
}
#define TCP_SYN 0x02
#define TCP_ACK 0x10

static const uint8_t VIP[4] = {10, 96, 0, 10};
static const uint16_t VIP_PORT = 80;
static const uint8_t NON_VIP[4] = {192, 168, 77, 7};
static const uint8_t CLIENT[4] = {172, 16, 0, 2};
#define NREALS 10

// ---------------------------------------------------------------- katran
struct katran {
	struct bpf_object *obj;
	int prog;
	int vip_map, reals, ch_rings, ctl_array, stats, lru_mapping,
	    fallback_cache, reals_stats;
	int lru[64];
	uint64_t lru_size;
};

static int map_fd(struct bpf_object *obj, const char *name)
{
	struct bpf_map *m = bpf_object__find_map_by_name(obj, name);
	CHECK(m, "map %s not found", name);
	int fd = bpf_map__fd(m);
	CHECK(fd >= 0, "map %s fd", name);
	return fd;
}

static void katran_load(struct katran *k, const char *path, int nforward, uint64_t per_core)
{
	k->lru_size = per_core ? per_core : K_DEFAULT_LRU_SIZE / (nforward ? nforward : 2);
	// KatranLb::initLrus: one LRU_HASH per forwarding core, named
	// katran_lru<core>, key flow_key, value real_pos_lru, size
	// LruSize / forwarding cores, flags 0 (no NUMA), the first one also the
	// inner-map prototype of lru_mapping.
	for (int c = 0; c < nforward; c++) {
		char name[16];
		snprintf(name, sizeof name, "katran_lru%d", c);
		k->lru[c] = bpf_map_create(BPF_MAP_TYPE_LRU_HASH, name,
					   sizeof(struct k_flow_key),
					   sizeof(struct k_real_pos_lru),
					   k->lru_size, NULL);
		CHECK(k->lru[c] >= 0, "create %s: %s", name, strerror(errno));
	}
	k->obj = bpf_object__open_file(path, NULL);
	CHECK(k->obj, "open %s", path);
	struct bpf_map *lm = bpf_object__find_map_by_name(k->obj, "lru_mapping");
	CHECK(lm, "lru_mapping");
	if (nforward) // else libbpf makes the prototype from the BTF definition
		CHECK(!bpf_map__set_inner_map_fd(lm, k->lru[0]), "set_inner_map_fd");
	int err = bpf_object__load(k->obj);
	CHECK(!err, "load katran: %d", err);
	struct bpf_program *p = bpf_object__find_program_by_name(k->obj, "balancer_ingress");
	CHECK(p, "balancer_ingress");
	k->prog = bpf_program__fd(p);
	k->vip_map = map_fd(k->obj, "vip_map");
	k->reals = map_fd(k->obj, "reals");
	k->ch_rings = map_fd(k->obj, "ch_rings");
	k->ctl_array = map_fd(k->obj, "ctl_array");
	k->stats = map_fd(k->obj, "stats");
	k->lru_mapping = map_fd(k->obj, "lru_mapping");
	k->fallback_cache = map_fd(k->obj, "fallback_cache");
	k->reals_stats = map_fd(k->obj, "reals_stats");
	// KatranLb::attachLrus: lru_mapping[core] = that core's LRU.
	for (int c = 0; c < nforward; c++) {
		uint32_t key = c;
		uint32_t fd = k->lru[c];
		CHECK(!bpf_map_update_elem(k->lru_mapping, &key, &fd, 0),
		      "lru_mapping[%d]: %s", c, strerror(errno));
	}
}

static void katran_configure(struct katran *k)
{
	// ctl_array[0]: default gateway MAC (KatranLb::changeMac).
	struct k_ctl_value cv = {0};
	memcpy(&cv.value, MAC_GW, 6);
	uint32_t key = 0;
	CHECK(!bpf_map_update_elem(k->ctl_array, &key, &cv, 0), "ctl_array");
	// One VIP, vip_num 0, no flags.
	struct k_vip_definition vd;
	memset(&vd, 0, sizeof vd);
	memcpy(&vd.vip[0], VIP, 4);
	vd.port = htons(VIP_PORT);
	vd.proto = 6;
	struct k_vip_meta vm = {.flags = 0, .vip_num = 0};
	CHECK(!bpf_map_update_elem(k->vip_map, &vd, &vm, 0), "vip_map");
	// Reals 1..10 (id 0 is "unset" to Katran): 10.200.0.<1+i>.
	for (uint32_t i = 1; i <= NREALS; i++) {
		struct k_real_definition rd;
		memset(&rd, 0, sizeof rd);
		uint8_t a[4] = {10, 200, 0, (uint8_t)(1 + i)};
		memcpy(&rd.dst[0], a, 4);
		CHECK(!bpf_map_update_elem(k->reals, &i, &rd, 0), "reals[%u]", i);
	}
	// ch_rings[vip_num * RING_SIZE + pos] = real id. KatranLb fills it from
	// its Maglev CHHelpers; the datapath reads one array slot either way, so
	// a simple interleave is used here (every slot set, no 0).
	uint32_t *keys = malloc(K_RING_SIZE * 4), *vals = malloc(K_RING_SIZE * 4);
	for (uint32_t i = 0; i < K_RING_SIZE; i++) {
		keys[i] = 0 * K_RING_SIZE + i;
		vals[i] = 1 + (uint32_t)((i * 2654435761u) % NREALS);
	}
	uint32_t count = K_RING_SIZE;
	DECLARE_LIBBPF_OPTS(bpf_map_batch_opts, bo);
	if (bpf_map_update_batch(k->ch_rings, keys, vals, &count, &bo)) {
		for (uint32_t i = 0; i < K_RING_SIZE; i++)
			CHECK(!bpf_map_update_elem(k->ch_rings, &keys[i], &vals[i], 0), "ch_rings");
	}
	free(keys);
	free(vals);
}

// Per-CPU lb_stats at index idx, summed over all CPUs and for `cpu`.
static struct k_lb_stats stat_cpu(struct katran *k, uint32_t idx, int c)
{
	struct k_lb_stats v[ncpus];
	CHECK(!bpf_map_lookup_elem(k->stats, &idx, v), "stats[%u]", idx);
	return v[c];
}
static struct k_lb_stats stat_sum(struct katran *k, uint32_t idx)
{
	struct k_lb_stats v[ncpus], s = {0};
	CHECK(!bpf_map_lookup_elem(k->stats, &idx, v), "stats[%u]", idx);
	for (int i = 0; i < ncpus; i++) {
		s.v1 += v[i].v1;
		s.v2 += v[i].v2;
	}
	return s;
}

// is_under_flood() keeps {v1: new connections in this 1 s quantum, v2:
// quantum start} per CPU at stats[MAX_VIPS + NEW_CONN_RATE_CNTR]. Above
// MAX_CONN_RATE (125,000) per second per CPU Katran skips the LRU insert.
static void conn_rate_set(struct katran *k, uint64_t v1, uint64_t v2)
{
	struct k_lb_stats v[ncpus];
	for (int i = 0; i < ncpus; i++) {
		v[i].v1 = v1;
		v[i].v2 = v2;
	}
	uint32_t idx = K_MAX_VIPS + K_NEW_CONN_RATE_CNTR;
	CHECK(!bpf_map_update_elem(k->stats, &idx, v, 0), "conn rate reset");
}
static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

// Entries in an LRU/hash map, by batch lookup (fallback: get_next_key).
static uint64_t count_entries(int fd, uint32_t ksz, uint32_t vsz)
{
	const uint32_t batch = 65536;
	void *keys = malloc((size_t)batch * ksz), *vals = malloc((size_t)batch * vsz);
	uint64_t total = 0;
	uint8_t in[64], out[64];
	void *inp = NULL;
	DECLARE_LIBBPF_OPTS(bpf_map_batch_opts, bo);
	for (;;) {
		uint32_t n = batch;
		int err = bpf_map_lookup_batch(fd, inp, out, keys, vals, &n, &bo);
		if (err && errno != ENOENT) {
			if (errno == EINVAL || errno == ENOTSUP || errno == EOPNOTSUPP) {
				// fallback
				total = 0;
				uint8_t k1[64], k2[64];
				void *prev = NULL;
				while (!bpf_map_get_next_key(fd, prev, k2)) {
					total++;
					memcpy(k1, k2, ksz);
					prev = k1;
				}
				break;
			}
			die("lookup_batch: %s", strerror(errno));
		}
		total += n;
		if (err)
			break; // ENOENT: done
		memcpy(in, out, sizeof in);
		inp = in;
	}
	free(keys);
	free(vals);
	return total;
}

// ---------------------------------------------------------------- harness
struct harness {
	struct bpf_object *obj;
	int wrapper, empty, lru_insert, lru_lookup_insert, hash_insert;
	int packet, target, lru, hash;
	uint32_t seq;
};

static int prog_fd(struct bpf_object *obj, const char *name)
{
	struct bpf_program *p = bpf_object__find_program_by_name(obj, name);
	CHECK(p, "program %s", name);
	return bpf_program__fd(p);
}

static void harness_load(struct harness *h, const char *path, uint64_t lru_size)
{
	h->obj = bpf_object__open_file(path, NULL);
	CHECK(h->obj, "open %s", path);
	CHECK(!bpf_map__set_max_entries(bpf_object__find_map_by_name(h->obj, "bench_lru"), lru_size), "size");
	CHECK(!bpf_map__set_max_entries(bpf_object__find_map_by_name(h->obj, "bench_hash"), lru_size), "size");
	int err = bpf_object__load(h->obj);
	CHECK(!err, "load harness: %d", err);
	h->wrapper = prog_fd(h->obj, "bench_wrapper");
	h->empty = prog_fd(h->obj, "bench_empty");
	h->lru_insert = prog_fd(h->obj, "bench_lru_insert");
	h->lru_lookup_insert = prog_fd(h->obj, "bench_lru_lookup_insert");
	h->hash_insert = prog_fd(h->obj, "bench_hash_insert");
	h->packet = map_fd(h->obj, "bench_packet");
	h->target = map_fd(h->obj, "bench_target");
	h->lru = map_fd(h->obj, "bench_lru");
	h->hash = map_fd(h->obj, "bench_hash");
	// New-flow sources start at 172.16.0.16 (bytes 28-29 = 0x0010): never
	// the fixed client 172.16.0.2.
	h->seq = 0x00100000;
}

struct result {
	uint32_t retval;
	uint32_t duration;
	uint32_t out_len;
	uint8_t out[512];
};

// Time `target` through the wrapper: `repeat` iterations on `pkt`.
static struct result timed(struct harness *h, int target, const uint8_t *pkt,
			   bool vary, uint32_t repeat)
{
	uint32_t key = 0;
	uint32_t fd = target;
	CHECK(!bpf_map_update_elem(h->target, &key, &fd, 0), "bench_target: %s", strerror(errno));
	struct bench_packet bp;
	memset(&bp, 0, sizeof bp);
	memcpy(bp.head, pkt, HEAD);
	bp.vary = vary;
	bp.seq = h->seq;
	bp.orig_len = PKT_LEN;
	CHECK(!bpf_map_update_elem(h->packet, &key, &bp, 0), "bench_packet");
	struct result r;
	memset(&r, 0, sizeof r);
	DECLARE_LIBBPF_OPTS(bpf_test_run_opts, o,
		.data_in = pkt,
		.data_size_in = PKT_LEN,
		.data_out = r.out,
		.data_size_out = sizeof r.out,
		.repeat = repeat);
	int err = bpf_prog_test_run_opts(h->wrapper, &o);
	CHECK(!err, "test_run: %s", strerror(errno));
	r.retval = o.retval;
	r.duration = o.duration;
	r.out_len = o.data_size_out;
	if (vary)
		h->seq += repeat;
	// the wrapper's counter must have advanced by exactly `repeat`
	CHECK(!bpf_map_lookup_elem(h->packet, &key, &bp), "bench_packet read");
	if (vary)
		CHECK(bp.seq == h->seq, "wrapper seq %u != %u", bp.seq, h->seq);
	return r;
}

// ---------------------------------------------------------------- cases
enum {
	C_EMPTY,
	C_EMPTY_VARY,
	C_NEW_SYN,
	C_NEW_ACK,
	C_NEW_SYN_FLOOD,
	C_EST_ACK,
	C_SYN_SAME,
	C_NONVIP,
	C_LRU_INSERT,
	C_LRU_LOOKUP_INSERT,
	C_HASH_INSERT,
	C_NEW_SYN_ASIS,
	NCASES
};
static const char *case_name[NCASES] = {
	"empty (baseline)",
	"empty, wrapper varying the source",
	"katran new flow, SYN (CH + LRU insert)",
	"katran new flow, ACK (LRU miss + CH + insert)",
	"katran new flow, SYN, 'under flood' (no insert)",
	"katran established, ACK (LRU hit)",
	"katran SYN, same source (CH + LRU overwrite)",
	"katran non-VIP (XDP_PASS)",
	"plain LRU insert (update_elem)",
	"plain LRU lookup-miss + insert",
	"plain HASH insert (prealloc)",
	"katran new SYN, big repeat, rate ctr not reset",
};

struct ctx {
	struct katran k;
	struct harness h;
	uint8_t syn[PKT_LEN], ack[PKT_LEN], other[PKT_LEN];
	uint32_t repeat, new_repeat, asis_repeat;
	bool verbose;
};

static bool is_real(const uint8_t *a)
{
	return a[0] == 10 && a[1] == 200 && a[2] == 0 && a[3] >= 2 && a[3] < 2 + NREALS;
}

static uint64_t lru_count(struct katran *k, int c)
{
	if (fallback_mode)
		return c == cpu ? count_entries(k->fallback_cache, sizeof(struct k_flow_key),
						 sizeof(struct k_real_pos_lru)) : 0;
	return count_entries(k->lru[c], sizeof(struct k_flow_key), sizeof(struct k_real_pos_lru));
}

static void check_encap(const struct result *r, const uint8_t *in)
{
	CHECK(r->retval == XDP_TX, "katran returned %u, expected XDP_TX(3)", r->retval);
	CHECK(r->out_len == PKT_LEN + 20, "encap length %u", r->out_len);
	CHECK(!memcmp(r->out, MAC_GW, 6), "outer dst MAC is not the gateway");
	CHECK(r->out[12] == 0x08 && r->out[13] == 0 && r->out[14] == 0x45 && r->out[23] == 4,
	      "outer header is not IPv4/IPIP");
	CHECK(is_real(r->out + 30), "outer dst %u.%u.%u.%u is not a real",
	      r->out[30], r->out[31], r->out[32], r->out[33]);
	// inner IPv4 header starts at 34: VIP unchanged
	CHECK(!memcmp(r->out + 34 + 16, VIP, 4), "inner dst is not the VIP");
	(void)in;
}

// Run one case; verify its path. Returns ns per packet.
static uint32_t run_case(struct ctx *x, int c, bool report)
{
	struct katran *k = &x->k;
	struct harness *h = &x->h;
	uint32_t rep = x->repeat;
	struct result r;
	uint64_t lru_before = 0, lru_after, other_before = 0;
	struct k_lb_stats miss_b = {0}, lru_b = {0}, tx_b = {0}, pass_b = {0}, fb_b = {0}, miss_a, lru_a, tx_a, pass_a, fb_a;
	bool katran = (c >= C_NEW_SYN && c <= C_NONVIP) || c == C_NEW_SYN_ASIS;
	bool count_lru = (c == C_NEW_SYN || c == C_NEW_ACK || c == C_NEW_SYN_FLOOD ||
			  c == C_EST_ACK || c == C_SYN_SAME || c == C_NEW_SYN_ASIS);
	// C_SYN_SAME also goes through Katran's rate limiter (every SYN is a
	// CH pick + LRU write): keep it under MAX_CONN_RATE like the new flows.
	if (c == C_NEW_SYN || c == C_NEW_ACK || c == C_NEW_SYN_FLOOD || c == C_SYN_SAME ||
	    c == C_LRU_INSERT || c == C_LRU_LOOKUP_INSERT || c == C_HASH_INSERT)
		rep = x->new_repeat;
	if (c == C_NEW_SYN_ASIS)
		rep = x->asis_repeat;
	if (fallback_mode && c == C_EST_ACK) {
		// new flows have evicted it from the 1000-entry fallback: put it back
		conn_rate_set(k, 0, 0);
		struct result p = timed(h, k->prog, x->ack, false, 1);
		check_encap(&p, x->ack);
	}
	if (count_lru) {
		lru_before = lru_count(k, cpu);
		other_before = fallback_mode ? 0 : lru_count(k, 1 - cpu) +
			count_entries(k->fallback_cache, sizeof(struct k_flow_key), sizeof(struct k_real_pos_lru));
	}
	if (c == C_LRU_INSERT || c == C_LRU_LOOKUP_INSERT)
		lru_before = count_entries(h->lru, 40, 16);
	if (c == C_HASH_INSERT)
		lru_before = count_entries(h->hash, 40, 16);
	if (katran) {
		miss_b = stat_cpu(k, K_MAX_VIPS + K_LRU_MISS_CNTR, cpu);
		lru_b = stat_cpu(k, K_MAX_VIPS + K_LRU_CNTRS, cpu);
		tx_b = stat_cpu(k, K_MAX_VIPS + K_XDP_TX_CNTR, cpu);
		pass_b = stat_cpu(k, K_MAX_VIPS + K_XDP_PASS_CNTR, cpu);
		fb_b = stat_sum(k, K_MAX_VIPS + K_FALLBACK_LRU_CNTR);
	}
	// Katran's new-connection rate limiter: start each run in a fresh 1 s
	// quantum (so up to 125,000 inserts happen), or for the flood case in
	// a quantum already over the limit (so none do).
	if (c == C_NEW_SYN || c == C_NEW_ACK || c == C_SYN_SAME)
		conn_rate_set(k, 0, 0);
	if (c == C_NEW_SYN_FLOOD)
		conn_rate_set(k, K_MAX_CONN_RATE + 1, mono_ns());

	switch (c) {
	case C_EMPTY: r = timed(h, h->empty, x->syn, false, rep); break;
	case C_EMPTY_VARY: r = timed(h, h->empty, x->syn, true, rep); break;
	case C_NEW_SYN_ASIS: r = timed(h, k->prog, x->syn, true, rep); break;
	case C_NEW_SYN: r = timed(h, k->prog, x->syn, true, rep); break;
	case C_NEW_ACK: r = timed(h, k->prog, x->ack, true, rep); break;
	case C_NEW_SYN_FLOOD: r = timed(h, k->prog, x->syn, true, rep); break;
	case C_EST_ACK: r = timed(h, k->prog, x->ack, false, rep); break;
	case C_SYN_SAME: r = timed(h, k->prog, x->syn, false, rep); break;
	case C_NONVIP: r = timed(h, k->prog, x->other, false, rep); break;
	case C_LRU_INSERT: r = timed(h, h->lru_insert, x->syn, true, rep); break;
	case C_LRU_LOOKUP_INSERT: r = timed(h, h->lru_lookup_insert, x->syn, true, rep); break;
	case C_HASH_INSERT: r = timed(h, h->hash_insert, x->syn, true, rep); break;
	default: die("case");
	}

	// ---- proofs
	char proof[512] = "";
	if (c == C_EMPTY || c == C_EMPTY_VARY || c == C_LRU_INSERT || c == C_LRU_LOOKUP_INSERT || c == C_HASH_INSERT)
		CHECK(r.retval == XDP_PASS, "%s returned %u (tail call failed?)", case_name[c], r.retval);
	if (c == C_LRU_INSERT || c == C_LRU_LOOKUP_INSERT || c == C_HASH_INSERT) {
		lru_after = count_entries(c == C_HASH_INSERT ? h->hash : h->lru, 40, 16);
		CHECK(lru_after - lru_before == rep, "%s: map grew by %lu, expected %u",
		      case_name[c], lru_after - lru_before, rep);
		snprintf(proof, sizeof proof, "ret=%u entries %lu -> %lu (+%lu)", r.retval,
			 lru_before, lru_after, lru_after - lru_before);
	}
	if (katran) {
		miss_a = stat_cpu(k, K_MAX_VIPS + K_LRU_MISS_CNTR, cpu);
		lru_a = stat_cpu(k, K_MAX_VIPS + K_LRU_CNTRS, cpu);
		tx_a = stat_cpu(k, K_MAX_VIPS + K_XDP_TX_CNTR, cpu);
		pass_a = stat_cpu(k, K_MAX_VIPS + K_XDP_PASS_CNTR, cpu);
		fb_a = stat_sum(k, K_MAX_VIPS + K_FALLBACK_LRU_CNTR);
		if (fallback_mode)
			CHECK(fb_a.v1 - fb_b.v1 == (c == C_NONVIP ? 0 : rep), "fallback counter +%lu", fb_a.v1 - fb_b.v1);
		else
			CHECK(fb_a.v1 == fb_b.v1, "fallback LRU was used");
		struct k_lb_stats rate = stat_cpu(k, K_MAX_VIPS + K_NEW_CONN_RATE_CNTR, cpu);
		uint64_t d_syn_miss = miss_a.v1 - miss_b.v1, d_ack_miss = miss_a.v2 - miss_b.v2;
		uint64_t d_vip = lru_a.v1 - lru_b.v1, d_ch = lru_a.v2 - lru_b.v2;
		uint64_t d_tx = tx_a.v1 - tx_b.v1, d_pass = pass_a.v1 - pass_b.v1;
		if (count_lru) {
			lru_after = lru_count(k, cpu);
			uint64_t other_after = fallback_mode ? 0 : lru_count(k, 1 - cpu) +
				count_entries(k->fallback_cache, sizeof(struct k_flow_key), sizeof(struct k_real_pos_lru));
			CHECK(other_after == other_before, "another CPU's LRU or the fallback grew");
		}
		if (c == C_NONVIP) {
			CHECK(r.retval == XDP_PASS, "non-VIP returned %u", r.retval);
			CHECK(r.out_len == PKT_LEN && !memcmp(r.out, x->other, PKT_LEN), "non-VIP packet changed");
			CHECK(d_pass == rep && d_vip == 0, "non-VIP counters: pass %lu vip %lu", d_pass, d_vip);
			snprintf(proof, sizeof proof, "ret=%u XDP_PASS_CNTR +%lu, vip packets +%lu",
				 r.retval, d_pass, d_vip);
		} else {
			check_encap(&r, x->syn);
			CHECK(d_tx == rep && d_vip == rep, "tx %lu vip %lu, expected %u", d_tx, d_vip, rep);
			int64_t grew = (int64_t)(lru_after - lru_before);
			if (fallback_mode) {
				// 1000 entries, evicting: the table cannot grow by rep.
				CHECK(lru_after <= 1000 + 128, "fallback_cache has %lu entries", lru_after);
				if (c == C_NEW_SYN || c == C_NEW_ACK || c == C_NEW_SYN_ASIS)
					grew = rep; // checked through the miss counters below
			}
			switch (c) {
			case C_NEW_SYN:
				CHECK(d_syn_miss == rep && d_ch == rep && grew == rep,
				      "new SYN: syn misses %lu, CH %lu, LRU +%ld (want %u each)",
				      d_syn_miss, d_ch, grew, rep);
				CHECK(rate.v1 == rep, "conn rate %lu", rate.v1);
				break;
			case C_NEW_ACK:
				CHECK(d_ack_miss == rep && d_ch == rep && grew == rep,
				      "new ACK: non-syn misses %lu, CH %lu, LRU +%ld (want %u each)",
				      d_ack_miss, d_ch, grew, rep);
				break;
			case C_NEW_SYN_FLOOD:
				CHECK(d_syn_miss == rep && d_ch == rep && grew == 0,
				      "flood: syn misses %lu, CH %lu, LRU +%ld", d_syn_miss, d_ch, grew);
				break;
			case C_EST_ACK:
				CHECK(d_ch == 0 && d_ack_miss == 0 && grew == 0,
				      "established: CH %lu misses %lu LRU +%ld", d_ch, d_ack_miss, grew);
				break;
			case C_NEW_SYN_ASIS:
				CHECK(d_syn_miss == rep && d_ch == rep && grew >= 0 && grew <= rep,
				      "as-is: syn misses %lu CH %lu LRU +%ld", d_syn_miss, d_ch, grew);
				break;
			case C_SYN_SAME:
				CHECK(d_syn_miss == rep && d_ch == rep && grew == 0,
				      "same-source SYN: syn misses %lu CH %lu LRU +%ld", d_syn_miss, d_ch, grew);
				break;
			}
			snprintf(proof, sizeof proof,
				 "ret=%u out %u B to %u.%u.%u.%u; TX +%lu, vip pkts +%lu, CH picks +%lu, "
				 "SYN misses +%lu, non-SYN misses +%lu, conn-rate v1=%lu; LRU[cpu%d] %lu -> %lu (%+ld)",
				 r.retval, r.out_len, r.out[30], r.out[31], r.out[32], r.out[33],
				 d_tx, d_vip, d_ch, d_syn_miss, d_ack_miss, rate.v1, cpu,
				 lru_before, lru_after, (int64_t)(lru_after - lru_before));
		}
	}
	if (report)
		printf("  %-48s %4u ns  repeat %u  %s\n", case_name[c], r.duration, rep, proof);
	return r.duration;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}
static double median(uint32_t *v, int n)
{
	uint32_t t[n];
	memcpy(t, v, n * sizeof *v);
	qsort(t, n, sizeof *t, cmp_u32);
	return n % 2 ? t[n / 2] : (t[n / 2 - 1] + t[n / 2]) / 2.0;
}

int main(int argc, char **argv)
{
	const char *katran_obj = "build/balancer.bpf.o";
	const char *harness_obj = "build/harness.bpf.o";
	int rounds = 7;
	uint32_t repeat = 100000, new_repeat = 100000;
	int nforward = 2;
	int opt;
	uint32_t asis_repeat = 0;
	uint64_t per_core = 0;
	while ((opt = getopt(argc, argv, "k:H:r:n:N:c:f:D:l:")) != -1) {
		switch (opt) {
		case 'k': katran_obj = optarg; break;
		case 'H': harness_obj = optarg; break;
		case 'r': rounds = atoi(optarg); break;
		case 'n': repeat = strtoul(optarg, NULL, 0); break;
		case 'N': new_repeat = strtoul(optarg, NULL, 0); break;
		case 'c': cpu = atoi(optarg); break;
		case 'f': nforward = atoi(optarg); break;
		case 'D': asis_repeat = strtoul(optarg, NULL, 0); break;
		case 'l': per_core = strtoull(optarg, NULL, 0); break;
		default:
			fprintf(stderr, "usage: %s [-k katran.o] [-H harness.o] [-r rounds] "
				"[-n repeat] [-N new-flow repeat] [-c cpu] [-f forwarding cores] "
				"[-D as-is new-SYN repeat, 0 = skip] [-l LRU entries per core, default 8M/cores]\n", argv[0]);
			return 2;
		}
	}
	CHECK(rounds > 0 && rounds <= 101, "rounds");
	CHECK(new_repeat <= K_MAX_CONN_RATE,
	      "new-flow repeat %u > MAX_CONN_RATE %u: Katran would stop inserting",
	      new_repeat, K_MAX_CONN_RATE);
	ncpus = libbpf_num_possible_cpus();
	CHECK(ncpus > 0, "ncpus");
	CHECK(cpu >= 0 && (nforward == 0 || cpu < nforward) && nforward <= 2, "cpu/forwarding cores");
	fallback_mode = nforward == 0;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	CHECK(!sched_setaffinity(0, sizeof set, &set), "pin to cpu %d", cpu);
	libbpf_set_strict_mode(LIBBPF_STRICT_ALL);

	static struct ctx x;
	x.repeat = repeat;
	x.new_repeat = new_repeat;
	x.asis_repeat = asis_repeat;
	int ncases = asis_repeat ? NCASES : NCASES - 1;
	katran_load(&x.k, katran_obj, nforward, per_core);
	katran_configure(&x.k);
	harness_load(&x.h, harness_obj, x.k.lru_size);
	build_tcp(x.syn, CLIENT, 51000, VIP, VIP_PORT, TCP_SYN);
	build_tcp(x.ack, CLIENT, 51000, VIP, VIP_PORT, TCP_ACK);
	build_tcp(x.other, CLIENT, 51001, NON_VIP, 80, TCP_SYN);

	time_t now = time(NULL);
	char when[64];
	strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S %Z", localtime(&now));
	printf("katran-bench %s, cpu %d, %d possible cpus, katran LRU %lu entries/core x %d cores, "
	       "repeat %u (new flows %u), %d rounds\n",
	       when, cpu, ncpus, x.k.lru_size, nforward, repeat, new_repeat, rounds);

	{
		struct bpf_prog_info info;
		uint32_t len = sizeof info;
		memset(&info, 0, sizeof info);
		CHECK(!bpf_obj_get_info_by_fd(x.k.prog, &info, &len), "prog info");
		printf("balancer_ingress: id %u, xlated %u B, jited %u B, verified_insns %u; ",
		       info.id, info.xlated_prog_len, info.jited_prog_len, info.verified_insns);
		if (fallback_mode)
			printf("NO per-core LRU: lru_mapping empty, Katran falls back to fallback_cache (1000)\n");
		else
			printf("LRU maps katran_lru0..%d created flags 0, inner-map prototype = katran_lru0\n",
			       nforward - 1);
	}
	// Prime the established flow: one ACK through Katran with the counter
	// fresh, so the fixed client flow is in this CPU's LRU.
	conn_rate_set(&x.k, 0, 0);
	{
		uint64_t before = lru_count(&x.k, cpu);
		struct result r = timed(&x.h, x.k.prog, x.ack, false, 1);
		check_encap(&r, x.ack);
		uint64_t after = lru_count(&x.k, cpu);
		CHECK(after == before + 1, "priming did not insert (%lu -> %lu)", before, after);
		printf("primed established flow 172.16.0.2:51000 -> 10.96.0.10:80 into LRU[cpu%d] "
		       "(%lu -> %lu), backend %u.%u.%u.%u\n", cpu, before, after,
		       r.out[30], r.out[31], r.out[32], r.out[33]);
	}
	// warm-up round, not counted
	printf("warm-up round:\n");
	for (int c = 0; c < ncases; c++)
		run_case(&x, c, true);

	uint32_t ns[NCASES][rounds];
	for (int i = 0; i < rounds; i++) {
		printf("round %d:\n", i + 1);
		for (int c = 0; c < ncases; c++)
			ns[c][i] = run_case(&x, c, true);
	}
	// summary: deltas over the empty baseline of the same round
	printf("\nsummary, %d rounds, ns per packet from BPF_PROG_TEST_RUN duration, "
	       "repeat %u (new flows and inserts %u)\n", rounds, repeat, new_repeat);
	printf("%-50s %9s %15s | %9s %17s\n", "case", "median", "min..max", "delta med", "delta min..max");
	for (int c = 0; c < ncases; c++) {
		int32_t d[rounds];
		uint32_t mn = ~0u, mx = 0;
		int32_t dmn = INT32_MAX, dmx = INT32_MIN;
		for (int i = 0; i < rounds; i++) {
			d[i] = (int32_t)ns[c][i] - (int32_t)ns[C_EMPTY][i];
			if (ns[c][i] < mn) mn = ns[c][i];
			if (ns[c][i] > mx) mx = ns[c][i];
			if (d[i] < dmn) dmn = d[i];
			if (d[i] > dmx) dmx = d[i];
		}
		// median of per-round deltas (shift to unsigned for the helper)
		uint32_t du[rounds];
		for (int i = 0; i < rounds; i++)
			du[i] = (uint32_t)(d[i] + 100000);
		double dmed = median(du, rounds) - 100000;
		char r1[32], r2[32];
		snprintf(r1, sizeof r1, "%u..%u", mn, mx);
		snprintf(r2, sizeof r2, "%+d..%+d", dmn, dmx);
		printf("%-50s %9.1f %15s | %+9.1f %17s\n", case_name[c], median(ns[c], rounds), r1,
		       c == C_EMPTY ? 0.0 : dmed, c == C_EMPTY ? "" : r2);
	}
	printf("(delta = case - empty in the same round; median of the per-round deltas)\n");
	uint64_t total = lru_count(&x.k, cpu);
	printf("final LRU[cpu%d] entries %lu of %lu; LRU[cpu%d] %lu; fallback_cache %lu\n", cpu, total,
	       x.k.lru_size, 1 - cpu, lru_count(&x.k, 1 - cpu),
	       count_entries(x.k.fallback_cache, 40, 16));
	struct k_lb_stats s;
	s = stat_sum(&x.k, K_MAX_VIPS + K_LRU_CNTRS);
	printf("katran stats: LRU_CNTRS v1(vip pkts)=%lu v2(CH picks)=%lu", s.v1, s.v2);
	s = stat_sum(&x.k, K_MAX_VIPS + K_LRU_MISS_CNTR);
	printf("; LRU_MISS v1(SYN)=%lu v2(non-SYN)=%lu", s.v1, s.v2);
	s = stat_sum(&x.k, K_MAX_VIPS + K_FALLBACK_LRU_CNTR);
	printf("; FALLBACK_LRU=%lu", s.v1);
	s = stat_sum(&x.k, K_MAX_VIPS + K_CH_DROP_STATS);
	printf("; CH_DROP=%lu/%lu", s.v1, s.v2);
	s = stat_sum(&x.k, K_MAX_VIPS + K_ENCAP_FAIL_CNTR);
	printf("; ENCAP_FAIL=%lu/%lu", s.v1, s.v2);
	s = stat_sum(&x.k, K_MAX_VIPS + K_XDP_TX_CNTR);
	printf("; XDP_TX=%lu", s.v1);
	s = stat_sum(&x.k, K_MAX_VIPS + K_XDP_PASS_CNTR);
	printf("; XDP_PASS=%lu", s.v1);
	s = stat_sum(&x.k, K_MAX_VIPS + K_XDP_DROP_CNTR);
	printf("; XDP_DROP=%lu\n", s.v1);
	return 0;
}
