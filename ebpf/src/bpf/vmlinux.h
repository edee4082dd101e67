/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The kernel types dwcp's BPF programs use, and only those: a minimal vmlinux.h, committed so the
 * build needs neither bpftool nor the build host's BTF (`/sys/kernel/btf/vmlinux`).
 *
 * The kernel structs below are partial: every field is read through a CO-RE relocation
 * (`preserve_access_index`), which libbpf resolves at load time by field *name* against the
 * running kernel's BTF, so their offsets here do not matter and the programs load on any kernel
 * that has the fields (libbpf refuses to load them, naming the field, on one that does not).
 * `struct bpf_sock_ops` is UAPI: the verifier checks its accesses by offset, so it is copied whole
 * from `include/uapi/linux/bpf.h` and must keep that layout.
 * The field types were taken from `bpftool btf dump file /sys/kernel/btf/vmlinux format c` on
 * Linux 6.18; ebpf/tests/probes.rs and initwin.rs load and run the programs against the kernel.
 */
#ifndef __VMLINUX_H__
#define __VMLINUX_H__

typedef signed char __s8;
typedef unsigned char __u8;
typedef short int __s16;
typedef short unsigned int __u16;
typedef int __s32;
typedef unsigned int __u32;
typedef long long int __s64;
typedef long long unsigned int __u64;
typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef __s64 s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
enum { false = 0, true = 1 };

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_SK_STORAGE = 24,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum {
	BPF_F_NO_PREALLOC = 1,
};

enum {
	BPF_LOCAL_STORAGE_GET_F_CREATE = 1,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

enum {
	BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB = 4,
	BPF_SOCK_OPS_RTT_CB = 12,
};

enum {
	BPF_SOCK_OPS_RTT_CB_FLAG = 1 << 3,
};

struct bpf_sock;

/* UAPI: layout exactly as include/uapi/linux/bpf.h (the union of pointers is __bpf_md_ptr). */
struct bpf_sock_ops {
	__u32 op;
	union {
		__u32 args[4];
		__u32 reply;
		__u32 replylong[4];
	};
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port;
	__u32 local_port;
	__u32 is_fullsock;
	__u32 snd_cwnd;
	__u32 srtt_us;
	__u32 bpf_sock_ops_cb_flags;
	__u32 state;
	__u32 rtt_min;
	__u32 snd_ssthresh;
	__u32 rcv_nxt;
	__u32 snd_nxt;
	__u32 snd_una;
	__u32 mss_cache;
	__u32 ecn_flags;
	__u32 rate_delivered;
	__u32 rate_interval_us;
	__u32 packets_out;
	__u32 retrans_out;
	__u32 total_retrans;
	__u32 segs_in;
	__u32 data_segs_in;
	__u32 segs_out;
	__u32 data_segs_out;
	__u32 lost_out;
	__u32 sacked_out;
	__u32 sk_txhash;
	__u64 bytes_received;
	__u64 bytes_acked;
	union {
		struct bpf_sock *sk;
	} __attribute__((aligned(8)));
	union {
		void *skb_data;
	} __attribute__((aligned(8)));
	union {
		void *skb_data_end;
	} __attribute__((aligned(8)));
	__u32 skb_len;
	__u32 skb_tcp_flags;
	__u64 skb_hwtstamp;
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

typedef struct {
	s64 counter;
} atomic64_t;

struct sock_common {
	volatile unsigned char skc_state;
	atomic64_t skc_cookie;
};

struct sock {
	struct sock_common __sk_common;
	u32 sk_pacing_status;
	unsigned long sk_pacing_rate;
	unsigned long sk_max_pacing_rate;
};

struct sk_buff {
	unsigned int len;
};

struct minmax_sample {
	u32 t;
	u32 v;
};

struct minmax {
	struct minmax_sample s[3];
};

struct tcp_sock {
	u32 srtt_us;
	struct minmax rtt_min;
	u32 snd_cwnd;
	u32 snd_ssthresh;
	u32 snd_wnd;
	u32 rcv_wnd;
	u32 mss_cache;
	u32 total_retrans;
	u32 delivered;
	u64 bytes_acked;
	u32 rate_interval_us;
	u32 rate_delivered;
	u32 snd_cwnd_clamp;
};

struct rate_sample {
	int losses;
	u32 acked_sacked;
};

#pragma clang attribute pop

/* A struct_ops map's type: libbpf matches its members by name against the kernel's. */
struct tcp_congestion_ops {
	u32 (*ssthresh)(struct sock *sk);
	void (*cong_control)(struct sock *sk, u32 ack, int flag, const struct rate_sample *rs);
	u32 (*undo_cwnd)(struct sock *sk);
	void (*init)(struct sock *sk);
	char name[16];
};

#endif /* __VMLINUX_H__ */
