// Encode throughput of distilx::Tokenizer (distilx/data/tokenizer.hpp) in MB/s with 1 and 2
// threads, over the tokenizer test corpus repeated to a few MB and cut into ~4 KiB documents.
// Usage: tokenizer_bench [tokenizer.json] [corpus.jsonl] [megabytes]
//   defaults: $DISTILX_TOKENIZER_DIR/qwen3/tokenizer.json, tests/data/tokenizer/corpus.jsonl, 4
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "distilx/data/tokenizer.hpp"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct Result {
  double wall = 0, cpu = 0;
  std::size_t tokens = 0;
};

/// Encodes every document, split round-robin over `threads` threads.
Result run(const distilx::Tokenizer& tok, const std::vector<std::string>& docs, int threads) {
  std::vector<std::size_t> counts(static_cast<std::size_t>(threads), 0);
  const double c0 = process_cpu_seconds();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (std::size_t i = static_cast<std::size_t>(t); i < docs.size(); i += static_cast<std::size_t>(threads))
        counts[static_cast<std::size_t>(t)] += tok.encode(docs[i]).size();
    });
  for (auto& th : pool) th.join();
  Result r;
  r.wall = seconds_since(t0);
  r.cpu = process_cpu_seconds() - c0;
  for (auto c : counts) r.tokens += c;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const char* dir = std::getenv("DISTILX_TOKENIZER_DIR");
  const std::string tok_path = argc > 1 ? argv[1] : std::string(dir ? dir : ".") + "/qwen3/tokenizer.json";
  const std::string corpus_path = argc > 2 ? argv[2] : "tests/data/tokenizer/corpus.jsonl";
  const double megabytes = argc > 3 ? std::atof(argv[3]) : 4.0;

  std::ifstream in(corpus_path);
  if (!in) {
    std::cerr << "cannot open corpus " << corpus_path << "\n";
    return 1;
  }
  std::string text, line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    if (j.is_string()) text += j.get<std::string>() + "\n";  // byte-list cases are skipped
  }
  // Cut the repeated corpus into ~4 KiB documents (at line ends), a typical pre-training chunk.
  std::vector<std::string> docs;
  std::size_t total_bytes = 0;
  const std::size_t target = static_cast<std::size_t>(megabytes * 1e6);
  std::string doc;
  std::size_t pos = 0;
  while (total_bytes < target) {
    const std::size_t nl = text.find('\n', pos);
    doc.append(text, pos, nl + 1 - pos);
    pos = (nl + 1 == text.size()) ? 0 : nl + 1;
    if (doc.size() >= 4096) {
      total_bytes += doc.size();
      docs.push_back(std::move(doc));
      doc.clear();
    }
  }

  const auto t0 = std::chrono::steady_clock::now();
  const distilx::Tokenizer tok = distilx::Tokenizer::from_file(tok_path);
  std::printf("tokenizer %s: loaded in %.2f s, vocab %d\n", tok_path.c_str(), seconds_since(t0), tok.vocab_size());
  std::printf("input: %zu documents, %.2f MB (corpus %s repeated)\n", docs.size(), total_bytes / 1e6,
              corpus_path.c_str());
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  std::printf("hardware threads: %u\n", hw);

  // The first pass fills the word cache (a real corpus keeps missing it on rare words); later
  // passes show the cached steady state. Copies of a Tokenizer share one cache, so the cold
  // pass can only be measured once, first.
  // Wall-clock MB/s is what a caller sees; MB per CPU-second shows the cost per core even
  // when other processes share the machine.
  const double mb = double(total_bytes) / 1e6;
  const Result cold = run(tok, docs, 1);
  std::printf("1 thread,  cold cache: %7.2f MB/s wall, %7.2f MB per CPU-s  (%zu tokens, %.2f bytes/token)\n",
              mb / cold.wall, mb / cold.cpu, cold.tokens, double(total_bytes) / double(cold.tokens));
  for (int threads : {1, 2}) {
    Result best;
    best.wall = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      const Result r = run(tok, docs, threads);
      if (r.wall < best.wall) best = r;
    }
    std::printf("%d thread%s warm cache: %7.2f MB/s wall, %7.2f MB per CPU-s  (best of 3)\n", threads,
                threads == 1 ? ", " : "s,", mb / best.wall, mb / best.cpu);
  }
  return 0;
}
