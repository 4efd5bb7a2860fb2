/*
 * What _qmm.c shares with the other C files of the serving.models._qmm extension (_cpu_ops.c):
 * its thread pool, its code path switch (set_simd) and its thread count (set_num_threads).
 */
#ifndef FLEETLM_QMM_SHARED_H
#define FLEETLM_QMM_SHARED_H

#include <stddef.h>

#if defined(__GNUC__) || defined(__clang__)
#define QMM_HIDDEN __attribute__((visibility("hidden")))
#else
#define QMM_HIDDEN
#endif

typedef void (*qmm_task_fn)(void *ctx, size_t item);

/*
 * Runs task(ctx, i) for every i in [0, n_items), each exactly once, on the calling thread and the
 * pool's workers: at most max_threads threads (0: the count set by set_num_threads), the caller
 * included. Returns when all are done. Items are claimed one at a time through an atomic counter,
 * in increasing order. When the pool is busy (another thread is computing) or one thread is asked
 * for, the caller runs every item itself, in order. Call it without the GIL; task must not call
 * back into the pool.
 */
QMM_HIDDEN void qmm_parallel_for(size_t n_items, int max_threads, qmm_task_fn task, void *ctx);

/* The code path set_simd chose: 1 AVX2 (+FMA, F16C), 0 portable. */
QMM_HIDDEN int qmm_simd_active(void);

/* Threads per call (set_num_threads). */
QMM_HIDDEN int qmm_num_threads(void);

#ifdef QMM_WITH_CPU_OPS
#include <Python.h>
/* _cpu_ops.c's functions, added to the module at import. */
QMM_HIDDEN extern PyMethodDef qmm_cpu_ops_methods[];
#endif

#endif /* FLEETLM_QMM_SHARED_H */
