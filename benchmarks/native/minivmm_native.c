/*
 * minivmm-native: the native C baseline for the minivmm benchmarks.
 *
 * It loads a machine image written by the Python side (see IMAGE_FORMAT.md),
 * runs exactly the same guest bytes on /dev/kvm and reports one JSON object,
 * so Python and C numbers can be compared like for like.
 *
 * Mirrors no ABI itself: it uses the kernel's own <linux/kvm.h> (Documentation/
 * virt/kvm/api.rst sections 4 and 5, 7.18 KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and
 * 7.36 KVM_CAP_DIRTY_LOG_RING, 6.15+ numbering).
 *
 *   minivmm-native exits IMAGE
 *   minivmm-native dirty IMAGE --tracker ring|bitmap [--ring-entries E]
 *                              [--clear|--no-clear]
 *
 * Exit status: 0 ok, 1 a vCPU reported a non-zero exit code, 2 usage /
 * image / syscall error, 3 unexpected guest exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* The image stores these structs as raw bytes: their size is the format. */
_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs layout");
_Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs layout");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2 layout");
_Static_assert(sizeof(struct kvm_dirty_gfn) == 16, "kvm_dirty_gfn layout");

#define PORT_CONSOLE_E9  0xe9
#define PORT_CONSOLE_COM 0x3f8
#define PORT_EXC_REPORT  0xe0
#define PORT_SYNC        0xf0
#define PORT_DONE        0xf4

struct slot {
	uint32_t id, flags;
	uint64_t gpa, size, npages;
	void *mem;
	uint32_t *seen;     /* ring dedupe: seen[page] == collection generation */
	uint64_t *bitmap;   /* bitmap mode: KVM_GET_DIRTY_LOG buffer */
	uint64_t pages;     /* distinct pages per collection, summed (this slot only) */
};

struct vcpu {
	int idx, fd;
	struct kvm_run *run;
	struct kvm_dirty_gfn *ring;
	uint32_t fetch;           /* free-running ring fetch index */
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	uint64_t exits, syncs;
	int exit_code;
	int empty_full;           /* ring-full exits in a row that found nothing */
	uint64_t since_full;      /* entries taken from this ring (by any thread) since its
				   * last ring-full exit; under `lock` */
	double t_end;
	pthread_t thread;
};

enum tracker { TRACK_NONE, TRACK_RING, TRACK_BITMAP };

static const char *prog = "minivmm-native";
static int kvm_fd, vm_fd;
static struct slot *slots;
static uint32_t nslots;
static struct vcpu *vcpus;
static uint32_t nvcpus;
static struct kvm_cpuid2 *cpuid;
static uint64_t tss_addr, identity_map_addr;   /* image v2; 0: not set */

static int dirty_mode;
static enum tracker tracker = TRACK_NONE;
static uint32_t ring_entries = 4096;
static int do_clear = 1;        /* --clear / --no-clear */
static int manual_protect;      /* KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled */

/* Collection statistics; only touched with `lock` held. */
static uint64_t st_collections, st_pages, st_entries, st_dups;
static uint64_t st_ring_full, st_reset_mismatch;
static double st_collect_s;
static uint32_t generation = 0;   /* dedupe generation, one per collection: the ring-full
				   * harvests before a sync collection share its generation,
				   * as minivmm de-duplicates over the whole collection */
static int new_generation = 1;    /* the next harvest starts a new collection */

/* Sync barrier among the still-running vCPUs (dirty mode). */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static uint32_t nrunning, narrived;
static uint64_t barrier_round;
static pthread_barrier_t start_gate;

static void die_sys(const char *what)
{
	fprintf(stderr, "%s: %s: %s\n", prog, what, strerror(errno));
	exit(2);
}

static void __attribute__((format(printf, 2, 3))) die(int status, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(status);
}

static void usage(void)
{
	fprintf(stderr, "usage: %s exits IMAGE | %s dirty IMAGE --tracker ring|bitmap "
		"[--ring-entries E] [--clear|--no-clear]\n", prog, prog);
	exit(2);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *xcalloc(size_t n, size_t sz)
{
	void *p = calloc(n ? n : 1, sz);
	if (!p)
		die_sys("calloc");
	return p;
}

/* Fault in every page of a buffer now, at set-up, rather than at its first use inside
 * a timed collection: minivmm pre-faults its own buffers the same way (on a nested host
 * a first-touch fault right after KVM_RUN costs ~11 us per 4 KiB).  Volatile, so it is
 * not elided. */
static void prefault(void *p, size_t len)
{
	volatile char *c = p;
	long page = sysconf(_SC_PAGESIZE);

	for (size_t i = 0; i < len; i += (size_t)page)
		c[i] = 0;
}

/* ---------------------------------------------------------------- image */

static void rd(FILE *f, void *buf, size_t n, const char *what)
{
	if (n && fread(buf, 1, n, f) != n)
		die(2, "image: truncated or unreadable while reading %s", what);
}

static uint32_t rd32(FILE *f, const char *what)
{
	uint8_t b[4];
	rd(f, b, 4, what);
	return b[0] | b[1] << 8 | b[2] << 16 | (uint32_t)b[3] << 24;
}

static uint64_t rd64(FILE *f, const char *what)
{
	uint64_t lo = rd32(f, what);
	return lo | (uint64_t)rd32(f, what) << 32;
}

static void load_image(const char *path)
{
	FILE *f = fopen(path, "rb");
	char magic[8];

	if (!f)
		die(2, "open %s: %s", path, strerror(errno));
	rd(f, magic, 8, "magic");
	if (memcmp(magic, "MVMMIMG1", 8))
		die(2, "image: bad magic");
	uint32_t version = rd32(f, "version");
	if (version != 1 && version != 2)
		die(2, "image: unsupported version %u", version);
	if (version >= 2) {
		/* VMX's private real-mode pages, where the Python side put them */
		tss_addr = rd64(f, "tss_addr");
		identity_map_addr = rd64(f, "identity_map_addr");
	}

	nslots = rd32(f, "nslots");
	slots = xcalloc(nslots, sizeof(*slots));
	for (uint32_t i = 0; i < nslots; i++) {
		struct slot *s = &slots[i];
		s->id = rd32(f, "slot_id");
		s->flags = rd32(f, "slot flags");
		s->gpa = rd64(f, "guest_phys_addr");
		s->size = rd64(f, "memory_size");
		uint64_t clen = rd64(f, "content_len");
		if (!s->size || s->size % 4096 || s->gpa % 4096 || clen > s->size)
			die(2, "image: slot %u: bad gpa/size/content_len", s->id);
		s->npages = s->size / 4096;
		/* Private anonymous memory: only touched pages get backed. */
		s->mem = mmap(NULL, s->size, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (s->mem == MAP_FAILED)
			die_sys("mmap guest memory");
		rd(f, s->mem, clen, "slot content");
	}

	nvcpus = rd32(f, "nvcpus");
	if (!nvcpus)
		die(2, "image: no vCPUs");
	vcpus = xcalloc(nvcpus, sizeof(*vcpus));
	for (uint32_t i = 0; i < nvcpus; i++) {
		rd(f, &vcpus[i].regs, sizeof(vcpus[i].regs), "kvm_regs");
		rd(f, &vcpus[i].sregs, sizeof(vcpus[i].sregs), "kvm_sregs");
	}

	uint32_t ncpuid = rd32(f, "ncpuid");
	cpuid = xcalloc(1, sizeof(*cpuid) + (size_t)ncpuid * sizeof(cpuid->entries[0]));
	cpuid->nent = ncpuid;
	rd(f, cpuid->entries, (size_t)ncpuid * sizeof(cpuid->entries[0]), "cpuid entries");
	fclose(f);
}

/* ---------------------------------------------------------------- setup */

static void setup_vm(void)
{
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die_sys("open /dev/kvm");
	vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm_fd < 0)
		die_sys("KVM_CREATE_VM");
	/* VMX without unrestricted guest runs real mode through vm86 and needs
	 * these (api.rst 4.40, 4.36); other hosts accept and ignore them. */
	if (tss_addr && ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SET_TSS_ADDR) > 0 &&
	    ioctl(vm_fd, KVM_SET_TSS_ADDR, (unsigned long)tss_addr) < 0)
		die_sys("KVM_SET_TSS_ADDR");
	if (identity_map_addr &&
	    ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SET_IDENTITY_MAP_ADDR) > 0 &&
	    ioctl(vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &identity_map_addr) < 0)
		die_sys("KVM_SET_IDENTITY_MAP_ADDR");

	if (tracker == TRACK_RING) {
		/* The ring must be enabled before any vCPU exists.  Prefer the
		 * acquire/release flavour; the plain one is x86-only legacy. */
		struct kvm_enable_cap cap = { .cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL };
		int max = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
		if (max <= 0) {
			cap.cap = KVM_CAP_DIRTY_LOG_RING;
			max = ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
		}
		if (max <= 0)
			die(2, "KVM_CHECK_EXTENSION: dirty ring not supported");
		if ((uint64_t)ring_entries * sizeof(struct kvm_dirty_gfn) > (uint64_t)max)
			die(2, "KVM_CHECK_EXTENSION: ring of %u entries exceeds the maximum of %d bytes",
			    ring_entries, max);
		cap.args[0] = (uint64_t)ring_entries * sizeof(struct kvm_dirty_gfn);
		if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0)
			die_sys("KVM_ENABLE_CAP(dirty ring)");
	} else if (tracker == TRACK_BITMAP &&
		   ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0) {
		/* Without INITIALLY_SET: the bitmap starts clean. */
		struct kvm_enable_cap cap = { .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
					      .args = { KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE } };
		if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0)
			die_sys("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");
		manual_protect = 1;
	}

	for (uint32_t i = 0; i < nslots; i++) {
		struct slot *s = &slots[i];
		struct kvm_userspace_memory_region r = {
			.slot = s->id, .flags = s->flags, .guest_phys_addr = s->gpa,
			.memory_size = s->size, .userspace_addr = (uintptr_t)s->mem,
		};
		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
			die_sys("KVM_SET_USER_MEMORY_REGION");
		if (s->flags & KVM_MEM_LOG_DIRTY_PAGES) {
			s->seen = xcalloc(s->npages, sizeof(*s->seen));
			s->bitmap = xcalloc((s->npages + 63) / 64, sizeof(uint64_t));
			prefault(s->seen, s->npages * sizeof(*s->seen));
			prefault(s->bitmap, (s->npages + 63) / 64 * sizeof(uint64_t));
		}
	}

	int run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die_sys("KVM_GET_VCPU_MMAP_SIZE");
	for (uint32_t i = 0; i < nvcpus; i++) {
		struct vcpu *v = &vcpus[i];
		v->idx = i;
		v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, (unsigned long)i);
		if (v->fd < 0)
			die_sys("KVM_CREATE_VCPU");
		if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) < 0)
			die_sys("KVM_SET_CPUID2");
		v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
		if (v->run == MAP_FAILED)
			die_sys("mmap kvm_run");
		if (ioctl(v->fd, KVM_SET_SREGS, &v->sregs) < 0)
			die_sys("KVM_SET_SREGS");
		if (ioctl(v->fd, KVM_SET_REGS, &v->regs) < 0)
			die_sys("KVM_SET_REGS");
		if (tracker == TRACK_RING) {
			/* Populated, as minivmm maps it: no faults in the first harvest. */
			v->ring = mmap(NULL, (size_t)ring_entries * sizeof(struct kvm_dirty_gfn),
				       PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, v->fd,
				       (off_t)KVM_DIRTY_LOG_PAGE_OFFSET * getpagesize());
			if (v->ring == MAP_FAILED)
				die_sys("mmap dirty ring");
		}
	}
}

/* ----------------------------------------------------------- collection */

static struct slot *find_slot(uint32_t id)
{
	for (uint32_t i = 0; i < nslots; i++)
		if (slots[i].id == id)
			return &slots[i];
	return NULL;
}

/* Walk one vCPU's ring from its fetch index; returns entries harvested. */
static uint64_t harvest_ring(struct vcpu *v, uint64_t *distinct)
{
	uint64_t n = 0;
	struct slot *s = NULL;

	for (;;) {
		struct kvm_dirty_gfn *g = &v->ring[v->fetch & (ring_entries - 1)];
		/* Acquire pairs with KVM's release when it publishes the entry. */
		uint32_t flags = __atomic_load_n(&g->flags, __ATOMIC_ACQUIRE);
		if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
			break;
		uint32_t slot_id = g->slot & 0xffff;   /* high 16 bits: address space */
		uint64_t off = g->offset;
		if (!s || s->id != slot_id)
			s = find_slot(slot_id);
		if (!s || !s->seen || off >= s->npages)
			die(2, "dirty ring: bad entry slot=%u offset=%llu",
			    g->slot, (unsigned long long)off);
		if (s->seen[off] != generation) {
			s->seen[off] = generation;
			s->pages++;
			(*distinct)++;
		}
		__atomic_store_n(&g->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
		v->fetch++;
		n++;
	}
	return n;
}

/* Harvest + reset (ring) or get + clear (bitmap).  Caller holds `lock`; what each
 * ring gave is added to its vCPU's since_full. */
static void collect(int sync, double t0)
{
	uint64_t distinct = 0, entries = 0;

	if (tracker == TRACK_RING) {
		if (new_generation && ++generation == 0) {   /* wrapped: forget old marks */
			for (uint32_t i = 0; i < nslots; i++)
				if (slots[i].seen)
					memset(slots[i].seen, 0, slots[i].npages * sizeof(uint32_t));
			generation = 1;
		}
		new_generation = sync;      /* a sync collection ends this generation */
		for (uint32_t i = 0; i < nvcpus; i++) {
			uint64_t n = harvest_ring(&vcpus[i], &distinct);
			vcpus[i].since_full += n;
			entries += n;
		}
		int r = ioctl(vm_fd, KVM_RESET_DIRTY_RINGS, 0);
		if (r < 0)
			die_sys("KVM_RESET_DIRTY_RINGS");
		if ((uint64_t)r != entries)
			st_reset_mismatch++;
	} else {
		for (uint32_t i = 0; i < nslots; i++) {
			struct slot *s = &slots[i];
			if (!s->bitmap)
				continue;
			struct kvm_dirty_log log = { .slot = s->id, .dirty_bitmap = s->bitmap };
			if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
				die_sys("KVM_GET_DIRTY_LOG");
			uint64_t set = 0;
			for (uint64_t w = 0; w < (s->npages + 63) / 64; w++)
				set += __builtin_popcountll(s->bitmap[w]);
			distinct += set;
			s->pages += set;
			/* Nothing set, nothing to re-protect: skipped, as minivmm does. */
			if (set && manual_protect && do_clear) {
				/* Re-protect exactly what we collected. */
				struct kvm_clear_dirty_log cl = {
					.slot = s->id, .num_pages = s->npages, .first_page = 0,
					.dirty_bitmap = s->bitmap,
				};
				if (ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &cl) < 0)
					die_sys("KVM_CLEAR_DIRTY_LOG");
			}
		}
	}

	st_collect_s += now() - t0;
	st_pages += distinct;
	st_entries += entries;
	st_dups += entries > distinct ? entries - distinct : 0;
}

/* Last arrival (or a finishing vCPU) collects and releases everyone. */
static void release_barrier(void)
{
	collect(1, now());
	st_collections++;
	narrived = 0;
	barrier_round++;
	pthread_cond_broadcast(&cond);
}

static void sync_barrier(void)
{
	pthread_mutex_lock(&lock);
	if (++narrived == nrunning) {
		release_barrier();
	} else {
		uint64_t round = barrier_round;
		while (round == barrier_round)
			pthread_cond_wait(&cond, &lock);
	}
	pthread_mutex_unlock(&lock);
}

static void vcpu_finished(void)
{
	pthread_mutex_lock(&lock);
	nrunning--;
	/* The others may be waiting only for us. */
	if (narrived && narrived == nrunning)
		release_barrier();
	pthread_mutex_unlock(&lock);
}

/* ------------------------------------------------------------- run loop */

static const char *exit_name(uint32_t r)
{
	static const char *names[] = {
		[KVM_EXIT_UNKNOWN] = "UNKNOWN", [KVM_EXIT_EXCEPTION] = "EXCEPTION",
		[KVM_EXIT_IO] = "IO", [KVM_EXIT_HYPERCALL] = "HYPERCALL",
		[KVM_EXIT_DEBUG] = "DEBUG", [KVM_EXIT_HLT] = "HLT",
		[KVM_EXIT_MMIO] = "MMIO", [KVM_EXIT_IRQ_WINDOW_OPEN] = "IRQ_WINDOW_OPEN",
		[KVM_EXIT_SHUTDOWN] = "SHUTDOWN", [KVM_EXIT_FAIL_ENTRY] = "FAIL_ENTRY",
		[KVM_EXIT_INTR] = "INTR", [KVM_EXIT_INTERNAL_ERROR] = "INTERNAL_ERROR",
		[KVM_EXIT_SYSTEM_EVENT] = "SYSTEM_EVENT",
		[KVM_EXIT_X86_RDMSR] = "X86_RDMSR", [KVM_EXIT_X86_WRMSR] = "X86_WRMSR",
		[KVM_EXIT_DIRTY_RING_FULL] = "DIRTY_RING_FULL",
	};
	if (r < sizeof(names) / sizeof(names[0]) && names[r])
		return names[r];
	return "?";
}

static void bad_exit(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	struct kvm_regs regs;
	char detail[128] = "";
	unsigned long long rip = ~0ULL;

	if (ioctl(v->fd, KVM_GET_REGS, &regs) == 0)
		rip = regs.rip;
	switch (run->exit_reason) {
	case KVM_EXIT_IO: {
		const uint8_t *d = (const uint8_t *)run + run->io.data_offset;
		uint32_t val = 0;
		memcpy(&val, d, run->io.size <= 4 ? run->io.size : 4);
		snprintf(detail, sizeof(detail), " %s port=0x%x size=%u data=0x%x%s",
			 run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
			 run->io.port, run->io.size, val,
			 run->io.port == PORT_EXC_REPORT ? " (guest exception report)" : "");
		break;
	}
	case KVM_EXIT_MMIO:
		snprintf(detail, sizeof(detail), " %s gpa=0x%llx len=%u",
			 run->mmio.is_write ? "write" : "read",
			 (unsigned long long)run->mmio.phys_addr, run->mmio.len);
		break;
	case KVM_EXIT_INTERNAL_ERROR:
		snprintf(detail, sizeof(detail), " suberror=%u", run->internal.suberror);
		break;
	case KVM_EXIT_FAIL_ENTRY:
		snprintf(detail, sizeof(detail), " hw_reason=0x%llx",
			 (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		break;
	}
	die(3, "vcpu %d: unexpected exit %s (%u)%s rip=0x%llx", v->idx,
	    exit_name(run->exit_reason), run->exit_reason, detail, rip);
}

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	struct kvm_run *run = v->run;

	pthread_barrier_wait(&start_gate);
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				v->exits++;
				continue;
			}
			die_sys("KVM_RUN");
		}
		v->exits++;

		if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT) {
			const uint8_t *data = (const uint8_t *)run + run->io.data_offset;
			if (run->io.port == PORT_CONSOLE_E9 || run->io.port == PORT_CONSOLE_COM)
				continue;
			if (run->io.port == PORT_SYNC) {
				v->syncs++;
				if (dirty_mode)
					sync_barrier();
				continue;
			}
			if (run->io.port == PORT_DONE) {
				v->exit_code = data[0];
				break;
			}
		} else if (run->exit_reason == KVM_EXIT_DIRTY_RING_FULL &&
			   tracker == TRACK_RING) {
			/* timed from before an uncontended lock, as minivmm times its handler */
			double t0 = now();
			if (pthread_mutex_trylock(&lock)) {
				pthread_mutex_lock(&lock);
				t0 = now();
			}
			collect(0, t0);
			st_ring_full++;
			/* Count what was taken from this vCPU's ring since its previous
			 * ring-full exit, by whichever thread: with several vCPUs in step,
			 * another one's collection often empties this ring first, exit
			 * after exit. Nothing at all, several times in a row, means the
			 * ring wrapped past the soft limit (seen with emulated guest code)
			 * and re-entering would loop forever. */
			uint64_t got = v->since_full;
			v->since_full = 0;
			pthread_mutex_unlock(&lock);
			v->empty_full = got ? 0 : v->empty_full + 1;
			if (v->empty_full >= 3)
				die(3, "vcpu %d: dirty ring full but nothing to harvest "
				    "(ring overflowed; use more --ring-entries)", v->idx);
			continue;
		}
		bad_exit(v);
	}
	v->t_end = now();
	if (dirty_mode)
		vcpu_finished();
	return NULL;
}

/* ----------------------------------------------------------------- main */

int main(int argc, char **argv)
{
	if (argc < 3)
		usage();
	if (!strcmp(argv[1], "dirty"))
		dirty_mode = 1;
	else if (strcmp(argv[1], "exits"))
		usage();
	for (int i = 3; i < argc; i++) {
		if (!dirty_mode)
			usage();
		if (!strcmp(argv[i], "--tracker") && i + 1 < argc) {
			i++;
			if (!strcmp(argv[i], "ring"))
				tracker = TRACK_RING;
			else if (!strcmp(argv[i], "bitmap"))
				tracker = TRACK_BITMAP;
			else
				usage();
		} else if (!strcmp(argv[i], "--ring-entries") && i + 1 < argc) {
			char *end;
			unsigned long e = strtoul(argv[++i], &end, 0);
			/* The ring index is masked, so the size must be a power of two. */
			if (*end || !e || (e & (e - 1)) || e > (1UL << 24))
				usage();
			ring_entries = e;
		} else if (!strcmp(argv[i], "--clear")) {
			do_clear = 1;
		} else if (!strcmp(argv[i], "--no-clear")) {
			do_clear = 0;
		} else {
			usage();
		}
	}
	if (dirty_mode && tracker == TRACK_NONE)
		usage();
	if (tracker == TRACK_RING && !do_clear)
		die(2, "--no-clear applies to --tracker bitmap only "
		    "(an unreset dirty ring would just fill up)");

	load_image(argv[2]);
	setup_vm();

	nrunning = nvcpus;
	if (pthread_barrier_init(&start_gate, NULL, nvcpus + 1))
		die(2, "pthread_barrier_init failed");
	/* Before the threads are made, as minivmm's clock (Machine.start() inside
	 * DirtySession.run()) counts making its vCPU threads; still no KVM_RUN before t0. */
	double t0 = now();
	for (uint32_t i = 0; i < nvcpus; i++) {
		int err = pthread_create(&vcpus[i].thread, NULL, vcpu_thread, &vcpus[i]);
		if (err)
			die(2, "pthread_create: %s", strerror(err));
	}
	pthread_barrier_wait(&start_gate);

	double t_end = t0;
	uint64_t exits = 0, syncs = 0;
	int failed = 0;
	for (uint32_t i = 0; i < nvcpus; i++) {
		pthread_join(vcpus[i].thread, NULL);
		exits += vcpus[i].exits;
		syncs += vcpus[i].syncs;
		if (vcpus[i].t_end > t_end)
			t_end = vcpus[i].t_end;
	}

	if (!dirty_mode) {
		double el = t_end - t0;
		printf("{\"mode\":\"exits\",\"vcpus\":%u,\"exits\":%llu,\"sync\":%llu,"
		       "\"elapsed_s\":%.9f,\"exits_per_s\":%.1f}\n",
		       nvcpus, (unsigned long long)exits, (unsigned long long)syncs,
		       el, el > 0 ? exits / el : 0.0);
	} else {
		/* Pick up whatever was dirtied after the last sync. */
		collect(1, now());
		st_collections++;
		double el = now() - t0;
		printf("{\"mode\":\"dirty\",\"tracker\":\"%s\",\"ring_entries\":%u,"
		       "\"vcpus\":%u,\"clear\":%s,\"collections\":%llu,\"pages\":%llu,"
		       "\"entries\":%llu,\"duplicates\":%llu,\"ring_full_exits\":%llu,"
		       "\"reset_mismatch\":%llu,\"collect_s\":%.9f,"
		       "\"collect_ns_per_page\":%.1f,\"elapsed_s\":%.9f,\"pages_per_s\":%.1f",
		       tracker == TRACK_RING ? "ring" : "bitmap",
		       tracker == TRACK_RING ? ring_entries : 0, nvcpus,
		       tracker == TRACK_RING || (manual_protect && do_clear) ? "true" : "false",
		       (unsigned long long)st_collections, (unsigned long long)st_pages,
		       (unsigned long long)st_entries, (unsigned long long)st_dups,
		       (unsigned long long)st_ring_full, (unsigned long long)st_reset_mismatch,
		       st_collect_s, st_pages ? st_collect_s * 1e9 / st_pages : 0.0,
		       el, el > 0 ? st_pages / el : 0.0);
		/* per logged slot, so the harness can compare the data slot's pages alone */
		printf(",\"slot_pages\":{");
		for (uint32_t i = 0, first = 1; i < nslots; i++) {
			if (!(slots[i].flags & KVM_MEM_LOG_DIRTY_PAGES))
				continue;
			printf("%s\"%u\":%llu", first ? "" : ",", slots[i].id,
			       (unsigned long long)slots[i].pages);
			first = 0;
		}
		printf("}}\n");
	}
	/* A result that never got written (stdout on a full disk) must not exit 0 as if
	 * it had. */
	if (fflush(stdout) == EOF || ferror(stdout))
		die_sys("writing the result to stdout");

	for (uint32_t i = 0; i < nvcpus; i++) {
		if (vcpus[i].exit_code) {
			fprintf(stderr, "%s: vcpu %u exited with code %d\n",
				prog, i, vcpus[i].exit_code);
			failed = 1;
		}
	}
	return failed;
}
