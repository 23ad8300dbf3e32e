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

#include <algorithm>
#include <cstdint>
#include <cstring>
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

}  // extern "C"
