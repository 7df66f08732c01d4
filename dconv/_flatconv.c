/* The loops of dconv's backward pass that BLAS runs badly, compiled. dconv.kernel calls them
 * when this module was built (an optional extension: see "Compiled helper" in dconv/kernel.py)
 * and the channel counts suit the logical vector of LANES channels (16 float32, 8 float64).
 *
 * input_grad: dA_prev of a stride-1 convolution on the flat grid of
 * dconv.kernel.flat_grid (the batch zero-padded to rows x cols pixels, one row per
 * padded pixel, kernel tap k a constant row shift offsets[k]). For every input pixel:
 *
 *   dA[n, y, x, :] = sum_k sum_c D[base - offsets[k] + n*sample + y*cols + x, c] * Wt[k, c, :]
 *
 *   Pixel (n, y, x) is stored where an out_layout says: the whole dA_prev at stride 1, or at
 *   stride > 1 the pixels of one phase of the input, straight into the unpadded dA_prev.
 *   A register block holds neighbouring pixels x input channels and takes every tap and
 *   channel before one store: no pass over memory per tap, no padding row written. For a
 *   narrow C_prev (a first layer's 1-4 channels) the block's vectors run over C instead.
 *
 * weight_grad: dW of a convolution of any stride, from the padded input and dZ in place:
 *
 *   dW[k, c, :] += sum_(n, i, j) P[n*sample + i*row_step + j*col_step + offsets[k], c] * dZ[n, i, j, :]
 *
 *   A register block holds input channels x output vectors, over one sample's pixels at a
 *   time; each sample's sum is added into a float64 dW. For a narrow C_prev the caller merges
 *   the taps of each kernel row into the rows of a block (their values lie side by side in P).
 *   With the per-sample statistics, the same sums also build each sample's own float64 dW_n
 *   (one sample's at a time), whose squares go into dW_sq and whose squared norm into norm2[n];
 *   dW gets the same additions in the same order with or without them, and may be left out.
 *   Given a samples buffer, every sample's dW_n stays there, for the per-sample inner products
 *   and sketches of dconv.kernel.sketch.
 *
 * Both are compiled once per SIMD level in this one file (_flatconv_loops.h, included under
 * each level's target pragma) and chosen per call by name; levels() says which this CPU runs:
 *
 *   level     ISA                vector regs   logical vector     multiply-add
 *   avx512    AVX-512F           32 x 64 B     1 zmm              FMA
 *   avx2      AVX2 + FMA         16 x 32 B     2 ymm              FMA
 *   baseline  SSE2 (x86-64)      16 x 16 B     4 xmm              multiply, then add
 *   neon      ASIMD (aarch64)    32 x 16 B     4 q registers      FMA
 *
 * Every register block has its sizes as compile-time constants, one function per size, so
 * that its accumulators stay in registers; a row of pixels (or of channels) is cut into
 * near-equal blocks. The sizes follow each level's register file (the tables below).
 *
 * query_dots: the per-sample inner products of dconv.kernel.sketch, out[s, q] = <x_s, Q_q> in
 * float64 for rows x_s (each sample's dW) and queries Q_q, a span of values at a time so that a
 * span of the queries serves every row before the next (one pass over Q per call, not per row).
 * weight_grad_dots: weight_grad with the statistics over a block of samples one tap at a time,
 * each tap's per-sample sums handed to query_dots while they are in L2 (dW and the statistics
 * get the bits of weight_grad).
 *
 * column_sums: float32 db summed in float64 (plain C, the same at every level).
 * top_add: per-query top lists of a panel of scores (plain C, dconv.kernel.topk).
 *
 * All release the GIL, so threads can run slices of a batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define DCONV_X86_64 1
#include <immintrin.h>
#elif defined(__aarch64__)
#define DCONV_AARCH64 1
#include <arm_neon.h>
#endif

typedef Py_ssize_t idx;

#define NARROW 4 /* input_grad: the largest C_prev of the narrow blocks */
#ifndef WEIGHT_TILE_PIXELS
#define WEIGHT_TILE_PIXELS 128 /* weight_grad: about this many output pixels per pass (whole rows) */
#endif
#ifndef DOT_SPAN
#define DOT_SPAN 512 /* query_dots: values of each row and query per pass (16 queries: 64 KB of Q) */
#endif

/* Where input_grad writes pixel (n, y, x): element first + n*sample + y*row + x*pixel of dA. */
typedef struct {
    idx first, sample, row, pixel;
} out_layout;

/* Which input_grad blocks take C_prev = Cp (the same rule at every level). */
enum { PLAN_NONE, PLAN_TWO_VECTORS, PLAN_ONE_VECTOR, PLAN_NARROW };

static int input_plan(idx Cp, idx C, idx lanes)
{
    if (Cp % (2 * lanes) == 0)
        return PLAN_TWO_VECTORS;
    if (Cp % lanes == 0)
        return PLAN_ONE_VECTOR;
    if (Cp <= NARROW && C % lanes == 0)
        return PLAN_NARROW;
    return PLAN_NONE;
}

/* weight_grad's statistics, after sample n: dW_sq += dW_n * dW_n elementwise, and the sum of those
 * squares, added in element order into 8 accumulators, then those in order. Plain C, called at
 * every level: the same bits wherever dW_n has them. */
static double sample_squares(const double *dW_n, idx size, double *dW_sq)
{
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    idx e = 0;
    for (; e + 8 <= size; e += 8)
        for (int l = 0; l < 8; l++) {
            double square = dW_n[e + l] * dW_n[e + l];
            dW_sq[e + l] += square;
            acc[l] += square;
        }
    for (; e < size; e++) {
        double square = dW_n[e] * dW_n[e];
        dW_sq[e] += square;
        acc[0] += square;
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* sample_squares one tap at a time (weight_grad_dots): the same squares, added into dW_sq and into
 * the sample's 8 accumulators acc (element e of the tap into acc[e % 8]; a tap holds a multiple of 8
 * elements, so each lands where sample_squares adds it, in the same order). */
static void tap_squares(const double *dW_n, idx size, double *dW_sq, double *acc)
{
    for (idx e = 0; e + 8 <= size; e += 8)
        for (int l = 0; l < 8; l++) {
            double square = dW_n[e + l] * dW_n[e + l];
            dW_sq[e + l] += square;
            acc[l] += square;
        }
}

/* query_dots of one level (the float64 inclusion of _flatconv_loops.h), for weight_grad_dots */
typedef void (*query_dots_fn)(const double *, idx, idx, const double *, idx, idx, double *);

/* REPEAT(N, M, args): M(args, 1) M(args, 2) ... M(args, N), N a literal or a macro. */
#define REPEAT(N, ...) REPEAT_EXPANDED(N, __VA_ARGS__)
#define REPEAT_EXPANDED(N, ...) REPEAT_##N(__VA_ARGS__)
#define REPEAT_1(M, ...) M(__VA_ARGS__, 1)
#define REPEAT_2(M, ...) REPEAT_1(M, __VA_ARGS__) M(__VA_ARGS__, 2)
#define REPEAT_3(M, ...) REPEAT_2(M, __VA_ARGS__) M(__VA_ARGS__, 3)
#define REPEAT_4(M, ...) REPEAT_3(M, __VA_ARGS__) M(__VA_ARGS__, 4)
#define REPEAT_5(M, ...) REPEAT_4(M, __VA_ARGS__) M(__VA_ARGS__, 5)
#define REPEAT_6(M, ...) REPEAT_5(M, __VA_ARGS__) M(__VA_ARGS__, 6)
#define REPEAT_7(M, ...) REPEAT_6(M, __VA_ARGS__) M(__VA_ARGS__, 7)
#define REPEAT_8(M, ...) REPEAT_7(M, __VA_ARGS__) M(__VA_ARGS__, 8)
#define REPEAT_9(M, ...) REPEAT_8(M, __VA_ARGS__) M(__VA_ARGS__, 9)
#define REPEAT_10(M, ...) REPEAT_9(M, __VA_ARGS__) M(__VA_ARGS__, 10)
#define REPEAT_11(M, ...) REPEAT_10(M, __VA_ARGS__) M(__VA_ARGS__, 11)
#define REPEAT_12(M, ...) REPEAT_11(M, __VA_ARGS__) M(__VA_ARGS__, 12)
#define REPEAT_13(M, ...) REPEAT_12(M, __VA_ARGS__) M(__VA_ARGS__, 13)
#define REPEAT_14(M, ...) REPEAT_13(M, __VA_ARGS__) M(__VA_ARGS__, 14)
#define REPEAT_15(M, ...) REPEAT_14(M, __VA_ARGS__) M(__VA_ARGS__, 15)
#define REPEAT_16(M, ...) REPEAT_15(M, __VA_ARGS__) M(__VA_ARGS__, 16)

/* F(name): name with this inclusion's PREFIX, e.g. F(input_grad) -> avx2_f32_input_grad. */
#define PASTE(a, b) PASTE_EXPANDED(a, b)
#define PASTE_EXPANDED(a, b) a##_##b
#define F(name) PASTE(PREFIX, name)

/* ------------------------------------------------------------------ the levels
 * Each section defines a level's vector operations and block sizes, then includes
 * _flatconv_level.h, which instantiates _flatconv_loops.h for float32 and float64 (the logical
 * vector is 64 bytes in both dtypes, so one table of sizes serves both). A block of NB x NV
 * logical vectors needs NB * NV * PARTS accumulator registers, plus the loaded vectors. */

#if DCONV_X86_64

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif
#define LEVEL avx512
#define PARTS 1
#define NATIVE_F32 __m512
#define NATIVE_F64 __m512d
#define SET1_F32 _mm512_set1_ps
#define SET1_F64 _mm512_set1_pd
#define LOADU_F32 _mm512_loadu_ps
#define LOADU_F64 _mm512_loadu_pd
#define FMADD_F32 _mm512_fmadd_ps
#define FMADD_F64 _mm512_fmadd_pd
#define INPUT_PIXELS_2 12 /* 24 accumulators of 32 registers */
#define INPUT_PIXELS_1 12
#define NARROW_PIXELS_1 8
#define NARROW_PIXELS_2 8
#define NARROW_PIXELS_3 6
#define NARROW_PIXELS_4 5
#define WEIGHT_ROWS_2 14 /* 28 accumulators */
#define WEIGHT_ROWS_1 16
#define DOT_SAMPLES 4 /* query_dots: 24 accumulators, 4 rows, 1 query (4 x 4 and 4 x 5 were 10-15% slower) */
#define DOT_QUERIES 6
#include "_flatconv_level.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define LEVEL avx2
#define PARTS 2
#define NATIVE_F32 __m256
#define NATIVE_F64 __m256d
#define SET1_F32 _mm256_set1_ps
#define SET1_F64 _mm256_set1_pd
#define LOADU_F32 _mm256_loadu_ps
#define LOADU_F64 _mm256_loadu_pd
#define FMADD_F32 _mm256_fmadd_ps
#define FMADD_F64 _mm256_fmadd_pd
#define INPUT_PIXELS_2 0 /* 6 x 1 vector was 5-20% faster than 3 x 2 */
#define INPUT_PIXELS_1 6 /* 12 accumulators of 16 registers, 2 loaded weights, 1 broadcast */
#define NARROW_PIXELS_1 6
#define NARROW_PIXELS_2 3
#define NARROW_PIXELS_3 2
#define NARROW_PIXELS_4 1
#define WEIGHT_ROWS_2 0
#define WEIGHT_ROWS_1 6
#define DOT_SAMPLES 2 /* query_dots: 8 accumulators of 16 registers, 4 for the rows, 2 for a query */
#define DOT_QUERIES 2
#include "_flatconv_level.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

/* baseline: SSE2, which every x86-64 CPU has, and no FMA: products are rounded before the add */
#define LEVEL baseline
#define PARTS 4
#define NATIVE_F32 __m128
#define NATIVE_F64 __m128d
#define SET1_F32 _mm_set1_ps
#define SET1_F64 _mm_set1_pd
#define LOADU_F32 _mm_loadu_ps
#define LOADU_F64 _mm_loadu_pd
#define FMADD_F32(a, b, c) _mm_add_ps(_mm_mul_ps(a, b), c)
#define FMADD_F64(a, b, c) _mm_add_pd(_mm_mul_pd(a, b), c)
#define INPUT_PIXELS_2 0
#define INPUT_PIXELS_1 2 /* 8 accumulators of 16 registers, and the loaded weights */
#define NARROW_PIXELS_1 2
#define NARROW_PIXELS_2 1
#define NARROW_PIXELS_3 1
#define NARROW_PIXELS_4 1
#define WEIGHT_ROWS_2 0
#define WEIGHT_ROWS_1 2
#define DOT_SAMPLES 1 /* query_dots: 8 accumulators, 4 for the row, 4 for a query: all 16 */
#define DOT_QUERIES 2
#include "_flatconv_level.h"

#elif DCONV_AARCH64

#define LEVEL neon
#define PARTS 4
#define NATIVE_F32 float32x4_t
#define NATIVE_F64 float64x2_t
#define SET1_F32 vdupq_n_f32
#define SET1_F64 vdupq_n_f64
#define LOADU_F32 vld1q_f32
#define LOADU_F64 vld1q_f64
#define FMADD_F32(a, b, c) vfmaq_f32(c, a, b)
#define FMADD_F64(a, b, c) vfmaq_f64(c, a, b)
#define INPUT_PIXELS_2 0 /* as on avx2: 1-vector blocks (not measured here) */
#define INPUT_PIXELS_1 5 /* GCC 12 spilled at 6 (aarch64 cross build) */
#define NARROW_PIXELS_1 5
#define NARROW_PIXELS_2 2
#define NARROW_PIXELS_3 1
#define NARROW_PIXELS_4 1
#define WEIGHT_ROWS_2 0
#define WEIGHT_ROWS_1 5
#define DOT_SAMPLES 2 /* query_dots: 16 accumulators of 32 registers, 8 for the rows, 4 for a query */
#define DOT_QUERIES 2
#include "_flatconv_level.h"

#endif

/* Which CPUs run each level */
#if DCONV_X86_64
static int runs_avx512(void) { return __builtin_cpu_supports("avx512f"); }
static int runs_avx2(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif
static int runs_always(void) { return 1; }

typedef struct {
    const char *name;
    int (*runs_here)(void);
    void (*f32_input_grad)(const float *, const float *, const idx *, idx, idx, idx, idx, idx, idx, idx, idx, idx,
                           float *, out_layout);
    void (*f64_input_grad)(const double *, const double *, const idx *, idx, idx, idx, idx, idx, idx, idx, idx,
                           idx, double *, out_layout);
    void (*f32_weight_grad)(const float *, const float *, const idx *, idx, idx, idx, idx, idx, idx, idx, idx, idx,
                            idx, double *, double *, idx, double *, double *);
    void (*f64_weight_grad)(const double *, const double *, const idx *, idx, idx, idx, idx, idx, idx, idx, idx,
                            idx, idx, double *, double *, idx, double *, double *);
    void (*f64_query_dots)(const double *, idx, idx, const double *, idx, idx, double *);
    void (*f32_weight_grad_dots)(const float *, const float *, const idx *, idx, idx, idx, idx, idx, idx, idx, idx,
                                 idx, idx, double *, double *, double *, double *, query_dots_fn, const double *, idx,
                                 idx, double *);
    void (*f64_weight_grad_dots)(const double *, const double *, const idx *, idx, idx, idx, idx, idx, idx, idx, idx,
                                 idx, idx, double *, double *, double *, double *, query_dots_fn, const double *, idx,
                                 idx, double *);
} simd_level;

#define LEVEL_ENTRY(NAME, RUNS)                                                                     \
    {#NAME, RUNS, NAME##_f32_input_grad, NAME##_f64_input_grad, NAME##_f32_weight_grad, NAME##_f64_weight_grad, \
     NAME##_f64_query_dots, NAME##_f32_weight_grad_dots, NAME##_f64_weight_grad_dots}

/* Best first */
static const simd_level levels[] = {
#if DCONV_X86_64
    LEVEL_ENTRY(avx512, runs_avx512),
    LEVEL_ENTRY(avx2, runs_avx2),
    LEVEL_ENTRY(baseline, runs_always),
#elif DCONV_AARCH64
    LEVEL_ENTRY(neon, runs_always),
#endif
    {NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL},
};

/* The level of that name, if this CPU runs it; else NULL with a ValueError set. */
static const simd_level *find_level(const char *name)
{
    for (const simd_level *level = levels; level->name; level++)
        if (strcmp(level->name, name) == 0) {
            if (level->runs_here())
                return level;
            PyErr_Format(PyExc_ValueError, "SIMD level %s: this CPU cannot run it", name);
            return NULL;
        }
    PyErr_Format(PyExc_ValueError, "SIMD level %s is not compiled into this build", name);
    return NULL;
}

/* db: the column sums of a (rows, C) float32 matrix, added into a float64 out, converting each
 * value to float64 before adding (as NumPy's sum(axis=0, dtype=float64), without its temporaries).
 * One pass over the rows per block of up to SUM_COLUMNS columns, 4 rows at a time into 4
 * independent accumulators (a narrow C would otherwise wait on one add chain). */
#define SUM_COLUMNS 256
static void f32_column_sums(const float *x, idx rows, idx C, double *out)
{
    double acc[4][SUM_COLUMNS];
    for (idx c0 = 0; c0 < C; c0 += SUM_COLUMNS) {
        idx cb = C - c0 < SUM_COLUMNS ? C - c0 : SUM_COLUMNS;
        for (int ph = 0; ph < 4; ph++)
            for (idx c = 0; c < cb; c++)
                acc[ph][c] = 0;
        idx r = 0;
        for (; r + 4 <= rows; r += 4)
            for (int ph = 0; ph < 4; ph++) {
                const float *row = x + (r + ph) * C + c0;
                for (idx c = 0; c < cb; c++)
                    acc[ph][c] += (double)row[c];
            }
        for (; r < rows; r++)
            for (idx c = 0; c < cb; c++)
                acc[0][c] += (double)x[r * C + c0 + c];
        for (idx c = 0; c < cb; c++)
            out[c0 + c] += (acc[0][c] + acc[1][c]) + (acc[2][c] + acc[3][c]);
    }
}

/* The statistics of per-sample products: the squares of g rows of n values (float32 or float64),
 * each converted to float64 and squared, added into sq (n) in row order, and each row's sum of
 * squares written to norm2 (g). Blocks of SQUARE_BLOCK columns keep sq's block in L1 while the g
 * rows pass over it; a row's sum runs in 4 accumulators (column index mod 4) in column order, so
 * neither sum depends on g. */
#define SQUARE_BLOCK 512
#define DEFINE_SQUARE_SUMS(NAME, T)                                                                      \
    static void NAME(const T *x, idx g, idx n, double *sq, double *norm2)                               \
    {                                                                                                    \
        double acc[SQUARE_BLOCK_ROWS][4];                                                                \
        for (idx j0 = 0; j0 < g; j0 += SQUARE_BLOCK_ROWS) {                                              \
            idx gb = g - j0 < SQUARE_BLOCK_ROWS ? g - j0 : SQUARE_BLOCK_ROWS;                            \
            for (idx j = 0; j < gb; j++)                                                                 \
                acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0;                                       \
            for (idx c0 = 0; c0 < n; c0 += SQUARE_BLOCK) {                                               \
                idx cb = n - c0 < SQUARE_BLOCK ? n - c0 : SQUARE_BLOCK;                                  \
                for (idx j = 0; j < gb; j++) {                                                           \
                    const T *row = x + (j0 + j) * n + c0;                                                \
                    double *out = sq + c0, *a = acc[j];                                                  \
                    idx c = 0;                                                                           \
                    for (; c + 4 <= cb; c += 4)                                                          \
                        for (int ph = 0; ph < 4; ph++) {                                                 \
                            double v = (double)row[c + ph];                                              \
                            v *= v;                                                                      \
                            out[c + ph] += v;                                                            \
                            a[(c0 + c + ph) & 3] += v;                                                   \
                        }                                                                                \
                    for (; c < cb; c++) {                                                                \
                        double v = (double)row[c];                                                       \
                        v *= v;                                                                          \
                        out[c] += v;                                                                     \
                        a[(c0 + c) & 3] += v;                                                            \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            for (idx j = 0; j < gb; j++)                                                                 \
                norm2[j0 + j] = (acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]);                       \
        }                                                                                                \
    }
#define SQUARE_BLOCK_ROWS 64
DEFINE_SQUARE_SUMS(f32_square_sums, float)
DEFINE_SQUARE_SUMS(f64_square_sums, double)
#undef DEFINE_SQUARE_SUMS

/* The end of query_dots (the same at every level): the values past the last whole vector of each
 * row (n % 8 of them) added into lane k - body of their sums, then each sum's 8 lanes added in a
 * fixed order into out (g, n_q). */
static void query_dots_finish(const double *x, idx g, idx n, const double *Q, idx q_stride, idx n_q,
                              const double *part, double *out)
{
    idx body = n - n % 8;
    for (idx s = 0; s < g; s++)
        for (idx q = 0; q < n_q; q++) {
            double p[8];
            memcpy(p, part + (s * n_q + q) * 8, sizeof p);
            for (idx k = body; k < n; k++)
                p[k - body] += x[s * n + k] * Q[q * q_stride + k];
            out[s * n_q + q] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
        }
}

/* Per-query top lists (dconv.kernel.topk.RunningTop): each query's `top` largest scores (positive
 * list, descending) and `top` smallest (negative list, ascending), ties by train index ascending,
 * NaN never; index -1 and score NaN past the end of a short list (a list's entries are a prefix).
 * A panel's scores come in increasing train index, so a new score ranks after every equal one already
 * there: it joins a full list only if it beats the list's last score strictly. The scan looks at
 * TOP_SCAN scores at a time against both lists' bounds (a loop the compiler vectorises with the
 * baseline ISA; wider clones measured no faster: the scan waits on memory), and only a block that
 * holds a score reaching a bound is gone through one score at a time. */
#define TOP_SCAN 64
static int top_insert(Py_ssize_t *index, double *score, idx top, double value, Py_ssize_t at, int largest)
{
    int full = index[top - 1] >= 0;
    if (full && !(largest ? value > score[top - 1] : value < score[top - 1]))
        return 0;
    idx s = 0;
    while (s < top && index[s] >= 0 && !(largest ? score[s] < value : score[s] > value))
        s++;
    for (idx k = top - 1; k > s; k--) {
        index[k] = index[k - 1];
        score[k] = score[k - 1];
    }
    index[s] = at;
    score[s] = value;
    return 1;
}

#define DEFINE_TOP_ADD(NAME, T, INF)                                                                     \
    static void NAME(const T *panel, idx n_q, idx width, idx stride, Py_ssize_t first, idx top,          \
                     Py_ssize_t *pos_index, double *pos_score, Py_ssize_t *neg_index, double *neg_score)  \
    {                                                                                                    \
        for (idx q = 0; q < n_q; q++) {                                                                  \
            const T *row = panel + q * stride;                                                           \
            Py_ssize_t *pi = pos_index + q * top, *ni = neg_index + q * top;                             \
            double *ps = pos_score + q * top, *ns = neg_score + q * top;                                 \
            T high = pi[top - 1] >= 0 ? (T)ps[top - 1] : -INF; /* a score >= high may join */            \
            T low = ni[top - 1] >= 0 ? (T)ns[top - 1] : INF;                                             \
            for (idx j0 = 0; j0 < width; j0 += TOP_SCAN) {                                               \
                idx jn = width - j0 < TOP_SCAN ? width - j0 : TOP_SCAN;                                  \
                int reach = 0;                                                                           \
                for (idx j = 0; j < jn; j++)                                                             \
                    reach |= (row[j0 + j] >= high) | (row[j0 + j] <= low);                              \
                if (!reach)                                                                              \
                    continue;                                                                            \
                for (idx j = j0; j < j0 + jn; j++) {                                                     \
                    T v = row[j];                                                                        \
                    if (v >= high && top_insert(pi, ps, top, (double)v, first + j, 1))                   \
                        high = pi[top - 1] >= 0 ? (T)ps[top - 1] : -INF;                                 \
                    if (v <= low && top_insert(ni, ns, top, (double)v, first + j, 0))                    \
                        low = ni[top - 1] >= 0 ? (T)ns[top - 1] : INF;                                   \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }
DEFINE_TOP_ADD(f32_top_add, float, INFINITY)
DEFINE_TOP_ADD(f64_top_add, double, (double)INFINITY)
#undef DEFINE_TOP_ADD

/* ------------------------------------------------------------------ Python bindings */

/* The item type of a buffer in native byte order: 'f' (float32), 'd' (float64), 'n' (an integer
 * of the size of Py_ssize_t), or 0 for anything else (the other byte order included). */
static char item_type(const Py_buffer *view)
{
    const char *format = view->format ? view->format : "B";
    const unsigned int one = 1;
    const char native = *(const unsigned char *)&one ? '<' : '>'; /* NumPy writes '<d' for a '<f8' array */
    if (format[0] == '@' || format[0] == '=' || format[0] == native || (format[0] == '!' && native == '>'))
        format++;
    if (format[1] != '\0')
        return 0;
    switch (format[0]) {
    case 'f':
        return 'f';
    case 'd':
        return 'd';
    case 'l':
    case 'q':
    case 'n':
        return view->itemsize == (Py_ssize_t)sizeof(idx) ? 'n' : 0;
    default:
        return 0;
    }
}

/* Get a C-contiguous buffer of item type `type` (0: 'f' or 'd') with at least `count` items. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, char type, Py_ssize_t count, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    char got = item_type(view);
    int type_ok = type ? got == type : (got == 'f' || got == 'd');
    if (!type_ok || view->len < count * view->itemsize) {
        PyErr_Format(PyExc_ValueError, "%s must be a native %s buffer of at least %zd items; got format %s, %zd bytes",
                     name, type == 'n' ? "intp" : "float", count, view->format ? view->format : "B", view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static void release(Py_buffer *views, int n)
{
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

/* What weight_grad and weight_grad_dots share: the taps, P's item type and the optional dW output. */
typedef struct {
    idx K;              /* taps */
    const idx *offsets; /* each tap's row offset */
    char type;          /* 'f' or 'd', P's and dZ's */
    double *out;        /* (K, R, C) float64 dW, or NULL */
} weight_buffers;

/* Into v[*held...]: offsets (intp), P (float32 or float64, at least p_items), dZ (P's type, at least g_items)
 * and, unless out_obj is None, out (float64, K x rc items); *held counts the buffers taken, *w what they hold.
 * Returns 0, or -1 with the Python error set. */
static int weight_inputs(PyObject *off_obj, PyObject *P_obj, PyObject *G_obj, PyObject *out_obj, idx p_items,
                         idx g_items, idx rc, Py_buffer *v, int *held, weight_buffers *w)
{
    if (get_buffer(off_obj, &v[*held], 0, 'n', 1, "offsets") < 0)
        return -1;
    w->K = v[*held].len / (Py_ssize_t)sizeof(idx);
    w->offsets = v[(*held)++].buf;
    if (get_buffer(P_obj, &v[*held], 0, 0, p_items, "P") < 0)
        return -1;
    w->type = item_type(&v[(*held)++]);
    if (get_buffer(G_obj, &v[*held], 0, w->type, g_items, "dZ") < 0)
        return -1;
    (*held)++;
    w->out = NULL;
    if (out_obj != Py_None) {
        if (get_buffer(out_obj, &v[*held], 1, 'd', w->K * rc, "out") < 0)
            return -1;
        w->out = v[(*held)++].buf;
    }
    return 0;
}

static PyObject *input_grad(PyObject *self, PyObject *args)
{
    const char *level_name;
    PyObject *D_obj, *W_obj, *off_obj, *out_obj;
    idx d_rows, base, m, sample, height, width, cols, C, Cp;
    out_layout o;
    if (!PyArg_ParseTuple(args, "sOOOnnnnnnnnnO(nnnn)", &level_name, &D_obj, &W_obj, &off_obj, &d_rows, &base, &m,
                          &sample, &height, &width, &cols, &C, &Cp, &out_obj, &o.first, &o.sample, &o.row, &o.pixel))
        return NULL;
    const simd_level *level = find_level(level_name);
    if (level == NULL)
        return NULL;
    if (m < 1 || height < 1 || width < 1 || C < 1 || Cp < 1 || o.first < 0 || o.sample < 0 || o.row < 0 ||
        o.pixel < Cp)
        return PyErr_Format(PyExc_ValueError, "input_grad: empty output or bad layout (first %zd, steps %zd %zd %zd)",
                            o.first, o.sample, o.row, o.pixel);
    Py_buffer v[4]; /* offsets, D, Wt, out */
    if (get_buffer(off_obj, &v[0], 0, 'n', 1, "offsets") < 0)
        return NULL;
    idx K = v[0].len / (Py_ssize_t)sizeof(idx);
    const idx *offsets = v[0].buf;
    if (get_buffer(D_obj, &v[1], 0, 0, d_rows * C, "D") < 0) {
        release(v, 1);
        return NULL;
    }
    char type = item_type(&v[1]);
    if (get_buffer(W_obj, &v[2], 0, type, K * C * Cp, "Wt") < 0) {
        release(v, 2);
        return NULL;
    }
    /* the last element written: pixel (m-1, height-1, width-1), channel Cp-1 */
    idx out_end = o.first + (m - 1) * o.sample + (height - 1) * o.row + (width - 1) * o.pixel + Cp;
    if (get_buffer(out_obj, &v[3], 1, type, out_end, "out") < 0) {
        release(v, 3);
        return NULL;
    }
    /* every row read lies in D: the lowest is base - offsets[K-1], the highest below base - offsets[0] + last pixel */
    int fits = m > 0 && base - offsets[K - 1] >= 0 &&
               base - offsets[0] + (m - 1) * sample + (height - 1) * cols + width <= d_rows;
    int planned = input_plan(Cp, C, type == 'f' ? 16 : 8) != PLAN_NONE;
    if (fits && planned) {
        Py_BEGIN_ALLOW_THREADS
        if (type == 'f')
            level->f32_input_grad(v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, Cp, v[3].buf, o);
        else
            level->f64_input_grad(v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, Cp, v[3].buf, o);
        Py_END_ALLOW_THREADS
    }
    release(v, 4);
    if (!fits)
        return PyErr_Format(PyExc_ValueError, "input_grad: the flat grid does not fit the %zd rows of D", d_rows);
    if (!planned)
        return PyErr_Format(PyExc_ValueError,
                            "input_grad: C_prev %zd is not a multiple of the vector width, nor at most %d with C a multiple",
                            Cp, NARROW);
    Py_RETURN_NONE;
}

static PyObject *weight_grad(PyObject *self, PyObject *args)
{
    const char *level_name;
    PyObject *P_obj, *G_obj, *off_obj, *out_obj, *sq_obj = Py_None, *norm_obj = Py_None, *each_obj = Py_None;
    idx p_rows, m, sample, row_step, col_step, n_h, n_w, Cp, R, C;
    if (!PyArg_ParseTuple(args, "sOOOnnnnnnnnnnO|OOO", &level_name, &P_obj, &G_obj, &off_obj, &p_rows, &m, &sample,
                          &row_step, &col_step, &n_h, &n_w, &Cp, &R, &C, &out_obj, &sq_obj, &norm_obj, &each_obj))
        return NULL;
    const simd_level *level = find_level(level_name);
    if (level == NULL)
        return NULL;
    if (Cp < 1 || R < 1)
        return PyErr_Format(PyExc_ValueError, "weight_grad: C_prev %zd and rows %zd must be >= 1", Cp, R);
    int stats = sq_obj != Py_None || norm_obj != Py_None;
    if (stats && (sq_obj == Py_None || norm_obj == Py_None))
        return PyErr_Format(PyExc_ValueError, "weight_grad: dW_sq and norm2 must be given together");
    if (!stats && out_obj == Py_None)
        return PyErr_Format(PyExc_ValueError, "weight_grad: out may be None only with dW_sq and norm2");
    if (!stats && each_obj != Py_None)
        return PyErr_Format(PyExc_ValueError, "weight_grad: samples needs dW_sq and norm2");
    Py_buffer v[7]; /* offsets, P, dZ, out, dW_sq, norm2, samples */
    int held = 0;
    weight_buffers w;
    if (weight_inputs(off_obj, P_obj, G_obj, out_obj, p_rows * Cp, m * n_h * n_w * C, R * C, v, &held, &w) < 0)
        goto fail;
    idx K = w.K;
    const idx *offsets = w.offsets;
    char type = w.type;
    double *out = w.out, *dW_sq = NULL, *norm2 = NULL;
    if (stats) {
        if (get_buffer(sq_obj, &v[held], 1, 'd', K * R * C, "dW_sq") < 0)
            goto fail;
        dW_sq = v[held++].buf;
        if (get_buffer(norm_obj, &v[held], 1, 'd', m, "norm2") < 0)
            goto fail;
        norm2 = v[held++].buf;
    }
    double *each = NULL; /* every sample's own dW, if asked for */
    if (each_obj != Py_None) {
        if (get_buffer(each_obj, &v[held], 1, 'd', m * K * R * C, "samples") < 0)
            goto fail;
        each = v[held++].buf;
    }
    idx last = (m - 1) * sample + (n_h - 1) * row_step + (n_w - 1) * col_step; /* the last output pixel's row */
    /* the last element read: R values from the last output pixel's pixel of the last tap */
    int fits = m > 0 && n_h > 0 && n_w > 0 && offsets[0] >= 0 && (last + offsets[K - 1]) * Cp + R <= p_rows * Cp;
    int lanes_ok = C % (type == 'f' ? 16 : 8) == 0;
    double *sample_dW = NULL; /* one sample's dW at a time, for the statistics */
    idx sample_stride = each ? K * R * C : 0;
    if (each)
        sample_dW = each;
    else if (fits && lanes_ok && stats && (sample_dW = PyMem_RawMalloc((size_t)(K * R * C) * sizeof(double))) == NULL) {
        release(v, held);
        return PyErr_NoMemory();
    }
    if (fits && lanes_ok) {
        Py_BEGIN_ALLOW_THREADS
        if (type == 'f')
            level->f32_weight_grad(v[1].buf, v[2].buf, offsets, K, m, sample, row_step, col_step, n_h, n_w, Cp, R, C,
                                   out, sample_dW, sample_stride, dW_sq, norm2);
        else
            level->f64_weight_grad(v[1].buf, v[2].buf, offsets, K, m, sample, row_step, col_step, n_h, n_w, Cp, R, C,
                                   out, sample_dW, sample_stride, dW_sq, norm2);
        Py_END_ALLOW_THREADS
    }
    if (!each)
        PyMem_RawFree(sample_dW);
    release(v, held);
    if (!fits)
        return PyErr_Format(PyExc_ValueError, "weight_grad: the output pixels do not fit the %zd rows of P", p_rows);
    if (!lanes_ok)
        return PyErr_Format(PyExc_ValueError, "weight_grad: C %zd is not a multiple of the vector width", C);
    Py_RETURN_NONE;
fail:
    release(v, held);
    return NULL;
}

static PyObject *column_sums(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *out_obj;
    idx rows, C;
    if (!PyArg_ParseTuple(args, "OnnO", &x_obj, &rows, &C, &out_obj))
        return NULL;
    Py_buffer v[2];
    if (get_buffer(x_obj, &v[0], 0, 'f', rows * C, "x") < 0)
        return NULL;
    if (get_buffer(out_obj, &v[1], 1, 'd', C, "out") < 0) {
        release(v, 1);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    f32_column_sums(v[0].buf, rows, C, v[1].buf);
    Py_END_ALLOW_THREADS
    release(v, 2);
    Py_RETURN_NONE;
}

static PyObject *square_sums(PyObject *self, PyObject *args)
{
    PyObject *x_obj, *sq_obj, *norm_obj;
    idx g, n;
    if (!PyArg_ParseTuple(args, "OnnOO", &x_obj, &g, &n, &sq_obj, &norm_obj))
        return NULL;
    if (g < 0 || n < 0)
        return PyErr_Format(PyExc_ValueError, "square_sums: g %zd and n %zd must be >= 0", g, n);
    Py_buffer v[3];
    if (get_buffer(x_obj, &v[0], 0, 0, g * n, "x") < 0)
        return NULL;
    if (get_buffer(sq_obj, &v[1], 1, 'd', n, "sq") < 0) {
        release(v, 1);
        return NULL;
    }
    if (get_buffer(norm_obj, &v[2], 1, 'd', g, "norm2") < 0) {
        release(v, 2);
        return NULL;
    }
    char type = item_type(&v[0]);
    Py_BEGIN_ALLOW_THREADS
    if (type == 'f')
        f32_square_sums(v[0].buf, g, n, v[1].buf, v[2].buf);
    else
        f64_square_sums(v[0].buf, g, n, v[1].buf, v[2].buf);
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

static PyObject *query_dots(PyObject *self, PyObject *args)
{
    const char *level_name;
    PyObject *x_obj, *q_obj, *out_obj;
    idx g, n, q_stride, n_q;
    if (!PyArg_ParseTuple(args, "sOnnOnnO", &level_name, &x_obj, &g, &n, &q_obj, &q_stride, &n_q, &out_obj))
        return NULL;
    const simd_level *level = find_level(level_name);
    if (level == NULL)
        return NULL;
    if (g < 0 || n < 0 || n_q < 0 || q_stride < n)
        return PyErr_Format(PyExc_ValueError, "query_dots: g %zd, n %zd, n_q %zd, q_stride %zd out of range", g, n,
                            n_q, q_stride);
    Py_buffer v[3];
    if (get_buffer(x_obj, &v[0], 0, 'd', g * n, "x") < 0)
        return NULL;
    if (get_buffer(q_obj, &v[1], 0, 'd', n_q ? (n_q - 1) * q_stride + n : 0, "Q") < 0) {
        release(v, 1);
        return NULL;
    }
    if (get_buffer(out_obj, &v[2], 1, 'd', g * n_q, "out") < 0) {
        release(v, 2);
        return NULL;
    }
    double *part = PyMem_RawCalloc((size_t)(g * n_q * 8 + 1), sizeof(double)); /* each sum's 8 lanes */
    if (part == NULL) {
        release(v, 3);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    level->f64_query_dots(v[0].buf, g, n, v[1].buf, q_stride, n_q, part);
    query_dots_finish(v[0].buf, g, n, v[1].buf, q_stride, n_q, part, v[2].buf);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(part);
    release(v, 3);
    Py_RETURN_NONE;
}

static PyObject *weight_grad_dots(PyObject *self, PyObject *args)
{
    const char *level_name;
    PyObject *P_obj, *G_obj, *off_obj, *out_obj, *sq_obj, *norm_obj, *q_obj, *dots_obj;
    idx p_rows, m, sample, row_step, col_step, n_h, n_w, Cp, R, C, q_stride, n_q;
    if (!PyArg_ParseTuple(args, "sOOOnnnnnnnnnnOOOOnnO", &level_name, &P_obj, &G_obj, &off_obj, &p_rows, &m, &sample,
                          &row_step, &col_step, &n_h, &n_w, &Cp, &R, &C, &out_obj, &sq_obj, &norm_obj, &q_obj,
                          &q_stride, &n_q, &dots_obj))
        return NULL;
    const simd_level *level = find_level(level_name);
    if (level == NULL)
        return NULL;
    if (Cp < 1 || R < 1 || m < 1 || n_q < 0)
        return PyErr_Format(PyExc_ValueError, "weight_grad_dots: C_prev %zd, rows %zd, m %zd and n_q %zd out of range",
                            Cp, R, m, n_q);
    Py_buffer v[8]; /* offsets, P, dZ, out, dW_sq, norm2, Q, dots */
    int held = 0;
    weight_buffers w;
    if (weight_inputs(off_obj, P_obj, G_obj, out_obj, p_rows * Cp, m * n_h * n_w * C, R * C, v, &held, &w) < 0)
        goto fail;
    idx K = w.K;
    const idx *offsets = w.offsets;
    char type = w.type;
    double *out = w.out;
    if (get_buffer(sq_obj, &v[held], 1, 'd', K * R * C, "dW_sq") < 0)
        goto fail;
    double *dW_sq = v[held++].buf;
    if (get_buffer(norm_obj, &v[held], 1, 'd', m, "norm2") < 0)
        goto fail;
    double *norm2 = v[held++].buf;
    idx weights = K * R * C;
    if (q_stride < weights) {
        PyErr_Format(PyExc_ValueError, "weight_grad_dots: q_stride %zd is below the %zd weights", q_stride, weights);
        goto fail;
    }
    if (get_buffer(q_obj, &v[held], 0, 'd', n_q ? (n_q - 1) * q_stride + weights : 0, "Q") < 0)
        goto fail;
    const double *Q = v[held++].buf;
    if (get_buffer(dots_obj, &v[held], 1, 'd', m * n_q, "dots") < 0)
        goto fail;
    double *dots = v[held++].buf;
    idx last = (m - 1) * sample + (n_h - 1) * row_step + (n_w - 1) * col_step;
    int fits = n_h > 0 && n_w > 0 && offsets[0] >= 0 && (last + offsets[K - 1]) * Cp + R <= p_rows * Cp;
    int lanes_ok = C % (type == 'f' ? 16 : 8) == 0;
    if (!fits || !lanes_ok) {
        release(v, held);
        if (!fits)
            return PyErr_Format(PyExc_ValueError, "weight_grad_dots: the output pixels do not fit the %zd rows of P",
                                p_rows);
        return PyErr_Format(PyExc_ValueError, "weight_grad_dots: C %zd is not a multiple of the vector width", C);
    }
    /* one tap of each sample's own dW, each sample's 8 square sums, each product's 8 lanes */
    double *scratch = PyMem_RawMalloc((size_t)(m * R * C) * sizeof(double));
    double *lanes = PyMem_RawCalloc((size_t)(m * 8 + m * n_q * 8), sizeof(double));
    if (scratch == NULL || lanes == NULL) {
        PyMem_RawFree(scratch);
        PyMem_RawFree(lanes);
        release(v, held);
        return PyErr_NoMemory();
    }
    double *part = lanes + m * 8;
    Py_BEGIN_ALLOW_THREADS
    if (type == 'f')
        level->f32_weight_grad_dots(v[1].buf, v[2].buf, offsets, K, m, sample, row_step, col_step, n_h, n_w, Cp, R, C,
                                    out, scratch, dW_sq, lanes, level->f64_query_dots, Q, q_stride, n_q, part);
    else
        level->f64_weight_grad_dots(v[1].buf, v[2].buf, offsets, K, m, sample, row_step, col_step, n_h, n_w, Cp, R, C,
                                    out, scratch, dW_sq, lanes, level->f64_query_dots, Q, q_stride, n_q, part);
    for (idx n = 0; n < m; n++) { /* as sample_squares ends */
        const double *acc = lanes + 8 * n;
        norm2[n] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
    query_dots_finish(NULL, m, 0, Q, q_stride, n_q, part, dots); /* a tap holds whole vectors: no tail */
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scratch);
    PyMem_RawFree(lanes);
    release(v, held);
    Py_RETURN_NONE;
fail:
    release(v, held);
    return NULL;
}

static PyObject *top_add(PyObject *self, PyObject *args)
{
    PyObject *panel_obj, *pi_obj, *ps_obj, *ni_obj, *ns_obj;
    idx n_q, width, stride, first, top;
    if (!PyArg_ParseTuple(args, "OnnnnnOOOO", &panel_obj, &n_q, &width, &stride, &first, &top, &pi_obj, &ps_obj,
                          &ni_obj, &ns_obj))
        return NULL;
    if (n_q < 0 || width < 0 || top < 1 || stride < width || first < 0)
        return PyErr_Format(PyExc_ValueError, "top_add: n_q %zd, width %zd, stride %zd, first %zd, top %zd out of range",
                            n_q, width, stride, first, top);
    Py_buffer v[5];
    idx count = n_q ? (n_q - 1) * stride + width : 0;
    if (get_buffer(panel_obj, &v[0], 0, 0, count, "panel") < 0)
        return NULL;
    PyObject *lists[4] = {pi_obj, ps_obj, ni_obj, ns_obj};
    const char types[4] = {'n', 'd', 'n', 'd'};
    const char *names[4] = {"pos_index", "pos_score", "neg_index", "neg_score"};
    for (int k = 0; k < 4; k++)
        if (get_buffer(lists[k], &v[k + 1], 1, types[k], n_q * top, names[k]) < 0) {
            release(v, k + 1);
            return NULL;
        }
    char type = item_type(&v[0]);
    Py_BEGIN_ALLOW_THREADS
    if (type == 'f')
        f32_top_add(v[0].buf, n_q, width, stride, first, top, v[1].buf, v[2].buf, v[3].buf, v[4].buf);
    else
        f64_top_add(v[0].buf, n_q, width, stride, first, top, v[1].buf, v[2].buf, v[3].buf, v[4].buf);
    Py_END_ALLOW_THREADS
    release(v, 5);
    Py_RETURN_NONE;
}

static PyObject *list_levels(PyObject *self, PyObject *unused)
{
    PyObject *names = PyList_New(0);
    for (const simd_level *level = levels; names && level->name; level++)
        if (level->runs_here()) {
            PyObject *name = PyUnicode_FromString(level->name);
            if (name == NULL || PyList_Append(names, name) < 0) {
                Py_XDECREF(name);
                Py_CLEAR(names);
                break;
            }
            Py_DECREF(name);
        }
    if (names == NULL)
        return NULL;
    PyObject *result = PyList_AsTuple(names);
    Py_DECREF(names);
    return result;
}

static PyMethodDef methods[] = {
    {"levels", list_levels, METH_NOARGS,
     "levels()\n\nThe SIMD levels compiled into this build that this CPU runs, best first."},
    {"input_grad", input_grad, METH_VARARGS,
     "input_grad(level, D, Wt, offsets, d_rows, base, m, sample, H, W, cols, C, C_prev, out, layout)\n\n"
     "dA_prev of a stride-1 convolution into out, shape (m, H, W, C_prev). Wt has shape (K, C, C_prev),\n"
     "or (K, C_prev, C) when C_prev is narrow (at most 4 and not a multiple of the vector width)."},
    {"weight_grad", weight_grad, METH_VARARGS,
     "weight_grad(level, P, dZ, offsets, p_rows, m, sample, row_step, col_step, n_H, n_W, C_prev, rows, C, out\n"
     "            [, dW_sq, norm2[, samples]])\n\n"
     "Add dW into out, float64, shape (K, C_prev, C). Output pixel (n, i, j) reads row\n"
     "n*sample + i*row_step + j*col_step + offsets[k] of the padded input P and dZ[n, i, j].\n"
     "With dW_sq (float64, shaped like out) and norm2 (float64, (m,)): also add each sample's dW_n * dW_n\n"
     "into dW_sq and write |dW_n|^2 to norm2[n]; out may then be None (the statistics only).\n"
     "With samples (float64, (m, K, C_prev, C)) too: each sample's dW_n is left in samples[n]."},
    {"column_sums", column_sums, METH_VARARGS,
     "column_sums(x, rows, C, out)\n\nAdd the column sums of float32 x (rows, C) into float64 out (C,)."},
    {"square_sums", square_sums, METH_VARARGS,
     "square_sums(x, g, n, sq, norm2)\n\nThe squares of x (g, n), float32 or float64, in float64: added into\n"
     "sq (n,) row after row, and each row's sum written to norm2 (g,)."},
    {"query_dots", query_dots, METH_VARARGS,
     "query_dots(level, x, g, n, Q, q_stride, n_q, out)\n\n"
     "out[s, q] = sum_k x[s, k] * Q[q * q_stride + k], k < n, all float64: x (g, n), out (g, n_q) written.\n"
     "Lane k % 8 of each sum takes its values in order, a span of values at a time, then the lanes\n"
     "are added in a fixed order."},
    {"weight_grad_dots", weight_grad_dots, METH_VARARGS,
     "weight_grad_dots(level, P, dZ, offsets, p_rows, m, sample, row_step, col_step, n_H, n_W, C_prev, rows, C, out,\n"
     "                 dW_sq, norm2, Q, q_stride, n_q, dots)\n\n"
     "weight_grad with dW_sq and norm2 (the same bits), a tap at a time over the m samples, and also\n"
     "dots[n, q] = <dW_n, Q[q * q_stride : q * q_stride + K * rows * C]> (float64, (m, n_q), written) as\n"
     "query_dots sums them, a tap at a time."},
    {"top_add", top_add, METH_VARARGS,
     "top_add(panel, n_q, width, stride, first, top, pos_index, pos_score, neg_index, neg_score)\n\n"
     "Add a panel of scores (float32 or float64; row q at panel[q * stride], width scores against train\n"
     "samples first .. first + width - 1) to every query's top lists, in place: pos_index/neg_index intp\n"
     "(n_q, top), pos_score/neg_score float64 (n_q, top), index -1 and NaN past the end of a short list."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flatconv",
                                    "The compiled loops of dconv.kernel, one set per SIMD level.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__flatconv(void)
{
#if DCONV_X86_64
    __builtin_cpu_init();
#endif
    return PyModule_Create(&module);
}
