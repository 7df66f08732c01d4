/* One SIMD level of dconv/_flatconv.c: _flatconv_loops.h for float32 and float64. Included with
 * LEVEL, PARTS, the level's NATIVE_*, SET1_*, LOADU_*, FMADD_* and block sizes defined (see
 * _flatconv_loops.h); undefines them all after. The float64 inclusion also defines query_dots. */

#define T float
#define LANES 16
#define PREFIX PASTE(LEVEL, f32)
#define NATIVE NATIVE_F32
#define SET1 SET1_F32
#define LOADU LOADU_F32
#define FMADD FMADD_F32
#include "_flatconv_loops.h" /* which undefines T, LANES, PREFIX, NATIVE, SET1, LOADU and FMADD */

#define T double
#define LANES 8
#define PREFIX PASTE(LEVEL, f64)
#define NATIVE NATIVE_F64
#define SET1 SET1_F64
#define LOADU LOADU_F64
#define FMADD FMADD_F64
#include "_flatconv_loops.h" /* which undefines T, LANES, PREFIX, NATIVE, SET1, LOADU and FMADD */

#undef LEVEL
#undef PARTS
#undef NATIVE_F32
#undef NATIVE_F64
#undef SET1_F32
#undef SET1_F64
#undef LOADU_F32
#undef LOADU_F64
#undef FMADD_F32
#undef FMADD_F64
#undef INPUT_PIXELS_2
#undef INPUT_PIXELS_1
#undef NARROW_PIXELS_1
#undef NARROW_PIXELS_2
#undef NARROW_PIXELS_3
#undef NARROW_PIXELS_4
#undef WEIGHT_ROWS_2
#undef WEIGHT_ROWS_1
#undef DOT_SAMPLES
#undef DOT_QUERIES
