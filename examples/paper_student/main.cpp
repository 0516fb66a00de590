// Example: build the Distil-xLSTM paper-config student (or another width and
// vocabulary), print its parameter counts and time one forward + backward pass
// (next-token cross-entropy through the frozen head) on the CPU.
#include <boost/program_options.hpp>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <vector>

#include "distilx/distilx.hpp"

namespace po = boost::program_options;
using Clock = std::chrono::steady_clock;

namespace {
std::string with_commas(long long v) {
  std::string s = std::to_string(v), out;
  int n = 0;
  for (auto it = s.rbegin(); it != s.rend(); ++it) {
    if (n && n % 3 == 0 && *it != '-') out.insert(out.begin(), ',');
    out.insert(out.begin(), *it);
    ++n;
  }
  return out;
}

int run(const po::variables_map& vm) {
  distilx::StudentConfig c = distilx::StudentConfig::paper(vm["vocab"].as<long>(), vm["dim"].as<long>());
  const long B = vm["batch"].as<long>(), S = vm["seq"].as<long>();
  const auto counts = distilx::Student<float>::count(c);
  std::printf("distilx %s — Distil-xLSTM student (paper config)\n", distilx::version_string());
  std::printf("  blocks %lld (sLSTM at 0, 2, 4), d %lld, vocab %lld, heads %lld, qkv block %lld, FFN %.1f, untied\n",
              (long long)c.num_blocks, (long long)c.embedding_dim, (long long)c.vocab_size, (long long)c.mlstm_num_heads,
              (long long)c.mlstm_qkv_proj_blocksize, c.ffn_proj_factor);
  std::printf("  trainable parameters: %s\n  total parameters:     %s (frozen embedding + head: %s)\n",
              with_commas(counts.trainable).c_str(), with_commas(counts.total()).c_str(),
              with_commas(counts.frozen).c_str());
  auto t0 = Clock::now();
  distilx::Student<float> student(c);
  student.init(vm["seed"].as<unsigned long>());
  const double t_init = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(B * S));
  distilx::Rng rng(1);
  for (auto& t : tokens) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
  // Loss = mean next-token cross-entropy, so the backward pass is a real one.
  t0 = Clock::now();
  student.forward(tokens.data(), B, S);
  std::vector<float> logits(static_cast<std::size_t>(B * S * c.vocab_size));
  student.logits(logits.data());
  double loss = 0;
  const long V = c.vocab_size;
  long count = 0;
  for (long i = 0; i < B * S; ++i) {
    float* z = logits.data() + i * V;
    float mx = z[0];
    for (long v = 1; v < V; ++v) mx = std::max(mx, z[v]);
    double se = 0;
    for (long v = 0; v < V; ++v) se += std::exp(double(z[v] - mx));
    const bool has_target = (i % S) + 1 < S;
    const long tgt = has_target ? tokens[static_cast<std::size_t>(i + 1)] : -1;
    if (has_target) loss -= double(z[tgt] - mx) - std::log(se), ++count;
    for (long v = 0; v < V; ++v) z[v] = has_target ? float(std::exp(double(z[v] - mx)) / se) : 0.f;
    if (has_target) z[tgt] -= 1.f;
  }
  for (auto& g : logits) g /= float(count);
  const double t_fwd = std::chrono::duration<double>(Clock::now() - t0).count();
  t0 = Clock::now();
  student.zero_grad();
  student.backward_from_logits(logits.data());
  const double t_bwd = std::chrono::duration<double>(Clock::now() - t0).count();
  double gn = 0;
  for (distilx::index_t i = 0; i < student.flat_size(); ++i) gn += double(student.grads()[i]) * student.grads()[i];
  std::printf("  init %.2f s; forward %.2f s, backward %.2f s on %ld x %ld tokens (%.0f tokens/s)\n", t_init, t_fwd,
              t_bwd, B, S, double(B * S) / (t_fwd + t_bwd));
  std::printf("  next-token CE at init %.4f (ln V = %.4f), gradient norm %.4g\n", loss / count, std::log(double(V)),
              std::sqrt(gn));
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  po::options_description opts("Usage: paper_student [options]\n\nBuilds the Distil-xLSTM student and runs one training pass.\n\nOptions");
  opts.add_options()("help,h", "show this help and exit")("version", "print the version and exit")(
      "vocab", po::value<long>()->default_value(151936), "vocabulary size (the teacher's)")(
      "dim", po::value<long>()->default_value(1536), "model width (the teacher's hidden size)")(
      "batch", po::value<long>()->default_value(1), "batch size")("seq", po::value<long>()->default_value(64),
                                                                   "sequence length")(
      "seed", po::value<unsigned long>()->default_value(42), "initialisation seed");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "paper_student: " << e.what() << "\nTry 'paper_student --help'.\n";
    return 2;
  }
  if (vm.count("help")) {
    std::cout << opts << "\n";
    return 0;
  }
  if (vm.count("version")) {
    std::cout << "distilx " << distilx::version_string() << "\n";
    return 0;
  }
  try {
    return run(vm);
  } catch (const std::exception& e) {
    std::cerr << "paper_student: " << e.what() << "\n";
    return 1;
  }
}
