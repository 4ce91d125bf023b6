// CPU twins of the Triton kernels: Philox4x32-10 normals, one-pass weight sample + KL, one-pass gradient.
//
// eps follows the RNG contract of kernels/philox.py operation for operation (float32, IEEE-exact operations
// only, compiled without FMA contraction), so a seed gives the same eps bit for bit here, in the Triton
// interpreter and on a GPU, whatever the instruction set: vector division, square root and int/float
// conversions round exactly like their scalar forms. The posterior arithmetic around eps (softplus, KL,
// gradients) uses explicit fused multiply-adds and no division it can do without.
//
// Layout of this file: the kernel section (torch-free, below the #else) is compiled three times, into the
// namespaces kernels_avx512, kernels_avx2 and kernels_baseline, each under its own target; the best one the CPU supports is picked
// once at load time (BAYESLAYERS_CPU_ISA=avx2|baseline forces a lower one). Work is split in fixed chunks of
// CHUNK elements over ATen's thread pool (contiguous ranges of chunks per thread); the KL is summed per chunk
// in double in a fixed order, so results do not depend on the thread count, nor (AVX-512 vs AVX2) on the
// instruction set; the baseline x86-64 build has no FMA and agrees within a few ulp (eps: bit for bit). All
// outputs are allocated by the caller (Python) and written here.

#ifndef BAYESLAYERS_KERNEL_SECTION

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#define BAYESLAYERS_KERNEL_SECTION
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define BAYESLAYERS_X86_CLONES 1
#define BAYESLAYERS_ISA 2  // the kernel section's intrinsics: 2 AVX-512, 1 AVX2, 0 none
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2,prefer-vector-width=512")
namespace kernels_avx512 {
#include "reparameterization_cpu.cpp"  // this file again: the kernel section below
}  // namespace kernels_avx512
#pragma GCC pop_options
#undef BAYESLAYERS_ISA
#define BAYESLAYERS_ISA 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
namespace kernels_avx2 {
#include "reparameterization_cpu.cpp"  // this file again: the kernel section below
}  // namespace kernels_avx2
#pragma GCC pop_options
#undef BAYESLAYERS_ISA
#endif
#define BAYESLAYERS_ISA 0
namespace kernels_baseline {
#include "reparameterization_cpu.cpp"  // this file again: the kernel section below
}  // namespace kernels_baseline
#undef BAYESLAYERS_ISA
#undef BAYESLAYERS_KERNEL_SECTION

namespace {

constexpr int64_t CHUNK = 4096;  // elements per work item and per KL partial sum (a multiple of the block)
static_assert(CHUNK % kernels_baseline::BLOCK == 0, "a chunk holds whole blocks");

// The kernels of one instruction set.
struct Kernels {
  const char* name;
  void (*eps)(uint64_t, int64_t, int64_t, float*);
  double (*sample)(const float*, const float*, const float*, uint64_t, int64_t, int64_t, float, int, float*);
  void (*gradient)(const float*, const float*, const float*, const float*, uint64_t, int64_t, int64_t, float, float,
                   int, float*, float*, float*);
};

#define KERNELS_OF(NAME) Kernels{#NAME, &kernels_##NAME::eps_chunk, &kernels_##NAME::sample_chunk, &kernels_##NAME::gradient_chunk}

std::vector<Kernels> supported_kernels() {  // best first
  std::vector<Kernels> found;
#ifdef BAYESLAYERS_X86_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    found.push_back(KERNELS_OF(avx512));
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    found.push_back(KERNELS_OF(avx2));
#endif
  found.push_back(KERNELS_OF(baseline));
  return found;
}

Kernels pick_kernels(const std::string& wanted) {
  const std::vector<Kernels> found = supported_kernels();
  for (const Kernels& k : found)
    if (wanted == k.name) return k;
  TORCH_CHECK(wanted.empty(), "instruction set '", wanted, "' is not supported by this CPU (or this build); ",
              "choose from the ones instruction_sets() lists");
  return found.front();
}

Kernels& active() {
  static Kernels kernels = [] {
    const char* env = std::getenv("BAYESLAYERS_CPU_ISA");
    return pick_kernels(env == nullptr ? "" : env);
  }();
  return kernels;
}

std::vector<std::string> instruction_sets() {
  std::vector<std::string> names;
  for (const Kernels& k : supported_kernels()) names.emplace_back(k.name);
  return names;
}

std::string instruction_set() { return active().name; }

// "" picks the best supported one again.
void set_instruction_set(const std::string& name) { active() = pick_kernels(name); }

// Asks for transparent huge pages under a freshly allocated output before the kernel first touches it: large
// outputs come from new mmap'd memory every call, and faulting it in 4 KiB pages costs about as much as the
// kernel itself (2 MiB pages: 512 times fewer faults). A hint only; results are unchanged.
void advise_huge_pages(const torch::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t first = (begin + HUGE - 1) & ~(HUGE - 1), last = end & ~(HUGE - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

bool overlaps(const torch::Tensor& a, const torch::Tensor& b) {
  const char *a0 = static_cast<const char*>(a.data_ptr()), *b0 = static_cast<const char*>(b.data_ptr());
  return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

void check_float_vector(const torch::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == numel,
              name, " must be a contiguous float32 CPU tensor of ", numel, " elements");
}

// f(chunk, begin, n) for every chunk, contiguous ranges of chunks per thread.
template <typename F>
void for_chunks(int64_t numel, const F& f) {
  const int64_t chunks = (numel + CHUNK - 1) / CHUNK;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * CHUNK;
      f(chunk, begin, std::min(numel, begin + CHUNK) - begin);
    }
  });
}

template <typename out_t>
void store(const float* values, int64_t n, out_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(values[i]);
}

// direction 0: KL(q||p), 1: KL(p||q); -1: no KL.
template <typename out_t>
double sample_weight_kl_impl(const Kernels& k, const float* mu, const float* rho, const float* prior, uint64_t seed,
                             float prior_sigma, int direction, out_t* w, int64_t numel) {
  std::vector<double> chunk_kl(direction < 0 ? 0 : (numel + CHUNK - 1) / CHUNK);
  for_chunks(numel, [&](int64_t chunk, int64_t begin, int64_t n) {
    alignas(64) float buffer[std::is_same<out_t, float>::value ? 1 : CHUNK];
    float* w_float = std::is_same<out_t, float>::value ? reinterpret_cast<float*>(w + begin) : buffer;
    const double kl = k.sample(mu + begin, rho + begin, prior == nullptr ? nullptr : prior + begin, seed, begin, n,
                               prior_sigma, direction, w_float);
    if (!std::is_same<out_t, float>::value) store(w_float, n, w + begin);
    if (direction >= 0) chunk_kl[chunk] = kl;
  });
  double total = 0.0;
  for (const double kl : chunk_kl) total += kl;  // in chunk order: independent of the thread count
  return total;
}

template <typename out_t>
void reparameterization_grad_impl(const Kernels& k, const float* d_w, const float* mu, const float* rho,
                                  const float* prior, uint64_t seed, float g_kl, float prior_sigma, int direction,
                                  float* d_mu, float* d_rho, out_t* w, int64_t numel) {
  for_chunks(numel, [&](int64_t, int64_t begin, int64_t n) {
    alignas(64) float buffer[std::is_same<out_t, float>::value ? 1 : CHUNK];
    float* w_float = w == nullptr                                ? nullptr
                     : std::is_same<out_t, float>::value ? reinterpret_cast<float*>(w + begin)
                                                                 : buffer;
    k.gradient(d_w == nullptr ? nullptr : d_w + begin, mu + begin, rho + begin,
               prior == nullptr ? nullptr : prior + begin, seed, begin, n, g_kl, prior_sigma, direction,
               d_mu + begin, d_rho + begin, w_float);
    if (w != nullptr && !std::is_same<out_t, float>::value) store(w_float, n, w + begin);
  });
}

#define DISPATCH_OUT(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

// out: contiguous float32, filled with the eps of (seed, flat index).
void philox_normal_into(int64_t seed, torch::Tensor out) {
  check_float_vector(out, out.numel(), "out");
  const Kernels& k = active();
  float* data = out.data_ptr<float>();
  for_chunks(out.numel(), [&](int64_t, int64_t begin, int64_t n) { k.eps(seed, begin, n, data + begin); });
}

// w = mu + softplus(rho) * eps (w's dtype); kl: a one-element float32 tensor receiving the summed KL, or empty.
void sample_weight_kl(torch::Tensor mu, torch::Tensor rho, c10::optional<torch::Tensor> prior, int64_t seed,
                      double prior_sigma, int64_t direction, torch::Tensor w, torch::Tensor kl) {
  const int64_t numel = mu.numel();
  check_float_vector(mu, numel, "mu");
  check_float_vector(rho, numel, "rho");
  if (prior) check_float_vector(*prior, numel, "prior_mu");
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.numel() == numel, "w must be a contiguous CPU tensor of ",
              numel, " elements");
  const bool with_kl = kl.numel() > 0;
  TORCH_CHECK(kl.device().is_cpu() && (!with_kl || (kl.scalar_type() == torch::kFloat32 && kl.numel() == 1)),
              "kl must be a float32 CPU tensor of one element (or empty: no KL)");
  const Kernels& k = active();
  advise_huge_pages(w);
  const float* prior_data = prior ? prior->data_ptr<float>() : nullptr;
  const int dir = with_kl ? static_cast<int>(direction) : -1;
  double total = 0.0;
  DISPATCH_OUT(w.scalar_type(), "sample_weight_kl", [&] {
    total = sample_weight_kl_impl<scalar_t>(k, mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data,
                                            static_cast<uint64_t>(seed), static_cast<float>(prior_sigma), dir,
                                            w.data_ptr<scalar_t>(), numel);
  });
  if (with_kl) *kl.data_ptr<float>() = static_cast<float>(total);
}

// d_mu, d_rho (float32) and optionally w again; d_w float32 or absent; g_kl: the KL's upstream gradient (0: none).
void reparameterization_grad(c10::optional<torch::Tensor> d_w, torch::Tensor mu, torch::Tensor rho,
                             c10::optional<torch::Tensor> prior, int64_t seed, double g_kl, double prior_sigma,
                             int64_t direction, torch::Tensor d_mu, torch::Tensor d_rho,
                             c10::optional<torch::Tensor> w) {
  const int64_t numel = mu.numel();
  check_float_vector(mu, numel, "mu");
  check_float_vector(rho, numel, "rho");
  check_float_vector(d_mu, numel, "d_mu");
  check_float_vector(d_rho, numel, "d_rho");
  if (d_w) check_float_vector(*d_w, numel, "d_w");
  if (prior) check_float_vector(*prior, numel, "prior_mu");
  for (const torch::Tensor* out : {&d_mu, &d_rho}) {  // only d_mu may share memory, and only with d_w, exactly
    for (const torch::Tensor* in : {&mu, &rho, &d_mu, &d_rho}) {
      TORCH_CHECK(in == out || !overlaps(*in, *out), "d_mu and d_rho must not overlap mu, rho or each other");
    }
  }
  TORCH_CHECK(!d_w || !overlaps(*d_w, d_rho), "d_rho must not overlap d_w");
  TORCH_CHECK(!d_w || !overlaps(*d_w, d_mu) || d_w->data_ptr() == d_mu.data_ptr(),
              "d_mu must be d_w itself or not overlap it");
  const Kernels& k = active();
  advise_huge_pages(d_mu);
  advise_huge_pages(d_rho);
  const float* d_w_data = d_w ? d_w->data_ptr<float>() : nullptr;
  const float* prior_data = prior ? prior->data_ptr<float>() : nullptr;
  const int dir = g_kl != 0.0 ? static_cast<int>(direction) : -1;
  const uint64_t key = static_cast<uint64_t>(seed);
  if (!w) {
    reparameterization_grad_impl<float>(k, d_w_data, mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data, key,
                                        static_cast<float>(g_kl), static_cast<float>(prior_sigma), dir,
                                        d_mu.data_ptr<float>(), d_rho.data_ptr<float>(), nullptr, numel);
    return;
  }
  TORCH_CHECK(w->device().is_cpu() && w->is_contiguous() && w->numel() == numel,
              "w must be a contiguous CPU tensor of ", numel, " elements");
  advise_huge_pages(*w);
  DISPATCH_OUT(w->scalar_type(), "reparameterization_grad", [&] {
    reparameterization_grad_impl<scalar_t>(k, d_w_data, mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data, key,
                                           static_cast<float>(g_kl), static_cast<float>(prior_sigma), dir,
                                           d_mu.data_ptr<float>(), d_rho.data_ptr<float>(), w->data_ptr<scalar_t>(),
                                           numel);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("CHUNK") = CHUNK;
  m.def("philox_normal_into", &philox_normal_into, "eps of (seed, flat index) into a float32 tensor");
  m.def("sample_weight_kl", &sample_weight_kl, "one pass: weight sample and the summed KL");
  m.def("reparameterization_grad", &reparameterization_grad, "one pass: d_mu, d_rho and optionally w");
  m.def("instruction_set", &instruction_set, "the instruction set the kernels run with");
  m.def("instruction_sets", &instruction_sets, "the instruction sets this CPU supports, best first");
  m.def("set_instruction_set", &set_instruction_set, "run the kernels with one of instruction_sets() ('': best)");
}

#else  // BAYESLAYERS_KERNEL_SECTION: torch-free kernels, compiled once per instruction set

#define ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int LANES = 16;         // Philox counters per block, side by side in vector lanes
constexpr int BLOCK = 4 * LANES;  // elements per block (4 words per counter)

// Constants written as the same float64 expressions as kernels/philox.py, then rounded to float32.
constexpr float TWO_POW_M32 = static_cast<float>(1.0 / 4294967296.0);
constexpr float TWO_POW_M33 = static_cast<float>(1.0 / 8589934592.0);
constexpr float SQRT2 = static_cast<float>(1.4142135623730951);
constexpr float LN2 = static_cast<float>(0.6931471805599453);
constexpr float RADIANS_PER_UNIT = static_cast<float>(3.141592653589793 / 2147483648.0);
constexpr float LOG_C11 = static_cast<float>(2.0 / 11.0), LOG_C9 = static_cast<float>(2.0 / 9.0);
constexpr float LOG_C7 = static_cast<float>(2.0 / 7.0), LOG_C5 = static_cast<float>(2.0 / 5.0);
constexpr float LOG_C3 = static_cast<float>(2.0 / 3.0), LOG_C1 = 2.0f;
constexpr float SIN_C11 = static_cast<float>(-1.0 / 39916800.0), SIN_C9 = static_cast<float>(1.0 / 362880.0);
constexpr float SIN_C7 = static_cast<float>(-1.0 / 5040.0), SIN_C5 = static_cast<float>(1.0 / 120.0);
constexpr float SIN_C3 = static_cast<float>(-1.0 / 6.0);
constexpr float COS_C12 = static_cast<float>(1.0 / 479001600.0), COS_C10 = static_cast<float>(-1.0 / 3628800.0);
constexpr float COS_C8 = static_cast<float>(1.0 / 40320.0), COS_C6 = static_cast<float>(-1.0 / 720.0);
constexpr float COS_C4 = static_cast<float>(1.0 / 24.0), COS_C2 = -0.5f;

ALWAYS_INLINE uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

ALWAYS_INLINE float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// x = 2^exponent m with m in [sqrt(1/2), sqrt(2)), for a positive normal float x (exact): the argument reduction
// of both logs below.
ALWAYS_INLINE float reduce_log_argument(float x, int32_t* exponent) {
  const uint32_t bits = float_bits(x);
  const float mantissa = bits_float((bits & 0x7FFFFFu) | 0x3F800000u);
  const bool high = mantissa > SQRT2;
  *exponent = static_cast<int32_t>(bits >> 23) - (high ? 126 : 127);
  return high ? mantissa * 0.5f : mantissa;
}

ALWAYS_INLINE float log_unit(float u) {  // log of a positive normal float (u in (0, 1] for eps), as philox.log_unit
  int32_t exponent;
  const float mantissa = reduce_log_argument(u, &exponent);
  const float s = (mantissa - 1.0f) / (mantissa + 1.0f);
  const float z = s * s;
  float p = z * LOG_C11 + LOG_C9;
  p = p * z + LOG_C7;
  p = p * z + LOG_C5;
  p = p * z + LOG_C3;
  p = p * z + LOG_C1;
  return static_cast<float>(exponent) * LN2 + s * p;
}

// (r cos theta, r sin theta) of one radius word and one angle word, as philox.box_muller.
ALWAYS_INLINE void box_muller(uint32_t radius_word, uint32_t angle_word, float* first, float* second) {
  const float u = static_cast<float>(radius_word) * TWO_POW_M32 + TWO_POW_M33;
  const float radius = __builtin_sqrtf(-2.0f * log_unit(u));
  const uint32_t quadrant = ((angle_word + 0x20000000u) >> 30) & 3u;  // nearest quarter turn
  const float a = static_cast<float>(static_cast<int32_t>(angle_word - (quadrant << 30))) * RADIANS_PER_UNIT;
  const float z = a * a;
  float ps = z * SIN_C11 + SIN_C9;
  ps = ps * z + SIN_C7;
  ps = ps * z + SIN_C5;
  ps = ps * z + SIN_C3;
  const float sin_a = a + (a * z) * ps;
  float pc = z * COS_C12 + COS_C10;
  pc = pc * z + COS_C8;
  pc = pc * z + COS_C6;
  pc = pc * z + COS_C4;
  pc = pc * z + COS_C2;
  const float cos_a = 1.0f + z * pc;
  // quadrant q rotates by q quarter turns: (cos, sin) -> (-sin, cos) per turn
  const bool odd = (quadrant & 1u) != 0, negate_cos = ((quadrant + 1u) & 2u) != 0, negate_sin = (quadrant & 2u) != 0;
  const float c = odd ? sin_a : cos_a, s = odd ? cos_a : sin_a;
  *first = radius * (negate_cos ? -c : c);
  *second = radius * (negate_sin ? -s : s);
}

// Philox4x32-10 of the counters (first_counter + g, 0, 0, 0), g < LANES, key (k0, k1), as tl.randint4x: word j
// of counter g into w[j][g]. The vector forms take the 32 x 32 -> 64-bit products from vpmuludq on even and odd
// lanes (compilers otherwise widen to 64-bit lanes and use the slower 64-bit multiply).
#if BAYESLAYERS_ISA == 2
ALWAYS_INLINE void mulhilo(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

ALWAYS_INLINE void philox_lanes(uint32_t first_counter, uint32_t k0, uint32_t k1, uint32_t (*__restrict w)[LANES]) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u)), m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first_counter)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_setzero_si512(), c2 = c1, c3 = c1;
  uint32_t key0 = k0, key1 = k1;
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, &hi0, &lo0);
    mulhilo(c2, m1, &hi1, &lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(key0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(key1)));
    c1 = lo1;
    c3 = lo0;
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
  _mm512_store_si512(w[0], c0);
  _mm512_store_si512(w[1], c1);
  _mm512_store_si512(w[2], c2);
  _mm512_store_si512(w[3], c3);
}
#elif BAYESLAYERS_ISA == 1
ALWAYS_INLINE void mulhilo(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

ALWAYS_INLINE void philox_lanes(uint32_t first_counter, uint32_t k0, uint32_t k1, uint32_t (*__restrict w)[LANES]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u)), m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int half = 0; half < LANES; half += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_counter + half)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c1 = _mm256_setzero_si256(), c2 = c1, c3 = c1;
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(c0, m0, &hi0, &lo0);
      mulhilo(c2, m1, &hi1, &lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c1 = lo1;
      c3 = lo0;
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[0] + half), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[1] + half), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[2] + half), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[3] + half), c3);
  }
}
#else
ALWAYS_INLINE void philox_lanes(uint32_t first_counter, uint32_t k0, uint32_t k1, uint32_t (*__restrict w)[LANES]) {
#pragma omp simd
  for (int g = 0; g < LANES; ++g) {
    uint32_t c0 = first_counter + static_cast<uint32_t>(g), c1 = 0, c2 = 0, c3 = 0, key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ key0;
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ key1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    w[0][g] = c0;
    w[1][g] = c1;
    w[2][g] = c2;
    w[3][g] = c3;
  }
}
#endif

// eps of the BLOCK elements from 4 * first_counter on: counter g gives elements 4g .. 4g+3, by Box-Muller of
// words (w0, w1) -> 4g, 4g+1 and (w2, w3) -> 4g+2, 4g+3 (one vector lane per counter).
ALWAYS_INLINE void normal_block(uint32_t first_counter, uint32_t k0, uint32_t k1, float* __restrict out) {
  alignas(64) uint32_t w[4][LANES];
  philox_lanes(first_counter, k0, k1, w);
#pragma omp simd
  for (int g = 0; g < LANES; ++g) {
    float n0, n1, n2, n3;
    box_muller(w[0][g], w[1][g], &n0, &n1);
    box_muller(w[2][g], w[3][g], &n2, &n3);
    out[4 * g] = n0;
    out[4 * g + 1] = n1;
    out[4 * g + 2] = n2;
    out[4 * g + 3] = n3;
  }
}

// a * b + c for the posterior arithmetic (softplus, KL, gradients; eps never uses it): one fused rounding where
// the hardware has FMA (the AVX2 and AVX-512 builds, non-x86 targets), a product and a sum on baseline x86-64
// (a software fmaf there would cost 6x). The AVX2 and AVX-512 builds give the same bits; the baseline x86-64 build
// the same eps and these results within a few ulp.
#if BAYESLAYERS_ISA >= 1 || !defined(__x86_64__)
ALWAYS_INLINE float mul_add(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
ALWAYS_INLINE float mul_add(float a, float b, float c) { return a * b + c; }
#endif

// exp(x) for x <= 0 (clamped at -87: results stay normal floats): Cody-Waite reduction and a degree-7
// polynomial, branch-free. About 1 ulp.
ALWAYS_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = mul_add(x, 1.44269504f, 12582912.0f) - 12582912.0f;  // round to nearest integer
  float r = mul_add(n, -0.693359375f, x);
  r = mul_add(n, 2.12194440e-4f, r);
  float p = mul_add(r, 1.0f / 5040.0f, 1.0f / 720.0f);
  p = mul_add(p, r, 1.0f / 120.0f);
  p = mul_add(p, r, 1.0f / 24.0f);
  p = mul_add(p, r, 1.0f / 6.0f);
  p = mul_add(p, r, 0.5f);
  p = mul_add(p, r, 1.0f);
  p = mul_add(p, r, 1.0f);
  return p * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// log(1 + e) for e in [0, 1], given q = 1 / ((2 + e)(1 + e)): 2 atanh(s) with s = e / (2 + e) = e (1 + e) q in
// [0, 1/3], odd series to s^15 (truncation below 2^-25 relative). About 2 ulp.
ALWAYS_INLINE float log1p_unit(float e, float q) {
  const float s = (e * (1.0f + e)) * q, z = s * s;
  float p = mul_add(z, 2.0f / 15.0f, 2.0f / 13.0f);
  p = mul_add(p, z, 2.0f / 11.0f);
  p = mul_add(p, z, 2.0f / 9.0f);
  p = mul_add(p, z, 2.0f / 7.0f);
  p = mul_add(p, z, 2.0f / 5.0f);
  p = mul_add(p, z, 2.0f / 3.0f);
  p = mul_add(p, z, 2.0f);
  return s * p;
}

// softplus(rho) = max(rho, 0) + log(1 + exp(-|rho|)) (rho itself above 20, as F.softplus) and its derivative
// sigmoid(rho), from one exp and one division (shared by the log and the sigmoid).
ALWAYS_INLINE float softplus_sigmoid(float rho, float* sigmoid) {
  const float e = exp_nonpositive(-__builtin_fabsf(rho)), two_plus_e = 2.0f + e;
  const float q = 1.0f / (two_plus_e * (1.0f + e));
  *sigmoid = (rho >= 0.0f ? 1.0f : e) * (two_plus_e * q);
  return rho > 20.0f ? rho : (rho > 0.0f ? rho : 0.0f) + log1p_unit(e, q);
}

ALWAYS_INLINE float softplus(float rho) {
  float unused;
  return softplus_sigmoid(rho, &unused);
}

// log(x) of a positive normal float without a division: x = 2^k m, m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact),
// log(1 + f) = f - f^2 / 2 + f^3 P(f) (degree-7 least-squares fit, about 2 ulp). Exactly 0 at x = 1.
ALWAYS_INLINE float log_positive(float x) {
  int32_t exponent;
  const float f = reduce_log_argument(x, &exponent) - 1.0f, f2 = f * f;
  float p = mul_add(f, -0.072297103703022f, 0.12446440011262894f);
  p = mul_add(p, f, -0.13166923820972443f);
  p = mul_add(p, f, 0.1424783170223236f);
  p = mul_add(p, f, -0.166270911693573f);
  p = mul_add(p, f, 0.19999174773693085f);
  p = mul_add(p, f, -0.2500067949295044f);
  p = mul_add(p, f, 0.3333335816860199f);
  const float log_m = mul_add(f2 * f, p, mul_add(f2, -0.5f, f));
  return mul_add(static_cast<float>(exponent), LN2, log_m);
}

// sigma / s from sigma and 1 / s, exactly 1 when sigma equals s (so that the KL cancels to 0 there).
ALWAYS_INLINE float sigma_ratio(float sigma, float prior_sigma, float inv_prior_sigma) {
  return sigma == prior_sigma ? 1.0f : sigma * inv_prior_sigma;
}

// KL per element (nats), q = N(mu, sigma^2), p = N(m, s^2), gap = mu - m, as posterior_math.kl_element.
// Written in r = sigma / s and t = r - 1: exactly 0 when the posterior equals the prior.
ALWAYS_INLINE float kl_qp(float gap, float sigma, float prior_sigma, float inv_prior_sigma) {
  const float r = sigma_ratio(sigma, prior_sigma, inv_prior_sigma), t = r - 1.0f, g = gap * inv_prior_sigma;
  return mul_add(0.5f * t, r + 1.0f, mul_add(0.5f * g, g, -log_positive(r)));
}

ALWAYS_INLINE float kl_pq(float gap, float sigma, float prior_sigma, float inv_prior_sigma) {
  const float r = sigma_ratio(sigma, prior_sigma, inv_prior_sigma), t = r - 1.0f, g = gap * inv_prior_sigma;
  const float inv_r2 = 1.0f / (r * r);
  return mul_add(mul_add(0.5f * g, g, -0.5f * t * (r + 1.0f)), inv_r2, log_positive(r));
}

alignas(64) const float ZEROS[BLOCK] = {};  // the prior mean of a zero-mean prior, the d_w of "no weight gradient"

// n <= BLOCK elements: w = mu + softplus(rho) * eps; with KL >= 0 the KL per element into kl (0 beyond n).
template <int KL>
ALWAYS_INLINE void sample_block(const float* __restrict mu, const float* __restrict rho,
                                const float* __restrict prior, const float* __restrict eps, int n,
                                float prior_sigma, float* __restrict w, float* __restrict kl) {
  const float inv_prior_sigma = 1.0f / prior_sigma;
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float sigma = softplus(rho[i]);
    w[i] = mul_add(sigma, eps[i], mu[i]);
    if (KL == 0) kl[i] = kl_qp(mu[i] - prior[i], sigma, prior_sigma, inv_prior_sigma);
    if (KL == 1) kl[i] = kl_pq(mu[i] - prior[i], sigma, prior_sigma, inv_prior_sigma);
  }
  if (KL >= 0)
    for (int i = n; i < BLOCK; ++i) kl[i] = 0.0f;
}

// Elements [begin, begin + n) of one chunk (begin a multiple of 4; mu, rho, prior, w point at element begin).
template <int KL>
double sample_chunk_kl(const float* mu, const float* rho, const float* prior, uint64_t seed, int64_t begin,
                       int64_t n, float prior_sigma, float* w) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  alignas(64) float eps[BLOCK], kl[BLOCK], w_tail[BLOCK];
  alignas(64) double sums[LANES] = {};  // fixed lanes: the same sum on every instruction set
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int count = static_cast<int>(std::min<int64_t>(BLOCK, n - start));
    normal_block(static_cast<uint32_t>((begin + start) / 4), k0, k1, eps);
    const float* p = prior == nullptr ? ZEROS : prior + start;
    if (count == BLOCK) {
      sample_block<KL>(mu + start, rho + start, p, eps, BLOCK, prior_sigma, w + start, kl);
    } else {
      sample_block<KL>(mu + start, rho + start, p, eps, count, prior_sigma, w_tail, kl);
      std::memcpy(w + start, w_tail, count * sizeof(float));
    }
    if (KL >= 0) {
      for (int j = 0; j < BLOCK; j += LANES) {
#pragma omp simd
        for (int l = 0; l < LANES; ++l) sums[l] += static_cast<double>(kl[j + l]);
      }
    }
  }
  double total = 0.0;
  for (int l = 0; l < LANES; ++l) total += sums[l];
  return total;
}

// n <= BLOCK elements: d_mu = d_w + g_kl dKL/dmu, d_rho = (d_w eps + g_kl dKL/dsigma) sigmoid(rho), and
// w = mu + sigma eps when WRITE_W. d_mu may be d_w itself (the in-place gradient): both are not restrict, so
// each d_w[i] is read before d_mu[i] is written.
template <int KL, bool WRITE_W>
ALWAYS_INLINE void gradient_block(const float* d_w, const float* __restrict mu, const float* __restrict rho,
                                  const float* __restrict prior, const float* __restrict eps, int n, float g_kl,
                                  float prior_sigma, float* d_mu, float* __restrict d_rho, float* __restrict w) {
  const float var = prior_sigma * prior_sigma, inv_var = 1.0f / var;
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    float sigmoid;
    const float sigma = softplus_sigmoid(rho[i], &sigmoid);
    float dm = d_w[i], dr = d_w[i] * eps[i];
    if (KL == 0) {  // dKL/dmu = gap / s^2, dKL/dsigma = sigma / s^2 - 1 / sigma
      dm = mul_add(g_kl, (mu[i] - prior[i]) * inv_var, dm);
      dr = mul_add(g_kl, mul_add(sigma, inv_var, -1.0f / sigma), dr);
    }
    if (KL == 1) {  // dKL/dmu = gap / sigma^2, dKL/dsigma = 1 / sigma - (s^2 + gap^2) / sigma^3
      const float gap = mu[i] - prior[i], inv_sigma = 1.0f / sigma, inv_sigma_var = inv_sigma * inv_sigma;
      dm = mul_add(g_kl, gap * inv_sigma_var, dm);
      dr = mul_add(g_kl, inv_sigma - mul_add(gap, gap, var) * inv_sigma_var * inv_sigma, dr);
    }
    d_mu[i] = dm;
    d_rho[i] = dr * sigmoid;
    if (WRITE_W) w[i] = mul_add(sigma, eps[i], mu[i]);
  }
}

template <int KL, bool WRITE_W>
void gradient_chunk_of(const float* d_w, const float* mu, const float* rho, const float* prior, uint64_t seed,
                       int64_t begin, int64_t n, float g_kl, float prior_sigma, float* d_mu, float* d_rho,
                       float* w) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const bool need_eps = d_w != nullptr || WRITE_W;
  alignas(64) float eps[BLOCK], d_mu_tail[BLOCK], d_rho_tail[BLOCK], w_tail[BLOCK];
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int count = static_cast<int>(std::min<int64_t>(BLOCK, n - start));
    if (need_eps) normal_block(static_cast<uint32_t>((begin + start) / 4), k0, k1, eps);
    const float* g = d_w == nullptr ? ZEROS : d_w + start;
    const float* p = prior == nullptr ? ZEROS : prior + start;
    const float* e = need_eps ? eps : ZEROS;
    if (count == BLOCK) {
      gradient_block<KL, WRITE_W>(g, mu + start, rho + start, p, e, BLOCK, g_kl, prior_sigma, d_mu + start,
                                  d_rho + start, WRITE_W ? w + start : w_tail);
    } else {
      gradient_block<KL, WRITE_W>(g, mu + start, rho + start, p, e, count, g_kl, prior_sigma, d_mu_tail, d_rho_tail,
                                  w_tail);
      std::memcpy(d_mu + start, d_mu_tail, count * sizeof(float));
      std::memcpy(d_rho + start, d_rho_tail, count * sizeof(float));
      if (WRITE_W) std::memcpy(w + start, w_tail, count * sizeof(float));
    }
  }
}

// The entry points of one instruction set (see struct Kernels).

void eps_chunk(uint64_t seed, int64_t begin, int64_t n, float* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  alignas(64) float tail[BLOCK];
  for (int64_t start = 0; start < n; start += BLOCK) {
    const uint32_t counter = static_cast<uint32_t>((begin + start) / 4);
    if (n - start >= BLOCK) {
      normal_block(counter, k0, k1, out + start);
    } else {
      normal_block(counter, k0, k1, tail);
      std::memcpy(out + start, tail, (n - start) * sizeof(float));
    }
  }
}

// direction: 0 KL(q||p), 1 KL(p||q), -1 no KL (returns 0).
double sample_chunk(const float* mu, const float* rho, const float* prior, uint64_t seed, int64_t begin, int64_t n,
                    float prior_sigma, int direction, float* w) {
  if (direction == 0) return sample_chunk_kl<0>(mu, rho, prior, seed, begin, n, prior_sigma, w);
  if (direction == 1) return sample_chunk_kl<1>(mu, rho, prior, seed, begin, n, prior_sigma, w);
  return sample_chunk_kl<-1>(mu, rho, prior, seed, begin, n, prior_sigma, w);
}

// direction as sample_chunk (-1: no KL term); d_w and w may be null.
void gradient_chunk(const float* d_w, const float* mu, const float* rho, const float* prior, uint64_t seed,
                    int64_t begin, int64_t n, float g_kl, float prior_sigma, int direction, float* d_mu, float* d_rho,
                    float* w) {
#define GRADIENT_CASE(KL, WRITE_W) \
  return gradient_chunk_of<KL, WRITE_W>(d_w, mu, rho, prior, seed, begin, n, g_kl, prior_sigma, d_mu, d_rho, w)
  if (w != nullptr) {
    if (direction == 0) GRADIENT_CASE(0, true);
    if (direction == 1) GRADIENT_CASE(1, true);
    GRADIENT_CASE(-1, true);
  }
  if (direction == 0) GRADIENT_CASE(0, false);
  if (direction == 1) GRADIENT_CASE(1, false);
  GRADIENT_CASE(-1, false);
#undef GRADIENT_CASE
}

#undef ALWAYS_INLINE

#endif  // BAYESLAYERS_KERNEL_SECTION
