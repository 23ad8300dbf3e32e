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
// ## Sign codes (SimHash): pack the sign bits of projections into one integer per table
//
//   codes[row, r] = Σ_k [proj[row, r·bits + k] has its sign bit clear] · 2^k
//
// (+0 counts as positive and -0 as negative, as torch.copysign does.)
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Rows [row_begin, row_end) of proj (rows, tables·bits) into codes[row_offset(row) + r], where a
// row is (block b, position t) with t < positions and the codes of block b start at b·stride.
template <typename code_t>
void sign_codes(const float* proj, code_t* codes, int64_t positions, int64_t tables, int64_t bits,
                int64_t stride, int64_t offset, int64_t row_begin, int64_t row_end) {
    const int64_t K = tables * bits;
    std::vector<uint64_t> words(static_cast<size_t>(K / 64 + 2), 0);
    const uint64_t mask = bits == 64 ? ~uint64_t(0) : (uint64_t(1) << bits) - 1;
    for (int64_t row = row_begin; row < row_end; ++row) {
        for (int64_t w = 0; w * 64 < K; ++w)
            words[w] = sign_word(proj + row * K + w * 64, std::min<int64_t>(64, K - w * 64));
        code_t* out = codes + (row / positions) * stride + (offset + row % positions) * tables;
        for (int64_t r = 0; r < tables; ++r) {
            const int64_t bit = r * bits, w = bit / 64, shift = bit % 64;
            uint64_t field = words[w] >> shift;
            if (shift != 0 && shift + bits > 64) field |= words[w + 1] << (64 - shift);
            out[r] = static_cast<code_t>(field & mask);
        }
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

// proj: (blocks·positions, tables·bits) float32; codes: (blocks, stride / tables, tables) with
// the block's rows written at position `offset` onwards.
void lshattn_sign_codes_i32(const float* proj, int32_t* codes, int64_t positions, int64_t tables, int64_t bits,
                            int64_t stride, int64_t offset, int64_t row_begin, int64_t row_end) {
    sign_codes<int32_t>(proj, codes, positions, tables, bits, stride, offset, row_begin, row_end);
}

void lshattn_sign_codes_i64(const float* proj, int64_t* codes, int64_t positions, int64_t tables, int64_t bits,
                            int64_t stride, int64_t offset, int64_t row_begin, int64_t row_end) {
    sign_codes<int64_t>(proj, codes, positions, tables, bits, stride, offset, row_begin, row_end);
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

}  // extern "C"
