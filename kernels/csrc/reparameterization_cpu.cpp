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
#include <vector>

namespace {

constexpr int64_t CHUNK = 4096;  // elements per work item (a multiple of 4: whole Philox counters)
constexpr int64_t GROUPS_PER_TILE = 16;  // Philox counters generated together (vectorisable inner loops)

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

// Philox4x32-10 of counter (counter, 0, 0, 0) and key (k0, k1), as tl.randint4x.
inline void philox4x32_10(uint32_t counter, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

inline float log_unit(float u) {  // log of u in (0, 1], as philox.log_unit
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

inline void box_muller(uint32_t radius_word, uint32_t angle_word, float* first, float* second) {
  const float u = static_cast<float>(radius_word) * TWO_POW_M32 + TWO_POW_M33;
  const float radius = std::sqrt(-2.0f * log_unit(u));
  float cos, sin;
  cos_sin_turn(angle_word, &cos, &sin);
  *first = radius * cos;
  *second = radius * sin;
}

// eps of the elements [begin, end) (begin a multiple of 4) into out[0 .. end - begin).
void normals(int64_t seed, int64_t begin, int64_t end, float* out) {
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  float tile[4 * GROUPS_PER_TILE];
  for (int64_t start = begin; start < end; start += 4 * GROUPS_PER_TILE) {
    const int64_t first_group = start / 4;
    for (int64_t g = 0; g < GROUPS_PER_TILE; ++g) {
      uint32_t words[4];
      philox4x32_10(static_cast<uint32_t>(first_group + g), k0, k1, words);
      box_muller(words[0], words[1], &tile[4 * g], &tile[4 * g + 1]);
      box_muller(words[2], words[3], &tile[4 * g + 2], &tile[4 * g + 3]);
    }
    const int64_t count = std::min<int64_t>(4 * GROUPS_PER_TILE, end - start);
    std::memcpy(out + (start - begin), tile, count * sizeof(float));
  }
}

inline float softplus(float rho) {
  return rho > 20.0f ? rho : std::max(rho, 0.0f) + std::log1p(std::exp(-std::fabs(rho)));
}

inline float sigmoid(float rho) { return 1.0f / (1.0f + std::exp(-rho)); }

// KL per element (nats): 0 = KL(q || p), 1 = KL(p || q); gap = mu - prior mean, as posterior_math.kl_element.
// Written in r = sigma / s and t = r - 1 so that it cancels exactly (to 0) when the posterior equals the prior.
inline float kl_element(float gap, float sigma, float prior_sigma, int64_t direction) {
  const float r = sigma / prior_sigma, t = r - 1.0f, g = gap / prior_sigma;
  const float log_r = std::log1p(t);
  if (direction == 0) return 0.5f * t * (r + 1.0f) - log_r + 0.5f * g * g;
  const float r2 = r * r;
  return log_r - 0.5f * t * (r + 1.0f) / r2 + 0.5f * g * g / r2;
}

inline void kl_element_grads(float gap, float sigma, float prior_var, int64_t direction, float* g_mu, float* g_sigma) {
  if (direction == 0) {
    *g_mu = gap / prior_var;
    *g_sigma = sigma / prior_var - 1.0f / sigma;
  } else {
    const float inv_var = 1.0f / (sigma * sigma);
    *g_mu = gap * inv_var;
    *g_sigma = 1.0f / sigma - (prior_var + gap * gap) * inv_var / sigma;
  }
}

void check_float_vector(const torch::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == numel,
              name, " must be a contiguous float32 CPU tensor of ", numel, " elements");
}

template <typename out_t>
void sample_weight_kl_impl(const float* mu, const float* rho, const float* prior, int64_t seed, float prior_sigma,
                           int64_t direction, out_t* w, double* chunk_kl, int64_t numel) {
  const int64_t chunks = (numel + CHUNK - 1) / CHUNK;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> eps(CHUNK);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * CHUNK, end = std::min(numel, begin + CHUNK);
      normals(seed, begin, end, eps.data());
      double kl = 0.0;
      for (int64_t i = begin; i < end; ++i) {
        const float sigma = softplus(rho[i]);
        w[i] = static_cast<out_t>(mu[i] + sigma * eps[i - begin]);
        if (chunk_kl != nullptr) {
          const float gap = prior == nullptr ? mu[i] : mu[i] - prior[i];
          kl += kl_element(gap, sigma, prior_sigma, direction);
        }
      }
      if (chunk_kl != nullptr) chunk_kl[chunk] = kl;
    }
  });
}

template <typename out_t>
void reparameterization_grad_impl(const float* d_w, const float* mu, const float* rho, const float* prior,
                                  int64_t seed, float g_kl, float prior_var, int64_t direction, float* d_mu,
                                  float* d_rho, out_t* w, int64_t numel) {
  const int64_t chunks = (numel + CHUNK - 1) / CHUNK;
  const bool needs_eps = d_w != nullptr || w != nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> eps(CHUNK);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * CHUNK, end = std::min(numel, begin + CHUNK);
      if (needs_eps) normals(seed, begin, end, eps.data());
      for (int64_t i = begin; i < end; ++i) {
        const float sigma = softplus(rho[i]);
        float dm = 0.0f, ds = 0.0f;
        if (d_w != nullptr) {
          dm = d_w[i];
          ds = d_w[i] * eps[i - begin];
        }
        if (w != nullptr) w[i] = static_cast<out_t>(mu[i] + sigma * eps[i - begin]);
        if (g_kl != 0.0f) {
          float g_mu, g_sigma;
          const float gap = prior == nullptr ? mu[i] : mu[i] - prior[i];
          kl_element_grads(gap, sigma, prior_var, direction, &g_mu, &g_sigma);
          dm += g_kl * g_mu;
          ds += g_kl * g_sigma;
        }
        d_mu[i] = dm;
        d_rho[i] = ds * sigmoid(rho[i]);
      }
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
  TORCH_CHECK(!with_kl || (chunk_kl.scalar_type() == torch::kFloat64 && chunk_kl.numel() == (numel + CHUNK - 1) / CHUNK),
              "chunk_kl must be float64 with one element per ", CHUNK, " weight elements");
  const float* prior_data = prior ? prior->data_ptr<float>() : nullptr;
  double* kl_data = with_kl ? chunk_kl.data_ptr<double>() : nullptr;
  DISPATCH_OUT(w.scalar_type(), "sample_weight_kl", [&] {
    sample_weight_kl_impl<scalar_t>(mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data, seed,
                                    static_cast<float>(prior_sigma), direction, w.data_ptr<scalar_t>(), kl_data,
                                    numel);
  });
}

// d_mu, d_rho (float32) and optionally w again; d_w float32 or absent; g_kl: the KL's upstream gradient (0: none).
void reparameterization_grad(c10::optional<torch::Tensor> d_w, torch::Tensor mu, torch::Tensor rho,
                             c10::optional<torch::Tensor> prior, int64_t seed, double g_kl, double prior_sigma,
                             int64_t direction, torch::Tensor d_mu, torch::Tensor d_rho, c10::optional<torch::Tensor> w) {
  const int64_t numel = mu.numel();
  check_float_vector(mu, numel, "mu");
  check_float_vector(rho, numel, "rho");
  check_float_vector(d_mu, numel, "d_mu");
  check_float_vector(d_rho, numel, "d_rho");
  if (d_w) check_float_vector(*d_w, numel, "d_w");
  if (prior) check_float_vector(*prior, numel, "prior_mu");
  const float* d_w_data = d_w ? d_w->data_ptr<float>() : nullptr;
  const float* prior_data = prior ? prior->data_ptr<float>() : nullptr;
  const float prior_var = static_cast<float>(prior_sigma * prior_sigma);
  if (!w) {
    reparameterization_grad_impl<float>(d_w_data, mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data, seed,
                                        static_cast<float>(g_kl), prior_var, direction, d_mu.data_ptr<float>(),
                                        d_rho.data_ptr<float>(), nullptr, numel);
    return;
  }
  TORCH_CHECK(w->is_contiguous() && w->numel() == numel, "w must be contiguous with ", numel, " elements");
  DISPATCH_OUT(w->scalar_type(), "reparameterization_grad", [&] {
    reparameterization_grad_impl<scalar_t>(d_w_data, mu.data_ptr<float>(), rho.data_ptr<float>(), prior_data, seed,
                                           static_cast<float>(g_kl), prior_var, direction, d_mu.data_ptr<float>(),
                                           d_rho.data_ptr<float>(), w->data_ptr<scalar_t>(), numel);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("CHUNK") = CHUNK;
  m.def("philox_normal_into", &philox_normal_into, "eps of (seed, flat index) into a float32 tensor");
  m.def("sample_weight_kl", &sample_weight_kl, "one pass: weight sample and per-chunk KL sums");
  m.def("reparameterization_grad", &reparameterization_grad, "one pass: d_mu, d_rho and optionally w");
}
