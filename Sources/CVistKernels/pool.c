// A small fork-join thread pool. Decode issues a few hundred parallel jobs per token, each a few
// microseconds long, so waking sleeping threads for each would cost more than the work: workers
// spin on a generation counter for a short while after each job and only then sleep.
#include "CVistKernels.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

// Spin iterations before sleeping: a pause is ~10-140 cycles, so this is tens of microseconds,
// longer than the gap between two matrix-vector products of one decode step.
#define SPIN_ITERS 20000

// One thread's share of a split region: [lo, hi) packed into one word (lo in the low 32 bits),
// on a cache line of its own so the owner's claims do not disturb the other threads.
typedef struct {
    _Alignas(64) _Atomic uint64_t range;
} vk_share;

struct vk_pool {
    int n;
    vk_share *shares;  // n of them, for vk_pool_split_*
    pthread_t *threads;
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    atomic_uint generation;
    atomic_int pending;
    atomic_int stop;
    vk_task_fn fn;
    void *ctx;
};

typedef struct {
    vk_pool *pool;
    int ith;
} worker_arg;

static void *worker_main(void *p) {
    worker_arg *arg = p;
    vk_pool *pool = arg->pool;
    const int ith = arg->ith;
    free(arg);
    // The pool is created with generation 0; a worker that starts late must still run job 1.
    unsigned seen = 0;
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen &&
               !atomic_load_explicit(&pool->stop, memory_order_acquire)) {
            if (++spins < SPIN_ITERS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool->mutex);
            while (atomic_load_explicit(&pool->generation, memory_order_acquire) == seen &&
                   !atomic_load_explicit(&pool->stop, memory_order_acquire)) {
                pthread_cond_wait(&pool->cond, &pool->mutex);
            }
            pthread_mutex_unlock(&pool->mutex);
        }
        if (atomic_load_explicit(&pool->stop, memory_order_acquire)) return NULL;
        seen = gen;
        pool->fn(pool->ctx, ith, pool->n);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel);
    }
}

vk_pool *vk_pool_create(int n) {
    if (n < 1) n = 1;
    vk_pool *pool = calloc(1, sizeof(vk_pool));
    if (!pool) return NULL;
    pool->n = n;
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->cond, NULL);
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->stop, 0);
    pool->threads = calloc((size_t)n, sizeof(pthread_t));
    pool->shares = aligned_alloc(64, (size_t)n * sizeof(vk_share));
    if (!pool->threads || !pool->shares) {
        free(pool->threads);
        free(pool->shares);
        free(pool);
        return NULL;
    }
    for (int i = 0; i < n; i++) atomic_init(&pool->shares[i].range, 0);
    for (int i = 1; i < n; i++) {
        worker_arg *arg = malloc(sizeof(worker_arg));
        arg->pool = pool;
        arg->ith = i;
        if (pthread_create(&pool->threads[i], NULL, worker_main, arg) != 0) {
            free(arg);
            pool->n = i;  // run with the threads that did start
            break;
        }
    }
    return pool;
}

int vk_pool_size(const vk_pool *pool) { return pool->n; }

void vk_pool_run(vk_pool *pool, vk_task_fn fn, void *ctx) {
    if (pool->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_release);
    pthread_mutex_lock(&pool->mutex);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&pool->cond);
    pthread_mutex_unlock(&pool->mutex);
    fn(ctx, 0, pool->n);
    int spins = 0;
    while (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) {
        if (++spins < SPIN_ITERS) cpu_relax();
        else sched_yield();
    }
}

void vk_pool_destroy(vk_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mutex);
    atomic_store_explicit(&pool->stop, 1, memory_order_release);
    pthread_cond_broadcast(&pool->cond);
    pthread_mutex_unlock(&pool->mutex);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mutex);
    pthread_cond_destroy(&pool->cond);
    free(pool->threads);
    free(pool->shares);
    free(pool);
}

static inline uint64_t pack_range(uint64_t lo, uint64_t hi) { return lo | hi << 32; }

void vk_pool_split_init(vk_pool *pool, int64_t units) {
    const int64_t n = pool->n, per = (units + n - 1) / n;
    for (int64_t i = 0; i < n; i++) {
        const int64_t lo = i * per < units ? i * per : units, hi = (i + 1) * per < units ? (i + 1) * per : units;
        atomic_store_explicit(&pool->shares[i].range, pack_range((uint64_t)lo, (uint64_t)hi), memory_order_relaxed);
    }
    // Published to the workers by vk_pool_run's release of the next generation.
}

int vk_pool_split_next(vk_pool *pool, int ith, int64_t *lo, int64_t *hi) {
    // Its own share first, from the front: a quarter of what is left at a time, so the claims
    // are few and adjacent (one sequential stream through the weights).
    _Atomic uint64_t *own = &pool->shares[ith].range;
    uint64_t v = atomic_load_explicit(own, memory_order_relaxed);
    for (;;) {
        const uint64_t a = v & 0xffffffffu, b = v >> 32;
        if (a >= b) break;
        const uint64_t take = (b - a) / 4 ? (b - a) / 4 : 1;
        if (atomic_compare_exchange_weak_explicit(own, &v, pack_range(a + take, b), memory_order_relaxed, memory_order_relaxed)) {
            *lo = (int64_t)a;
            *hi = (int64_t)(a + take);
            return 1;
        }
    }
    // Then half of what another thread has left, from the back of its share.
    for (int k = 1; k < pool->n; k++) {
        _Atomic uint64_t *other = &pool->shares[(ith + k) % pool->n].range;
        uint64_t w = atomic_load_explicit(other, memory_order_relaxed);
        for (;;) {
            const uint64_t a = w & 0xffffffffu, b = w >> 32;
            if (a >= b) break;
            const uint64_t take = (b - a) / 2 ? (b - a) / 2 : 1;
            if (atomic_compare_exchange_weak_explicit(other, &w, pack_range(a, b - take), memory_order_relaxed,
                                                      memory_order_relaxed)) {
                *lo = (int64_t)(b - take);
                *hi = (int64_t)b;
                return 1;
            }
        }
    }
    return 0;
}
