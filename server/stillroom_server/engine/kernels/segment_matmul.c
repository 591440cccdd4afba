/* Segmented matmul for LoRA rows on CPU, fp32, one thread (segment_kernel.py builds and calls it).
 *
 * A batch's rows lie one contiguous segment per adapter. For each segment s (rows begin[s] to end[s]),
 * out[rows] = x[rows] @ w[group[s]], or out[rows] += it with `accumulate`: w is a stack [G, K, M],
 * x has rows of K floats `ldx` apart, out rows of M floats `ldo` apart. Rows outside every segment
 * are neither read nor written. Four rows at a time, the output is cut into panels of up to 64
 * columns whose accumulators stay in registers while the panel's weights stream past once; a
 * decode step (a few rows per adapter, the stacks cold in cache) is bound by reading the weights.
 * The product is summed apart and then added to `out`, as `out + x @ w` is.
 */

#include <string.h>

typedef float vec __attribute__((vector_size(64)));   /* 16 floats: one AVX-512 register, or two AVX2 */
#define LANES 16

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* `rows` rows (1-4) times the `width` vectors (1-4) of columns from m0: constants once inlined */
static inline __attribute__((always_inline)) void panel(
        const float *restrict x, long ldx, const float *restrict w, long K, long M, long m0,
        float *restrict out, long ldo, int accumulate, const int rows, const int width) {
    vec acc[4][4] = {{{0}}};
    for (long k = 0; k < K; k++) {
        vec w_k[4];
        for (int j = 0; j < width; j++) w_k[j] = load(w + k * M + m0 + j * LANES);
        for (int r = 0; r < rows; r++) {
            const float xv = x[r * ldx + k];
            for (int j = 0; j < width; j++) acc[r][j] += xv * w_k[j];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < width; j++) {
            float *o = out + r * ldo + m0 + j * LANES;
            store(o, accumulate ? load(o) + acc[r][j] : acc[r][j]);
        }
}

/* the columns past the last whole vector, one at a time */
static void tail(const float *x, long ldx, const float *w, long K, long M, long m0, float *out,
                 long ldo, int accumulate, int rows) {
    for (int r = 0; r < rows; r++)
        for (long m = m0; m < M; m++) {
            float sum = 0.0f;
            for (long k = 0; k < K; k++) sum += x[r * ldx + k] * w[k * M + m];
            out[r * ldo + m] = accumulate ? out[r * ldo + m] + sum : sum;
        }
}

#define PANEL(R, W) panel(x, ldx, w, K, M, m0, out, ldo, accumulate, R, W)
#define BY_WIDTH(R) \
    switch (width) { case 4: PANEL(R, 4); break; case 3: PANEL(R, 3); break; \
                     case 2: PANEL(R, 2); break; default: PANEL(R, 1); }

static void rows_block(const float *x, long ldx, const float *w, long K, long M, float *out, long ldo,
                       int accumulate, int rows) {
    long m0 = 0;
    for (; m0 + LANES <= M; ) {
        long vectors = (M - m0) / LANES;
        int width = vectors >= 4 ? 4 : (int)vectors;
        switch (rows) {
            case 4: BY_WIDTH(4); break;
            case 3: BY_WIDTH(3); break;
            case 2: BY_WIDTH(2); break;
            default: BY_WIDTH(1);
        }
        m0 += width * LANES;
    }
    if (m0 < M) tail(x, ldx, w, K, M, m0, out, ldo, accumulate, rows);
}

void segment_matmul(const float *x, long ldx, const float *w, long K, long M, const long *begin,
                    const long *end, const long *group, long segments, float *out, long ldo, int accumulate) {
    for (long s = 0; s < segments; s++) {
        const float *w_g = w + group[s] * K * M;
        for (long row = begin[s]; row < end[s]; row += 4) {
            int rows = end[s] - row < 4 ? (int)(end[s] - row) : 4;
            rows_block(x + row * ldx, ldx, w_g, K, M, out + row * ldo, ldo, accumulate, rows);
        }
    }
}
