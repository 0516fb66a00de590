// Teacher forward throughput on the CPU backend: a tiny Llama-family config with random weights
// made in code (no files), forward with logits and all hidden states, reported as tokens/s and
// GFLOP/s (multiply-add = 2; attention counted causally). Usage:
//   teacher_bench [--batch B] [--seq S] [--iters N] [--hidden d] [--layers L] [--vocab V] [--double]
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "distilx/core/rng.hpp"
#include "distilx/teacher/llama.hpp"

namespace {

struct Options {
  long batch = 4, seq = 256, iters = 5, hidden = 256, layers = 4, vocab = 4096;
  bool dbl = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](long& dst) {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "teacher_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      dst = std::strtol(argv[++i], nullptr, 10);
    };
    if (a == "--batch") value(o.batch);
    else if (a == "--seq") value(o.seq);
    else if (a == "--iters") value(o.iters);
    else if (a == "--hidden") value(o.hidden);
    else if (a == "--layers") value(o.layers);
    else if (a == "--vocab") value(o.vocab);
    else if (a == "--double") o.dbl = true;
    else if (a == "--help") {
      std::printf("usage: teacher_bench [--batch B] [--seq S] [--iters N] [--hidden d] [--layers L] [--vocab V] "
                  "[--double]\n");
      std::exit(0);
    } else {
      std::fprintf(stderr, "teacher_bench: unknown option '%s' (try --help)\n", a.c_str());
      std::exit(2);
    }
  }
  return o;
}

template <class T>
int run(const Options& o) {
  using namespace distilx;
  io::HfModelConfig c;
  c.architecture = "Qwen2ForCausalLM";
  c.model_type = "qwen2";
  c.vocab_size = o.vocab;
  c.hidden_size = o.hidden;
  c.intermediate_size = (o.hidden * 8 / 3 + 15) / 16 * 16;  // ~ the SwiGLU 8/3 ratio
  c.num_hidden_layers = o.layers;
  c.num_attention_heads = o.hidden / 32;  // head_dim 32
  c.num_key_value_heads = std::max<long>(1, c.num_attention_heads / 4);
  c.head_dim = 32;
  c.max_position_embeddings = 32768;
  c.qkv_bias = true;
  c.tie_word_embeddings = true;
  c.sliding_window.assign(static_cast<std::size_t>(o.layers), 0);
  LlamaTeacher<T> t(c);
  Rng rng(1);
  t.init_random(rng);

  const index_t B = o.batch, S = o.seq, M = B * S, V = c.vocab_size, d = c.hidden_size;
  std::vector<std::int32_t> ids(static_cast<std::size_t>(M));
  for (auto& x : ids) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V)));
  std::vector<T> logits(static_cast<std::size_t>(M * V));
  std::vector<Tensor<T>> hs;

  // FLOPs per forward: projections + MLP + head (2 per multiply-add) and causal attention
  // (QK^T and PV over S(S+1)/2 pairs per head).
  const double qkvo = double(d) * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads);
  const double mlp = 3.0 * d * c.intermediate_size;
  const double per_token = 2.0 * (c.num_hidden_layers * (qkvo + mlp) + double(d) * V);
  const double attn = 2.0 * 2.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * (double(S) * (S + 1) / 2);
  const double flops = per_token * M + attn * B;

  t.forward(ids.data(), B, S, nullptr, logits.data(), &hs);  // warm-up: workspaces, page faults
  double best = 1e30, total = 0;
  for (long it = 0; it < o.iters; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    t.forward(ids.data(), B, S, nullptr, logits.data(), &hs);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
    total += s;
  }
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  std::printf("teacher forward (%s, %d threads): d %ld, L %ld, heads %ld/%ld x 32, F %ld, V %ld, B %ld x S %ld\n",
              sizeof(T) == 4 ? "float" : "double", threads, o.hidden, o.layers, long(c.num_attention_heads),
              long(c.num_key_value_heads), long(c.intermediate_size), o.vocab, o.batch, o.seq);
  std::printf("  best %.2f ms, mean %.2f ms over %ld runs: %.0f tokens/s (best), %.2f GFLOP/s\n", best * 1e3,
              total / double(o.iters) * 1e3, o.iters, double(M) / best, flops / best * 1e-9);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (o.batch <= 0 || o.seq <= 0 || o.iters <= 0 || o.hidden <= 0 || o.hidden % 32 != 0 || o.layers <= 0 ||
      o.vocab <= 0) {
    std::fprintf(stderr, "teacher_bench: sizes must be positive and --hidden a multiple of 32\n");
    return 2;
  }
  try {
    return o.dbl ? run<double>(o) : run<float>(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "teacher_bench: %s\n", e.what());
    return 1;
  }
}
