/* The register blocks and loops of dconv/_flatconv.c for one SIMD level and one dtype.
 *
 * _flatconv.c includes this file once per (level, dtype), inside that level's target pragma,
 * with these macros defined:
 *
 *   T, LANES               the element type, and the lanes of the logical vector: 16 float32 or
 *                          8 float64 at every level, so that every level takes the same layers
 *   PREFIX                 the name prefix of this inclusion, e.g. avx2_f32
 *   NATIVE, PARTS          the level's vector register type, and how many make a logical vector
 *   SET1(x), LOADU(p)      broadcast a scalar, load NATIVE from an unaligned address
 *   FMADD(a, b, c)         a * b + c: one rounding (FMA) on every level but x86-64 baseline
 *   INPUT_PIXELS_2/_1      the most pixels per input_grad block of 2 or 1 logical vectors
 *                          (0 for _2: no 2-vector blocks, where 1-vector blocks measured faster)
 *   NARROW_PIXELS_1.._4    the most pixels per narrow input_grad block, by C_prev
 *   WEIGHT_ROWS_2/_1       the most rows per weight_grad block of 2 or 1 logical vectors (0 for _2: none)
 *
 * The block sizes follow the level's register file: 32 vector registers on AVX-512 and NEON,
 * 16 on AVX2 and SSE2. Each lane of each accumulator sums the same terms in the same order at
 * every level, and the lanes of the narrow blocks are added in a fixed order, so the levels
 * with FMA give the same bits; only how many accumulators a block holds differs.
 */

typedef struct {
    NATIVE part[PARTS];
} F(vec);

#define NATIVE_LANES (LANES / PARTS)

/* Unroll the loops over a block's accumulators fully: GCC splits acc[][] into registers only
 * then (it kept whole blocks on the stack otherwise, even blocks of 4 accumulators). */
#define UNROLL _Pragma("GCC unroll 16")

static inline __attribute__((always_inline)) F(vec) F(load)(const T *p)
{
    F(vec) v;
    for (int h = 0; h < PARTS; h++)
        v.part[h] = LOADU(p + h * NATIVE_LANES);
    return v;
}

/* Store one native register at a time (a whole-struct memcpy kept the struct in memory) */
static inline __attribute__((always_inline)) void F(store)(T *p, F(vec) v)
{
    for (int h = 0; h < PARTS; h++)
        memcpy(p + h * NATIVE_LANES, &v.part[h], sizeof v.part[h]);
}

static inline __attribute__((always_inline)) F(vec) F(zero)(void)
{
    F(vec) v;
    for (int h = 0; h < PARTS; h++)
        v.part[h] = SET1((T)0);
    return v;
}

/* acc + x * w, x broadcast (one NATIVE register, shared by the caller across vectors) */
static inline __attribute__((always_inline)) F(vec) F(muladd_broadcast)(NATIVE x, F(vec) w, F(vec) acc)
{
    for (int h = 0; h < PARTS; h++)
        acc.part[h] = FMADD(x, w.part[h], acc.part[h]);
    return acc;
}

/* acc + a * b, lane by lane */
static inline __attribute__((always_inline)) F(vec) F(muladd)(F(vec) a, F(vec) b, F(vec) acc)
{
    for (int h = 0; h < PARTS; h++)
        acc.part[h] = FMADD(a.part[h], b.part[h], acc.part[h]);
    return acc;
}

/* The sum of the lanes, added in lane order */
static inline __attribute__((always_inline)) T F(lane_sum)(F(vec) v)
{
    T lanes[LANES], total = 0;
    memcpy(lanes, &v, sizeof lanes);
    for (int l = 0; l < LANES; l++)
        total += lanes[l];
    return total;
}

typedef void (*F(input_block))(const T *, const T *, const idx *, idx, idx, idx, T *, idx);
typedef void (*F(weight_block))(const T *, const T *, idx, idx, idx, idx, idx, idx, double *);
typedef void (*F(sample_block))(const T *, const T *, idx, idx, idx, idx, idx, idx, double *, double *, int);

/* A register block of input_grad: NB neighbouring pixels x NV vectors of input channels. src is
 * D's row of the block's first pixel; Wt (K, C, Cp) and out start at the block's first input
 * channel. */
#define DEFINE_INPUT_BLOCK(NV, NB)                                                                  \
    static void F(input_block_##NV##_##NB)(const T *src, const T *Wt, const idx *offsets, idx K,    \
                                           idx C, idx Cp, T *out, idx pixel)                        \
    {                                                                                               \
        F(vec) acc[NB][NV];                                                                         \
        UNROLL for (int i = 0; i < NB; i++)                                                         \
            UNROLL for (int v = 0; v < NV; v++)                                                     \
                acc[i][v] = F(zero)();                                                              \
        for (idx k = 0; k < K; k++) {                                                               \
            const T *s = src - offsets[k] * C;                                                      \
            const T *w = Wt + k * C * Cp;                                                           \
            for (idx c = 0; c < C; c++) {                                                           \
                F(vec) wv[NV];                                                                      \
                UNROLL for (int v = 0; v < NV; v++)                                                 \
                    wv[v] = F(load)(w + c * Cp + v * LANES);                                        \
                UNROLL for (int i = 0; i < NB; i++) {                                               \
                    NATIVE x = SET1(s[i * C + c]);                                                  \
                    UNROLL for (int v = 0; v < NV; v++)                                             \
                        acc[i][v] = F(muladd_broadcast)(x, wv[v], acc[i][v]);                       \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        UNROLL for (int i = 0; i < NB; i++)                                                         \
            UNROLL for (int v = 0; v < NV; v++)                                                     \
                F(store)(out + i * pixel + v * LANES, acc[i][v]);                                   \
    }

/* The narrow block (CP = C_prev <= NARROW, a first layer's 1-3 image channels): NB pixels x CP
 * accumulators whose vectors run over C, their lanes added at the end. The CP weight vectors of
 * a tap and block of C are loaded once per NB pixels. Wc has shape (K, CP, C); C a multiple of
 * LANES. */
#define DEFINE_NARROW_BLOCK(CP, NB)                                                                 \
    static void F(narrow_block_##CP##_##NB)(const T *src, const T *Wc, const idx *offsets, idx K,   \
                                            idx C, idx Cp, T *out, idx pixel)                       \
    {                                                                                               \
        (void)Cp;                                                                                   \
        F(vec) acc[NB][CP];                                                                         \
        UNROLL for (int i = 0; i < NB; i++)                                                         \
            UNROLL for (int p = 0; p < CP; p++)                                                     \
                acc[i][p] = F(zero)();                                                              \
        for (idx k = 0; k < K; k++) {                                                               \
            const T *s = src - offsets[k] * C;                                                      \
            const T *w = Wc + k * CP * C;                                                           \
            for (idx c = 0; c < C; c += LANES) {                                                    \
                F(vec) wv[CP];                                                                      \
                UNROLL for (int p = 0; p < CP; p++)                                                 \
                    wv[p] = F(load)(w + p * C + c);                                                 \
                UNROLL for (int i = 0; i < NB; i++) {                                               \
                    F(vec) d = F(load)(s + i * C + c);                                              \
                    UNROLL for (int p = 0; p < CP; p++)                                             \
                        acc[i][p] = F(muladd)(d, wv[p], acc[i][p]);                                 \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        UNROLL for (int i = 0; i < NB; i++)                                                         \
            UNROLL for (int p = 0; p < CP; p++)                                                     \
                out[i * pixel + p] = F(lane_sum)(acc[i][p]);                                        \
    }

/* A register block of weight_grad: NR rows x NV vectors of outputs, summed over one tile of a
 * sample's output pixels and added to out (float64, at the block's first row and output). Output
 * pixel (i, j) reads P at a + (i*row_step + j*col_step) * Cp (the tap's pixel of the padded input;
 * the steps carry the stride) and dZ at g + (i*n_w + j) * C. A row is an input channel, or, where
 * the caller merges the taps of a kernel row (a narrow C_prev), a (tap, channel) pair: rows past
 * C_prev then read the next pixels' channels.
 * Its twin, sample_block, sums the same way for the statistics: it adds into out only when out
 * is not NULL, and also puts the float64 sums into this sample's own dW, sample: written on the
 * sample's first tile (first = 1), added on the others. Two functions, so that the block without
 * the statistics runs the very instructions it ran before they existed. */
#define WEIGHT_BLOCK_SUMS(NV, NR)                                                                   \
        F(vec) acc[NR][NV];                                                                         \
        UNROLL for (int r = 0; r < NR; r++)                                                         \
            UNROLL for (int v = 0; v < NV; v++)                                                     \
                acc[r][v] = F(zero)();                                                              \
        idx a_step = col_step * Cp;                                                                 \
        for (idx i = 0; i < n_h; i++) {                                                             \
            const T *ar = a + i * row_step * Cp;                                                    \
            const T *gr = g + i * n_w * C;                                                          \
            for (idx j = 0; j < n_w; j++) {                                                         \
                F(vec) dz[NV];                                                                      \
                UNROLL for (int v = 0; v < NV; v++)                                                 \
                    dz[v] = F(load)(gr + j * C + v * LANES);                                        \
                UNROLL for (int r = 0; r < NR; r++) {                                               \
                    NATIVE x = SET1(ar[j * a_step + r]);                                            \
                    UNROLL for (int v = 0; v < NV; v++)                                             \
                        acc[r][v] = F(muladd_broadcast)(x, dz[v], acc[r][v]);                       \
                }                                                                                   \
            }                                                                                       \
        }

#define DEFINE_WEIGHT_BLOCK(NV, NR)                                                                 \
    static void F(weight_block_##NV##_##NR)(const T *a, const T *g, idx row_step, idx col_step,     \
                                            idx n_h, idx n_w, idx Cp, idx C, double *out)           \
    {                                                                                               \
        WEIGHT_BLOCK_SUMS(NV, NR)                                                                   \
        UNROLL for (int r = 0; r < NR; r++)                                                         \
            UNROLL for (int v = 0; v < NV; v++) {                                                   \
                T lanes[LANES];                                                                     \
                memcpy(lanes, &acc[r][v], sizeof lanes);                                            \
                for (int l = 0; l < LANES; l++)                                                     \
                    out[r * C + v * LANES + l] += lanes[l];                                         \
            }                                                                                       \
    }                                                                                               \
    static void F(sample_block_##NV##_##NR)(const T *a, const T *g, idx row_step, idx col_step,     \
                                            idx n_h, idx n_w, idx Cp, idx C, double *out,           \
                                            double *sample, int first)                              \
    {                                                                                               \
        WEIGHT_BLOCK_SUMS(NV, NR)                                                                   \
        UNROLL for (int r = 0; r < NR; r++)                                                         \
            UNROLL for (int v = 0; v < NV; v++) {                                                   \
                T lanes[LANES];                                                                     \
                memcpy(lanes, &acc[r][v], sizeof lanes);                                            \
                if (out)                                                                            \
                    for (int l = 0; l < LANES; l++)                                                 \
                        out[r * C + v * LANES + l] += lanes[l];                                     \
                if (first)                                                                          \
                    for (int l = 0; l < LANES; l++)                                                 \
                        sample[r * C + v * LANES + l] = lanes[l];                                   \
                else                                                                                \
                    for (int l = 0; l < LANES; l++)                                                 \
                        sample[r * C + v * LANES + l] += lanes[l];                                  \
            }                                                                                       \
    }

#if INPUT_PIXELS_2
REPEAT(INPUT_PIXELS_2, DEFINE_INPUT_BLOCK, 2)
#endif
REPEAT(INPUT_PIXELS_1, DEFINE_INPUT_BLOCK, 1)
REPEAT(NARROW_PIXELS_1, DEFINE_NARROW_BLOCK, 1)
REPEAT(NARROW_PIXELS_2, DEFINE_NARROW_BLOCK, 2)
REPEAT(NARROW_PIXELS_3, DEFINE_NARROW_BLOCK, 3)
REPEAT(NARROW_PIXELS_4, DEFINE_NARROW_BLOCK, 4)
#if WEIGHT_ROWS_2
REPEAT(WEIGHT_ROWS_2, DEFINE_WEIGHT_BLOCK, 2)
#endif
REPEAT(WEIGHT_ROWS_1, DEFINE_WEIGHT_BLOCK, 1)

/* The blocks by size (entry 0 unused) */
#define BLOCK_NAME(KIND, N) F(KIND##_##N),
#if INPUT_PIXELS_2
static const F(input_block) F(input_blocks_2)[] = {NULL, REPEAT(INPUT_PIXELS_2, BLOCK_NAME, input_block_2)};
#endif
static const F(input_block) F(input_blocks_1)[] = {NULL, REPEAT(INPUT_PIXELS_1, BLOCK_NAME, input_block_1)};
static const F(input_block) F(narrow_blocks_1)[] = {NULL, REPEAT(NARROW_PIXELS_1, BLOCK_NAME, narrow_block_1)};
static const F(input_block) F(narrow_blocks_2)[] = {NULL, REPEAT(NARROW_PIXELS_2, BLOCK_NAME, narrow_block_2)};
static const F(input_block) F(narrow_blocks_3)[] = {NULL, REPEAT(NARROW_PIXELS_3, BLOCK_NAME, narrow_block_3)};
static const F(input_block) F(narrow_blocks_4)[] = {NULL, REPEAT(NARROW_PIXELS_4, BLOCK_NAME, narrow_block_4)};
#if WEIGHT_ROWS_2
static const F(weight_block) F(weight_blocks_2)[] = {NULL, REPEAT(WEIGHT_ROWS_2, BLOCK_NAME, weight_block_2)};
static const F(sample_block) F(sample_blocks_2)[] = {NULL, REPEAT(WEIGHT_ROWS_2, BLOCK_NAME, sample_block_2)};
#endif
static const F(weight_block) F(weight_blocks_1)[] = {NULL, REPEAT(WEIGHT_ROWS_1, BLOCK_NAME, weight_block_1)};
static const F(sample_block) F(sample_blocks_1)[] = {NULL, REPEAT(WEIGHT_ROWS_1, BLOCK_NAME, sample_block_1)};

/* input_grad over every pixel: each row of pixels cut into near-equal blocks, each block over
 * every group of input channels. The caller has checked input_plan(Cp, C, LANES). */
static void F(input_grad)(const T *D, const T *Wt, const idx *offsets, idx K, idx base, idx m, idx sample,
                          idx height, idx width, idx cols, idx C, idx Cp, T *dA, out_layout o)
{
    static const F(input_block) *narrow[NARROW + 1] = {
        NULL, F(narrow_blocks_1), F(narrow_blocks_2), F(narrow_blocks_3), F(narrow_blocks_4)};
    static const idx narrow_pixels[NARROW + 1] = {0, NARROW_PIXELS_1, NARROW_PIXELS_2, NARROW_PIXELS_3,
                                                  NARROW_PIXELS_4};
    const F(input_block) *blocks;
    idx max_pixels, channels;
    switch (input_plan(Cp, C, LANES)) {
    case PLAN_TWO_VECTORS:
#if INPUT_PIXELS_2
        blocks = F(input_blocks_2), max_pixels = INPUT_PIXELS_2, channels = 2 * LANES;
        break;
#endif
        /* fall through: no 2-vector blocks at this level, so two 1-vector blocks per pixel */
    case PLAN_ONE_VECTOR:
        blocks = F(input_blocks_1), max_pixels = INPUT_PIXELS_1, channels = LANES;
        break;
    default:
        blocks = narrow[Cp], max_pixels = narrow_pixels[Cp], channels = Cp;
    }
    idx n_blocks = (width + max_pixels - 1) / max_pixels;
    for (idx n = 0; n < m; n++)
        for (idx y = 0; y < height; y++)
            for (idx b = 0, x0 = 0, nb; b < n_blocks; b++, x0 += nb) {
                nb = (width - x0) / (n_blocks - b);
                const T *src = D + (base + n * sample + y * cols + x0) * C;
                T *out = dA + o.first + n * o.sample + y * o.row + x0 * o.pixel;
                for (idx p0 = 0; p0 < Cp; p0 += channels)
                    blocks[nb](src, Wt + p0, offsets, K, C, Cp, out + p0, o.pixel);
            }
}

/* weight_grad: each sample's dW, block by block, added into the float64 dW (if not NULL). C a
 * multiple of LANES. With the statistics (sample_dW not NULL: K*R*C doubles per sample), each
 * sample's dW is also summed on its own into sample_dW + n * sample_stride (a stride of 0 reuses
 * one scratch; K*R*C keeps every sample's), and then sample_squares adds its squares into dW_sq
 * and their sum into norm2[n]: dW gets the same additions in the same order either way. */
static void F(weight_grad)(const T *P, const T *G, const idx *offsets, idx K, idx m, idx sample, idx row_step,
                           idx col_step, idx n_h, idx n_w, idx Cp, idx R, idx C, double *dW, double *sample_dW,
                           idx sample_stride, double *dW_sq, double *norm2)
{
    const F(weight_block) *blocks = F(weight_blocks_1);
    const F(sample_block) *sample_blocks = F(sample_blocks_1);
    idx max_rows = WEIGHT_ROWS_1, width = LANES;
#if WEIGHT_ROWS_2
    if (C % (2 * LANES) == 0)
        blocks = F(weight_blocks_2), sample_blocks = F(sample_blocks_2), max_rows = WEIGHT_ROWS_2, width = 2 * LANES;
#endif
    idx n_blocks = (R + max_rows - 1) / max_rows;
    idx tile = n_w < WEIGHT_TILE_PIXELS ? WEIGHT_TILE_PIXELS / n_w : 1; /* output rows per tile */
    for (idx n = 0; n < m; n++) {
        double *own = sample_dW ? sample_dW + n * sample_stride : NULL; /* this sample's dW */
        for (idx i0 = 0; i0 < n_h; i0 += tile) {
            idx tile_h = n_h - i0 < tile ? n_h - i0 : tile;
            const T *a = P + (n * sample + i0 * row_step) * Cp;
            const T *g = G + (n * n_h + i0) * n_w * C;
            for (idx k = 0; k < K; k++)
                for (idx b = 0, c0 = 0, rows; b < n_blocks; b++, c0 += rows) {
                    rows = (R - c0) / (n_blocks - b);
                    for (idx p0 = 0; p0 < C; p0 += width) {
                        idx at = (k * R + c0) * C + p0;
                        if (own)
                            sample_blocks[rows](a + offsets[k] * Cp + c0, g + p0, row_step, col_step, tile_h, n_w,
                                                Cp, C, dW ? dW + at : NULL, own + at, i0 == 0);
                        else
                            blocks[rows](a + offsets[k] * Cp + c0, g + p0, row_step, col_step, tile_h, n_w, Cp, C,
                                         dW + at);
                    }
                }
        }
        if (own)
            norm2[n] = sample_squares(own, K * R * C, dW_sq);
    }
}

/* weight_grad_dots: weight_grad with the statistics and the query inner products of a block of m
 * samples, tap by tap: for tap k, each sample's own tap-k sums go into scratch (R*C doubles per
 * sample), their squares into dW_sq and the sample's 8 accumulators lanes[8n..] (tap_squares), and
 * dots adds the products of the block's tap-k sums with the queries' tap-k rows into part (lanes
 * of query_dots). So a tap's R*C sums of the block stay in L2 for the products, instead of every
 * sample's whole dW_n passing through a buffer; the queries are read once per block. Every element
 * of dW, dW_sq and dW_n gets the additions of weight_grad in the same order (samples, then tiles),
 * and the squares reach the same accumulators in the same order: the same bits. */
static void F(weight_grad_dots)(const T *P, const T *G, const idx *offsets, idx K, idx m, idx sample, idx row_step,
                                idx col_step, idx n_h, idx n_w, idx Cp, idx R, idx C, double *dW, double *scratch,
                                double *dW_sq, double *lanes, query_dots_fn dots, const double *Q, idx q_stride,
                                idx n_q, double *part)
{
    const F(sample_block) *sample_blocks = F(sample_blocks_1);
    idx max_rows = WEIGHT_ROWS_1, width = LANES;
#if WEIGHT_ROWS_2
    if (C % (2 * LANES) == 0)
        sample_blocks = F(sample_blocks_2), max_rows = WEIGHT_ROWS_2, width = 2 * LANES;
#endif
    idx n_blocks = (R + max_rows - 1) / max_rows;
    idx tile = n_w < WEIGHT_TILE_PIXELS ? WEIGHT_TILE_PIXELS / n_w : 1; /* output rows per tile */
    idx tap = R * C;
    for (idx k = 0; k < K; k++) {
        for (idx n = 0; n < m; n++) {
            double *own = scratch + n * tap; /* this sample's tap k */
            for (idx i0 = 0; i0 < n_h; i0 += tile) {
                idx tile_h = n_h - i0 < tile ? n_h - i0 : tile;
                const T *a = P + (n * sample + i0 * row_step) * Cp;
                const T *g = G + (n * n_h + i0) * n_w * C;
                for (idx b = 0, c0 = 0, rows; b < n_blocks; b++, c0 += rows) {
                    rows = (R - c0) / (n_blocks - b);
                    for (idx p0 = 0; p0 < C; p0 += width) {
                        idx at = c0 * C + p0;
                        sample_blocks[rows](a + offsets[k] * Cp + c0, g + p0, row_step, col_step, tile_h, n_w, Cp, C,
                                            dW ? dW + k * tap + at : NULL, own + at, i0 == 0);
                    }
                }
            }
            tap_squares(own, tap, dW_sq + k * tap, lanes + 8 * n);
        }
        dots(scratch, m, tap, Q + k * tap, q_stride, n_q, part);
    }
}

#if LANES == 8 /* the float64 inclusion: the per-sample inner products with the query gradients */
/* A register block of query_dots: NS rows of x against NQ queries, over len values (a multiple of
 * LANES) from x and Q, whose rows lie x_stride and q_stride apart. Lane l of a sum takes the values
 * at l mod LANES, in order; the block adds its sums, lane by lane, into part (LANES doubles per
 * (row, query), rows n_q queries apart). The rows' vectors stay in registers while each query's
 * vector passes over them: NS + NQ loads per NS * NQ multiply-adds. */
#define DEFINE_DOT_BLOCK(NS, NQ)                                                                    \
    static void F(dot_block_##NS##_##NQ)(const double *x, idx x_stride, const double *Q, idx q_stride, \
                                         idx len, double *part, idx n_q)                            \
    {                                                                                               \
        F(vec) acc[NS][NQ];                                                                         \
        UNROLL for (int s = 0; s < NS; s++)                                                         \
            UNROLL for (int q = 0; q < NQ; q++)                                                     \
                acc[s][q] = F(zero)();                                                              \
        for (idx k = 0; k < len; k += LANES) {                                                      \
            F(vec) xs[NS];                                                                          \
            UNROLL for (int s = 0; s < NS; s++)                                                     \
                xs[s] = F(load)(x + s * x_stride + k);                                              \
            UNROLL for (int q = 0; q < NQ; q++) {                                                   \
                F(vec) w = F(load)(Q + q * q_stride + k);                                           \
                UNROLL for (int s = 0; s < NS; s++)                                                 \
                    acc[s][q] = F(muladd)(xs[s], w, acc[s][q]);                                     \
            }                                                                                       \
        }                                                                                           \
        UNROLL for (int s = 0; s < NS; s++)                                                         \
            UNROLL for (int q = 0; q < NQ; q++) {                                                   \
                double lanes[LANES], *p = part + (s * n_q + q) * LANES;                             \
                memcpy(lanes, &acc[s][q], sizeof lanes);                                            \
                for (int l = 0; l < LANES; l++)                                                     \
                    p[l] += lanes[l];                                                               \
            }                                                                                       \
    }
typedef void (*F(dot_block))(const double *, idx, const double *, idx, idx, double *, idx);
#define DOT_NAME(NS, NQ) F(dot_block_##NS##_##NQ),
#define DEFINE_DOT_BLOCKS(NS)                                                                       \
    REPEAT(DOT_QUERIES, DEFINE_DOT_BLOCK, NS)                                                       \
    static const F(dot_block) F(dot_blocks_##NS)[] = {NULL, REPEAT(DOT_QUERIES, DOT_NAME, NS)};
DEFINE_DOT_BLOCKS(1)
#if DOT_SAMPLES >= 2
DEFINE_DOT_BLOCKS(2)
#endif
#if DOT_SAMPLES >= 3
DEFINE_DOT_BLOCKS(3)
#endif
#if DOT_SAMPLES >= 4
DEFINE_DOT_BLOCKS(4)
#endif
#if DOT_SAMPLES > 4
#error "DOT_SAMPLES is at most 4"
#endif
static const F(dot_block) *const F(dot_blocks)[] = {
    NULL, F(dot_blocks_1),
#if DOT_SAMPLES >= 2
    F(dot_blocks_2),
#endif
#if DOT_SAMPLES >= 3
    F(dot_blocks_3),
#endif
#if DOT_SAMPLES >= 4
    F(dot_blocks_4),
#endif
};

/* query_dots: part[(s * n_q + q) * LANES + l] += the lane-l sum of x[s, k] * Q[q, k] over the first
 * n - n % LANES values k (x: g rows of n values, n apart; Q: n_q rows q_stride apart). A span of
 * DOT_SPAN values of every row and query passes through the register blocks before the next span:
 * the span of Q stays in L1/L2 while all g rows go past it, so Q is read from memory once per call,
 * not once per row. Each block's sums start at zero on each span (a sum is a chain of DOT_SPAN /
 * LANES multiply-adds, then one add per span). Rows and queries are cut into near-equal blocks. */
static void F(query_dots)(const double *x, idx g, idx n, const double *Q, idx q_stride, idx n_q, double *part)
{
    idx body = n - n % LANES;
    idx s_blocks = (g + DOT_SAMPLES - 1) / DOT_SAMPLES, q_blocks = (n_q + DOT_QUERIES - 1) / DOT_QUERIES;
    for (idx k0 = 0; k0 < body; k0 += DOT_SPAN) {
        idx len = body - k0 < DOT_SPAN ? body - k0 : DOT_SPAN;
        for (idx b = 0, s0 = 0, ns; b < s_blocks; b++, s0 += ns) {
            ns = (g - s0) / (s_blocks - b);
            for (idx c = 0, q0 = 0, nq; c < q_blocks; c++, q0 += nq) {
                nq = (n_q - q0) / (q_blocks - c);
                F(dot_blocks)[ns][nq](x + s0 * n + k0, n, Q + q0 * q_stride + k0, q_stride, len,
                                      part + (s0 * n_q + q0) * LANES, n_q);
            }
        }
    }
}
#undef DEFINE_DOT_BLOCK
#undef DEFINE_DOT_BLOCKS
#undef DOT_NAME
#endif

#undef DEFINE_INPUT_BLOCK
#undef DEFINE_NARROW_BLOCK
#undef DEFINE_WEIGHT_BLOCK
#undef WEIGHT_BLOCK_SUMS
#undef BLOCK_NAME
#undef NATIVE_LANES
#undef UNROLL
/* this inclusion's parameters: the next one defines its own */
#undef T
#undef LANES
#undef PREFIX
#undef NATIVE
#undef SET1
#undef LOADU
#undef FMADD
