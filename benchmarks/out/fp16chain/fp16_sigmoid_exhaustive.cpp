#include <immintrin.h>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstring>
typedef __m512h vh;
static inline vh hset1(float x) { return _mm512_set1_ph((_Float16)x); }
static inline vh hsigmoid_pos(vh y) {
  y = _mm512_min_ph(y, hset1(16.0f));
  const vh t = _mm512_mul_ph(y, hset1(-1.44269504f));
  const vh n = _mm512_roundscale_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vh f = _mm512_sub_ph(t, n);
  vh p = hset1(9.618129e-3f);
  p = _mm512_fmadd_ph(p, f, hset1(5.550411e-2f));
  p = _mm512_fmadd_ph(p, f, hset1(2.402265e-1f));
  p = _mm512_fmadd_ph(p, f, hset1(6.931472e-1f));
  p = _mm512_fmadd_ph(p, f, hset1(1.0f));
  const vh e = _mm512_scalef_ph(p, n);
  return _mm512_rcp_ph(_mm512_add_ph(e, hset1(1.0f)));
}
int main() {
  double worst = 0, wy = 0; long n = 0;
  for (uint32_t b = 0; b < 0x7C00; b += 32) {  // every finite fp16 >= 0
    uint16_t in[32]; for (int i = 0; i < 32; ++i) in[i] = (uint16_t)std::min<uint32_t>(b + i, 0x7BFF);
    vh y; std::memcpy(&y, in, 64);
    vh s = hsigmoid_pos(y);
    _Float16 o[32], yy[32]; std::memcpy(o, &s, 64); std::memcpy(yy, &y, 64);
    for (int i = 0; i < 32; ++i) { double ref = 1.0 / (1.0 + std::exp(-(double)yy[i])); double e = std::fabs((double)o[i] - ref); if (e > worst) { worst = e; wy = (double)yy[i]; } ++n; }
  }
  printf("fp16 sigmoid: %ld inputs, max abs err %.3g (%.2f x 2^-11) at y=%g\n", n, worst, worst / std::ldexp(1.0, -11), wy);
}
