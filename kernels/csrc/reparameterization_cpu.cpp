// CPU twins of the Triton kernels: Philox4x32-10 normals, one-pass weight sample + KL, one-pass gradient.
//
// eps follows the RNG contract of kernels/philox.py operation for operation (float32, IEEE-exact operations
// only, compiled without FMA contraction), so a seed gives the same eps bit for bit here, in the Triton
// interpreter and on a GPU. Work is split in fixed chunks of CHUNK elements over ATen's thread pool; the KL is
// summed per chunk in double and the chunk sums are added in order, so results do not depend on the thread
// count. All outputs are allocated by the caller (Python) and written here.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 4096;  // elements per work item (a multiple of 4: whole Philox counters)
constexpr int GROUPS_PER_TILE = 16;  // Philox counters generated together (vectorisable inner loops)

// The hot loops are compiled for AVX2 and for baseline x86-64 and picked at load time (GCC function
// multiversioning); elsewhere for the target's default.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSIONED __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSIONED
#endif

// Constants written as the same float64 expressions as kernels/philox.py, then rounded to float32.
const float TWO_POW_M32 = static_cast<float>(1.0 / 4294967296.0);
const float TWO_POW_M33 = static_cast<float>(1.0 / 8589934592.0);
const float SQRT2 = static_cast<float>(1.4142135623730951);
const float LN2 = static_cast<float>(0.6931471805599453);
const float RADIANS_PER_UNIT = static_cast<float>(3.141592653589793 / 2147483648.0);
const float LOG_C11 = static_cast<float>(2.0 / 11.0), LOG_C9 = static_cast<float>(2.0 / 9.0);
const float LOG_C7 = static_cast<float>(2.0 / 7.0), LOG_C5 = static_cast<float>(2.0 / 5.0);
const float LOG_C3 = static_cast<float>(2.0 / 3.0), LOG_C1 = 2.0f;
const float SIN_C11 = static_cast<float>(-1.0 / 39916800.0), SIN_C9 = static_cast<float>(1.0 / 362880.0);
const float SIN_C7 = static_cast<float>(-1.0 / 5040.0), SIN_C5 = static_cast<float>(1.0 / 120.0);
const float SIN_C3 = static_cast<float>(-1.0 / 6.0);
const float COS_C12 = static_cast<float>(1.0 / 479001600.0), COS_C10 = static_cast<float>(-1.0 / 3628800.0);
const float COS_C8 = static_cast<float>(1.0 / 40320.0), COS_C6 = static_cast<float>(-1.0 / 720.0);
const float COS_C4 = static_cast<float>(1.0 / 24.0), COS_C2 = -0.5f;

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// Philox4x32-10 of the counters (first + g, 0, 0, 0), g < GROUPS_PER_TILE, key (k0, k1), as tl.randint4x;
// lanes side by side so the compiler vectorises the rounds.
inline void philox4x32_10_tile(uint32_t first, uint32_t key0, uint32_t key1, uint32_t c0[], uint32_t c1[],
                               uint32_t c2[], uint32_t c3[]) {
  for (int g = 0; g < GROUPS_PER_TILE; ++g) {
    c0[g] = first + static_cast<uint32_t>(g);
    c1[g] = c2[g] = c3[g] = 0;
  }
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < 10; ++round) {
    for (int g = 0; g < GROUPS_PER_TILE; ++g) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[g];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[g];
      c0[g] = static_cast<uint32_t>(p1 >> 32) ^ c1[g] ^ k0;
      c2[g] = static_cast<uint32_t>(p0 >> 32) ^ c3[g] ^ k1;
      c1[g] = static_cast<uint32_t>(p1);
      c3[g] = static_cast<uint32_t>(p0);
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

inline float log_unit(float u) {  // log of a positive normal float (u in (0, 1] for eps), as philox.log_unit
  const uint32_t bits = float_bits(u);
  int32_t exponent = static_cast<int32_t>(bits >> 23) - 127;
  float mantissa = bits_float((bits & 0x7FFFFFu) | 0x3F800000u);
  const bool high = mantissa > SQRT2;
  mantissa = high ? mantissa * 0.5f : mantissa;
  exponent = high ? exponent + 1 : exponent;
  const float s = (mantissa - 1.0f) / (mantissa + 1.0f);
  const float z = s * s;
  float p = z * LOG_C11 + LOG_C9;
  p = p * z + LOG_C7;
  p = p * z + LOG_C5;
  p = p * z + LOG_C3;
  p = p * z + LOG_C1;
  return static_cast<float>(exponent) * LN2 + s * p;
}

inline void cos_sin_turn(uint32_t word, float* cos_out, float* sin_out) {  // as philox.cos_sin_turn
  const uint32_t quadrant = ((word + 0x20000000u) >> 30) & 3u;
  const float a = static_cast<float>(static_cast<int32_t>(word - (quadrant << 30))) * RADIANS_PER_UNIT;
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
  *cos_out = quadrant == 0 ? cos_a : quadrant == 1 ? -sin_a : quadrant == 2 ? -cos_a : sin_a;
  *sin_out = quadrant == 0 ? sin_a : quadrant == 1 ? cos_a : quadrant == 2 ? -sin_a : -cos_a;
}

inline float box_muller_radius(uint32_t radius_word) {
  const float u = static_cast<float>(radius_word) * TWO_POW_M32 + TWO_POW_M33;
  return std::sqrt(-2.0f * log_unit(u));
}

// eps of the elements [begin, end) (begin a multiple of 4) into out[0 .. end - begin).
MULTIVERSIONED void normals(int64_t seed, int64_t begin, int64_t end, float* out) {
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  constexpr int PAIRS = 2 * GROUPS_PER_TILE;
  uint32_t c0[GROUPS_PER_TILE], c1[GROUPS_PER_TILE], c2[GROUPS_PER_TILE], c3[GROUPS_PER_TILE];
  uint32_t radius_words[PAIRS], angle_words[PAIRS];
  float radius[PAIRS], cos[PAIRS], sin[PAIRS], tile[2 * PAIRS];
  for (int64_t start = begin; start < end; start += 2 * PAIRS) {
    philox4x32_10_tile(static_cast<uint32_t>(start / 4), k0, k1, c0, c1, c2, c3);
    for (int g = 0; g < GROUPS_PER_TILE; ++g) {  // (w0, w1) -> elements 4g, 4g+1; (w2, w3) -> 4g+2, 4g+3
      radius_words[2 * g] = c0[g];
      angle_words[2 * g] = c1[g];
      radius_words[2 * g + 1] = c2[g];
      angle_words[2 * g + 1] = c3[g];
    }
    for (int p = 0; p < PAIRS; ++p) {
      radius[p] = box_muller_radius(radius_words[p]);
      cos_sin_turn(angle_words[p], &cos[p], &sin[p]);
    }
    for (int p = 0; p < PAIRS; ++p) {
      tile[2 * p] = radius[p] * cos[p];
      tile[2 * p + 1] = radius[p] * sin[p];
    }
    const int64_t count = std::min<int64_t>(2 * PAIRS, end - start);
    std::memcpy(out + (start - begin), tile, count * sizeof(float));
  }
}

// exp(x) for x <= 0 (clamped at -87: results stay normal floats): Cody-Waite reduction and a degree-7
// polynomial, branch-free so loops over it vectorise. About 1 ulp.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = r * (1.0f / 5040.0f) + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// log(1 + z) for z > -1 (1 + z a normal float), exact to a few ulps when 1 + z rounds (Goldberg).
inline float log1p_(float z) {
  const float y = 1.0f + z, d = y - 1.0f;
  return d == 0.0f ? z : log_unit(y) * (z / d);
}

// softplus(rho) = log(1 + exp(rho)) (rho itself above 20, as F.softplus) and its derivative sigmoid(rho),
// from one exp.
inline void softplus_sigmoid(float rho, float* softplus, float* sigmoid) {
  const float e = exp_nonpositive(-std::fabs(rho));
  *softplus = rho > 20.0f ? rho : std::max(rho, 0.0f) + log1p_(e);
  *sigmoid = (rho >= 0.0f ? 1.0f : e) / (1.0f + e);
}

inline float softplus(float rho) {
  return rho > 20.0f ? rho : std::max(rho, 0.0f) + log1p_(exp_nonpositive(-std::fabs(rho)));
}

// KL per element (nats), q = N(mu, sigma^2), p = N(m, s^2), gap = mu - m, as posterior_math.kl_element.
// Written in r = sigma / s and t = r - 1 so that it cancels exactly (to 0) when the posterior equals the prior.
inline float kl_qp(float gap, float sigma, float prior_sigma) {
  const float r = sigma / prior_sigma, t = r - 1.0f, g = gap / prior_sigma;
  return 0.5f * t * (r + 1.0f) - log1p_(t) + 0.5f * g * g;
}

inline float kl_pq(float gap, float sigma, float prior_sigma) {
  const float r = sigma / prior_sigma, t = r - 1.0f, g = gap / prior_sigma, r2 = r * r;
  return log1p_(t) - 0.5f * t * (r + 1.0f) / r2 + 0.5f * g * g / r2;
}

void check_float_vector(const torch::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == numel,
              name, " must be a contiguous float32 CPU tensor of ", numel, " elements");
}

// Per-thread scratch of one chunk.
struct Scratch {
  std::vector<float> eps = std::vector<float>(CHUNK), sigma = std::vector<float>(CHUNK),
                     sigmoid = std::vector<float>(CHUNK), w = std::vector<float>(CHUNK),
                     kl = std::vector<float>(CHUNK), zeros = std::vector<float>(CHUNK, 0.0f);
};

// One chunk of n elements: sigma = softplus(rho) and w = mu + sigma * eps (float32); KL per element into kl
// unless it is null.
MULTIVERSIONED void sample_chunk(const float* mu, const float* rho, const float* prior, const float* eps, int64_t n,
                                 float prior_sigma, int direction, float* sigma, float* w, float* kl) {
  for (int64_t i = 0; i < n; ++i) {
    sigma[i] = softplus(rho[i]);
    w[i] = mu[i] + sigma[i] * eps[i];
  }
  if (kl == nullptr) return;
  if (direction == 0) {
    for (int64_t i = 0; i < n; ++i) kl[i] = kl_qp(mu[i] - prior[i], sigma[i], prior_sigma);
  } else {
    for (int64_t i = 0; i < n; ++i) kl[i] = kl_pq(mu[i] - prior[i], sigma[i], prior_sigma);
  }
}

// One chunk: d_mu = d_w + g_kl dKL/dmu, d_rho = (d_w eps + g_kl dKL/dsigma) sigmoid(rho), and w = mu + sigma eps
// unless w is null; d_w may be null (no weight gradient), g_kl may be 0 (no KL term).
MULTIVERSIONED void gradient_chunk(const float* d_w, const float* mu, const float* rho, const float* prior,
                                   const float* eps, int64_t n, float g_kl, float prior_sigma, int direction,
                                   float* sigma, float* sigmoid, float* d_mu, float* d_rho, float* w) {
  for (int64_t i = 0; i < n; ++i) softplus_sigmoid(rho[i], &sigma[i], &sigmoid[i]);
  if (d_w != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      d_mu[i] = d_w[i];
      d_rho[i] = d_w[i] * eps[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) d_mu[i] = d_rho[i] = 0.0f;
  }
  if (g_kl != 0.0f) {
    const float var = prior_sigma * prior_sigma, inv_var = 1.0f / var;
    if (direction == 0) {  // dKL/dmu = gap / s^2, dKL/dsigma = sigma / s^2 - 1 / sigma
      for (int64_t i = 0; i < n; ++i) {
        d_mu[i] += g_kl * ((mu[i] - prior[i]) * inv_var);
        d_rho[i] += g_kl * (sigma[i] * inv_var - 1.0f / sigma[i]);
      }
    } else {  // dKL/dmu = gap / sigma^2, dKL/dsigma = 1 / sigma - (s^2 + gap^2) / sigma^3
      for (int64_t i = 0; i < n; ++i) {
        const float gap = mu[i] - prior[i], inv_sigma_var = 1.0f / (sigma[i] * sigma[i]);
        d_mu[i] += g_kl * (gap * inv_sigma_var);
        d_rho[i] += g_kl * (1.0f / sigma[i] - (var + gap * gap) * inv_sigma_var / sigma[i]);
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) d_rho[i] *= sigmoid[i];
  if (w != nullptr) {
    for (int64_t i = 0; i < n; ++i) w[i] = mu[i] + sigma[i] * eps[i];
  }
}

template <typename out_t>
void store(const float* values, int64_t n, out_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(values[i]);
}

template <typename out_t>
void sample_weight_kl_impl(const float* mu, const float* rho, const float* prior, int64_t seed, float prior_sigma,
                           int direction, out_t* w, double* chunk_kl, int64_t numel) {
  const int64_t chunks = (numel + CHUNK - 1) / CHUNK;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    Scratch scratch;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * CHUNK, n = std::min(numel, begin + CHUNK) - begin;
      normals(seed, begin, begin + n, scratch.eps.data());
      float* w_float = std::is_same<out_t, float>::value ? reinterpret_cast<float*>(w + begin) : scratch.w.data();
      float* kl = chunk_kl == nullptr ? nullptr : scratch.kl.data();
      sample_chunk(mu + begin, rho + begin, prior == nullptr ? scratch.zeros.data() : prior + begin,
                   scratch.eps.data(), n, prior_sigma, direction, scratch.sigma.data(), w_float, kl);
      if (!std::is_same<out_t, float>::value) store(w_float, n, w + begin);
      if (kl != nullptr) {
        double sum = 0.0;
        for (int64_t i = 0; i < n; ++i) sum += kl[i];
        chunk_kl[chunk] = sum;
      }
    }
  });
}

template <typename out_t>
void reparameterization_grad_impl(const float* d_w, const float* mu, const float* rho, const float* prior,
                                  int64_t seed, float g_kl, float prior_sigma, int direction, float* d_mu,
                                  float* d_rho, out_t* w, int64_t numel) {
  const int64_t chunks = (numel + CHUNK - 1) / CHUNK;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    Scratch scratch;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * CHUNK, n = std::min(numel, begin + CHUNK) - begin;
      if (d_w != nullptr || w != nullptr) normals(seed, begin, begin + n, scratch.eps.data());
      float* w_float = w == nullptr ? nullptr
                       : std::is_same<out_t, float>::value ? reinterpret_cast<float*>(w + begin) : scratch.w.data();
      gradient_chunk(d_w == nullptr ? nullptr : d_w + begin, mu + begin, rho + begin,
                     prior == nullptr ? scratch.zeros.data() : prior + begin, scratch.eps.data(), n, g_kl,
                     prior_sigma, direction, scratch.sigma.data(), scratch.sigmoid.data(), d_mu + begin,
                     d_rho + begin, w_float);
      if (w != nullptr && !std::is_same<out_t, float>::value) store(w_float, n, w + begin);
    }
  });
}

#define DISPATCH_OUT(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

// out: contiguous float32, filled with the eps of (seed, flat index).
void philox_normal_into(int64_t seed, torch::Tensor out) {
  check_float_vector(out, out.numel(), "out");
  const int64_t numel = out.numel();
  float* data = out.data_ptr<float>();
  const int64_t chunks = (numel + CHUNK - 1) / CHUNK;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * CHUNK;
      normals(seed, begin, std::min(numel, begin + CHUNK), data + begin);
    }
  });
}

// w = mu + softplus(rho) * eps (w's dtype); chunk_kl: float64 [ceil(numel / CHUNK)] per-chunk KL sums, or empty.
void sample_weight_kl(torch::Tensor mu, torch::Tensor rho, c10::optional<torch::Tensor> prior, int64_t seed,
                      double prior_sigma, int64_t direction, torch::Tensor w, torch::Tensor chunk_kl) {
  const int64_t numel = mu.numel();
  check_float_vector(mu, numel, "mu");
  check_float_vector(rho, numel, "rho");
  if (prior) check_float_vector(*prior, numel, "prior_mu");
  TORCH_CHECK(w.is_contiguous() && w.numel() == numel, "w must be contiguous with ", numel, " elements");
  const bool with_kl = chunk_kl.numel() > 0;
  const int64_t chunks = (numel + CHUNK - 1) / CHUNK;
  TORCH_CHECK(!with_kl || (chunk_kl.scalar_type() == torch::kFloat64 && chunk_kl.numel() == chunks),
              "chunk_kl must be float64 with one element per ", CHUNK, " weight elements");
  const float* prior_data = prior ? prior->data_ptr<float>() : nullptr;
  double* kl_data = with_kl ? chunk_kl.data_ptr<double>() : nullptr;
  DISPATCH_OUT(w.scalar_type(), "sample_weight_kl", [&] {
    sample_weight_kl_impl<scalar_t>(mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data, seed,
                                    static_cast<float>(prior_sigma), static_cast<int>(direction),
                                    w.data_ptr<scalar_t>(), kl_data, numel);
  });
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
  const float* d_w_data = d_w ? d_w->data_ptr<float>() : nullptr;
  const float* prior_data = prior ? prior->data_ptr<float>() : nullptr;
  if (!w) {
    reparameterization_grad_impl<float>(d_w_data, mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data, seed,
                                        static_cast<float>(g_kl), static_cast<float>(prior_sigma),
                                        static_cast<int>(direction), d_mu.data_ptr<float>(),
                                        d_rho.data_ptr<float>(), nullptr, numel);
    return;
  }
  TORCH_CHECK(w->is_contiguous() && w->numel() == numel, "w must be contiguous with ", numel, " elements");
  DISPATCH_OUT(w->scalar_type(), "reparameterization_grad", [&] {
    reparameterization_grad_impl<scalar_t>(d_w_data, mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data, seed,
                                           static_cast<float>(g_kl), static_cast<float>(prior_sigma),
                                           static_cast<int>(direction), d_mu.data_ptr<float>(),
                                           d_rho.data_ptr<float>(), w->data_ptr<scalar_t>(), numel);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("CHUNK") = CHUNK;
  m.def("philox_normal_into", &philox_normal_into, "eps of (seed, flat index) into a float32 tensor");
  m.def("sample_weight_kl", &sample_weight_kl, "one pass: weight sample and per-chunk KL sums");
  m.def("reparameterization_grad", &reparameterization_grad, "one pass: d_mu, d_rho and optionally w");
}
