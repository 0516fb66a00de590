// Tests of the frozen teacher (teacher/llama.hpp, io/hf_config.hpp, ops/rope.hpp, ops/attention.hpp):
// parity with Hugging Face transformers on the committed fixtures of tests/data/teacher (logits and
// every hidden state, padding positions excluded), RoPE and tiled attention against naive versions
// written here, and bad model directories refused with messages naming file, tensor and expectation.
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/core/rng.hpp"
#include "distilx/io/hf_config.hpp"
#include "distilx/io/safetensors.hpp"
#include "distilx/ops/attention.hpp"
#include "distilx/ops/rope.hpp"
#include "distilx/teacher/llama.hpp"
#include "distilx/teacher/teacher.hpp"

#ifndef DISTILX_TEST_DATA_DIR
#define DISTILX_TEST_DATA_DIR "tests/data"
#endif

namespace fs = std::filesystem;
using namespace distilx;

namespace {

const fs::path kTeacherData = fs::path(DISTILX_TEST_DATA_DIR) / "teacher";
const char* const kFixtures[] = {"qwen2_tied", "llama3_untied", "llama_sharded_bias", "mistral_window"};

fs::path hf_dir(const std::string& fixture) { return kTeacherData / fixture / "hf"; }

/// A fresh temporary directory, removed with everything in it at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("distilx_teacher_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
};

/// Copies a fixture's HF directory into a new temporary directory.
TempDir copy_fixture(const std::string& fixture) {
  TempDir t;
  for (const auto& e : fs::directory_iterator(hf_dir(fixture))) fs::copy(e.path(), t.path / e.path().filename());
  return t;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}
void write_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}
void write_json(const fs::path& p, const nlohmann::json& j) { write_text(p, j.dump(2)); }

/// Runs f, expects an exception of type E whose message contains every one of `parts`.
template <class E, class F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    const std::string msg = e.what();
    BOOST_TEST_MESSAGE("refused as expected: " << msg);
    for (const auto& p : parts) BOOST_TEST(msg.find(p) != std::string::npos, "message '" << msg << "' lacks '" << p << "'");
  }
  BOOST_TEST(thrown, "no exception thrown");
}

/// The HF reference outputs of one fixture.
struct Reference {
  io::SafetensorsFile file;
  explicit Reference(const std::string& fixture) : file((kTeacherData / fixture / "reference.safetensors").string()) {}
  bool has(const std::string& n) const { return file.contains(n); }
  std::vector<float> get(const std::string& n) const { return file.read<float>(n); }
  const Shape& shape(const std::string& n) const { return file.info(n).shape; }
  std::vector<std::string> cases() const {
    std::vector<std::string> out;
    std::stringstream ss(file.metadata().at("cases"));
    for (std::string c; std::getline(ss, c, ',');) out.push_back(c);
    return out;
  }
};

/// ||a - b|| / ||b|| over the positions whose mask is 1 (all positions when mask is empty);
/// both are [B*S, inner].
template <class A>
double masked_relative_error(const A* a, const std::vector<float>& b, const std::vector<std::uint8_t>& mask,
                             index_t rows, index_t inner) {
  std::vector<double> x, y;
  for (index_t r = 0; r < rows; ++r) {
    if (!mask.empty() && !mask[static_cast<std::size_t>(r)]) continue;
    for (index_t i = 0; i < inner; ++i) {
      x.push_back(double(a[r * inner + i]));
      y.push_back(double(b[static_cast<std::size_t>(r * inner + i)]));
    }
  }
  return relative_error(x.data(), y.data(), static_cast<index_t>(x.size()));
}

struct ParityResult {
  double logits = 0, hidden = 0;
};

/// Runs the C++ teacher on every case of the fixture and returns the worst relative errors.
template <class T>
ParityResult check_parity(const std::string& fixture, double tol, index_t q_tile = 64) {
  auto teacher = LlamaTeacher<T>::from_pretrained(hf_dir(fixture).string());
  teacher.set_attention_tile(q_tile);
  const Reference ref(fixture);
  ParityResult worst;
  for (const std::string& c : ref.cases()) {
    const Shape ids_shape = ref.shape(c + ".input_ids");
    const index_t B = ids_shape[0], S = ids_shape[1], V = teacher.vocab_size(), d = teacher.hidden_size();
    std::vector<std::int32_t> ids, pos;
    for (float v : ref.get(c + ".input_ids")) ids.push_back(static_cast<std::int32_t>(v));
    std::vector<std::uint8_t> mask;
    if (ref.has(c + ".attention_mask"))
      for (float v : ref.get(c + ".attention_mask")) mask.push_back(v != 0.0f ? 1 : 0);
    if (ref.has(c + ".position_ids"))
      for (float v : ref.get(c + ".position_ids")) pos.push_back(static_cast<std::int32_t>(v));

    std::vector<T> logits(static_cast<std::size_t>(B * S * V));
    std::vector<Tensor<T>> hs;
    teacher.forward(ids.data(), B, S, mask.empty() ? nullptr : mask.data(), logits.data(), &hs,
                    pos.empty() ? nullptr : pos.data());

    const double el = masked_relative_error(logits.data(), ref.get(c + ".logits"), mask, B * S, V);
    BOOST_TEST(el < tol, fixture << "/" << c << ": logits relative error " << el);
    worst.logits = std::max(worst.logits, el);
    BOOST_TEST_REQUIRE(static_cast<index_t>(hs.size()) == teacher.num_layers() + 1);
    for (std::size_t i = 0; i < hs.size(); ++i) {
      const std::string name = c + ".hidden_states." + std::to_string(i);
      BOOST_TEST_REQUIRE(ref.has(name), "reference lacks " << name);
      BOOST_TEST((hs[i].shape() == Shape{B, S, d}));
      const double eh = masked_relative_error(hs[i].data(), ref.get(name), mask, B * S, d);
      BOOST_TEST(eh < tol, fixture << "/" << name << ": relative error " << eh);
      worst.hidden = std::max(worst.hidden, eh);
    }
    BOOST_TEST(!ref.has(c + ".hidden_states." + std::to_string(hs.size())), "HF has more hidden states than L+1");
  }
  BOOST_TEST_MESSAGE(fixture << " (" << (sizeof(T) == 4 ? "float" : "double") << ", q_tile " << q_tile
                             << "): max relative error logits " << worst.logits << ", hidden states " << worst.hidden);
  return worst;
}

/// Every tensor of a fixture's weights, as float, with its shape.
std::map<std::string, std::pair<Shape, std::vector<float>>> read_all_weights(const std::string& fixture) {
  const io::HfWeights w(hf_dir(fixture).string());
  std::map<std::string, std::pair<Shape, std::vector<float>>> out;
  for (const auto& n : w.names()) {
    const Shape s = w.info(n).shape;
    std::vector<float> v(static_cast<std::size_t>(numel(s)));
    w.read<float>(n, v.data(), s);
    out[n] = {s, std::move(v)};
  }
  return out;
}

// ---- naive references --------------------------------------------------------------------------

/// HF's rotate_half application written literally: y = x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin).
std::vector<double> naive_rope(const std::vector<double>& x, const std::vector<std::int32_t>& pos,
                               const std::vector<double>& inv_freq, index_t M, index_t H, index_t D) {
  std::vector<double> y(x.size());
  const index_t half = D / 2;
  for (index_t m = 0; m < M; ++m)
    for (index_t h = 0; h < H; ++h) {
      const double* xv = &x[static_cast<std::size_t>((m * H + h) * D)];
      std::vector<double> cosv(D), sinv(D), rot(D);
      for (index_t i = 0; i < D; ++i) {
        const double a = double(float(pos[m]) * float(inv_freq[i % half]));
        cosv[i] = std::cos(a);
        sinv[i] = std::sin(a);
        rot[i] = i < half ? -xv[i + half] : xv[i - half];
      }
      for (index_t i = 0; i < D; ++i) y[static_cast<std::size_t>((m * H + h) * D + i)] = xv[i] * cosv[i] + rot[i] * sinv[i];
    }
  return y;
}

/// Full-matrix attention in double: scores for all keys, mask, softmax, weighted sum (repeat_kv for GQA).
std::vector<double> naive_attention(const std::vector<double>& q, const std::vector<double>& k,
                                    const std::vector<double>& v, const std::vector<std::uint8_t>& mask, index_t B,
                                    index_t S, index_t NH, index_t NKV, index_t DH, index_t window, double scale) {
  std::vector<double> out(static_cast<std::size_t>(B * S * NH * DH), 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < NH; ++h) {
      const index_t g = h / (NH / NKV);
      for (index_t i = 0; i < S; ++i) {
        std::vector<double> s(static_cast<std::size_t>(S), -INFINITY);
        double mx = -INFINITY;
        for (index_t j = 0; j < S; ++j) {
          const bool ok = j <= i && (window == 0 || i - j < window) && (mask.empty() || mask[b * S + j]);
          if (!ok) continue;
          double dot = 0;
          for (index_t e = 0; e < DH; ++e)
            dot += q[((b * S + i) * NH + h) * DH + e] * k[((b * S + j) * NKV + g) * DH + e];
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        if (mx == -INFINITY) continue;  // fully masked row: zeros
        double sum = 0;
        for (auto& x : s) sum += (x = std::isinf(x) ? 0.0 : std::exp(x - mx));
        for (index_t j = 0; j < S; ++j)
          for (index_t e = 0; e < DH; ++e)
            out[((b * S + i) * NH + h) * DH + e] += s[j] / sum * v[((b * S + j) * NKV + g) * DH + e];
      }
    }
  return out;
}

template <class T>
std::vector<T> random_vec(Rng& rng, index_t n, double sd = 1.0) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = static_cast<T>(rng.normal(0.0, sd));
  return v;
}

ops::CausalAttentionShape attention_shape(index_t B, index_t S, index_t NH, index_t NKV, index_t DH, index_t window,
                                          index_t q_tile) {
  ops::CausalAttentionShape sh;
  sh.B = B;
  sh.S = S;
  sh.NH = NH;
  sh.NKV = NKV;
  sh.DH = DH;
  sh.window = window;
  sh.q_tile = q_tile;
  return sh;
}

/// Runs causal_attention_forward in T and returns the max abs error against the double naive version.
template <class T>
double attention_error(index_t B, index_t S, index_t NH, index_t NKV, index_t DH, index_t window, index_t q_tile,
                       const std::vector<std::uint8_t>& mask, std::uint64_t seed) {
  Rng rng(seed);
  auto q = random_vec<T>(rng, B * S * NH * DH), k = random_vec<T>(rng, B * S * NKV * DH),
       v = random_vec<T>(rng, B * S * NKV * DH);
  const ops::CausalAttentionShape sh = attention_shape(B, S, NH, NKV, DH, window, q_tile);
  const double scale = 1.0 / std::sqrt(double(DH));
  std::vector<T> out(q.size(), T(-7)), scratch(static_cast<std::size_t>(ops::causal_attention_scratch_size(cpu{}, sh)));
  ops::causal_attention_forward(cpu{}, out.data(), q.data(), k.data(), v.data(), mask.empty() ? nullptr : mask.data(),
                                sh, T(scale), scratch.data(), static_cast<index_t>(scratch.size()));
  const std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end()), vd(v.begin(), v.end());
  const auto ref = naive_attention(qd, kd, vd, mask, B, S, NH, NKV, DH, window, scale);
  double err = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) err = std::max(err, std::abs(double(out[i]) - ref[i]));
  return err;
}

/// A config.json text for configuration tests (tiny Llama by default).
nlohmann::json base_config() {
  return nlohmann::json{{"architectures", {"LlamaForCausalLM"}},
                        {"model_type", "llama"},
                        {"vocab_size", 64},
                        {"hidden_size", 32},
                        {"intermediate_size", 48},
                        {"num_hidden_layers", 2},
                        {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},
                        {"rms_norm_eps", 1e-5},
                        {"max_position_embeddings", 128},
                        {"rope_theta", 10000.0},
                        {"tie_word_embeddings", false}};
}

}  // namespace

BOOST_AUTO_TEST_SUITE(teacher)

// ---- Hugging Face parity --------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(hf_parity_float) {
  for (const char* f : kFixtures) check_parity<float>(f, 1e-4);
}

BOOST_AUTO_TEST_CASE(hf_parity_double_and_small_tiles) {
  // Double compute against float32 HF outputs: the difference is HF's own rounding.
  for (const char* f : kFixtures) check_parity<double>(f, 1e-4);
  // Query tiles smaller than the sequence (several tiles, windows crossing tile borders).
  check_parity<float>("qwen2_tied", 1e-4, 5);
  check_parity<float>("mistral_window", 1e-4, 3);
}

BOOST_AUTO_TEST_CASE(hf_directory_contents) {
  const auto q = io::load_hf_config(hf_dir("qwen2_tied").string());
  BOOST_TEST(q.architecture == "Qwen2ForCausalLM");
  BOOST_TEST(q.tie_word_embeddings);
  BOOST_TEST(q.qkv_bias);
  BOOST_TEST(!q.o_bias);
  BOOST_TEST(q.num_key_value_heads == 2);
  BOOST_TEST(q.head_dim == 8);
  const auto l = io::load_hf_config(hf_dir("llama3_untied").string());
  BOOST_TEST((l.rope.kind == ops::RopeKind::llama3));
  BOOST_TEST(l.head_dim == 16);  // explicit head_dim, not hidden_size / heads = 12
  BOOST_TEST(l.rope.original_max_position_embeddings == 64.0);
  BOOST_TEST((l.eos_token_ids == std::vector<std::int64_t>{2, 3}));
  BOOST_TEST(!l.tie_word_embeddings);
  const auto m = io::load_hf_config(hf_dir("mistral_window").string());
  BOOST_TEST((m.sliding_window == std::vector<index_t>{6, 6}));
  const io::HfWeights sharded(hf_dir("llama_sharded_bias").string());
  BOOST_TEST(sharded.num_files() > 1u);
  const auto t = LlamaTeacher<float>::from_pretrained(hf_dir("llama_sharded_bias").string());
  BOOST_TEST(t.config().o_bias);
  BOOST_TEST(t.config().mlp_bias);
  // The tied head is the embedding itself.
  const auto tq = LlamaTeacher<float>::from_pretrained(hf_dir("qwen2_tied").string());
  BOOST_TEST(tq.lm_head().data() == tq.embedding().data());
  static_assert(is_teacher_v<LlamaTeacher<double>>);
  static_assert(!is_teacher_v<int>);
}

BOOST_AUTO_TEST_CASE(bf16_and_f16_weights_convert) {
  // The same model stored in BF16 / F16 loads into float and equals a float model whose weights were
  // rounded the same way: conversion, not tolerance, is checked.
  const auto weights = read_all_weights("qwen2_tied");
  for (io::DType dt : {io::DType::bf16, io::DType::f16}) {
    TempDir dir;
    fs::copy(hf_dir("qwen2_tied") / "config.json", dir.path / "config.json");
    io::SafetensorsWriter w;
    for (const auto& [name, sv] : weights) w.add_as<float>(name, dt, sv.first, sv.second.data());
    w.write((dir.path / "model.safetensors").string());
    auto low = LlamaTeacher<float>::from_pretrained(dir.str());
    auto ref = LlamaTeacher<float>::from_pretrained(hf_dir("qwen2_tied").string());
    ref.for_each_parameter([&](const std::string&, Tensor<float>& t) {
      for (auto& x : t)
        x = dt == io::DType::bf16 ? io::bf16_to_float(io::double_to_bf16(x)) : io::f16_to_float(io::double_to_f16(x));
    });
    const std::vector<std::int32_t> ids = {5, 17, 3, 99, 42, 7, 150, 8};
    std::vector<float> a(ids.size() * 160), b(a.size());
    low.forward(ids.data(), 2, 4, nullptr, a.data(), nullptr);
    ref.forward(ids.data(), 2, 4, nullptr, b.data(), nullptr);
    BOOST_TEST(relative_error(a.data(), b.data(), index_t(a.size())) == 0.0);
  }
}

BOOST_AUTO_TEST_CASE(padding_and_positions) {
  auto t = LlamaTeacher<double>::from_pretrained(hf_dir("llama3_untied").string());
  // A right-padded row equals the same row alone; a left-padded row with generate()-style positions too.
  const std::vector<std::int32_t> row = {10, 20, 30, 40, 50};
  std::vector<double> alone(5 * 128);
  t.forward(row.data(), 1, 5, nullptr, alone.data(), nullptr);
  const std::vector<std::uint8_t> mask = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1};
  std::vector<std::int32_t> pos15(15);
  hf_generate_position_ids(mask.data(), 1, 15, pos15.data());
  BOOST_TEST(pos15[0] == 0);
  BOOST_TEST(pos15[4] == 4);
  BOOST_TEST(pos15[5] == 1);  // padding gets 1, as generate() fills it
  BOOST_TEST(pos15[10] == 5);
  // Batch of 2 x 8: row 0 right-padded [10..50, pad x3], row 1 left-padded [pad x3, 10..50].
  const std::vector<std::int32_t> ids2 = {10, 20, 30, 40, 50, 0, 0, 0, 0, 0, 0, 10, 20, 30, 40, 50};
  const std::vector<std::uint8_t> mask2 = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1};
  std::vector<std::int32_t> pos2(16);
  hf_generate_position_ids(mask2.data(), 2, 8, pos2.data());
  std::vector<double> out(16 * 128);
  t.forward(ids2.data(), 2, 8, mask2.data(), out.data(), nullptr, pos2.data());
  double e_right = 0, e_left = 0;
  for (index_t s = 0; s < 5; ++s)
    for (index_t v = 0; v < 128; ++v) {
      e_right = std::max(e_right, std::abs(out[s * 128 + v] - alone[s * 128 + v]));
      e_left = std::max(e_left, std::abs(out[(8 + 3 + s) * 128 + v] - alone[s * 128 + v]));
    }
  BOOST_TEST(e_right < 1e-10);
  BOOST_TEST(e_left < 1e-10);
  // Left padding with the default (arange) positions shifts every real token by 3; RoPE scores
  // depend only on position differences, so the row is unchanged up to rounding (HF behaves alike).
  t.forward(ids2.data(), 2, 8, mask2.data(), out.data(), nullptr);
  double e_shift = 0;
  for (index_t v = 0; v < 128; ++v) e_shift = std::max(e_shift, std::abs(out[(8 + 4) * 128 + v] - alone[128 + v]));
  BOOST_TEST(e_shift < 1e-6);
  // position_ids are used: explicit 0..S-1 equals the default, stretched positions differ.
  std::vector<std::int32_t> ar(5), stretched(5);
  for (int i = 0; i < 5; ++i) ar[i] = i, stretched[i] = 3 * i;
  std::vector<double> with_ar(5 * 128), with_st(5 * 128);
  t.forward(row.data(), 1, 5, nullptr, with_ar.data(), nullptr, ar.data());
  t.forward(row.data(), 1, 5, nullptr, with_st.data(), nullptr, stretched.data());
  BOOST_TEST(relative_error(with_ar.data(), alone.data(), 5 * 128) == 0.0);
  BOOST_TEST(relative_error(with_st.data(), alone.data(), 5 * 128) > 1e-3);
  // Token ids outside the vocabulary are refused.
  const std::vector<std::int32_t> bad = {1, 128};
  expect_error<error>([&] { t.forward(bad.data(), 1, 2, nullptr, out.data(), nullptr); }, {"128", "vocabulary"});
}

// ---- RoPE and attention ops -------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(rope_matches_naive) {
  const index_t M = 7, H = 3, D = 16, half = D / 2;
  for (ops::RopeKind kind : {ops::RopeKind::standard, ops::RopeKind::llama3}) {
    ops::RopeSpec spec;
    spec.theta = 10000.0;
    spec.kind = kind;
    spec.factor = 8;
    spec.low_freq_factor = 1;
    spec.high_freq_factor = 4;
    spec.original_max_position_embeddings = 64;
    const auto inv = ops::rope_inverse_frequencies(spec, D);
    // Frequencies from the formulas, in double.
    std::vector<double> expect(half);
    for (index_t i = 0; i < half; ++i) {
      double f = std::pow(10000.0, -2.0 * double(i) / double(D));
      if (kind == ops::RopeKind::llama3) {
        const double wl = 2 * 3.14159265358979323846 / f;
        if (wl > 64.0) f /= 8.0;                       // low frequencies: divided by factor
        else if (wl >= 16.0) {                         // medium band: smooth interpolation
          const double s = (64.0 / wl - 1.0) / (4.0 - 1.0);
          f = (1 - s) * f / 8.0 + s * f;
        }
      }
      expect[i] = f;
      BOOST_TEST(std::abs(inv[i] - f) <= 1e-6 * f, "inv_freq[" << i << "] " << inv[i] << " vs " << f);
    }
    if (kind == ops::RopeKind::llama3) {
      BOOST_TEST(inv[0] == 1.0f);                          // high frequency kept
      BOOST_TEST(std::abs(inv[7] * 8.0 - std::pow(10000.0, -14.0 / 16)) < 1e-9);  // low frequency divided
    }
    Rng rng(3);
    auto x = random_vec<double>(rng, M * H * D);
    std::vector<std::int32_t> pos = {0, 1, 2, 5, 17, 100, 3000};
    std::vector<double> c(M * half), s(M * half);
    ops::rope_cos_sin(cpu{}, c.data(), s.data(), pos.data(), inv.data(), M, half);
    std::vector<double> invd(inv.begin(), inv.end());
    const auto ref = naive_rope(x, pos, invd, M, H, D);
    auto y = x;
    ops::rope_forward(cpu{}, y.data(), c.data(), s.data(), M, H, D);
    double err = 0;
    for (std::size_t i = 0; i < y.size(); ++i) err = std::max(err, std::abs(y[i] - ref[i]));
    BOOST_TEST(err < 1e-12);
    // The backward pass is the inverse rotation.
    ops::rope_backward(cpu{}, y.data(), c.data(), s.data(), M, H, D);
    err = 0;
    for (std::size_t i = 0; i < y.size(); ++i) err = std::max(err, std::abs(y[i] - x[i]));
    BOOST_TEST(err < 1e-12);
  }
}

BOOST_AUTO_TEST_CASE(attention_matches_naive) {
  const index_t B = 3, S = 37;
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(B * S), 1);
  for (index_t s = 30; s < S; ++s) mask[s] = 0;          // row 0: right padding
  for (index_t s = 0; s < 9; ++s) mask[S + s] = 0;       // row 1: left padding (fully masked queries)
  mask[2 * S + 11] = mask[2 * S + 20] = 0;               // row 2: holes
  for (index_t window : {index_t(0), index_t(1), index_t(5)})
    for (index_t tile : {index_t(1), index_t(4), index_t(16), index_t(64)}) {
      const double e_gqa = attention_error<double>(B, S, 6, 2, 8, window, tile, mask, 11);
      const double e_mha = attention_error<double>(B, S, 4, 4, 4, window, tile, {}, 12);
      const double e_mqa = attention_error<float>(B, S, 4, 1, 16, window, tile, mask, 13);
      BOOST_TEST(e_gqa < 1e-12, "GQA window " << window << " tile " << tile << ": " << e_gqa);
      BOOST_TEST(e_mha < 1e-12, "MHA window " << window << " tile " << tile << ": " << e_mha);
      BOOST_TEST(e_mqa < 1e-5, "MQA float window " << window << " tile " << tile << ": " << e_mqa);
    }
}

BOOST_AUTO_TEST_CASE(attention_long_sequence_tiled) {
  // 2000 positions in 64-query tiles: the scratch is 64 x S per thread, never S x S per head.
  const index_t S = 2000, tile = 64;
  ops::CausalAttentionShape sh;
  sh.S = S;
  sh.NH = 2;
  sh.q_tile = tile;
  BOOST_TEST(ops::causal_attention_scratch_size(cpu{}, sh) == ops::attention_threads(cpu{}) * tile * S);
  const double e = attention_error<float>(1, S, 2, 1, 16, 0, tile, {}, 21);
  BOOST_TEST(e < 2e-5, "long sequence max abs error " << e);
  const double ew = attention_error<float>(1, S, 2, 1, 16, 100, tile, {}, 22);
  BOOST_TEST(ew < 2e-5, "long sequence, window 100, max abs error " << ew);
  // Scratch too small for one tile is refused.
  std::vector<float> q(16 * 4), out(q.size()), scratch(3);
  ops::CausalAttentionShape small;
  small.S = 4;
  small.DH = 16;
  small.q_tile = 4;
  expect_error<shape_error>([&] {
    ops::causal_attention_forward(cpu{}, out.data(), q.data(), q.data(), q.data(), nullptr, small, 1.0f,
                                  scratch.data(), 3);
  }, {"scratch"});
}

BOOST_AUTO_TEST_CASE(attention_rope_in_op_matches_rotated_inputs) {
  // The op's own RoPE (AttentionRope) against rope_forward on copies of q and k, then the op
  // without RoPE: GQA, left padding, a window crossing tiles, positions not starting at 0.
  const index_t B = 2, S = 37, NH = 4, NKV = 2, DH = 16, half = DH / 2;
  Rng rng(31);
  auto q = random_vec<float>(rng, B * S * NH * DH), k = random_vec<float>(rng, B * S * NKV * DH),
       v = random_vec<float>(rng, B * S * NKV * DH);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(B * S));
  for (index_t i = 0; i < B * S; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(3 + (i % S) * 7);
  ops::RopeSpec spec;
  const auto inv = ops::rope_inverse_frequencies(spec, DH);
  std::vector<float> c(static_cast<std::size_t>(B * S * half)), sn(c.size());
  ops::rope_cos_sin(cpu{}, c.data(), sn.data(), pos.data(), inv.data(), B * S, half);
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(B * S), 1);
  for (index_t i = 0; i < 5; ++i) mask[static_cast<std::size_t>(i)] = 0;
  for (index_t window : {index_t(0), index_t(9)}) {
    ops::CausalAttentionShape sh = attention_shape(B, S, NH, NKV, DH, window, 8);
    auto qr = q, kr = k;
    ops::rope_forward(cpu{}, qr.data(), c.data(), sn.data(), B * S, NH, DH);
    ops::rope_forward(cpu{}, kr.data(), c.data(), sn.data(), B * S, NKV, DH);
    std::vector<float> ref(q.size()), got(q.size(), -7.0f);
    std::vector<float> scratch(static_cast<std::size_t>(ops::causal_attention_scratch_size(cpu{}, sh)));
    ops::causal_attention_forward(cpu{}, ref.data(), qr.data(), kr.data(), v.data(), mask.data(), sh, 0.25f,
                                  scratch.data(), static_cast<index_t>(scratch.size()));
    sh.rope = true;
    scratch.assign(static_cast<std::size_t>(ops::causal_attention_scratch_size(cpu{}, sh)), 0.0f);
    ops::causal_attention_forward(cpu{}, got.data(), q.data(), k.data(), v.data(), mask.data(), sh, 0.25f,
                                  scratch.data(), static_cast<index_t>(scratch.size()),
                                  ops::AttentionRope<float>{c.data(), sn.data()});
    double err = 0, ref_norm = 0;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      err = std::max(err, std::abs(double(got[i]) - double(ref[i])));
      ref_norm = std::max(ref_norm, std::abs(double(ref[i])));
    }
    BOOST_TEST(err <= 1e-6 * ref_norm, "window " << window << ": max abs difference " << err);
    // Tables without the shape's rope flag (whose scratch is too small for the rotated rows) are refused.
    sh.rope = false;
    expect_error<shape_error>([&] {
      ops::causal_attention_forward(cpu{}, got.data(), q.data(), k.data(), v.data(), mask.data(), sh, 0.25f,
                                    scratch.data(), static_cast<index_t>(scratch.size()),
                                    ops::AttentionRope<float>{c.data(), sn.data()});
    }, {"CausalAttentionShape::rope"});
  }
}

BOOST_AUTO_TEST_CASE(random_teacher_tiles_agree) {
  io::HfModelConfig c = io::parse_hf_config(base_config(), "in-code config");
  LlamaTeacher<double> t(c);
  Rng rng(5);
  t.init_random(rng);
  const index_t B = 2, S = 50;
  std::vector<std::int32_t> ids(B * S);
  for (auto& x : ids) x = static_cast<std::int32_t>(rng.below(64));
  std::vector<double> a(B * S * 64), b(a.size());
  std::vector<Tensor<double>> ha, hb;
  t.forward(ids.data(), B, S, nullptr, a.data(), &ha);
  t.set_attention_tile(7);
  t.forward(ids.data(), B, S, nullptr, b.data(), &hb);
  BOOST_TEST(relative_error(a.data(), b.data(), index_t(a.size())) < 1e-13);
  BOOST_TEST(ha.size() == 3u);
  // Logits are the last hidden state times the head.
  double err = 0;
  for (index_t m = 0; m < B * S; ++m)
    for (index_t v = 0; v < 64; ++v) {
      double z = 0;
      for (index_t j = 0; j < 32; ++j) z += ha[2][m * 32 + j] * t.lm_head()[v * 32 + j];
      err = std::max(err, std::abs(z - a[m * 64 + v]));
    }
  BOOST_TEST(err < 1e-10);
}

// ---- configuration parsing ---------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(config_variants) {
  // transformers 4.x style: rope_theta + rope_scaling {"type": "llama3", ...}.
  auto j = base_config();
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"type", "llama3"}, {"factor", 32.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  auto c = io::parse_hf_config(j, "v4.json");
  BOOST_TEST((c.rope.kind == ops::RopeKind::llama3));
  BOOST_TEST(c.rope.theta == 500000.0);
  BOOST_TEST(c.rope.factor == 32.0);
  // rope_scaling of type "default" and a null rope_scaling mean plain RoPE.
  j["rope_scaling"] = nullptr;
  BOOST_TEST((io::parse_hf_config(j, "x").rope.kind == ops::RopeKind::standard));
  // transformers 5: rope_parameters per layer type.
  auto q = base_config();
  q["architectures"] = {"Qwen2ForCausalLM"};
  q["model_type"] = "qwen2";
  q["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}, {"rope_theta", 1e6}}}};
  q["layer_types"] = {"full_attention", "full_attention"};
  c = io::parse_hf_config(q, "qwen.json");
  BOOST_TEST(c.rope.theta == 1e6);
  BOOST_TEST(c.qkv_bias);
  // Qwen2 sliding window only with use_sliding_window, on layers >= max_window_layers.
  q.erase("layer_types");
  q["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  q["sliding_window"] = 16;
  q["max_window_layers"] = 1;
  BOOST_TEST((io::parse_hf_config(q, "q").sliding_window == std::vector<index_t>{0, 0}));
  q["use_sliding_window"] = true;
  BOOST_TEST((io::parse_hf_config(q, "q").sliding_window == std::vector<index_t>{0, 16}));
  // Missing num_key_value_heads means MHA; missing head_dim means hidden / heads.
  auto m = base_config();
  m.erase("num_key_value_heads");
  c = io::parse_hf_config(m, "m");
  BOOST_TEST(c.num_key_value_heads == 4);
  BOOST_TEST(c.head_dim == 8);
  // No architectures field: model_type decides.
  m.erase("architectures");
  m["model_type"] = "mistral";
  m["sliding_window"] = nullptr;
  c = io::parse_hf_config(m, "m");
  BOOST_TEST(c.architecture == "MistralForCausalLM");
  BOOST_TEST((c.sliding_window == std::vector<index_t>{0, 0}));
}

BOOST_AUTO_TEST_CASE(unsupported_configs_refused) {
  auto refuse = [](nlohmann::json j, std::vector<std::string> parts) {
    expect_error<config_error>([&] { io::parse_hf_config(j, "cfg.json"); }, parts);
  };
  auto j = base_config();
  j["architectures"] = {"GPT2LMHeadModel"};
  refuse(j, {"cfg.json", "GPT2LMHeadModel", "LlamaForCausalLM"});
  j = base_config();
  j["architectures"] = {"Qwen3ForCausalLM"};
  refuse(j, {"Qwen3ForCausalLM", "does not support"});
  j = base_config();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  refuse(j, {"cfg.json", "yarn", "rope_type", "llama3"});
  j = base_config();
  j["rope_parameters"] = {{"rope_type", "dynamic"}, {"rope_theta", 10000.0}, {"factor", 2.0}};
  refuse(j, {"dynamic"});
  j = base_config();
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  refuse(j, {"low_freq_factor", "llama3"});
  j = base_config();
  j["num_local_experts"] = 8;
  refuse(j, {"num_local_experts", "mixture-of-experts"});
  j = base_config();
  j["hidden_act"] = "gelu";
  refuse(j, {"hidden_act", "gelu", "silu"});
  j = base_config();
  j["partial_rotary_factor"] = 0.5;
  refuse(j, {"partial_rotary_factor"});
  j = base_config();
  j["layer_types"] = {"full_attention", "chunked_attention"};
  refuse(j, {"layer_types", "chunked_attention"});
  j = base_config();
  j["num_key_value_heads"] = 3;
  refuse(j, {"num_key_value_heads", "multiple"});
  j = base_config();
  j.erase("hidden_size");
  refuse(j, {"cfg.json", "hidden_size", "missing"});
  j = base_config();
  j["intermediate_size"] = "large";
  refuse(j, {"intermediate_size", "integer"});
}

// ---- bad model directories ----------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(bad_config_files) {
  using LT = LlamaTeacher<float>;
  expect_error<io_error>([] { LT::from_pretrained("/nonexistent/distilx_model"); }, {"/nonexistent/distilx_model"});
  {
    auto d = copy_fixture("qwen2_tied");
    fs::remove(d.path / "config.json");
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); }, {(d.path / "config.json").string(), "does not exist"});
  }
  {
    auto d = copy_fixture("qwen2_tied");
    write_text(d.path / "config.json", "{\"architectures\": [\"Qwen2ForCausalLM\"], \"hidden_size\": ");
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); }, {(d.path / "config.json").string(), "not valid JSON"});
  }
  {
    auto d = copy_fixture("qwen2_tied");
    auto j = read_json(d.path / "config.json");
    j.erase("num_hidden_layers");
    write_json(d.path / "config.json", j);
    expect_error<config_error>([&] { LT::from_pretrained(d.str()); },
                               {(d.path / "config.json").string(), "num_hidden_layers", "missing"});
  }
  {
    auto d = copy_fixture("llama3_untied");
    auto j = read_json(d.path / "config.json");
    j["architectures"] = {"MixtralForCausalLM"};
    j["model_type"] = "mixtral";
    write_json(d.path / "config.json", j);
    expect_error<config_error>([&] { LT::from_pretrained(d.str()); }, {"MixtralForCausalLM", "config.json"});
  }
  {
    auto d = copy_fixture("llama3_untied");
    auto j = read_json(d.path / "config.json");
    j["rope_parameters"]["rope_type"] = "longrope";
    write_json(d.path / "config.json", j);
    expect_error<config_error>([&] { LT::from_pretrained(d.str()); }, {"longrope", "config.json"});
  }
}

BOOST_AUTO_TEST_CASE(bad_weight_files) {
  using LT = LlamaTeacher<float>;
  {  // no weights at all
    auto d = copy_fixture("qwen2_tied");
    fs::remove(d.path / "model.safetensors");
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); }, {d.str(), "model.safetensors.index.json"});
  }
  {  // a shard listed in the index is missing
    auto d = copy_fixture("llama_sharded_bias");
    const auto idx = read_json(d.path / "model.safetensors.index.json");
    const std::string shard = idx["weight_map"]["model.layers.0.input_layernorm.weight"].get<std::string>();
    fs::remove(d.path / shard);
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); },
                           {(d.path / "model.safetensors.index.json").string(), shard, "does not exist"});
  }
  {  // the index maps a tensor to a shard that does not hold it
    auto d = copy_fixture("llama_sharded_bias");
    auto idx = read_json(d.path / "model.safetensors.index.json");
    const std::string a = idx["weight_map"]["model.embed_tokens.weight"].get<std::string>();
    std::string other;
    for (auto& [k, v] : idx["weight_map"].items())
      if (v.get<std::string>() != a) other = v.get<std::string>();
    idx["weight_map"]["model.embed_tokens.weight"] = other;
    write_json(d.path / "model.safetensors.index.json", idx);
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); }, {"model.embed_tokens.weight", other, "does not hold"});
  }
  {  // malformed index
    auto d = copy_fixture("llama_sharded_bias");
    write_text(d.path / "model.safetensors.index.json", "{\"metadata\": {}}");
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); }, {"model.safetensors.index.json", "weight_map"});
  }
  {  // a tensor of the wrong shape (config says intermediate_size 80, file holds 64)
    auto d = copy_fixture("llama3_untied");
    auto j = read_json(d.path / "config.json");
    j["intermediate_size"] = 80;
    write_json(d.path / "config.json", j);
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); },
                           {(d.path / "model.safetensors").string(), "model.layers.0.mlp.gate_proj.weight",
                            "expected shape [80, 48]", "found shape [64, 48]"});
  }
  const auto weights = read_all_weights("llama3_untied");
  auto write_weights = [&](const TempDir& d, const std::string& skip, const std::string& as_int) {
    fs::copy(hf_dir("llama3_untied") / "config.json", d.path / "config.json");
    io::SafetensorsWriter w;
    for (const auto& [name, sv] : weights) {
      if (name == skip) continue;
      if (name == as_int) {
        std::vector<std::int32_t> iv(sv.second.begin(), sv.second.end());
        w.add<std::int32_t>(name, sv.first, iv.data());
      } else {
        w.add<float>(name, sv.first, sv.second.data());
      }
    }
    w.write((d.path / "model.safetensors").string());
  };
  {  // a tensor of the wrong dtype
    TempDir d;
    write_weights(d, "", "model.layers.1.self_attn.k_proj.weight");
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); },
                           {(d.path / "model.safetensors").string(), "model.layers.1.self_attn.k_proj.weight", "I32",
                            "floating-point", "[32, 48]"});
  }
  {  // a missing tensor (the untied head)
    TempDir d;
    write_weights(d, "lm_head.weight", "");
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); },
                           {"lm_head.weight", "missing", (d.path / "model.safetensors").string()});
  }
  {  // truncated file: the header claims more bytes than the file holds
    auto d = copy_fixture("llama3_untied");
    const auto p = d.path / "model.safetensors";
    fs::resize_file(p, fs::file_size(p) - 1000);
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); }, {p.string(), "past the end"});
  }
  {  // a header length field larger than the file
    auto d = copy_fixture("qwen2_tied");
    const auto p = d.path / "model.safetensors";
    {
      std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
      const unsigned char len[8] = {0x00, 0x00, 0x00, 0x10, 0, 0, 0, 0};  // 256 MiB
      f.write(reinterpret_cast<const char*>(len), 8);
    }
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); }, {p.string(), "header length"});
  }
  {  // a shard whose header is not JSON
    auto d = copy_fixture("llama_sharded_bias");
    const auto idx = read_json(d.path / "model.safetensors.index.json");
    const std::string shard = idx["weight_map"]["lm_head.weight"].get<std::string>();
    const unsigned char hdr[16] = {8, 0, 0, 0, 0, 0, 0, 0, '{', 'n', 'o', 't', ' ', 'j', 's', 'n'};
    write_text(d.path / shard, std::string(reinterpret_cast<const char*>(hdr), 16));
    expect_error<io_error>([&] { LT::from_pretrained(d.str()); }, {shard, "JSON"});
  }
}

BOOST_AUTO_TEST_SUITE_END()
