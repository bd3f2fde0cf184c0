// Times ggml's CPU MUL_MAT (y = W x, W quantized by ggml itself) for the shapes bench/qgemm.py uses,
// with a chosen thread count, in CPU time and wall time: ggml's own test-backend-ops reports only
// wall time at its default thread count, which a shared machine makes useless. Plain ggml graph
// compute (no CPU_REPACK extra buffer), as test-backend-ops runs it.
// Build (bench/qgemm.py does it when MEMKERNELS_GGML_SRC names a built ggml tree):
//   cc -O2 ggml_mulmat.c -I$GGML/include -L$GGML/build/src -lggml -lggml-base -lggml-cpu -lm
// Usage: ggml_mulmat TYPE N K TOKENS THREADS REPS  -> "cpu_us wall_us" (best of REPS)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

static double now(clockid_t c) {
  struct timespec ts;
  clock_gettime(c, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s TYPE N K TOKENS THREADS REPS\n", argv[0]);
    return 2;
  }
  const char* tname = argv[1];
  const int64_t N = atoll(argv[2]), K = atoll(argv[3]), T = atoll(argv[4]);
  const int threads = atoi(argv[5]), reps = atoi(argv[6]);
  enum ggml_type type = GGML_TYPE_COUNT;
  for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
    const char* nm = ggml_type_name((enum ggml_type)t);
    if (nm && strcmp(nm, tname) == 0) type = (enum ggml_type)t;
  }
  if (type == GGML_TYPE_COUNT) {
    fprintf(stderr, "unknown ggml type %s\n", tname);
    return 2;
  }
  ggml_cpu_init();
  const size_t wbytes = ggml_row_size(type, K) * N;
  struct ggml_init_params ip = {wbytes + (size_t)(K * T + N * T) * 4 + (64 << 20), NULL, false};
  struct ggml_context* ctx = ggml_init(ip);
  struct ggml_tensor* a = ggml_new_tensor_2d(ctx, type, K, N);
  struct ggml_tensor* b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, T);
  float* wf = malloc(sizeof(float) * K * N);
  srand(1);
  for (int64_t i = 0; i < K * N; ++i) wf[i] = (float)rand() / RAND_MAX - 0.5f;
  ggml_quantize_chunk(type, wf, a->data, 0, N, K, NULL);
  free(wf);
  for (int64_t i = 0; i < K * T; ++i) ((float*)b->data)[i] = (float)rand() / RAND_MAX - 0.5f;
  struct ggml_tensor* c = ggml_mul_mat(ctx, a, b);
  struct ggml_cgraph* gf = ggml_new_graph(ctx);
  ggml_build_forward_expand(gf, c);
  double best_cpu = 1e30, best_wall = 1e30;
  ggml_graph_compute_with_ctx(ctx, gf, threads);  // warm-up
  for (int r = 0; r < reps; ++r) {
    const double c0 = now(CLOCK_PROCESS_CPUTIME_ID), w0 = now(CLOCK_MONOTONIC);
    ggml_graph_compute_with_ctx(ctx, gf, threads);
    const double c1 = now(CLOCK_PROCESS_CPUTIME_ID), w1 = now(CLOCK_MONOTONIC);
    if (c1 - c0 < best_cpu) best_cpu = c1 - c0;
    if (w1 - w0 < best_wall) best_wall = w1 - w0;
  }
  printf("%.1f %.1f\n", best_cpu * 1e6, best_wall * 1e6);
  ggml_free(ctx);
  return 0;
}
