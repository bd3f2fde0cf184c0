// Calls flash attention through the installed library and checks it against a direct computation.
#include <cmath>
#include <cstdio>
#include <vector>

#include <memkernels/memkernels.h>

int main() {
  const int S = 5, D = 8;
  std::vector<float> q(S * D), k(S * D), v(S * D), out(S * D, NAN);
  for (int i = 0; i < S * D; ++i) {
    q[i] = std::sin(0.3f * i);
    k[i] = std::cos(0.7f * i);
    v[i] = 0.01f * i;
  }
  using memkernels::DType;
  memkernels::TensorView tq(q.data(), DType::Float32, {1, S, 1, D}), tk(k.data(), DType::Float32, {1, S, 1, D}),
      tv(v.data(), DType::Float32, {1, S, 1, D}), to(out.data(), DType::Float32, {1, S, 1, D});
  memkernels::AttentionOptions opts;
  opts.causal = true;
  memkernels::flash_attention(tq, tk, tv, to, nullptr, opts);
  double max_err = 0;
  for (int i = 0; i < S; ++i) {
    std::vector<double> p(i + 1);
    double m = -1e300, l = 0;
    for (int j = 0; j <= i; ++j) {
      double s = 0;
      for (int d = 0; d < D; ++d) s += double(q[i * D + d]) * k[j * D + d];
      p[j] = s / std::sqrt(double(D));
      m = std::max(m, p[j]);
    }
    for (int j = 0; j <= i; ++j) l += (p[j] = std::exp(p[j] - m));
    for (int d = 0; d < D; ++d) {
      double o = 0;
      for (int j = 0; j <= i; ++j) o += p[j] / l * v[j * D + d];
      max_err = std::max(max_err, std::abs(o - out[i * D + d]));
    }
  }
  std::printf("%s", memkernels::info_string().c_str());
  std::printf("consumer: flash_attention max error %.3g\n", max_err);
  return max_err < 1e-5 ? 0 : 1;
}
