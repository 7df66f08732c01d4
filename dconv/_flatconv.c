/* The loops of dconv's backward pass that BLAS runs badly, compiled. dconv.kernel calls
 * them when this module was built (an optional extension: see "Compiled helper" in
 * dconv/kernel.py) and the channel counts suit the vector width LANES (16 float32 or
 * 8 float64 per AVX-512 register; GCC/Clang vector extensions, -march=native).
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
 *   channel before one store: no pass over memory per tap, no padding row written.
 *   Blocks: up to 12 pixels x 2 or 1 vectors of input channels, and for a narrow C_prev (a
 *   first layer's 1-3 channels) 5-8 pixels x C_prev vectors running over C.
 *
 * weight_grad: dW of a convolution of any stride, from the padded input and dZ in place:
 *
 *   dW[k, c, :] += sum_(n, i, j) P[n*sample + i*row_step + j*col_step + offsets[k], c] * dZ[n, i, j, :]
 *
 *   Up to 14 input channels x 2 vectors of outputs per register block (16 x 1 vector when C
 *   is one vector), over one sample's pixels at a time; each sample's sum is added into a
 *   float64 dW. For a narrow C_prev the caller merges the taps of each kernel row into the
 *   rows of a block (their values lie side by side in P), so a first layer's 1-3 channels
 *   still fill the registers.
 *
 * Every register block has its sizes as compile-time constants, one function per size, so
 * that its accumulators stay in registers; a row of pixels (or of channels) is cut into
 * near-equal blocks. A block with a run-time size kept its accumulators on the stack:
 * measured 12% slower for dA_prev and 13% for dW, over the suite's layers.
 *
 * column_sums: float32 db summed in float64.
 *
 * All release the GIL, so threads can run slices of a batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef Py_ssize_t idx;

#define INPUT_PIXELS 12    /* input_grad: the most neighbouring pixels per register block (x 2 or 1 vectors) */
#define NARROW 4           /* input_grad: the largest C_prev of the narrow blocks */
#define NARROW_PIXELS_1 8  /* input_grad: the most pixels per narrow block, by C_prev (NB x C_prev vectors) */
#define NARROW_PIXELS_2 8
#define NARROW_PIXELS_3 6
#define NARROW_PIXELS_4 5
#define WEIGHT_ROWS 14     /* weight_grad: the most rows (input channels) per register block of 2 vectors */
#define WEIGHT_ROWS_ONE 16 /* weight_grad: the same when C is one vector */

/* Where input_grad writes pixel (n, y, x): element first + n*sample + y*row + x*pixel of dA. */
typedef struct {
    idx first, sample, row, pixel;
} out_layout;

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
#define BLOCK_NAME(PREFIX, N) PREFIX##_##N,

#define DEFINE_VECTOR(T, NAME, LANES)                                                               \
    typedef T NAME##_vec __attribute__((vector_size(LANES * sizeof(T))));                           \
                                                                                                    \
    static inline NAME##_vec NAME##_load(const T *p)                                                \
    {                                                                                               \
        NAME##_vec v;                                                                               \
        memcpy(&v, p, sizeof v);                                                                    \
        return v;                                                                                   \
    }                                                                                               \
                                                                                                    \
    typedef void (*NAME##_input_block)(const T *, const T *, const idx *, idx, idx, idx, T *, idx); \
    typedef void (*NAME##_weight_block)(const T *, const T *, idx, idx, idx, idx, idx, idx, double *);

/* A register block of input_grad: NB neighbouring pixels x NV vectors of input channels. src is
 * D's row of the block's first pixel; Wt (K, C, Cp) and out start at the block's first input
 * channel. */
#define DEFINE_INPUT_BLOCK(T, NAME, LANES, NV, NB)                                                  \
    static void NAME##_input_block_##NV##_##NB(const T *src, const T *Wt, const idx *offsets, idx K, \
                                               idx C, idx Cp, T *out, idx pixel)                    \
    {                                                                                               \
        NAME##_vec acc[NB][NV];                                                                     \
        for (int i = 0; i < NB; i++)                                                                \
            for (int v = 0; v < NV; v++)                                                            \
                acc[i][v] = (NAME##_vec){0};                                                        \
        for (idx k = 0; k < K; k++) {                                                               \
            const T *s = src - offsets[k] * C;                                                      \
            const T *w = Wt + k * C * Cp;                                                           \
            for (idx c = 0; c < C; c++) {                                                           \
                NAME##_vec wv[NV];                                                                  \
                for (int v = 0; v < NV; v++)                                                        \
                    wv[v] = NAME##_load(w + c * Cp + v * LANES);                                    \
                for (int i = 0; i < NB; i++)                                                        \
                    for (int v = 0; v < NV; v++)                                                    \
                        acc[i][v] += s[i * C + c] * wv[v];                                          \
            }                                                                                       \
        }                                                                                           \
        for (int i = 0; i < NB; i++)                                                                \
            for (int v = 0; v < NV; v++)                                                            \
                memcpy(out + i * pixel + v * LANES, &acc[i][v], sizeof acc[i][v]);                  \
    }

/* The narrow block (CP = C_prev <= NARROW, a first layer's 1-3 image channels): NB pixels x CP
 * accumulators whose vectors run over C, reduced across lanes at the end. The CP weight vectors
 * of a tap and block of C are loaded once per NB pixels. Wc has shape (K, CP, C); C a multiple
 * of LANES. */
#define DEFINE_NARROW_BLOCK(T, NAME, LANES, CP, NB)                                                 \
    static void NAME##_narrow_block_##CP##_##NB(const T *src, const T *Wc, const idx *offsets, idx K, \
                                                idx C, idx Cp, T *out, idx pixel)                   \
    {                                                                                               \
        (void)Cp;                                                                                   \
        NAME##_vec acc[NB][CP];                                                                     \
        for (int i = 0; i < NB; i++)                                                                \
            for (int p = 0; p < CP; p++)                                                            \
                acc[i][p] = (NAME##_vec){0};                                                        \
        for (idx k = 0; k < K; k++) {                                                               \
            const T *s = src - offsets[k] * C;                                                      \
            const T *w = Wc + k * CP * C;                                                           \
            for (idx c = 0; c < C; c += LANES) {                                                    \
                NAME##_vec wv[CP];                                                                  \
                for (int p = 0; p < CP; p++)                                                        \
                    wv[p] = NAME##_load(w + p * C + c);                                             \
                for (int i = 0; i < NB; i++) {                                                      \
                    NAME##_vec d = NAME##_load(s + i * C + c);                                      \
                    for (int p = 0; p < CP; p++)                                                    \
                        acc[i][p] += d * wv[p];                                                     \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int i = 0; i < NB; i++)                                                                \
            for (int p = 0; p < CP; p++) {                                                          \
                T total = 0;                                                                        \
                for (int l = 0; l < LANES; l++)                                                     \
                    total += acc[i][p][l];                                                          \
                out[i * pixel + p] = total;                                                         \
            }                                                                                       \
    }

/* A register block of weight_grad: NR rows x NV vectors of outputs, summed over one sample's
 * output pixels and added to out (float64, at the block's first row and output). Output pixel
 * (i, j) reads P at a + (i*row_step + j*col_step) * Cp (the tap's pixel of the padded input; the
 * steps carry the stride) and dZ at g + (i*n_w + j) * C. A row is an input channel, or, where the
 * caller merges the taps of a kernel row (a narrow C_prev), a (tap, channel) pair: rows past
 * C_prev then read the next pixels' channels. */
#define DEFINE_WEIGHT_BLOCK(T, NAME, LANES, NV, NR)                                                 \
    static void NAME##_weight_block_##NV##_##NR(const T *a, const T *g, idx row_step, idx col_step, \
                                                idx n_h, idx n_w, idx Cp, idx C, double *out)       \
    {                                                                                               \
        NAME##_vec acc[NR][NV];                                                                     \
        for (int r = 0; r < NR; r++)                                                                \
            for (int v = 0; v < NV; v++)                                                            \
                acc[r][v] = (NAME##_vec){0};                                                        \
        idx a_step = col_step * Cp;                                                                 \
        for (idx i = 0; i < n_h; i++) {                                                             \
            const T *ar = a + i * row_step * Cp;                                                    \
            const T *gr = g + i * n_w * C;                                                          \
            for (idx j = 0; j < n_w; j++) {                                                         \
                NAME##_vec dz[NV];                                                                  \
                for (int v = 0; v < NV; v++)                                                        \
                    dz[v] = NAME##_load(gr + j * C + v * LANES);                                    \
                for (int r = 0; r < NR; r++)                                                        \
                    for (int v = 0; v < NV; v++)                                                    \
                        acc[r][v] += ar[j * a_step + r] * dz[v];                                    \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < NR; r++)                                                                \
            for (int v = 0; v < NV; v++)                                                            \
                for (int l = 0; l < LANES; l++)                                                     \
                    out[r * C + v * LANES + l] += acc[r][v][l];                                     \
    }

/* The blocks of every size, and tables of them by size (entry 0 unused). */
#define DEFINE_BLOCKS(T, NAME, LANES)                                                               \
    REPEAT(INPUT_PIXELS, DEFINE_INPUT_BLOCK, T, NAME, LANES, 2)                                     \
    REPEAT(INPUT_PIXELS, DEFINE_INPUT_BLOCK, T, NAME, LANES, 1)                                     \
    REPEAT(NARROW_PIXELS_1, DEFINE_NARROW_BLOCK, T, NAME, LANES, 1)                                 \
    REPEAT(NARROW_PIXELS_2, DEFINE_NARROW_BLOCK, T, NAME, LANES, 2)                                 \
    REPEAT(NARROW_PIXELS_3, DEFINE_NARROW_BLOCK, T, NAME, LANES, 3)                                 \
    REPEAT(NARROW_PIXELS_4, DEFINE_NARROW_BLOCK, T, NAME, LANES, 4)                                 \
    REPEAT(WEIGHT_ROWS, DEFINE_WEIGHT_BLOCK, T, NAME, LANES, 2)                                     \
    REPEAT(WEIGHT_ROWS_ONE, DEFINE_WEIGHT_BLOCK, T, NAME, LANES, 1)                                 \
    static const NAME##_input_block NAME##_input_blocks_2[] = {NULL, REPEAT(INPUT_PIXELS, BLOCK_NAME, NAME##_input_block_2)}; \
    static const NAME##_input_block NAME##_input_blocks_1[] = {NULL, REPEAT(INPUT_PIXELS, BLOCK_NAME, NAME##_input_block_1)}; \
    static const NAME##_input_block NAME##_narrow_blocks_1[] = {NULL, REPEAT(NARROW_PIXELS_1, BLOCK_NAME, NAME##_narrow_block_1)}; \
    static const NAME##_input_block NAME##_narrow_blocks_2[] = {NULL, REPEAT(NARROW_PIXELS_2, BLOCK_NAME, NAME##_narrow_block_2)}; \
    static const NAME##_input_block NAME##_narrow_blocks_3[] = {NULL, REPEAT(NARROW_PIXELS_3, BLOCK_NAME, NAME##_narrow_block_3)}; \
    static const NAME##_input_block NAME##_narrow_blocks_4[] = {NULL, REPEAT(NARROW_PIXELS_4, BLOCK_NAME, NAME##_narrow_block_4)}; \
    static const NAME##_weight_block NAME##_weight_blocks_2[] = {NULL, REPEAT(WEIGHT_ROWS, BLOCK_NAME, NAME##_weight_block_2)}; \
    static const NAME##_weight_block NAME##_weight_blocks_1[] = {NULL, REPEAT(WEIGHT_ROWS_ONE, BLOCK_NAME, NAME##_weight_block_1)};

/* The loops over blocks. An input_grad plan: the blocks by pixel count, the most pixels per
 * block, and the input channels each block covers (2 or 1 vectors, or all C_prev when narrow). */
#define DEFINE_LOOPS(T, NAME, LANES)                                                                \
    typedef struct {                                                                                \
        const NAME##_input_block *blocks;                                                           \
        idx max_pixels, channels;                                                                   \
    } NAME##_input_plan;                                                                            \
                                                                                                    \
    /* The plan for C_prev = Cp; blocks NULL when no block fits. */                                 \
    static NAME##_input_plan NAME##_plan_input(idx Cp, idx C)                                       \
    {                                                                                               \
        static const NAME##_input_block *narrow[NARROW + 1] = {                                     \
            NULL, NAME##_narrow_blocks_1, NAME##_narrow_blocks_2, NAME##_narrow_blocks_3, NAME##_narrow_blocks_4}; \
        static const idx narrow_pixels[NARROW + 1] = {0, NARROW_PIXELS_1, NARROW_PIXELS_2, NARROW_PIXELS_3, NARROW_PIXELS_4}; \
        if (Cp % (2 * LANES) == 0)                                                                  \
            return (NAME##_input_plan){NAME##_input_blocks_2, INPUT_PIXELS, 2 * LANES};             \
        if (Cp % LANES == 0)                                                                        \
            return (NAME##_input_plan){NAME##_input_blocks_1, INPUT_PIXELS, LANES};                 \
        if (Cp <= NARROW && C % LANES == 0)                                                         \
            return (NAME##_input_plan){narrow[Cp], narrow_pixels[Cp], Cp};                          \
        return (NAME##_input_plan){NULL, 0, 0};                                                     \
    }                                                                                               \
                                                                                                    \
    static void NAME##_input_grad(NAME##_input_plan plan, const T *D, const T *Wt, const idx *offsets, \
                                  idx K, idx base, idx m, idx sample, idx height, idx width,        \
                                  idx cols, idx C, idx Cp, T *dA, out_layout o)                     \
    {                                                                                               \
        idx n_blocks = (width + plan.max_pixels - 1) / plan.max_pixels;                             \
        for (idx n = 0; n < m; n++)                                                                 \
            for (idx y = 0; y < height; y++)                                                        \
                for (idx b = 0, x0 = 0, nb; b < n_blocks; b++, x0 += nb) {                          \
                    nb = (width - x0) / (n_blocks - b);                                             \
                    const T *src = D + (base + n * sample + y * cols + x0) * C;                     \
                    T *out = dA + o.first + n * o.sample + y * o.row + x0 * o.pixel;                \
                    for (idx p0 = 0; p0 < Cp; p0 += plan.channels)                                  \
                        plan.blocks[nb](src, Wt + p0, offsets, K, C, Cp, out + p0, o.pixel);        \
                }                                                                                   \
    }                                                                                               \
                                                                                                    \
    static void NAME##_weight_grad(const T *P, const T *G, const idx *offsets, idx K, idx m,        \
                                   idx sample, idx row_step, idx col_step, idx n_h, idx n_w,        \
                                   idx Cp, idx R, idx C, double *dW)                                \
    {                                                                                               \
        int two = C % (2 * LANES) == 0;                                                             \
        const NAME##_weight_block *blocks = two ? NAME##_weight_blocks_2 : NAME##_weight_blocks_1;  \
        idx max_rows = two ? WEIGHT_ROWS : WEIGHT_ROWS_ONE, width = two ? 2 * LANES : LANES;        \
        idx n_blocks = (R + max_rows - 1) / max_rows;                                               \
        for (idx n = 0; n < m; n++)                                                                 \
            for (idx k = 0; k < K; k++)                                                             \
                for (idx b = 0, c0 = 0, rows; b < n_blocks; b++, c0 += rows) {                      \
                    rows = (R - c0) / (n_blocks - b);                                               \
                    for (idx p0 = 0; p0 < C; p0 += width)                                           \
                        blocks[rows](P + (n * sample + offsets[k]) * Cp + c0, G + n * n_h * n_w * C + p0, \
                                     row_step, col_step, n_h, n_w, Cp, C, dW + (k * R + c0) * C + p0); \
                }                                                                                   \
    }

DEFINE_VECTOR(float, f32, 16)
DEFINE_VECTOR(double, f64, 8)
DEFINE_BLOCKS(float, f32, 16)
DEFINE_BLOCKS(double, f64, 8)
DEFINE_LOOPS(float, f32, 16)
DEFINE_LOOPS(double, f64, 8)

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

static PyObject *input_grad(PyObject *self, PyObject *args)
{
    PyObject *D_obj, *W_obj, *off_obj, *out_obj;
    idx d_rows, base, m, sample, height, width, cols, C, Cp;
    out_layout o;
    if (!PyArg_ParseTuple(args, "OOOnnnnnnnnnO(nnnn)", &D_obj, &W_obj, &off_obj, &d_rows, &base, &m, &sample,
                          &height, &width, &cols, &C, &Cp, &out_obj, &o.first, &o.sample, &o.row, &o.pixel))
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
    f32_input_plan f32_plan = f32_plan_input(Cp, C);
    f64_input_plan f64_plan = f64_plan_input(Cp, C);
    int planned = type == 'f' ? f32_plan.blocks != NULL : f64_plan.blocks != NULL;
    if (fits && planned) {
        Py_BEGIN_ALLOW_THREADS
        if (type == 'f')
            f32_input_grad(f32_plan, v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, Cp, v[3].buf, o);
        else
            f64_input_grad(f64_plan, v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, Cp, v[3].buf, o);
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
    PyObject *P_obj, *G_obj, *off_obj, *out_obj;
    idx p_rows, m, sample, row_step, col_step, n_h, n_w, Cp, R, C;
    if (!PyArg_ParseTuple(args, "OOOnnnnnnnnnnO", &P_obj, &G_obj, &off_obj, &p_rows, &m, &sample, &row_step,
                          &col_step, &n_h, &n_w, &Cp, &R, &C, &out_obj))
        return NULL;
    if (Cp < 1 || R < 1)
        return PyErr_Format(PyExc_ValueError, "weight_grad: C_prev %zd and rows %zd must be >= 1", Cp, R);
    Py_buffer v[4]; /* offsets, P, dZ, out */
    if (get_buffer(off_obj, &v[0], 0, 'n', 1, "offsets") < 0)
        return NULL;
    idx K = v[0].len / (Py_ssize_t)sizeof(idx);
    const idx *offsets = v[0].buf;
    if (get_buffer(P_obj, &v[1], 0, 0, p_rows * Cp, "P") < 0) {
        release(v, 1);
        return NULL;
    }
    char type = item_type(&v[1]);
    if (get_buffer(G_obj, &v[2], 0, type, m * n_h * n_w * C, "dZ") < 0) {
        release(v, 2);
        return NULL;
    }
    if (get_buffer(out_obj, &v[3], 1, 'd', K * R * C, "out") < 0) {
        release(v, 3);
        return NULL;
    }
    idx last = (m - 1) * sample + (n_h - 1) * row_step + (n_w - 1) * col_step; /* the last output pixel's row */
    /* the last element read: R values from the last output pixel's pixel of the last tap */
    int fits = m > 0 && n_h > 0 && n_w > 0 && offsets[0] >= 0 && (last + offsets[K - 1]) * Cp + R <= p_rows * Cp;
    int lanes_ok = C % (type == 'f' ? 16 : 8) == 0;
    if (fits && lanes_ok) {
        Py_BEGIN_ALLOW_THREADS
        if (type == 'f')
            f32_weight_grad(v[1].buf, v[2].buf, offsets, K, m, sample, row_step, col_step, n_h, n_w, Cp, R, C, v[3].buf);
        else
            f64_weight_grad(v[1].buf, v[2].buf, offsets, K, m, sample, row_step, col_step, n_h, n_w, Cp, R, C, v[3].buf);
        Py_END_ALLOW_THREADS
    }
    release(v, 4);
    if (!fits)
        return PyErr_Format(PyExc_ValueError, "weight_grad: the output pixels do not fit the %zd rows of P", p_rows);
    if (!lanes_ok)
        return PyErr_Format(PyExc_ValueError, "weight_grad: C %zd is not a multiple of the vector width", C);
    Py_RETURN_NONE;
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

static PyMethodDef methods[] = {
    {"input_grad", input_grad, METH_VARARGS,
     "input_grad(D, Wt, offsets, d_rows, base, m, sample, H, W, cols, C, C_prev, out)\n\n"
     "dA_prev of a stride-1 convolution into out, shape (m, H, W, C_prev). Wt has shape (K, C, C_prev),\n"
     "or (K, C_prev, C) when C_prev is narrow (at most 4 and not a multiple of the vector width)."},
    {"weight_grad", weight_grad, METH_VARARGS,
     "weight_grad(P, dZ, offsets, p_rows, m, sample, row_step, col_step, n_H, n_W, C_prev, C, out)\n\n"
     "Add dW into out, float64, shape (K, C_prev, C). Output pixel (n, i, j) reads row\n"
     "n*sample + i*row_step + j*col_step + offsets[k] of the padded input P and dZ[n, i, j]."},
    {"column_sums", column_sums, METH_VARARGS,
     "column_sums(x, rows, C, out)\n\nAdd the column sums of float32 x (rows, C) into float64 out (C,)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flatconv",
                                    "dA_prev of a stride-1 convolution, compiled (see dconv/kernel.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__flatconv(void) { return PyModule_Create(&module); }
