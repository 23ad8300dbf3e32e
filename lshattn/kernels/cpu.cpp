// Native CPU kernels of lshattn, loaded with ctypes by lshattn/kernels/__init__.py. Plain C ABI:
// no Python or torch headers, so the file compiles in about a second.
//
// ## Bucket sums (YOSO-m, SimHash): one pass over the writers, one over the readers
//
//   out[n, i] = Σ_h table_h[read[n, i, h]],   table_h[c] = Σ_{j: write[n, j, h] == c} values[n, j]
//
// A unit of work is one row n (a batch-head) and a range of hashes [h0, h1), written to its own
// output; units never share the memory they write, so callers run them on as many threads as
// they like. A unit holds the tables of at most `group` hashes at once (group·rows·dv scalars)
// and passes over the positions once per group, adding each group's reads to the output.
//
// Codes are int32 table rows in [0, rows); a negative writer code writes nothing and a negative
// reader code reads nothing. Causal: the positions are taken in order (T == S), each writing
// before it reads, so reader i sums the writers j <= i; `reverse` takes the positions backwards
// (j >= i).
//
// Sums run in a fixed order (writers by position, then hashes by index), so a unit's result is
// deterministic.
//
// ## Sign codes (SimHash, YOSO): project onto the planes, pack the sign bits per table
//
//   proj[row, k] = Σ_d x[row, d] · planes[d, k],  codes[row, r] = Σ_b [proj[row, r·bits + b] has its sign bit clear] · 2^b
//
// (+0 counts as positive and -0 as negative, as torch.copysign does.) Each projection sums over d
// in order by the same instructions for every row, so a token gets the same codes whether it is
// hashed with a whole prompt or alone in a decoding step.
//
// ## Collision gradients (YOSO-m's backward): per hash, over the pairs that collide
//
//   grad_q[i] += Σ_{j: code(k_j) == code(q_i)} w_ij k_j,   grad_k[j] += Σ_{i: ...} w_ij q_i
//
// with w_ij = (g_i·v_j) per hash in which the pair collides ("approx"), or (g_i·v_j)·φ(q_i·k_j)
// once per colliding pair, in the first hash where it collides ("exact", φ the kernel's
// derivative). Per hash, a counting sort groups both sides by code. "approx" does each bucket
// in whichever way is cheaper: pair by pair (|Q_c|·|K_c|·(Dv + 2D) multiply-adds), or through
// the two (Dv, D) matrices V_cᵀ K_c and G_cᵀ Q_c, read by grad_q[i] += (V_cᵀ K_c)ᵀ g_i and
// grad_k[j] += (G_cᵀ Q_c)ᵀ v_j ((|Q_c| + |K_c|)·2·Dv·D multiply-adds). The second bounds a hash's
// work by O((T + S)·Dv·D) however unevenly the codes fall, where pairs alone would be O(T·S).
// "exact" goes pair by pair. Causal: pairs j <= i only; the matrices are then built over chunks
// of the bucket in position order (prefix sums for grad_q, suffix sums for grad_k), with the
// pairs inside a chunk done pair by pair. Units are (row, range of hashes) as for the bucket
// sums. All of it is small register-blocked matrix products on packed copies of a bucket's rows,
// except buckets of at most FEW_PAIRS pairs (most of them when 2^τ is near T), which go pair by
// pair where the rows are, since packing pads each side to 16 rows.
//
// ## SimHash decoding (lshattn.decode.simhash): a few new queries against the cached keys
//
// A unit is one batch-head: it hashes its T new keys into the codes buffer (as the sign codes
// above: the prefill's codes) and its T new queries, then for each query lists its keys: the visible keys the sinks and window cover
// (ranked among the real keys, as lshattn.local), then the indexed keys of the query's bucket in
// each table (index_keys[starts[c] .. starts[c + 1]]), then the keys appended after the index,
// compared one by one; each key once (a byte per key marks the listed ones). Softmax over them of
// scale·q·k (importance mode: plus −log P(collide | θ) for the keys not covered), then the
// weighted sum of their values. Visibility from `visible` (B, T, S) bytes, or by position when
// null (no padding: query t sees the keys up to S − T + t). A unit with no key writes zeros.
//
// ## YOSO-m decoding (lshattn.decode.yoso): one table lookup per hash, one add per new key
//
// A unit is one batch-head with its m tables of 2^τ rows of value sums of the cached real keys.
// It hashes its T new keys into the codes buffer and its T queries (the prefill's codes), then
// for each query sums its bucket's row in each table and the new keys up to it (times the hashes
// they share), divides by m, and corrects the keys the sinks and window cover (listed as for
// SimHash) from the sampled fraction hits/m to the exact kernel (1 − θ/π)^τ. Only then are the
// new real keys' values added to the tables, so each query reads the tables of the keys before
// the step, as the torch step does. O(m·Dv + (sinks + window)·(D + m + Dv)) a query, whatever S.
//
// ## SketchTopK decoding (lshattn.decode.sketch): rank every cached key by its sketch, attend the top
//
// A unit is one batch-head. It sketches its T new keys into the sketches buffer (8-bit sign codes
// in R tables, as above: the prefill's sketches), then for each query: its R·8 projections in
// float64, scaled so that the largest is ±2^20 and rounded to integers w (as query_weights in
// methods/sketch.py); a table per byte of the sketch, lut[r][c] = Σ_i (bit i of c ? w_ri : −w_ri)
// (256 entries built by adding one bit at a time); each visible key not covered by the sinks and
// window gets the estimate Σ_r lut[r][sketch_r(key)] (integers: exactly the prefill's ranking),
// and the keep[n] of the n such keys with the largest estimates are kept, ties to the earlier key
// (top_keys in methods/topk.py). Softmax of scale·q·k over the kept and the covered keys, each
// once. O(S·R) lookups and O((kept + covered)·(D + Dv)) a query: the ranking reads R bytes a key
// where exact attention reads D + Dv scalars.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace {

// DV > 0 fixes the row width at compile time, so a row lives in vector registers; DV == 0 reads
// it from `dv`.
template <int64_t DV, typename scalar_t>
struct Rows {
    int64_t dv;
    int64_t width() const { return DV > 0 ? DV : dv; }

    void add(scalar_t* __restrict dst, const scalar_t* __restrict src) const {
        const int64_t n = width();
#pragma GCC ivdep
        for (int64_t d = 0; d < n; ++d) dst[d] += src[d];
    }
};

template <int64_t DV, typename scalar_t>
void bucket_sums_unit(const scalar_t* values, const int32_t* write, const int32_t* read, scalar_t* out,
                      int64_t n, int64_t h0, int64_t h1, int64_t S, int64_t T, int64_t m, int64_t dv,
                      int64_t rows, int64_t group, int causal, int reverse) {
    const Rows<DV, scalar_t> row{dv};
    const scalar_t* v = values + n * S * dv;
    scalar_t* o = out + n * T * dv;
    std::vector<scalar_t> table;
    // The reader's sum builds in a local row (registers when DV is fixed), stored once.
    std::vector<scalar_t> scratch(DV > 0 ? 0 : dv);

    for (int64_t first = h0; first < h1; first += group) {
        const int64_t g = std::min(group, h1 - first);
        table.assign(static_cast<size_t>(g * rows * dv), scalar_t(0));
        const int32_t* w = write + n * S * m + first;
        const int32_t* r = read + n * T * m + first;
        const bool overwrite = first == h0;

        auto write_position = [&](int64_t j) {
            const int32_t* codes = w + j * m;
            for (int64_t h = 0; h < g; ++h)
                if (codes[h] >= 0) row.add(table.data() + (h * rows + codes[h]) * dv, v + j * dv);
        };
        auto read_position = [&](int64_t i) {
            const int32_t* codes = r + i * m;
            scalar_t local[DV > 0 ? DV : 1];
            scalar_t* acc = DV > 0 ? local : scratch.data();
            std::fill(acc, acc + row.width(), scalar_t(0));
            for (int64_t h = 0; h < g; ++h)
                if (codes[h] >= 0) row.add(acc, table.data() + (h * rows + codes[h]) * dv);
            if (overwrite)
                std::copy(acc, acc + row.width(), o + i * dv);
            else
                row.add(o + i * dv, acc);
        };

        if (!causal) {
            for (int64_t j = 0; j < S; ++j) write_position(j);
            for (int64_t i = 0; i < T; ++i) read_position(i);
        } else if (!reverse) {
            for (int64_t i = 0; i < T; ++i) { write_position(i); read_position(i); }
        } else {
            for (int64_t i = T - 1; i >= 0; --i) { write_position(i); read_position(i); }
        }
    }
}

// Units [unit_begin, unit_end) of N rows × `ranges` equal ranges of the m hashes: unit u is
// row u / ranges and range p = u % ranges, written to out[p] (out is (ranges, N, T, dv)).
template <typename scalar_t>
void run_units(const scalar_t* values, const int32_t* write, const int32_t* read, scalar_t* out, int64_t N,
               int64_t S, int64_t T, int64_t m, int64_t dv, int64_t rows, int64_t group, int64_t ranges,
               int64_t unit_begin, int64_t unit_end, int causal, int reverse) {
    for (int64_t u = unit_begin; u < unit_end; ++u) {
        const int64_t n = u / ranges, p = u % ranges;
        const int64_t h0 = m * p / ranges, h1 = m * (p + 1) / ranges;
        scalar_t* part = out + p * N * T * dv;
        switch (dv) {  // the head widths of common models, unrolled; any other runs the generic loop
            case 32: bucket_sums_unit<32>(values, write, read, part, n, h0, h1, S, T, m, dv, rows, group, causal, reverse); break;
            case 64: bucket_sums_unit<64>(values, write, read, part, n, h0, h1, S, T, m, dv, rows, group, causal, reverse); break;
            case 128: bucket_sums_unit<128>(values, write, read, part, n, h0, h1, S, T, m, dv, rows, group, causal, reverse); break;
            default: bucket_sums_unit<0>(values, write, read, part, n, h0, h1, S, T, m, dv, rows, group, causal, reverse);
        }
    }
}

// Bit i of the result <- the sign bit of x[i] is clear, for i < n <= 64. On x86 the sign bits
// of 8 (AVX) or 4 (SSE) floats come out of one movemask instruction.
inline uint64_t sign_word(const float* x, int64_t n) {
    uint64_t negative = 0;
    int64_t i = 0;
#if defined(__AVX__)
    for (; i + 8 <= n; i += 8) negative |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_loadu_ps(x + i))) << i;
#elif defined(__SSE__)
    for (; i + 4 <= n; i += 4) negative |= static_cast<uint64_t>(_mm_movemask_ps(_mm_loadu_ps(x + i))) << i;
#endif
    for (; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, x + i, sizeof u);
        negative |= static_cast<uint64_t>(u >> 31) << i;
    }
    return ~negative & (n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1);
}

// The codes of one row of projections (tables·bits of them) into out[0 .. tables).
template <typename code_t>
void pack_codes(const float* proj, code_t* out, int64_t tables, int64_t bits, std::vector<uint64_t>& words) {
    const int64_t K = tables * bits;
    const uint64_t mask = bits == 64 ? ~uint64_t(0) : (uint64_t(1) << bits) - 1;
    words.assign(static_cast<size_t>(K / 64 + 2), 0);
    for (int64_t w = 0; w * 64 < K; ++w) words[w] = sign_word(proj + w * 64, std::min<int64_t>(64, K - w * 64));
    for (int64_t r = 0; r < tables; ++r) {
        const int64_t bit = r * bits, w = bit / 64, shift = bit % 64;
        uint64_t field = words[w] >> shift;
        if (shift != 0 && shift + bits > 64) field |= words[w + 1] << (64 - shift);
        out[r] = static_cast<code_t>(field & mask);
    }
}

// Rows projected together: each plane's weights are read once for all of them.
constexpr int64_t PROJECT_ROWS = 4;

// Projections a pass keeps in registers for every row; the planes are stored in blocks of this
// many (lshattn.kernels.packed_planes).
constexpr int64_t PROJECT_WIDTH = 16;

// proj[i, :] = x_i · planes for the PROJECT_ROWS rows x_i (D floats each; pass a row of zeros for
// a missing one). The D × K planes are packed in blocks of PROJECT_WIDTH projections, each block a
// row-major D × width matrix (the last one narrower), so that a pass reads them in order: a
// decoding step reads a head's planes once from memory, where the rows of a D × K matrix cost a
// strided read of each block (2–3× slower cold). Every projection is a sum over d in order, by the same
// instructions whatever the rows: a token's codes do not depend on what it is hashed with (the
// decoding step hashes one token and gets the prefill's codes bit for bit).
// One compiled body (never inlined), so that every caller's rows are rounded by the same
// instructions: the prefill's and a decoding step's.
#define LSHATTN_SAME_ROUNDING __attribute__((noinline))
// acc[i][j] += Σ_d x_i[d]·block[d, j] for j < width, block a D × width matrix (WIDTH > 0: a
// constant width, which the compiler unrolls into registers; 0: the runtime `width` of the last,
// narrower pass).
template <int64_t WIDTH, int64_t ROWS>
inline void accumulate(const float* const* x, const float* __restrict block, int64_t D, int64_t width,
                       float (&acc)[ROWS][PROJECT_WIDTH]) {
    const int64_t n = WIDTH > 0 ? WIDTH : width;
    for (int64_t d = 0; d < D; ++d) {
        const float* __restrict w = block + d * n;
        for (int64_t j = 0; j < n; ++j)
            for (int64_t i = 0; i < ROWS; ++i) acc[i][j] += x[i][d] * w[j];
    }
}

// ROWS rows at once: PROJECT_ROWS for whole prompts, 2 for a decoding step's key and query
// (each element is the same chain of multiply-adds in either, so the codes are the same: tested).
template <int64_t ROWS>
LSHATTN_SAME_ROUNDING void project_rows(const float* const* x, const float* __restrict planes, int64_t D, int64_t K,
                                        float* __restrict proj) {
    constexpr int64_t W = PROJECT_WIDTH;
    for (int64_t j0 = 0; j0 < K; j0 += W) {
        const int64_t width = std::min(W, K - j0);
        float acc[ROWS][W] = {};
        if (width == W)
            accumulate<W, ROWS>(x, planes + j0 * D, D, width, acc);
        else
            accumulate<0, ROWS>(x, planes + j0 * D, D, width, acc);
        for (int64_t i = 0; i < ROWS; ++i)
            for (int64_t j = 0; j < width; ++j) proj[i * K + j0 + j] = acc[i][j];
    }
}

// Units [unit_begin, unit_end) of (row n, block of PROJECT_ROWS positions): x (N, L, D) float32,
// planes (H, D·tables·bits) packed (row n uses head n % H), codes (N, L, tables).
template <typename code_t>
void project_signs(const float* x, const float* planes, code_t* codes, int64_t H, int64_t L, int64_t D,
                   int64_t tables, int64_t bits, int64_t unit_begin, int64_t unit_end) {
    const int64_t K = tables * bits, blocks = (L + PROJECT_ROWS - 1) / PROJECT_ROWS;
    std::vector<float> proj(PROJECT_ROWS * K), zeros(D, 0.0f);
    std::vector<uint64_t> words;
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const int64_t n = unit / blocks, first = unit % blocks * PROJECT_ROWS;
        const int64_t rows = std::min(PROJECT_ROWS, L - first);
        const float* row[PROJECT_ROWS];
        for (int64_t i = 0; i < PROJECT_ROWS; ++i) row[i] = i < rows ? x + (n * L + first + i) * D : zeros.data();
        project_rows<PROJECT_ROWS>(row, planes + (n % H) * D * K, D, K, proj.data());
        for (int64_t i = 0; i < rows; ++i) pack_codes(proj.data() + i * K, codes + (n * L + first + i) * tables, tables, bits, words);
    }
}

// arccos in float32 by Abramowitz & Stegun 4.4.46 (absolute error <= 2e-8, below float32's
// resolution of the result): a polynomial the compiler can vectorise, where std::acos is a call
// per element. float64 keeps std::acos.
inline float arccos(float x) {
    const float a = std::fabs(x);
    const float poly =
        1.5707963050f +
        a * (-0.2145988016f +
             a * (0.0889789874f +
                  a * (-0.0501743046f + a * (0.0308918810f + a * (-0.0170881256f + a * (0.0066700901f - a * 0.0012624911f))))));
    const float r = std::sqrt(1.0f - a) * poly;
    return x < 0 ? 3.14159265358979f - r : r;
}
inline double arccos(double x) { return std::acos(x); }

// C = A·B for row-major A (M × K), B (K × N), C (M × N), with M a multiple of GEMM_ROWS and N
// of gemm_cols<scalar_t>: a GEMM_ROWS × gemm_cols block of C lives in vector registers (GCC/Clang
// vector extensions, 64 bytes a vector) while K runs.
constexpr int64_t GEMM_ROWS = 8;
template <typename scalar_t>
struct Vector {
    typedef scalar_t type __attribute__((vector_size(64)));
};
template <typename scalar_t>
constexpr int64_t gemm_cols() { return 64 / sizeof(scalar_t); }

template <typename scalar_t>
void gemm(scalar_t* __restrict C, const scalar_t* __restrict A, const scalar_t* __restrict B, int64_t M, int64_t K,
          int64_t N, int64_t lda, int64_t ldb, int64_t ldc) {
    using V = typename Vector<scalar_t>::type;
    constexpr int64_t R = GEMM_ROWS, W = gemm_cols<scalar_t>();
    for (int64_t i = 0; i < M; i += R)
        for (int64_t j = 0; j < N; j += W) {
            V acc[R] = {};
            for (int64_t p = 0; p < K; ++p) {
                V b;
                std::memcpy(&b, B + p * ldb + j, sizeof b);
                for (int64_t r = 0; r < R; ++r) acc[r] += A[(i + r) * lda + p] * b;
            }
            for (int64_t r = 0; r < R; ++r) std::memcpy(C + (i + r) * ldc + j, &acc[r], sizeof acc[r]);
        }
}

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

template <typename scalar_t>
struct CollisionGrads {
    const scalar_t *q, *k, *v, *g;  // rows of one batch-head: (T, D), (S, D), (S, Dv), (T, Dv)
    scalar_t *grad_q, *grad_k;       // (T, D), (S, D)
    int64_t D, Dv;
    bool causal;
    // The "exact" rule (exact_bits = τ > 0): a pair's weight is the kernel's derivative at its
    // cosine (clamped to ±clamp), once per pair: in the first hash where it collides.
    const int32_t *q_codes, *k_codes;  // (T, m), (S, m)
    int64_t m, exact_bits;
    double clamp;
    int64_t hash = 0;  // the hash being processed
    std::vector<scalar_t> scratch{};
    std::vector<char> keep{};  // which pairs of a query row count
    std::vector<scalar_t> row{}, matrix{};
    std::vector<std::pair<int64_t, int64_t>> cuts{};

    // w[b] *= τ(1 − arccos(x)/π)^(τ−1) / (π√(1 − x²)) at x = cosine[b] clamped to ±clamp, for
    // b < n; loop by loop over the row, so that each loop vectorises.
    void times_derivative(scalar_t* __restrict w, const scalar_t* __restrict cosine, int64_t n) {
        const scalar_t pi = scalar_t(3.14159265358979323846), bound = scalar_t(clamp);
        row.resize(static_cast<size_t>(2 * n));
        scalar_t *base = row.data(), *power = base + n;
        for (int64_t b = 0; b < n; ++b) {
            const scalar_t x = std::min(std::max(cosine[b], -bound), bound);
            base[b] = 1 - arccos(x) / pi;
            w[b] *= scalar_t(exact_bits) / (pi * std::sqrt(1 - x * x));
            power[b] = 1;
        }
        for (int64_t t = 1; t < exact_bits; ++t)
            for (int64_t b = 0; b < n; ++b) power[b] *= base[b];
        for (int64_t b = 0; b < n; ++b) w[b] *= power[b];
    }

    // Whether query i and key j collide in no hash before this one.
    bool first_collision(int64_t i, int64_t j) const {
        const int32_t *a = q_codes + i * m, *b = k_codes + j * m;
        int32_t collided = 0;  // no early exit: the loop then compiles to vector compares
        for (int64_t h = 0; h < hash; ++h) collided |= a[h] == b[h];
        return !collided;
    }

    static void axpy(scalar_t* __restrict y, scalar_t a, const scalar_t* __restrict x, int64_t n) {
        for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
    }

    // Rows at[0..n) of x (rows of width `width`) into a zero-padded block of out_rows rows of
    // `ld` scalars, or transposed (row c of the block holds column c of the rows) when `transpose`.
    static void pack(scalar_t* out, const scalar_t* x, const int64_t* at, int64_t n, int64_t out_rows, int64_t width,
                     int64_t ld, bool transpose) {
        std::fill(out, out + out_rows * ld, scalar_t(0));
        for (int64_t r = 0; r < n; ++r)
            for (int64_t c = 0; c < width; ++c) (transpose ? out[c * ld + r] : out[r * ld + c]) = x[at[r] * width + c];
    }

    // grad[at[r]] += block row r, for r < n.
    void scatter_add(scalar_t* grad, const int64_t* at, int64_t n, const scalar_t* block, int64_t ld) const {
        for (int64_t r = 0; r < n; ++r) axpy(grad + at[r] * D, scalar_t(1), block + r * ld, D);
    }

    // Buckets with at most this many pairs skip packing, which pads each side to 16 rows.
    static constexpr int64_t FEW_PAIRS = 16;

    // Lanes of independent partial sums: a fixed order (deterministic) that still vectorises.
    static scalar_t dot(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t n) {
        constexpr int64_t L = 64 / sizeof(scalar_t);
        scalar_t lanes[L] = {};
        int64_t d = 0;
        for (; d + L <= n; d += L)
            for (int64_t l = 0; l < L; ++l) lanes[l] += a[d + l] * b[d + l];
        scalar_t sum = 0;
        for (; d < n; ++d) sum += a[d] * b[d];
        for (int64_t l = 0; l < L; ++l) sum += lanes[l];
        return sum;
    }

    // A bucket with few pairs, one pair at a time on the rows where they are.
    void few_pairs(const int64_t* qs, int64_t nq, const int64_t* ks, int64_t nk) {
        for (int64_t a = 0; a < nq; ++a)
            for (int64_t b = 0; b < nk; ++b) {
                const int64_t i = qs[a], j = ks[b];
                if ((causal && j > i) || (exact_bits > 0 && !first_collision(i, j))) continue;
                scalar_t w = dot(g + i * Dv, v + j * Dv, Dv);
                if (exact_bits > 0) {
                    const scalar_t cosine = dot(q + i * D, k + j * D, D);
                    times_derivative(&w, &cosine, 1);
                }
                axpy(grad_q + i * D, w, k + j * D, D);
                axpy(grad_k + j * D, w, q + i * D, D);
            }
    }

    // One bucket through its pairs, as three small matrix products on packed copies of its rows:
    // W = G_c V_cᵀ (masked to j <= i when causal; for "exact", times the derivative at the
    // cosines Q_c K_cᵀ, on the pairs colliding here first), grad_Q_c += W K_c, grad_K_c += Wᵀ Q_c.
    void pairs(const int64_t* qs, int64_t nq, const int64_t* ks, int64_t nk) {
        const int64_t P = std::max(GEMM_ROWS, gemm_cols<scalar_t>());
        const int64_t mq = round_up(nq, P), mk = round_up(nk, P), Dp = round_up(D, P);
        const int64_t cosines = exact_bits > 0 ? mq * mk + Dp * mk : 0;
        scratch.resize(static_cast<size_t>(mq * Dv + Dv * mk + 2 * mq * mk + mk * Dp + mq * Dp +
                                           std::max(mq, mk) * Dp + cosines));
        scalar_t *G = scratch.data(), *Vt = G + mq * Dv, *Wm = Vt + Dv * mk, *Wt = Wm + mq * mk;
        scalar_t *K = Wt + mk * mq, *Q = K + mk * Dp, *out = Q + mq * Dp, *Cm = out + std::max(mq, mk) * Dp;
        scalar_t* Kt = Cm + mq * mk;
        keep.resize(static_cast<size_t>(mk));
        pack(G, g, qs, nq, mq, Dv, Dv, false);
        pack(Vt, v, ks, nk, Dv, Dv, mk, true);
        gemm(Wm, G, Vt, mq, Dv, mk, Dv, mk, mk);
        pack(Q, q, qs, nq, mq, D, Dp, false);
        if (exact_bits > 0) {
            pack(Kt, k, ks, nk, Dp, D, mk, true);
            gemm(Cm, Q, Kt, mq, Dp, mk, Dp, mk, mk);
        }
        for (int64_t a = 0; a < mq; ++a) {
            scalar_t* w = Wm + a * mk;
            for (int64_t b = 0; b < mk; ++b) {
                const bool paired = a < nq && b < nk && !(causal && ks[b] > qs[a]);
                keep[b] = paired && (exact_bits == 0 || first_collision(qs[a], ks[b]));
            }
            if (exact_bits > 0) times_derivative(w, Cm + a * mk, mk);
            for (int64_t b = 0; b < mk; ++b) Wt[b * mq + a] = w[b] = keep[b] ? w[b] : scalar_t(0);
        }
        pack(K, k, ks, nk, mk, D, Dp, false);
        gemm(out, Wm, K, mq, mk, Dp, mk, Dp, Dp);
        scatter_add(grad_q, qs, nq, out, Dp);
        gemm(out, Wt, Q, mk, mq, Dp, mq, Dp, Dp);
        scatter_add(grad_k, ks, nk, out, Dp);
    }

    // One bucket through the (Dv, D) matrices, all keys and queries at once (not causal):
    // grad_Q_c += G_c (V_cᵀ K_c) and grad_K_c += V_c (G_cᵀ Q_c).
    void matrices_at_once(const int64_t* qs, int64_t nq, const int64_t* ks, int64_t nk) {
        clear(matrix);
        accumulate(matrix.data(), v, k, ks, nk);
        read(grad_q, g, qs, nq, matrix.data());
        clear(matrix);
        accumulate(matrix.data(), g, q, qs, nq);
        read(grad_k, v, ks, nk, matrix.data());
    }

    // Members of a bucket per chunk of a causal bucket.
    static constexpr int64_t CHUNK = 64;

    // One bucket through the (Dv, D) matrices, causal: its members are cut, in position order,
    // into chunks of CHUNK (a key before a query at the same position). Pairs inside a chunk go
    // pair by pair; across chunks every pair is causal, so a chunk's queries read the matrix of
    // all earlier chunks' keys and its keys read that of all later chunks' queries.
    void matrices_in_chunks(const int64_t* qs, int64_t nq, const int64_t* ks, int64_t nk) {
        cuts.assign(1, {0, 0});  // (first query, first key) of each chunk, then the ends
        for (int64_t a = 0, b = 0; a < nq || b < nk;) {
            for (int64_t taken = 0; taken < CHUNK && (a < nq || b < nk); ++taken)
                (b < nk && (a == nq || ks[b] <= qs[a])) ? ++b : ++a;
            cuts.push_back({a, b});
        }
        const int64_t chunks = static_cast<int64_t>(cuts.size()) - 1;
        clear(matrix);  // Σ v_j k_jᵀ over the keys of the chunks so far
        for (int64_t c = 0; c < chunks; ++c) {
            const auto [a0, b0] = cuts[c];
            const auto [a1, b1] = cuts[c + 1];
            if (c > 0) read(grad_q, g, qs + a0, a1 - a0, matrix.data());
            if (a1 > a0 && b1 > b0) pairs(qs + a0, a1 - a0, ks + b0, b1 - b0);
            accumulate(matrix.data(), v, k, ks + b0, b1 - b0);
        }
        clear(matrix);  // Σ g_i q_iᵀ over the queries of the chunks after this one
        for (int64_t c = chunks - 1; c >= 0; --c) {
            const auto [a0, b0] = cuts[c];
            const auto [a1, b1] = cuts[c + 1];
            if (c < chunks - 1) read(grad_k, v, ks + b0, b1 - b0, matrix.data());
            accumulate(matrix.data(), g, q, qs + a0, a1 - a0);
        }
    }

    // The padded (Dv, D) matrix, zeroed.
    void clear(std::vector<scalar_t>& M) const {
        const int64_t P = std::max(GEMM_ROWS, gemm_cols<scalar_t>());
        M.assign(static_cast<size_t>(round_up(Dv, P) * round_up(D, P)), scalar_t(0));
    }

    // M += Yᵀ Z, where Y and Z hold rows at[0..n) of y (width Dv) and z (width D).
    void accumulate(scalar_t* M, const scalar_t* y, const scalar_t* z, const int64_t* at, int64_t n) {
        if (n == 0) return;
        const int64_t P = std::max(GEMM_ROWS, gemm_cols<scalar_t>());
        const int64_t mi = round_up(n, P), Dp = round_up(D, P), Dvp = round_up(Dv, P);
        scratch.resize(static_cast<size_t>(Dvp * mi + mi * Dp + Dvp * Dp));
        scalar_t *Yt = scratch.data(), *Z = Yt + Dvp * mi, *part = Z + mi * Dp;
        pack(Yt, y, at, n, Dvp, Dv, mi, true);
        pack(Z, z, at, n, mi, D, Dp, false);
        gemm(part, Yt, Z, Dvp, mi, Dp, mi, Dp, Dp);
        for (int64_t e = 0; e < Dvp * Dp; ++e) M[e] += part[e];
    }

    // grad[at] += X M, where X holds rows at[0..n) of x (width Dv).
    void read(scalar_t* grad, const scalar_t* x, const int64_t* at, int64_t n, const scalar_t* M) {
        if (n == 0) return;
        const int64_t P = std::max(GEMM_ROWS, gemm_cols<scalar_t>());
        const int64_t mo = round_up(n, P), Dp = round_up(D, P), Dvp = round_up(Dv, P);
        scratch.resize(static_cast<size_t>(mo * Dvp + mo * Dp));
        scalar_t *X = scratch.data(), *out = X + mo * Dvp;
        pack(X, x, at, n, mo, Dv, Dvp, false);
        gemm(out, X, M, mo, Dvp, Dp, Dvp, Dp, Dp);
        scatter_add(grad, at, n, out, Dp);
    }
};

// Stable counting sort of the positions with a valid code (>= 0) by code: members of bucket c are
// order[start[c] .. start[c + 1]), in increasing position.
inline void group_by_code(const int32_t* codes, int64_t L, int64_t stride, int64_t rows, std::vector<int64_t>& start,
                          std::vector<int64_t>& order) {
    start.assign(static_cast<size_t>(rows + 1), 0);
    for (int64_t i = 0; i < L; ++i)
        if (codes[i * stride] >= 0) ++start[codes[i * stride] + 1];
    for (int64_t c = 0; c < rows; ++c) start[c + 1] += start[c];
    order.resize(static_cast<size_t>(start[rows]));
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < L; ++i)
        if (codes[i * stride] >= 0) order[next[codes[i * stride]]++] = i;
}

template <typename scalar_t>
void collision_grads_units(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* g,
                           const int32_t* q_codes, const int32_t* k_codes, scalar_t* grad_q, scalar_t* grad_k,
                           int64_t N, int64_t T, int64_t S, int64_t m, int64_t D, int64_t Dv, int64_t rows,
                           int64_t ranges, int64_t unit_begin, int64_t unit_end, int causal, int64_t exact_bits,
                           double clamp) {
    std::vector<int64_t> q_start, q_order, k_start, k_order;
    for (int64_t u = unit_begin; u < unit_end; ++u) {
        const int64_t n = u / ranges, p = u % ranges;
        const int64_t h0 = m * p / ranges, h1 = m * (p + 1) / ranges;
        scalar_t* gq = grad_q + (p * N + n) * T * D;
        scalar_t* gk = grad_k + (p * N + n) * S * D;
        std::fill(gq, gq + T * D, scalar_t(0));
        std::fill(gk, gk + S * D, scalar_t(0));
        CollisionGrads<scalar_t> bucket{q + n * T * D, k + n * S * D, v + n * S * Dv, g + n * T * Dv, gq, gk, D, Dv,
                                        causal != 0, q_codes + n * T * m, k_codes + n * S * m, m, exact_bits, clamp};
        for (int64_t h = h0; h < h1; ++h) {
            bucket.hash = h;
            group_by_code(q_codes + n * T * m + h, T, m, rows, q_start, q_order);
            group_by_code(k_codes + n * S * m + h, S, m, rows, k_start, k_order);
            for (int64_t c = 0; c < rows; ++c) {
                const int64_t nq = q_start[c + 1] - q_start[c], nk = k_start[c + 1] - k_start[c];
                if (nq == 0 || nk == 0) continue;
                const int64_t* qs = q_order.data() + q_start[c];
                const int64_t* ks = k_order.data() + k_start[c];
                if (nq * nk <= bucket.FEW_PAIRS)
                    bucket.few_pairs(qs, nq, ks, nk);
                else if (exact_bits > 0 || nq * nk * (Dv + 2 * D) <= (nq + nk) * 2 * Dv * D)
                    bucket.pairs(qs, nq, ks, nk);
                else if (!causal)
                    bucket.matrices_at_once(qs, nq, ks, nk);
                else
                    bucket.matrices_in_chunks(qs, nq, ks, nk);
            }
        }
    }
}

// Σ_d a[d]·b[d] in eight interleaved partial sums, which the compiler keeps in vector lanes (one
// running sum would be a chain of dependent adds: several times slower at D = 64).
template <typename scalar_t>
scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
    scalar_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int l = 0; l < 8; ++l) part[l] += a[d + l] * b[d + l];
    for (; d < n; ++d) part[0] += a[d] * b[d];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// −log P(a pair at cosine `cosine` collides in some of `tables` tables of `bits` bits), at most −log tiny.
template <typename scalar_t>
scalar_t inverse_log_probability(scalar_t cosine, int64_t bits, int64_t tables) {
    const scalar_t tiny = std::numeric_limits<scalar_t>::min();
    const scalar_t pi = scalar_t(3.14159265358979323846);
    cosine = std::min(std::max(cosine, scalar_t(-1)), scalar_t(1));
    const scalar_t per_table = std::pow(1 - std::acos(cosine) / pi, scalar_t(bits));
    const scalar_t collide = -std::expm1(scalar_t(tables) * std::log1p(-per_table));
    return -std::log(std::max(collide, tiny));
}

// The table codes of up to PROJECT_ROWS rows x[i] (D values each, converted to float32 as the
// prefill hashes them), table r of row i into dest[i][r·table_stride[i]].
template <typename scalar_t, typename code_t>
void hash_rows(const scalar_t* const* x, int64_t rows, const float* planes, int64_t D, int64_t tables, int64_t bits,
               code_t* const* dest, const int64_t* table_stride, std::vector<float>& scratch, std::vector<float>& proj,
               std::vector<uint64_t>& words) {
    const int64_t K = tables * bits;
    scratch.assign(PROJECT_ROWS * D, 0.0f);
    const float* row[PROJECT_ROWS];
    for (int64_t i = 0; i < PROJECT_ROWS; ++i) {
        for (int64_t d = 0; i < rows && d < D; ++d) scratch[i * D + d] = float(x[i][d]);
        row[i] = scratch.data() + i * D;
    }
    proj.resize(PROJECT_ROWS * K);
    if (rows <= 2)
        project_rows<2>(row, planes, D, K, proj.data());
    else
        project_rows<PROJECT_ROWS>(row, planes, D, K, proj.data());
    std::vector<int64_t> packed(tables);
    for (int64_t i = 0; i < rows; ++i) {
        pack_codes(proj.data() + i * K, packed.data(), tables, bits, words);
        for (int64_t r = 0; r < tables; ++r) dest[i][r * table_stride[i]] = code_t(packed[r]);
    }
}

// Whether all n values are zero (a query left with no key; -0 counts, as torch's == 0).
template <typename scalar_t>
int64_t all_zero(const scalar_t* x, int64_t n) {
    for (int64_t d = 0; d < n; ++d)
        if (x[d] != 0) return 0;
    return 1;
}

// o = Σ_i softmax(logits)_i · v[keys[i]] (o zeroed before; `top` the largest logit).
template <typename scalar_t>
void softmax_values(const scalar_t* logits, scalar_t top, const std::vector<int32_t>& keys, const scalar_t* vb,
                    int64_t Dv, scalar_t* o) {
    scalar_t total = 0;
    for (size_t i = 0; i < keys.size(); ++i) {
        const scalar_t weight = std::exp(logits[i] - top);
        total += weight;
        const scalar_t* vj = vb + int64_t(keys[i]) * Dv;
        for (int64_t d = 0; d < Dv; ++d) o[d] += weight * vj[d];
    }
    for (int64_t d = 0; d < Dv; ++d) o[d] /= total;
}

// The keys one decoding query lists, each once (a byte per key marks the listed ones).
struct KeyList {
    std::vector<uint8_t> listed;
    std::vector<int32_t> keys;
    std::vector<uint8_t> covered;  // whether keys[i] came from the sinks or the window
    const uint8_t* sees = nullptr;  // the query's visible keys, or null: the keys up to `position`
    int64_t position = 0;

    explicit KeyList(int64_t S) : listed(S, 0) {}

    // Start the list of the query at `position` that sees `query_sees` (or null).
    void start(const uint8_t* query_sees, int64_t query_position) {
        for (int32_t j : keys) listed[j] = 0;
        keys.clear();
        covered.clear();
        sees = query_sees;
        position = query_position;
    }

    void add(int64_t j, uint8_t is_covered) {
        if (listed[j] || (sees ? !sees[j] : j > position)) return;
        listed[j] = 1;
        keys.push_back(int32_t(j));
        covered.push_back(is_covered);
    }

    // The visible keys among the first `sinks` real keys or within `window` real keys before the
    // query (window < 0: none), ranked among the real keys (`real`: the keys the last query of
    // the step sees), as covered_keys in decode/common.py.
    void add_covered(const uint8_t* real, int64_t S, int64_t sinks, int64_t window) {
        if (!sees) {  // ranks are positions
            for (int64_t j = 0; j < std::min(sinks, S); ++j) add(j, 1);
            if (window >= 0)
                for (int64_t j = std::max<int64_t>(0, position - window); j <= position; ++j) add(j, 1);
        } else if (sinks > 0 || window >= 0) {
            int64_t query_rank = -1, real_keys = 0;  // visible keys up to the query, less one
            for (int64_t j = 0; j < S; ++j) query_rank += sees[j], real_keys += real[j];
            for (int64_t j = 0, rank = 0; j < S && rank < sinks; ++j)
                if (real[j]) add(j, 1), ++rank;
            if (window >= 0)  // key rank (real keys up to it, less one) from the last key down
                for (int64_t j = S - 1, upto = real_keys; j >= 0 && upto - 1 >= query_rank - window; --j) {
                    add(j, 1);
                    upto -= real[j];
                }
        }
    }
};

// The codes of a store head's T new keys (`keys`, T rows of D values: row i's table r into
// key_codes[i·key_stride + r·table_stride]) and of `queries` rows (query i's into
// query_codes[i·tables + r]; none for SketchTopK), PROJECT_ROWS rows at a time: a decoding step's
// key and the queries of the query heads that read the store go through one projection.
template <typename scalar_t, typename code_t>
void hash_step(const scalar_t* keys, int64_t T, code_t* key_codes, int64_t key_stride, int64_t table_stride,
               const scalar_t* q, int64_t queries, code_t* query_codes, const float* planes, int64_t D,
               int64_t tables, int64_t bits, std::vector<float>& scratch, std::vector<float>& proj,
               std::vector<uint64_t>& words) {
    for (int64_t first = 0; first < T + queries; first += PROJECT_ROWS) {
        const int64_t rows = std::min(PROJECT_ROWS, T + queries - first);
        const scalar_t* row[PROJECT_ROWS];
        code_t* dest[PROJECT_ROWS];
        int64_t stride[PROJECT_ROWS];
        for (int64_t i = 0, n = first; i < rows; ++i, ++n) {
            const bool is_key = n < T;
            row[i] = is_key ? keys + n * D : q + (n - T) * D;
            dest[i] = is_key ? key_codes + n * key_stride : query_codes + (n - T) * tables;
            stride[i] = is_key ? table_stride : 1;
        }
        hash_rows(row, rows, planes, D, tables, bits, dest, stride, scratch, proj, words);
    }
}

template <typename scalar_t>
void simhash_decode_units(const scalar_t* q, const scalar_t* k, const scalar_t* v, const float* planes,
                          int16_t* buffer, const int32_t* index_keys, const int32_t* starts, const uint8_t* visible,
                          scalar_t* out, int64_t* scored, int64_t* empty, scalar_t* last_key, int64_t H, int64_t H_kv,
                          int64_t shared, int64_t T, int64_t S, int64_t D, int64_t Dv, int64_t R, int64_t indexed,
                          int64_t bits, int64_t capacity, int64_t sinks, int64_t window, int importance, double scale,
                          int64_t unit_begin, int64_t unit_end) {
    KeyList list(S);
    std::vector<scalar_t> logits;
    std::vector<int16_t> q_codes(shared * T * R);
    std::vector<float> scratch, proj;
    std::vector<uint64_t> words;
    const int64_t groups = H / H_kv, H_s = H / shared, codes_per_table = (int64_t(1) << bits) + 1, K = R * bits;
    for (int64_t bs = unit_begin; bs < unit_end; ++bs) {  // a store head: `shared` query heads, one key head
        const int64_t b = bs / H_s, first_head = bs % H_s * shared, kv = b * H_kv + first_head / groups;
        const scalar_t* kb = k + kv * S * D;
        const scalar_t* vb = v + kv * S * Dv;
        const float* head_planes = planes + bs % H_s * D * K;
        int16_t* head_codes = buffer + bs * R * capacity;
        if (first_head % groups == 0)
            std::copy(kb + (S - 1) * D, kb + S * D, last_key + kv * D);  // the store's check of its cache
        hash_step(kb + (S - T) * D, T, head_codes + (S - T), 1, capacity, q + (b * H + first_head) * T * D,
                  shared * T, q_codes.data(), head_planes, D, R, bits, scratch, proj, words);
        for (int64_t i = 0; i < shared * T; ++i) {  // the store's queries: query head first_head + i / T
            const int64_t h = first_head + i / T, t = i % T;
            const int64_t unit = (b * H + h) * T + t, position = S - T + t;
            const uint8_t* real = visible ? visible + (b * T + T - 1) * S : nullptr;  // the last query sees every real key
            list.start(visible ? visible + (b * T + t) * S : nullptr, position);
            list.add_covered(real, S, sinks, window);
            for (int64_t r = 0; r < R; ++r) {
                const int64_t table = bs * R + r, code = q_codes[i * R + r];
                const int32_t* run = index_keys + table * indexed;
                const int32_t* start = starts + table * codes_per_table + code;
                for (int32_t a = start[0]; a < start[1]; ++a) list.add(run[a], 0);
                const int16_t* codes = head_codes + r * capacity;  // the keys appended since the index was built
                for (int64_t j = indexed; j < S; ++j)
                    if (codes[j] == code) list.add(j, 0);
            }
            const std::vector<int32_t>& keys = list.keys;
            const std::vector<uint8_t>& covered = list.covered;

            const int64_t n = int64_t(keys.size());
            scalar_t* o = out + ((b * T + t) * H + h) * Dv;  // (B, T, H, Dv): the model's layout
            std::fill(o, o + Dv, scalar_t(0));
            scored[unit] = n;
            empty[unit] = all_zero(o, Dv);
            if (n == 0) continue;
            const scalar_t* qv = q + unit * D;
            const scalar_t q_norm = importance ? std::sqrt(dot(qv, qv, D)) : scalar_t(0);
            logits.resize(n);
            scalar_t top = -std::numeric_limits<scalar_t>::infinity();
            for (int64_t i = 0; i < n; ++i) {
                const scalar_t* kj = kb + int64_t(keys[i]) * D;
                const scalar_t product = dot(qv, kj, D);
                scalar_t logit = product * scalar_t(scale);
                if (importance && !covered[i]) {
                    const scalar_t norms =
                        std::max(q_norm * std::sqrt(dot(kj, kj, D)), std::numeric_limits<scalar_t>::min());
                    logit += inverse_log_probability<scalar_t>(product / norms, bits, R);
                }
                logits[i] = logit;
                top = std::max(top, logit);
            }
            softmax_values(logits.data(), top, keys, vb, Dv, o);
            empty[unit] = all_zero(o, Dv);
        }
    }
}

// max(‖x‖, 1e-12), the norm torch's F.normalize divides by.
template <typename scalar_t>
scalar_t norm(const scalar_t* x, int64_t D) {
    return std::max(std::sqrt(dot(x, x, D)), scalar_t(1e-12));
}

// x / max(‖x‖, 1e-12) into out (D values), as torch's F.normalize.
template <typename scalar_t>
void unit_vector(const scalar_t* x, scalar_t* out, int64_t D) {
    const scalar_t length = norm(x, D);
    for (int64_t d = 0; d < D; ++d) out[d] = x[d] / length;
}

// The angle between the unit vector u and k·k_scale (k_scale = 1/‖k‖), 2·atan2(‖u − k̂‖, ‖u + k̂‖)
// as lshattn.methods.yoso.angle (accurate near 0 and π), in one pass in eight partial sums.
template <typename scalar_t>
scalar_t angle(const scalar_t* u, const scalar_t* k, scalar_t k_scale, int64_t D) {
    scalar_t apart[8] = {0, 0, 0, 0, 0, 0, 0, 0}, together[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        for (int l = 0; l < 8; ++l) {
            const scalar_t a = u[d + l] - k[d + l] * k_scale, b = u[d + l] + k[d + l] * k_scale;
            apart[l] += a * a;
            together[l] += b * b;
        }
    for (; d < D; ++d) {
        const scalar_t a = u[d] - k[d] * k_scale, b = u[d] + k[d] * k_scale;
        apart[0] += a * a;
        together[0] += b * b;
    }
    scalar_t a = 0, b = 0;
    for (int l = 0; l < 8; ++l) a += apart[l], b += together[l];
    return 2 * std::atan2(std::sqrt(a), std::sqrt(b));
}

// x^n by squaring (std::pow with a float exponent is a library call several times slower).
template <typename scalar_t>
scalar_t power(scalar_t x, int64_t n) {
    scalar_t result = 1;
    for (; n > 0; n >>= 1, x *= x)
        if (n & 1) result *= x;
    return result;
}

template <typename scalar_t>
void yoso_decode_units(const scalar_t* q, const scalar_t* k, const scalar_t* v, const float* planes, int16_t* buffer,
                       scalar_t* tables, const uint8_t* visible, scalar_t* out, int64_t* scored, int64_t* empty,
                       scalar_t* last_key, int64_t H, int64_t H_kv, int64_t shared, int64_t T, int64_t S, int64_t D,
                       int64_t Dv, int64_t m, int64_t bits, int64_t capacity, int64_t sinks, int64_t window,
                       int normalize, int64_t unit_begin, int64_t unit_end) {
    KeyList list(S);
    std::vector<int16_t> q_codes(shared * T * m);
    std::vector<float> scratch, proj;
    std::vector<uint64_t> words;
    std::vector<scalar_t> q_unit(D);
    const int64_t groups = H / H_kv, H_s = H / shared, buckets = int64_t(1) << bits, K = m * bits;
    const scalar_t pi = scalar_t(3.14159265358979323846);
    for (int64_t bs = unit_begin; bs < unit_end; ++bs) {  // a store head: `shared` query heads, one key head
        const int64_t b = bs / H_s, first_head = bs % H_s * shared, kv = b * H_kv + first_head / groups;
        const scalar_t* kb = k + kv * S * D;
        const scalar_t* vb = v + kv * S * Dv;
        const float* head_planes = planes + bs % H_s * D * K;
        int16_t* head_codes = buffer + bs * capacity * m;  // (capacity, m)
        if (first_head % groups == 0)
            std::copy(kb + (S - 1) * D, kb + S * D, last_key + kv * D);  // the store's check of its cache
        scalar_t* head_tables = tables + bs * m * buckets * Dv;  // (m, 2^τ, Dv)
        const uint8_t* real = visible ? visible + (b * T + T - 1) * S : nullptr;  // the last query sees every real key
        hash_step(kb + (S - T) * D, T, head_codes + (S - T) * m, m, 1, q + (b * H + first_head) * T * D, shared * T,
                  q_codes.data(), head_planes, D, m, bits, scratch, proj, words);
        for (int64_t i = 0; i < shared * T; ++i) {  // the store's queries: query head first_head + i / T
            const int64_t h = first_head + i / T, t = i % T;
            const int64_t unit = (b * H + h) * T + t, position = S - T + t;
            const int16_t* codes = q_codes.data() + i * m;
            const uint8_t* sees = visible ? visible + (b * T + t) * S : nullptr;
            scalar_t* o = out + ((b * T + t) * H + h) * Dv;  // (B, T, H, Dv): the model's layout
            std::fill(o, o + Dv, scalar_t(0));
            for (int64_t r = 0; r < m; ++r) {  // the cached keys: a row per hash
                const scalar_t* row = head_tables + (r * buckets + codes[r]) * Dv;
                for (int64_t d = 0; d < Dv; ++d) o[d] += row[d];
            }
            auto hits = [&](int64_t j) {  // the hashes in which key j shares the query's bucket
                int64_t count = 0;
                for (int64_t r = 0; r < m; ++r) count += head_codes[j * m + r] == codes[r];
                return scalar_t(count);
            };
            for (int64_t j = S - T; j < S; ++j) {  // the new keys up to the query
                if (sees ? !sees[j] : j > position) continue;
                const scalar_t shared = hits(j);
                for (int64_t d = 0; d < Dv; ++d) o[d] += shared * vb[j * Dv + d];
            }
            for (int64_t d = 0; d < Dv; ++d) o[d] /= scalar_t(m);

            list.start(sees, position);
            list.add_covered(real, S, sinks, window);
            scored[unit] = int64_t(list.keys.size());
            if (!list.keys.empty()) unit_vector(q + unit * D, q_unit.data(), D);
            for (int32_t j : list.keys) {  // the exact kernel in place of the sampled fraction
                const scalar_t* kj = kb + int64_t(j) * D;
                const scalar_t theta = angle(q_unit.data(), kj, scalar_t(1) / norm(kj, D), D);
                const scalar_t weight = power(1 - theta / pi, bits) - hits(j) / scalar_t(m);
                for (int64_t d = 0; d < Dv; ++d) o[d] += weight * vb[int64_t(j) * Dv + d];
            }
            if (normalize) {
                const scalar_t norm = std::max(std::sqrt(dot(o, o, Dv)), scalar_t(1e-12));
                for (int64_t d = 0; d < Dv; ++d) o[d] /= norm;
            }
            empty[unit] = all_zero(o, Dv);
        }
        for (int64_t j = S - T; j < S; ++j) {  // the new real keys into the tables, after every query read them
            if (real && !real[j]) continue;
            for (int64_t r = 0; r < m; ++r) {
                scalar_t* row = head_tables + (r * buckets + head_codes[j * m + r]) * Dv;
                for (int64_t d = 0; d < Dv; ++d) row[d] += vb[j * Dv + d];
            }
        }
    }
}

// A query's largest projection is scaled to this magnitude and rounded (LEVELS in methods/sketch.py).
constexpr double SKETCH_LEVELS = double(1 << 20);
// Keys ranked together: their estimates stay in the L1 cache while the R tables are added.
constexpr int64_t SKETCH_CHUNK = 512;

// lut (R, 256): the query's estimate for each byte value of each table of the sketch, from its
// R·8 projections on the packed planes (float64, in d order), scaled and rounded as query_weights.
template <typename scalar_t>
void sketch_lookup(const scalar_t* qv, const float* planes, int64_t D, int64_t R, std::vector<double>& z,
                   std::vector<int32_t>& lut) {
    const int64_t K = R * 8;
    z.assign(K, 0.0);
    for (int64_t first = 0; first < K; first += PROJECT_WIDTH) {  // a packed block: (D, width) row-major
        const int64_t width = std::min(PROJECT_WIDTH, K - first);
        const float* block = planes + first * D;
        for (int64_t d = 0; d < D; ++d)
            for (int64_t i = 0; i < width; ++i) z[first + i] += double(qv[d]) * double(block[d * width + i]);
    }
    double largest = 0;
    for (double x : z) largest = std::max(largest, std::abs(x));
    const double factor = SKETCH_LEVELS / (largest > 0 ? largest : 1.0);
    lut.resize(R * 256);
    for (int64_t r = 0; r < R; ++r) {
        int32_t w[8], all_negative = 0;
        for (int i = 0; i < 8; ++i) w[i] = int32_t(std::nearbyint(z[r * 8 + i] * factor)), all_negative -= w[i];
        int32_t* row = lut.data() + r * 256;
        row[0] = all_negative;
        for (int c = 1; c < 256; ++c) row[c] = row[c & (c - 1)] + 2 * w[__builtin_ctz(c)];  // one more bit set
    }
}

// estimate[j] = Σ_r lut[r][sketch_r[j]] for j in [first, last). Four tables a pass (a quarter of
// the estimates' loads and stores; |entry| <= 2^23, so four fit an int32). About 1 ns a lookup on
// the AMD EPYC cores here, vectorised (AVX2 gathers) or not.
void add_estimates(const int32_t* lut, const uint8_t* sketches, int64_t capacity, int64_t R, int64_t first,
                   int64_t last, int64_t* estimate) {
    std::fill(estimate + first, estimate + last, int64_t(0));
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
        const int32_t* table = lut + r * 256;
        const uint8_t* sketch = sketches + r * capacity;
        for (int64_t j = first; j < last; ++j)
            estimate[j] += table[sketch[j]] + table[256 + sketch[capacity + j]] + table[512 + sketch[2 * capacity + j]] +
                           table[768 + sketch[3 * capacity + j]];
    }
    for (; r < R; ++r)
        for (int64_t j = first; j < last; ++j) estimate[j] += lut[r * 256 + sketches[r * capacity + j]];
}

// The kth largest (1-based, 1 <= k <= n) of n values: a histogram of their top 11 bits above the least
// finds its bucket, then nth_element among that bucket's values alone. Linear, with no branch
// that the values steer; nth_element over all of them was half a step at 8k, and slowest on the
// many equal estimates of short sketches.
int64_t kth_largest(const int64_t* values, int64_t n, int64_t k, std::vector<int64_t>& counts,
                    std::vector<int64_t>& in_bucket) {
    constexpr int BUCKET_BITS = 11;
    const auto [least_at, most_at] = std::minmax_element(values, values + n);
    const int64_t least = *least_at, span = *most_at - least;
    if (span == 0) return least;
    const int shift = std::max(0, 64 - __builtin_clzll(uint64_t(span)) - BUCKET_BITS);
    const int64_t top = span >> shift;
    counts.assign(top + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++counts[(values[i] - least) >> shift];
    int64_t bucket = top, above = 0;  // the values in buckets above `bucket`
    for (; above + counts[bucket] < k; --bucket) above += counts[bucket];
    if (shift == 0) return least + bucket;  // a bucket per value
    in_bucket.clear();
    for (int64_t i = 0; i < n; ++i)
        if (((values[i] - least) >> shift) == bucket) in_bucket.push_back(values[i]);
    const auto kth = in_bucket.begin() + (k - above - 1);
    std::nth_element(in_bucket.begin(), kth, in_bucket.end(), std::greater<int64_t>());
    return *kth;
}

template <typename scalar_t>
void sketch_decode_units(const scalar_t* q, const scalar_t* k, const scalar_t* v, const float* planes,
                         uint8_t* buffer, const int64_t* keep, const uint8_t* visible, scalar_t* out, int64_t* scored,
                         int64_t* empty, scalar_t* last_key, int64_t H, int64_t H_kv, int64_t shared, int64_t T,
                         int64_t S, int64_t D, int64_t Dv, int64_t R, int64_t capacity, int64_t sinks, int64_t window,
                         double scale, int64_t unit_begin, int64_t unit_end) {
    KeyList list(S);
    std::vector<scalar_t> logits;
    std::vector<float> scratch, proj;
    std::vector<uint64_t> words;
    std::vector<double> z;
    std::vector<int32_t> lut;
    std::vector<int64_t> estimate(S), bucket_counts, in_bucket;
    const int64_t unranked = -R * 8 * (int64_t(1) << 20) - 1;  // below any estimate: R·8 weights of at most 2^20
    const int64_t groups = H / H_kv, H_s = H / shared;
    for (int64_t bs = unit_begin; bs < unit_end; ++bs) {  // a store head: `shared` query heads, one key head
        const int64_t b = bs / H_s, first_head = bs % H_s * shared, kv = b * H_kv + first_head / groups;
        const scalar_t* kb = k + kv * S * D;
        const scalar_t* vb = v + kv * S * Dv;
        const float* head_planes = planes + bs % H_s * D * R * 8;
        uint8_t* head_sketches = buffer + bs * R * capacity;  // (R, capacity)
        if (first_head % groups == 0)
            std::copy(kb + (S - 1) * D, kb + S * D, last_key + kv * D);  // the store's check of its cache
        // the keys only: a query's weights are its float64 projections
        hash_step(kb + (S - T) * D, T, head_sketches + (S - T), 1, capacity, q, int64_t(0), head_sketches, head_planes,
                  D, R, int64_t(8), scratch, proj, words);
        const uint8_t* real = visible ? visible + (b * T + T - 1) * S : nullptr;  // the last query sees every real key
        for (int64_t i = 0; i < shared * T; ++i) {  // the store's queries: query head first_head + i / T
            const int64_t h = first_head + i / T, t = i % T;
            const int64_t unit = (b * H + h) * T + t, position = S - T + t;
            const uint8_t* sees = visible ? visible + (b * T + t) * S : nullptr;
            const scalar_t* qv = q + unit * D;
            list.start(sees, position);
            list.add_covered(real, S, sinks, window);
            const int64_t seen = sees ? S : position + 1;  // keys past it are never visible
            sketch_lookup(qv, head_planes, D, R, z, lut);
            for (int64_t first = 0; first < seen; first += SKETCH_CHUNK) {
                const int64_t last = std::min(seen, first + SKETCH_CHUNK);
                add_estimates(lut.data(), head_sketches, capacity, R, first, last, estimate.data());
            }
            // The keys not to rank (covered, or not visible) get an estimate below every real one.
            int64_t n = seen - int64_t(list.keys.size());
            for (int32_t j : list.keys) estimate[j] = unranked;
            if (sees)
                for (int64_t j = 0; j < seen; ++j)
                    if (!sees[j]) estimate[j] = unranked, --n;
            const int64_t kept = std::min(keep[n], n);
            if (kept > 0) {  // the kept-th largest estimate, then those above it and the earliest ties
                const int64_t threshold = kth_largest(estimate.data(), seen, kept, bucket_counts, in_bucket);
                int64_t room = kept;
                for (int64_t j = 0; j < seen; ++j) room -= estimate[j] > threshold;
                for (int64_t j = 0; j < seen; ++j)
                    if (estimate[j] > threshold || (estimate[j] == threshold && room-- > 0)) list.add(j, 0);
            }
            const std::vector<int32_t>& keys = list.keys;
            scalar_t* o = out + ((b * T + t) * H + h) * Dv;  // (B, T, H, Dv): the model's layout
            std::fill(o, o + Dv, scalar_t(0));
            scored[unit] = int64_t(keys.size());
            if (!keys.empty()) {
                logits.resize(keys.size());
                scalar_t top = -std::numeric_limits<scalar_t>::infinity();
                for (size_t i = 0; i < keys.size(); ++i) {
                    logits[i] = dot(qv, kb + int64_t(keys[i]) * D, D) * scalar_t(scale);
                    top = std::max(top, logits[i]);
                }
                softmax_values(logits.data(), top, keys, vb, Dv, o);
            }
            empty[unit] = all_zero(o, Dv);
        }
    }
}

}  // namespace

extern "C" {

void lshattn_bucket_sums_f32(const float* values, const int32_t* write, const int32_t* read, float* out, int64_t N,
                             int64_t S, int64_t T, int64_t m, int64_t dv, int64_t rows, int64_t group,
                             int64_t ranges, int64_t unit_begin, int64_t unit_end, int causal, int reverse) {
    run_units<float>(values, write, read, out, N, S, T, m, dv, rows, group, ranges, unit_begin, unit_end, causal,
                     reverse);
}

void lshattn_bucket_sums_f64(const double* values, const int32_t* write, const int32_t* read, double* out, int64_t N,
                             int64_t S, int64_t T, int64_t m, int64_t dv, int64_t rows, int64_t group,
                             int64_t ranges, int64_t unit_begin, int64_t unit_end, int causal, int reverse) {
    run_units<double>(values, write, read, out, N, S, T, m, dv, rows, group, ranges, unit_begin, unit_end, causal,
                      reverse);
}

// x (N, L, D) float32, planes (H, D·tables·bits) float32 packed, codes (N, L, tables); units are
// (row n, block of 4 positions).
void lshattn_project_signs_i32(const float* x, const float* planes, int32_t* codes, int64_t H, int64_t L, int64_t D,
                               int64_t tables, int64_t bits, int64_t unit_begin, int64_t unit_end) {
    project_signs<int32_t>(x, planes, codes, H, L, D, tables, bits, unit_begin, unit_end);
}

void lshattn_project_signs_i64(const float* x, const float* planes, int64_t* codes, int64_t H, int64_t L, int64_t D,
                               int64_t tables, int64_t bits, int64_t unit_begin, int64_t unit_end) {
    project_signs<int64_t>(x, planes, codes, H, L, D, tables, bits, unit_begin, unit_end);
}

// q (N, T, D), k (N, S, D), v (N, S, Dv), g (N, T, Dv); codes (N, T, m) and (N, S, m) in
// [0, rows) or negative for none; grad_q (ranges, N, T, D) and grad_k (ranges, N, S, D).
void lshattn_collision_grads_f32(const float* q, const float* k, const float* v, const float* g,
                                 const int32_t* q_codes, const int32_t* k_codes, float* grad_q, float* grad_k,
                                 int64_t N, int64_t T, int64_t S, int64_t m, int64_t D, int64_t Dv, int64_t rows,
                                 int64_t ranges, int64_t unit_begin, int64_t unit_end, int causal,
                                 int64_t exact_bits, double clamp) {
    collision_grads_units<float>(q, k, v, g, q_codes, k_codes, grad_q, grad_k, N, T, S, m, D, Dv, rows, ranges,
                                 unit_begin, unit_end, causal, exact_bits, clamp);
}

void lshattn_collision_grads_f64(const double* q, const double* k, const double* v, const double* g,
                                 const int32_t* q_codes, const int32_t* k_codes, double* grad_q, double* grad_k,
                                 int64_t N, int64_t T, int64_t S, int64_t m, int64_t D, int64_t Dv, int64_t rows,
                                 int64_t ranges, int64_t unit_begin, int64_t unit_end, int causal,
                                 int64_t exact_bits, double clamp) {
    collision_grads_units<double>(q, k, v, g, q_codes, k_codes, grad_q, grad_k, N, T, S, m, D, Dv, rows, ranges,
                                  unit_begin, unit_end, causal, exact_bits, clamp);
}

// A store head serves `shared` consecutive query heads (1, or the G of a key head), H_s = H / shared.
// q (B·H, T, D), k (B·H_kv, S, D), v (B·H_kv, S, Dv); planes (H_s, D·R·bits) float32, packed; buffer
// (B·H_s, R, capacity) int16 codes, the new keys' written at S − T .. S; index_keys (B·H_s, R,
// indexed) and starts (B·H_s, R, 2^bits + 1); visible (B, T, S) or null; out (B, T, H, Dv); scored (B·H·T)
// the keys each query scored; empty (B·H·T) whether its output is all zeros; last_key (B·H_kv, D)
// receives each key head's last key. Units are store heads (B·H_s).
#define LSHATTN_SIMHASH_DECODE(suffix, scalar_t)                                                                   \
    void lshattn_simhash_decode_##suffix(                                                                          \
        const scalar_t* q, const scalar_t* k, const scalar_t* v, const float* planes, int16_t* buffer,             \
        const int32_t* index_keys, const int32_t* starts, const uint8_t* visible, scalar_t* out, int64_t* scored,  \
        int64_t* empty, scalar_t* last_key, int64_t H, int64_t H_kv, int64_t shared, int64_t T, int64_t S,         \
        int64_t D, int64_t Dv, int64_t R, int64_t indexed, int64_t bits, int64_t capacity, int64_t sinks,          \
        int64_t window, int importance, double scale, int64_t unit_begin, int64_t unit_end) {                      \
        simhash_decode_units<scalar_t>(q, k, v, planes, buffer, index_keys, starts, visible, out, scored, empty,   \
                                       last_key, H, H_kv, shared, T, S, D, Dv, R, indexed, bits, capacity, sinks,  \
                                       window, importance, scale, unit_begin, unit_end);                           \
    }
LSHATTN_SIMHASH_DECODE(f32, float)
LSHATTN_SIMHASH_DECODE(f64, double)

// q (B·H, T, D), k (B·H_kv, S, D), v (B·H_kv, S, Dv); planes (H_s, D·m·bits) float32, packed; buffer
// (B·H_s, capacity, m) int16 codes, the new keys' written at S − T .. S; tables (B·H_s, m, 2^bits, Dv)
// of the cached real keys' value sums, the new real keys' added; visible (B, T, S) or null; out
// (B, T, H, Dv); scored (B·H·T) the covered keys; empty (B·H·T) whether an output is all zeros;
// last_key (B·H_kv, D) receives each key head's last key. Units are store heads (B·H_s).
#define LSHATTN_YOSO_DECODE(suffix, scalar_t)                                                                         \
    void lshattn_yoso_decode_##suffix(                                                                                \
        const scalar_t* q, const scalar_t* k, const scalar_t* v, const float* planes, int16_t* buffer,                \
        scalar_t* tables, const uint8_t* visible, scalar_t* out, int64_t* scored, int64_t* empty, scalar_t* last_key, \
        int64_t H, int64_t H_kv, int64_t shared, int64_t T, int64_t S, int64_t D, int64_t Dv, int64_t m,              \
        int64_t bits, int64_t capacity, int64_t sinks, int64_t window, int normalize, int64_t unit_begin,             \
        int64_t unit_end) {                                                                                           \
        yoso_decode_units<scalar_t>(q, k, v, planes, buffer, tables, visible, out, scored, empty, last_key, H, H_kv,  \
                                    shared, T, S, D, Dv, m, bits, capacity, sinks, window, normalize, unit_begin,     \
                                    unit_end);                                                                        \
    }
LSHATTN_YOSO_DECODE(f32, float)
LSHATTN_YOSO_DECODE(f64, double)

// q (B·H, T, D), k (B·H_kv, S, D), v (B·H_kv, S, Dv); planes (H_s, D·R·8) float32, packed; buffer
// (B·H_s, R, capacity) the keys' sketches, the new keys' written at S − T .. S; keep (S + 1,) the
// keys kept of n candidates; visible (B, T, S) or null; out (B, T, H, Dv); scored (B·H·T) the keys
// each query scored; empty (B·H·T) whether its output is all zeros; last_key (B·H_kv, D) receives
// each key head's last key. Units are store heads (B·H_s).
#define LSHATTN_SKETCH_DECODE(suffix, scalar_t)                                                                        \
    void lshattn_sketch_decode_##suffix(                                                                               \
        const scalar_t* q, const scalar_t* k, const scalar_t* v, const float* planes, uint8_t* buffer,                 \
        const int64_t* keep, const uint8_t* visible, scalar_t* out, int64_t* scored, int64_t* empty,                  \
        scalar_t* last_key, int64_t H, int64_t H_kv, int64_t shared, int64_t T, int64_t S, int64_t D, int64_t Dv,      \
        int64_t R, int64_t capacity, int64_t sinks, int64_t window, double scale, int64_t unit_begin,                  \
        int64_t unit_end) {                                                                                            \
        sketch_decode_units<scalar_t>(q, k, v, planes, buffer, keep, visible, out, scored, empty, last_key, H, H_kv,    \
                                      shared, T, S, D, Dv, R, capacity, sinks, window, scale, unit_begin, unit_end);   \
    }
LSHATTN_SKETCH_DECODE(f32, float)
LSHATTN_SKETCH_DECODE(f64, double)

}  // extern "C"
