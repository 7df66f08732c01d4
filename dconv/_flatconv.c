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
 *   Three shapes of block: 6 pixels x 2 vectors, 8 pixels x 1 vector, and for a narrow
 *   C_prev (a first layer's 1-3 channels) 5-8 pixels x C_prev vectors running over C.
 *
 * weight_grad: dW of a convolution of any stride, from the padded input and dZ in place:
 *
 *   dW[k, c, :] += sum_(n, i, j) P[n*sample + i*row_step + j*col_step + offsets[k], c] * dZ[n, i, j, :]
 *
 *   8 input channels x 2 vectors of outputs per register block (16 x 1 vector when C is one
 *   vector), over one sample's pixels at a time; each sample's sum is added into a float64 dW.
 *   For a narrow C_prev the caller merges the taps of each kernel row into the rows of a
 *   block (their values lie side by side in P), so a first layer's 1-3 channels still fill
 *   the registers.
 *
 * column_sums: float32 db summed in float64.
 *
 * All release the GIL, so threads can run slices of a batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef Py_ssize_t idx;

#define PIXELS 8        /* input_grad: neighbouring pixels per register block (x 1 vector) */
#define WIDE_PIXELS 6   /* input_grad, wide variant: pixels per register block (x 2 vectors) */
#define NARROW 4        /* input_grad: the largest C_prev of the narrow variant */
#define CHANNELS 8      /* weight_grad: rows (input channels) per register block (x 2 vectors of outputs) */
#define ONE_VECTOR_ROWS 16 /* weight_grad: rows per register block when C is one vector */

/* Where input_grad writes pixel (n, y, x): element first + n*sample + y*row + x*pixel of dA. */
typedef struct {
    idx first, sample, row, pixel;
} out_layout;

#define DEFINE_INPUT_GRAD(T, NAME, LANES)                                                           \
    typedef T NAME##_vec __attribute__((vector_size(LANES * sizeof(T))));                           \
                                                                                                    \
    static inline NAME##_vec NAME##_load(const T *p)                                                \
    {                                                                                               \
        NAME##_vec v;                                                                               \
        memcpy(&v, p, sizeof v);                                                                    \
        return v;                                                                                   \
    }                                                                                               \
                                                                                                    \
    static void NAME##_input_grad(const T *D, const T *Wt, const idx *offsets, idx K, idx base,     \
                                  idx m, idx sample, idx height, idx width, idx cols, idx C,       \
                                  idx Cp, T *dA, out_layout o)                                      \
    {                                                                                               \
        for (idx n = 0; n < m; n++)                                                                 \
            for (idx y = 0; y < height; y++)                                                        \
                for (idx x0 = 0; x0 < width; x0 += PIXELS) {                                        \
                    idx nb = width - x0 < PIXELS ? width - x0 : PIXELS;                             \
                    idx q = n * sample + y * cols + x0;                                             \
                    T *out = dA + o.first + n * o.sample + y * o.row + x0 * o.pixel;                \
                    for (idx p0 = 0; p0 < Cp; p0 += LANES) {                                        \
                        NAME##_vec acc[PIXELS];                                                     \
                        for (int i = 0; i < PIXELS; i++)                                            \
                            acc[i] = (NAME##_vec){0};                                               \
                        for (idx k = 0; k < K; k++) {                                               \
                            const T *src = D + (base - offsets[k] + q) * C;                         \
                            const T *w = Wt + k * C * Cp + p0;                                      \
                            if (nb == PIXELS) {                                                     \
                                for (idx c = 0; c < C; c++) {                                       \
                                    NAME##_vec wv = NAME##_load(w + c * Cp);                        \
                                    for (int i = 0; i < PIXELS; i++)                                \
                                        acc[i] += src[i * C + c] * wv;                              \
                                }                                                                   \
                            } else {                                                                \
                                for (idx c = 0; c < C; c++) {                                       \
                                    NAME##_vec wv = NAME##_load(w + c * Cp);                        \
                                    for (idx i = 0; i < nb; i++)                                    \
                                        acc[i] += src[i * C + c] * wv;                              \
                                }                                                                   \
                            }                                                                       \
                        }                                                                           \
                        for (idx i = 0; i < nb; i++)                                                \
                            memcpy(out + i * o.pixel + p0, &acc[i], sizeof acc[i]);                 \
                    }                                                                               \
                }                                                                                   \
    }

/* The same sum with 6 pixels x 2 vectors of input channels per register block (C_prev a
 * multiple of 2*LANES): 8 loads feed 12 FMAs, against 9 for 8 in the 8 x 1 block above. */
#define DEFINE_INPUT_GRAD_WIDE(T, NAME, LANES)                                                      \
    static void NAME##_input_grad_wide(const T *D, const T *Wt, const idx *offsets, idx K,         \
                                       idx base, idx m, idx sample, idx height, idx width,         \
                                       idx cols, idx C, idx Cp, T *dA, out_layout o)                \
    {                                                                                               \
        for (idx n = 0; n < m; n++)                                                                 \
            for (idx y = 0; y < height; y++)                                                        \
                for (idx x0 = 0; x0 < width; x0 += WIDE_PIXELS) {                                   \
                    idx nb = width - x0 < WIDE_PIXELS ? width - x0 : WIDE_PIXELS;                   \
                    idx q = n * sample + y * cols + x0;                                             \
                    T *out = dA + o.first + n * o.sample + y * o.row + x0 * o.pixel;                \
                    for (idx p0 = 0; p0 < Cp; p0 += 2 * LANES) {                                    \
                        NAME##_vec lo[WIDE_PIXELS], hi[WIDE_PIXELS];                                \
                        for (int i = 0; i < WIDE_PIXELS; i++)                                       \
                            lo[i] = hi[i] = (NAME##_vec){0};                                        \
                        for (idx k = 0; k < K; k++) {                                               \
                            const T *src = D + (base - offsets[k] + q) * C;                         \
                            const T *w = Wt + k * C * Cp + p0;                                      \
                            if (nb == WIDE_PIXELS) {                                                \
                                for (idx c = 0; c < C; c++) {                                       \
                                    NAME##_vec w0 = NAME##_load(w + c * Cp);                        \
                                    NAME##_vec w1 = NAME##_load(w + c * Cp + LANES);                \
                                    for (int i = 0; i < WIDE_PIXELS; i++) {                         \
                                        lo[i] += src[i * C + c] * w0;                               \
                                        hi[i] += src[i * C + c] * w1;                               \
                                    }                                                               \
                                }                                                                   \
                            } else {                                                                \
                                for (idx c = 0; c < C; c++) {                                       \
                                    NAME##_vec w0 = NAME##_load(w + c * Cp);                        \
                                    NAME##_vec w1 = NAME##_load(w + c * Cp + LANES);                \
                                    for (idx i = 0; i < nb; i++) {                                  \
                                        lo[i] += src[i * C + c] * w0;                               \
                                        hi[i] += src[i * C + c] * w1;                               \
                                    }                                                               \
                                }                                                                   \
                            }                                                                       \
                        }                                                                           \
                        for (idx i = 0; i < nb; i++) {                                              \
                            memcpy(out + i * o.pixel + p0, &lo[i], sizeof lo[i]);                   \
                            memcpy(out + i * o.pixel + p0 + LANES, &hi[i], sizeof hi[i]);           \
                        }                                                                           \
                    }                                                                               \
                }                                                                                   \
    }

/* The same sum for a narrow C_prev (CP <= NARROW, a first layer's 1-3 image channels): the
 * vectors run over C instead, NB pixels x CP accumulators, reduced across lanes at the end. The
 * CP weight vectors of a tap and block of C are loaded once per NB pixels. One function per CP,
 * so that the accumulators stay in registers. Wc has shape (K, CP, C); C a multiple of LANES. */
#define DEFINE_INPUT_GRAD_NARROW(T, NAME, LANES, CP, NB)                                            \
    static void NAME##_input_grad_narrow##CP(const T *D, const T *Wc, const idx *offsets, idx K,   \
                                             idx base, idx m, idx sample, idx height, idx width,   \
                                             idx cols, idx C, T *dA, out_layout o)                 \
    {                                                                                               \
        for (idx n = 0; n < m; n++)                                                                 \
            for (idx y = 0; y < height; y++)                                                        \
                for (idx x0 = 0; x0 < width; x0 += NB) {                                            \
                    idx nb = width - x0 < NB ? width - x0 : NB;                                     \
                    idx q = n * sample + y * cols + x0;                                             \
                    NAME##_vec acc[NB][CP];                                                         \
                    for (int i = 0; i < NB; i++)                                                    \
                        for (int p = 0; p < CP; p++)                                                \
                            acc[i][p] = (NAME##_vec){0};                                            \
                    for (idx k = 0; k < K; k++) {                                                   \
                        const T *src = D + (base - offsets[k] + q) * C;                             \
                        const T *w = Wc + k * CP * C;                                               \
                        for (idx c = 0; c < C; c += LANES) {                                        \
                            NAME##_vec wv[CP];                                                      \
                            for (int p = 0; p < CP; p++)                                            \
                                wv[p] = NAME##_load(w + p * C + c);                                 \
                            if (nb == NB) {                                                         \
                                for (int i = 0; i < NB; i++) {                                      \
                                    NAME##_vec d = NAME##_load(src + i * C + c);                    \
                                    for (int p = 0; p < CP; p++)                                    \
                                        acc[i][p] += d * wv[p];                                     \
                                }                                                                   \
                            } else {                                                                \
                                for (idx i = 0; i < nb; i++) {                                      \
                                    NAME##_vec d = NAME##_load(src + i * C + c);                    \
                                    for (int p = 0; p < CP; p++)                                    \
                                        acc[i][p] += d * wv[p];                                     \
                                }                                                                   \
                            }                                                                       \
                        }                                                                           \
                    }                                                                               \
                    T *out = dA + o.first + n * o.sample + y * o.row + x0 * o.pixel;               \
                    for (idx i = 0; i < nb; i++)                                                    \
                        for (int p = 0; p < CP; p++) {                                              \
                            T total = 0;                                                            \
                            for (int l = 0; l < LANES; l++)                                         \
                                total += acc[i][p][l];                                              \
                            out[i * o.pixel + p] = total;                                           \
                        }                                                                           \
                }                                                                                   \
    }

/* dW for rows c0 .. c0+cb-1 (cb <= CHANNELS) and outputs p0 .. p0+2*LANES-1, one sample and one
 * tap: 2*CHANNELS vector accumulators, added to out (float64) at the end. Output pixel (i, j) reads
 * P from element (a0 + i*row_step + j*col_step) * Cp (the tap's pixel of the padded input; the
 * steps carry the stride) and dZ row g0 + i*n_w + j. A row is an input channel, or, where the
 * caller merges the taps of a kernel row (a narrow C_prev), a (tap, channel) pair: rows past
 * C_prev then read the next pixels' channels. ONE_VECTOR_ROWS x 1 vector is the block for C =
 * LANES. */
#define DEFINE_WEIGHT_GRAD(T, NAME, LANES)                                                          \
    static void NAME##_weight_block(const T *P, const T *G, idx a0, idx g0, idx row_step,           \
                                    idx col_step, idx n_h, idx n_w, idx Cp, idx C, idx c0, idx cb,  \
                                    idx p0, double *out)                                           \
    {                                                                                               \
        NAME##_vec lo[CHANNELS], hi[CHANNELS];                                                      \
        for (int c = 0; c < CHANNELS; c++)                                                          \
            lo[c] = hi[c] = (NAME##_vec){0};                                                        \
        for (idx i = 0; i < n_h; i++) {                                                             \
            const T *a = P + (a0 + i * row_step) * Cp + c0;                                         \
            const T *g = G + (g0 + i * n_w) * C + p0;                                               \
            idx a_step = col_step * Cp;                                                             \
            if (cb == CHANNELS) {                                                                   \
                for (idx j = 0; j < n_w; j++) {                                                     \
                    NAME##_vec v0 = NAME##_load(g + j * C), v1 = NAME##_load(g + j * C + LANES);    \
                    for (int c = 0; c < CHANNELS; c++) {                                            \
                        lo[c] += a[j * a_step + c] * v0;                                            \
                        hi[c] += a[j * a_step + c] * v1;                                            \
                    }                                                                               \
                }                                                                                   \
            } else {                                                                                \
                for (idx j = 0; j < n_w; j++) {                                                     \
                    NAME##_vec v0 = NAME##_load(g + j * C), v1 = NAME##_load(g + j * C + LANES);    \
                    for (idx c = 0; c < cb; c++) {                                                  \
                        lo[c] += a[j * a_step + c] * v0;                                            \
                        hi[c] += a[j * a_step + c] * v1;                                            \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (idx c = 0; c < cb; c++)                                                                \
            for (int l = 0; l < LANES; l++) {                                                       \
                out[(c0 + c) * C + p0 + l] += lo[c][l];                                             \
                out[(c0 + c) * C + p0 + LANES + l] += hi[c][l];                                     \
            }                                                                                       \
    }                                                                                               \
                                                                                                    \
    static void NAME##_weight_block_one(const T *P, const T *G, idx a0, idx g0, idx row_step,       \
                                        idx col_step, idx n_h, idx n_w, idx Cp, idx C, idx c0,      \
                                        idx cb, idx p0, double *out)                               \
    {                                                                                               \
        NAME##_vec acc[ONE_VECTOR_ROWS];                                                            \
        for (int c = 0; c < ONE_VECTOR_ROWS; c++)                                                   \
            acc[c] = (NAME##_vec){0};                                                               \
        for (idx i = 0; i < n_h; i++) {                                                             \
            const T *a = P + (a0 + i * row_step) * Cp + c0;                                         \
            const T *g = G + (g0 + i * n_w) * C + p0;                                               \
            idx a_step = col_step * Cp;                                                             \
            if (cb == ONE_VECTOR_ROWS) {                                                            \
                for (idx j = 0; j < n_w; j++) {                                                     \
                    NAME##_vec v = NAME##_load(g + j * C);                                          \
                    for (int c = 0; c < ONE_VECTOR_ROWS; c++)                                       \
                        acc[c] += a[j * a_step + c] * v;                                            \
                }                                                                                   \
            } else {                                                                                \
                for (idx j = 0; j < n_w; j++) {                                                     \
                    NAME##_vec v = NAME##_load(g + j * C);                                          \
                    for (idx c = 0; c < cb; c++)                                                    \
                        acc[c] += a[j * a_step + c] * v;                                            \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (idx c = 0; c < cb; c++)                                                                \
            for (int l = 0; l < LANES; l++)                                                         \
                out[(c0 + c) * C + p0 + l] += acc[c][l];                                            \
    }                                                                                               \
                                                                                                    \
    static void NAME##_weight_grad(const T *P, const T *G, const idx *offsets, idx K, idx m,        \
                                   idx sample, idx row_step, idx col_step, idx n_h, idx n_w,       \
                                   idx Cp, idx R, idx C, double *dW)                               \
    {                                                                                               \
        int two = C % (2 * LANES) == 0;                                                             \
        idx rows = two ? CHANNELS : ONE_VECTOR_ROWS, width = two ? 2 * LANES : LANES;               \
        for (idx n = 0; n < m; n++)                                                                 \
            for (idx k = 0; k < K; k++)                                                             \
                for (idx c0 = 0; c0 < R; c0 += rows)                                                \
                    for (idx p0 = 0; p0 < C; p0 += width)                                           \
                        (two ? NAME##_weight_block : NAME##_weight_block_one)(                      \
                            P, G, n * sample + offsets[k], n * n_h * n_w, row_step, col_step, n_h,  \
                            n_w, Cp, C, c0, R - c0 < rows ? R - c0 : rows, p0, dW + k * R * C);     \
    }

DEFINE_INPUT_GRAD(float, f32, 16)
DEFINE_INPUT_GRAD(double, f64, 8)
DEFINE_INPUT_GRAD_WIDE(float, f32, 16)
DEFINE_INPUT_GRAD_WIDE(double, f64, 8)
DEFINE_INPUT_GRAD_NARROW(float, f32, 16, 1, 8)
DEFINE_INPUT_GRAD_NARROW(float, f32, 16, 2, 8)
DEFINE_INPUT_GRAD_NARROW(float, f32, 16, 3, 6)
DEFINE_INPUT_GRAD_NARROW(float, f32, 16, 4, 5)
DEFINE_INPUT_GRAD_NARROW(double, f64, 8, 1, 8)
DEFINE_INPUT_GRAD_NARROW(double, f64, 8, 2, 8)
DEFINE_INPUT_GRAD_NARROW(double, f64, 8, 3, 6)
DEFINE_INPUT_GRAD_NARROW(double, f64, 8, 4, 5)

/* The narrow variant for C_prev = Cp (1 .. NARROW). */
typedef void (*f32_narrow_fn)(const float *, const float *, const idx *, idx, idx, idx, idx, idx, idx, idx, idx,
                              float *, out_layout);
typedef void (*f64_narrow_fn)(const double *, const double *, const idx *, idx, idx, idx, idx, idx, idx, idx, idx,
                              double *, out_layout);
static const f32_narrow_fn f32_narrow[NARROW + 1] = {NULL, f32_input_grad_narrow1, f32_input_grad_narrow2,
                                                     f32_input_grad_narrow3, f32_input_grad_narrow4};
static const f64_narrow_fn f64_narrow[NARROW + 1] = {NULL, f64_input_grad_narrow1, f64_input_grad_narrow2,
                                                     f64_input_grad_narrow3, f64_input_grad_narrow4};
DEFINE_WEIGHT_GRAD(float, f32, 16)
DEFINE_WEIGHT_GRAD(double, f64, 8)

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
    idx lanes = type == 'f' ? 16 : 8;
    int wide = Cp % lanes == 0, narrow = !wide && Cp <= NARROW && C % lanes == 0;
    if (fits && (wide || narrow)) {
        Py_BEGIN_ALLOW_THREADS
        if (type == 'f' && wide && Cp % (2 * lanes) == 0)
            f32_input_grad_wide(v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, Cp, v[3].buf, o);
        else if (type == 'f' && wide)
            f32_input_grad(v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, Cp, v[3].buf, o);
        else if (wide && Cp % (2 * lanes) == 0)
            f64_input_grad_wide(v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, Cp, v[3].buf, o);
        else if (wide)
            f64_input_grad(v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, Cp, v[3].buf, o);
        else if (type == 'f')
            f32_narrow[Cp](v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, v[3].buf, o);
        else
            f64_narrow[Cp](v[1].buf, v[2].buf, offsets, K, base, m, sample, height, width, cols, C, v[3].buf, o);
        Py_END_ALLOW_THREADS
    }
    release(v, 4);
    if (!fits)
        return PyErr_Format(PyExc_ValueError, "input_grad: the flat grid does not fit the %zd rows of D", d_rows);
    if (!(wide || narrow))
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
