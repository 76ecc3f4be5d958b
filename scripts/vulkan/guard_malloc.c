// Guard allocator for tracing heap corruption in a driver (docs/vulkan.md, "The lavapipe 22.3 crash").
// Preloaded, it serves every block of GUARD_MIN bytes or more (default 65536) from its own mapping
// that ends at a PROT_NONE page, so a write past the end faults at the writing instruction; freed
// blocks are unmapped (GUARD_UAF=1: kept mapped PROT_NONE instead, never reused, costs memory), so a
// use after free faults too. GUARD_BT=1 records in each block's header the thread and backtrace that
// allocated and freed it; scripts/vulkan/guard_who.py prints them in gdb for a faulting address.
//
//   gcc -O1 -shared -fPIC -o guard_malloc.so scripts/vulkan/guard_malloc.c -ldl
//   gdb -x scripts/vulkan/guard_who.py -ex 'set env LD_PRELOAD=./guard_malloc.so'
//       -ex 'set env GUARD_MIN=256' -ex 'set env GUARD_BT=1' -ex run
//       -ex 'who $_siginfo._sifields._sigfault.si_addr' --args python ...   (one command line)
// Small blocks and blocks aligned above a page go to glibc (its __libc_* entry points, which need no
// dlsym and so no allocation). Many small guarded blocks need more mappings than Linux's default
// vm.max_map_count (65530): raise it for GUARD_MIN below a few KiB.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

extern void * __libc_malloc(size_t);
extern void __libc_free(void *);
extern void * __libc_calloc(size_t, size_t);
extern void * __libc_realloc(void *, size_t);
extern void * __libc_memalign(size_t, size_t);

enum { PAGE = 4096, NBT = 20, TABLE = 1 << 21 };
#define MAGIC 0x6775617264ULL  // guard_who.py looks for it at the start of a mapping

// At the start of each block's mapping; the user pointer is preceded by a pointer back to it.
typedef struct {
    uint64_t magic;
    void * base;
    size_t maplen, size;
    long alloc_tid, free_tid;
    int n_alloc_bt, n_free_bt;
    void * alloc_bt[NBT], * free_bt[NBT];
} header;

static size_t guard_min;
static int keep_freed, want_bt;
static __thread int in_backtrace;  // backtrace() may allocate: those allocations are not traced

static void init(void) {
    if (guard_min) return;
    const char * s = getenv("GUARD_MIN"), * u = getenv("GUARD_UAF"), * b = getenv("GUARD_BT");
    keep_freed = u && atoi(u);
    want_bt = b && atoi(b);
    guard_min = s ? strtoull(s, 0, 10) : 65536;
}

static int trace(void ** out) {
    if (!want_bt || in_backtrace) return 0;
    in_backtrace = 1;
    int n = backtrace(out, NBT);
    in_backtrace = 0;
    return n;
}

// Which pointers are ours: an open-addressing set (1 marks a deleted slot, reused by inserts).
static void * volatile table[TABLE];
static size_t slot_of(const void * p) { return ((uintptr_t) p >> 4) & (TABLE - 1); }
static int is_ours(const void * p) {
    for (size_t i = 0, h = slot_of(p); i < TABLE; ++i) {
        void * q = table[(h + i) & (TABLE - 1)];
        if (q == p) return 1;
        if (!q) return 0;
    }
    return 0;
}
static void remember(void * p) {
    for (size_t i = 0, h = slot_of(p); i < TABLE; ++i) {
        void * volatile * s = &table[(h + i) & (TABLE - 1)];
        if (__sync_bool_compare_and_swap(s, 0, p) || __sync_bool_compare_and_swap(s, (void *) 1, p)) return;
    }
    abort();
}
static void forget(const void * p) {
    for (size_t i = 0, h = slot_of(p); i < TABLE; ++i) {
        void * volatile * s = &table[(h + i) & (TABLE - 1)];
        if (*s == p) { *s = (void *) 1; return; }
        if (!*s) return;
    }
}
static header * header_of(void * p) { return ((header **) p)[-1]; }

static void * guarded(size_t size, size_t align) {
    if (align < 16) align = 16;
    const size_t body = (size + align - 1) / align * align;
    const size_t data_pages = (sizeof(header) + sizeof(void *) + align + body + PAGE - 1) / PAGE;
    const size_t maplen = (data_pages + 1) * PAGE;
    char * base = mmap(0, maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return 0;
    char * guard = base + data_pages * PAGE;
    mprotect(guard, PAGE, PROT_NONE);
    char * p = guard - body;  // aligned: the guard page is, and body is a multiple of align (<= PAGE)
    header * h = (header *) base;
    h->magic = MAGIC, h->base = base, h->maplen = maplen, h->size = size;
    h->alloc_tid = syscall(SYS_gettid), h->n_alloc_bt = trace(h->alloc_bt), h->n_free_bt = 0;
    ((header **) p)[-1] = h;
    remember(p);
    return p;
}
static void release(void * p) {
    header * h = header_of(p);
    forget(p);
    h->free_tid = syscall(SYS_gettid), h->n_free_bt = trace(h->free_bt);
    if (keep_freed) mprotect(h->base, h->maplen, PROT_NONE);
    else munmap(h->base, h->maplen);
}
static void * aligned(size_t align, size_t n) {
    init();
    return n >= guard_min && align <= PAGE ? guarded(n, align) : __libc_memalign(align, n);
}

void * malloc(size_t n) { init(); return n >= guard_min ? guarded(n, 16) : __libc_malloc(n); }
void * calloc(size_t a, size_t b) { init(); return a * b >= guard_min ? guarded(a * b, 16) : __libc_calloc(a, b); }
void free(void * p) { if (p && is_ours(p)) release(p); else if (p) __libc_free(p); }
void * memalign(size_t a, size_t n) { return aligned(a, n); }
void * aligned_alloc(size_t a, size_t n) { return aligned(a, n); }
void * valloc(size_t n) { return aligned(PAGE, n); }
int posix_memalign(void ** out, size_t a, size_t n) {
    void * p = aligned(a, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
size_t malloc_usable_size(void * p) {
    static size_t (*libc_usable)(void *);
    if (p && is_ours(p)) return header_of(p)->size;
    if (!libc_usable) libc_usable = (size_t (*)(void *)) dlsym(RTLD_NEXT, "malloc_usable_size");
    return libc_usable(p);
}
void * realloc(void * p, size_t n) {
    init();
    if (!p) return malloc(n);
    if (!is_ours(p) && n < guard_min) return __libc_realloc(p, n);
    const size_t old = malloc_usable_size(p);
    void * q = malloc(n);
    if (!q) return 0;
    memcpy(q, p, old < n ? old : n);
    free(p);
    return q;
}
