/* Segmented matmul for LoRA rows on CPU, fp32, one thread (segment_kernel.py builds and calls it).
 *
 * A batch's rows lie one contiguous segment per adapter. For each segment s (rows begin[s] to end[s]),
 * out[rows] = x[rows] @ w[group[s]], or out[rows] += it with `accumulate`: w is a stack [G, K, M],
 * x has rows of K floats `ldx` apart, out rows of M floats `ldo` apart. Rows outside every segment
 * are neither read nor written. Each weight row is read once per block of four rows and streamed in
 * order, which is what a decode step (a few rows per adapter, the stacks cold in cache) needs; the
 * product is summed in a separate accumulator before it is added to `out`, as `out + x @ w` is.
 */

#define COLUMNS 1024   /* output columns per pass: the four rows' accumulators stay in L1 */

static inline void rows_block(const float *restrict x, long ldx, const float *restrict w, long K, long M,
                              float *restrict out, long ldo, int accumulate, const int rows) {
    float acc[4][COLUMNS] __attribute__((aligned(64)));
    for (long m0 = 0; m0 < M; m0 += COLUMNS) {
        const long width = M - m0 < COLUMNS ? M - m0 : COLUMNS;
        for (int r = 0; r < rows; r++)
            for (long m = 0; m < width; m++) acc[r][m] = 0.0f;
        for (long k = 0; k < K; k++) {
            const float *restrict w_row = w + k * M + m0;
            for (int r = 0; r < rows; r++) {
                const float xv = x[r * ldx + k];
                float *restrict a = acc[r];
                for (long m = 0; m < width; m++) a[m] += xv * w_row[m];
            }
        }
        for (int r = 0; r < rows; r++) {
            float *restrict o = out + r * ldo + m0;
            if (accumulate)
                for (long m = 0; m < width; m++) o[m] += acc[r][m];
            else
                for (long m = 0; m < width; m++) o[m] = acc[r][m];
        }
    }
}

void segment_matmul(const float *x, long ldx, const float *w, long K, long M, const long *begin,
                    const long *end, const long *group, long segments, float *out, long ldo, int accumulate) {
    for (long s = 0; s < segments; s++) {
        const float *w_g = w + group[s] * K * M;
        long row = begin[s];
        for (; row + 4 <= end[s]; row += 4)
            rows_block(x + row * ldx, ldx, w_g, K, M, out + row * ldo, ldo, accumulate, 4);
        const long left = end[s] - row;   /* the constant row counts let the compiler unroll */
        if (left == 3) rows_block(x + row * ldx, ldx, w_g, K, M, out + row * ldo, ldo, accumulate, 3);
        if (left == 2) rows_block(x + row * ldx, ldx, w_g, K, M, out + row * ldo, ldo, accumulate, 2);
        if (left == 1) rows_block(x + row * ldx, ldx, w_g, K, M, out + row * ldo, ldo, accumulate, 1);
    }
}
