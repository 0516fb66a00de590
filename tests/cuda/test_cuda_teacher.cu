// The teacher on the GPU against the CPU backend: the RoPE ops, the fused causal GQA attention op
// (exact kernel in fp32 mode, tensor-core kernel in bf16 / fp16 modes; S not a multiple of the
// tiles, sliding windows, left and right key padding, fully masked rows), LlamaTeacher<T, cuda>
// against LlamaTeacher<T, cpu> with the same random weights (logits and every hidden state), and
// the Hugging Face fixtures of tests/data/teacher loaded with from_pretrained on the GPU.
// Errors are norm-relative per tensor: float <= 1e-4 in fp32 mode (TF32 off), <= 2e-2 in bf16.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/cuda.cuh"
#include "cuda_test_util.cuh"
#include "distilx/io/safetensors.hpp"

using namespace distilx;
namespace cb = distilx::cuda_backend;

namespace {

using testing::MathModeScope;

template <class T>
std::vector<T> randv(index_t n, Rng& rng) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = static_cast<T>(rng.normal());
  return v;
}

template <class T>
std::vector<T> host_of(const T* dev, index_t n) {
  std::vector<T> h(static_cast<std::size_t>(n));
  if (n) DISTILX_CUDA_CHECK(cudaMemcpy(h.data(), dev, sizeof(T) * n, cudaMemcpyDeviceToHost));
  return h;
}
template <class T>
Buffer<T, distilx::cuda> device_of(const std::vector<T>& h) {
  Buffer<T, distilx::cuda> b(static_cast<index_t>(h.size()));
  if (!h.empty()) b.copy_from_host(h.data(), static_cast<index_t>(h.size()));
  return b;
}

/// Norm-relative error over the rows whose mask is 1 (all rows when mask is empty); a, b [rows, inner].
template <class A, class B>
double masked_rel(const A* a, const B* b, const std::vector<std::uint8_t>& mask, index_t rows, index_t inner) {
  double num = 0, den = 0;
  for (index_t r = 0; r < rows; ++r) {
    if (!mask.empty() && !mask[static_cast<std::size_t>(r)]) continue;
    for (index_t i = 0; i < inner; ++i) {
      const double x = double(a[r * inner + i]), y = double(b[r * inner + i]);
      num += (x - y) * (x - y);
      den += y * y;
    }
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

/// A [B, S] mask: row 0 left-padded, row 1 right-padded, further rows full; pad = padding length.
std::vector<std::uint8_t> padded_mask(index_t B, index_t S, index_t pad) {
  std::vector<std::uint8_t> m(static_cast<std::size_t>(B * S), 1);
  for (index_t s = 0; s < pad && s < S; ++s) {
    m[static_cast<std::size_t>(s)] = 0;                              // row 0: left padding
    if (B > 1) m[static_cast<std::size_t>(S + S - 1 - s)] = 0;       // row 1: right padding
  }
  return m;
}

// ---- attention op ------------------------------------------------------------------------

struct AttnCase {
  index_t B, S, NH, NKV, DH, window;
  bool masked;
};

std::string describe(const AttnCase& c) {
  std::ostringstream os;
  os << "B" << c.B << " S" << c.S << " NH" << c.NH << " NKV" << c.NKV << " DH" << c.DH << " window " << c.window
     << (c.masked ? " padded" : "");
  return os.str();
}

/// Runs the CPU and the CUDA attention op on the same random inputs; returns the relative error
/// of the output (and checks that two GPU runs are bit-identical). rope: both ops rotate q and k
/// themselves with tables of positions that restart per sequence at an offset.
template <class T>
double attention_error(const AttnCase& c, Rng& rng, cb::AttentionKernel* used, bool rope = false) {
  ops::CausalAttentionShape s;
  s.B = c.B;
  s.S = c.S;
  s.NH = c.NH;
  s.NKV = c.NKV;
  s.DH = c.DH;
  s.window = c.window;
  s.q_tile = 16;
  const index_t nq = c.B * c.S * c.NH * c.DH, nk = c.B * c.S * c.NKV * c.DH;
  const auto q = randv<T>(nq, rng), k = randv<T>(nk, rng), v = randv<T>(nk, rng);
  const auto mask = c.masked ? padded_mask(c.B, c.S, c.S / 3 + 1) : std::vector<std::uint8_t>{};
  const T scale = static_cast<T>(1.0 / std::sqrt(double(c.DH)));
  const index_t M = c.B * c.S, half = c.DH / 2;
  std::vector<T> cos_t, sin_t;
  if (rope) {
    std::vector<std::int32_t> pos(static_cast<std::size_t>(M));
    for (index_t i = 0; i < M; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(11 + i % c.S);
    const auto inv = ops::rope_inverse_frequencies(ops::RopeSpec{}, c.DH);
    cos_t.resize(static_cast<std::size_t>(M * half));
    sin_t.resize(cos_t.size());
    ops::rope_cos_sin(cpu{}, cos_t.data(), sin_t.data(), pos.data(), inv.data(), M, half);
  }
  s.rope = rope;
  std::vector<T> ref(static_cast<std::size_t>(nq));
  std::vector<T> scratch(static_cast<std::size_t>(ops::causal_attention_scratch_size(cpu{}, s)));
  ops::causal_attention_forward(cpu{}, ref.data(), q.data(), k.data(), v.data(), mask.empty() ? nullptr : mask.data(),
                                s, scale, scratch.data(), static_cast<index_t>(scratch.size()),
                                ops::AttentionRope<T>{rope ? cos_t.data() : nullptr, rope ? sin_t.data() : nullptr});
  auto dq = device_of(q), dk = device_of(k), dv = device_of(v);
  auto dm = device_of(mask);
  auto dcos = device_of(cos_t), dsin = device_of(sin_t);
  const ops::AttentionRope<T> drope{rope ? dcos.data() : nullptr, rope ? dsin.data() : nullptr};
  Buffer<T, distilx::cuda> out(nq), out2(nq);
  const std::uint8_t* mp = mask.empty() ? nullptr : dm.data();
  *used = cb::attention_kernel_for<T>(s, out.data(), dq.data(), dk.data(), dv.data());
  BOOST_TEST(ops::causal_attention_scratch_size(distilx::cuda{}, s) == 0);
  ops::causal_attention_forward(distilx::cuda{}, out.data(), dq.data(), dk.data(), dv.data(), mp, s, scale,
                                static_cast<T*>(nullptr), index_t{0}, drope);
  ops::causal_attention_forward(distilx::cuda{}, out2.data(), dq.data(), dk.data(), dv.data(), mp, s, scale,
                                static_cast<T*>(nullptr), index_t{0}, drope);
  const auto got = out.to_host(), got2 = out2.to_host();
  BOOST_TEST(std::memcmp(got.data(), got2.data(), sizeof(T) * got.size()) == 0, describe(c) << ": reruns differ");
  // Fully masked query rows (left padding) must be exact zeros, as on the CPU.
  if (c.masked)
    for (index_t i = 0; i < c.S; ++i)
      if (!mask[static_cast<std::size_t>(i)]) {
        // Row 0 is left padded: query i sees keys <= i, all padding.
        for (index_t e = 0; e < c.NH * c.DH; ++e)
          if (got[static_cast<std::size_t>(i * c.NH * c.DH + e)] != T(0)) {
            BOOST_ERROR(describe(c) << ": fully masked row " << i << " is not zero");
            break;
          }
      }
  return relative_error(got.data(), ref.data(), nq);
}

const AttnCase kAttnCases[] = {
    {2, 77, 4, 2, 64, 0, false},    // S not a multiple of any tile, GQA 2
    {2, 77, 4, 2, 64, 0, true},     // left / right key padding
    {1, 150, 6, 2, 128, 19, false}, // sliding window, GQA 3
    {3, 70, 4, 4, 128, 0, true},    // MHA, padding
    {2, 129, 4, 1, 64, 64, true},   // window = key tile, MQA
    {1, 1, 2, 1, 64, 0, false},     // a single position
};
const AttnCase kExactOnlyCases[] = {
    {2, 45, 4, 2, 8, 0, true},    // tiny head dim (the fixtures' 8)
    {1, 66, 3, 1, 40, 5, false},  // head dim not a multiple of 32
    {1, 40, 2, 2, 256, 0, true},  // the largest supported head dim
};

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_teacher)

BOOST_AUTO_TEST_CASE(rope_matches_cpu) {
  Rng rng(3);
  const index_t M = 37, H = 3, D = 64, half = D / 2, ld = H * D + 5;
  for (ops::RopeKind kind : {ops::RopeKind::standard, ops::RopeKind::llama3}) {
    ops::RopeSpec spec;
    spec.theta = 500000.0;
    spec.kind = kind;
    const std::vector<float> inv = ops::rope_inverse_frequencies(spec, D);
    std::vector<std::int32_t> pos(static_cast<std::size_t>(M));
    for (auto& p : pos) p = static_cast<std::int32_t>(rng.below(9000));
    std::vector<float> c(static_cast<std::size_t>(M * half)), s(c.size());
    ops::rope_cos_sin(cpu{}, c.data(), s.data(), pos.data(), inv.data(), M, half);
    auto dpos = device_of(pos);
    auto dinv = device_of(inv);
    Buffer<float, distilx::cuda> dc(M * half), ds(M * half);
    ops::rope_cos_sin(distilx::cuda{}, dc.data(), ds.data(), dpos.data(), dinv.data(), M, half);
    const double ec = relative_error(dc.to_host().data(), c.data(), M * half);
    const double es = relative_error(ds.to_host().data(), s.data(), M * half);
    BOOST_TEST(ec <= 1e-6);
    BOOST_TEST(es <= 1e-6);
    // Rotation with a padded row stride (the padding must be left alone), then its inverse.
    auto x = randv<float>(M * ld, rng);
    auto dx = device_of(x);
    std::vector<float> y = x;
    ops::rope_forward(cpu{}, y.data(), c.data(), s.data(), M, H, D, ld);
    ops::rope_forward(distilx::cuda{}, dx.data(), dc.data(), ds.data(), M, H, D, ld);
    const double ef = relative_error(dx.to_host().data(), y.data(), M * ld);
    BOOST_TEST(ef <= 1e-6);
    ops::rope_backward(distilx::cuda{}, dx.data(), dc.data(), ds.data(), M, H, D, ld);
    const double eb = relative_error(dx.to_host().data(), x.data(), M * ld);
    BOOST_TEST(eb <= 1e-6);
    BOOST_TEST_MESSAGE("rope " << (kind == ops::RopeKind::llama3 ? "llama3" : "standard") << ": cos " << ec << ", sin "
                               << es << ", forward " << ef << ", forward+backward vs identity " << eb);
  }
}

BOOST_AUTO_TEST_CASE(attention_exact_matches_cpu) {
  MathModeScope fp32(cb::MathMode::fp32);
  Rng rng(11);
  double worst_f = 0, worst_d = 0;
  auto run = [&](const AttnCase& c) {
    for (bool rope : {false, true}) {
      cb::AttentionKernel used{};
      const double ef = attention_error<float>(c, rng, &used, rope);
      BOOST_TEST((used == cb::AttentionKernel::exact));
      BOOST_TEST(ef <= 1e-5, describe(c) << (rope ? " rope" : "") << " float: relative error " << ef);
      const double ed = attention_error<double>(c, rng, &used, rope);
      BOOST_TEST(ed <= 1e-12, describe(c) << (rope ? " rope" : "") << " double: relative error " << ed);
      worst_f = std::max(worst_f, ef);
      worst_d = std::max(worst_d, ed);
    }
  };
  for (const AttnCase& c : kAttnCases) run(c);
  for (const AttnCase& c : kExactOnlyCases) run(c);
  BOOST_TEST_MESSAGE("attention exact kernel: worst relative error float " << worst_f << ", double " << worst_d);
}

BOOST_AUTO_TEST_CASE(attention_tensor_cores_match_cpu) {
  Rng rng(12);
  for (cb::MathMode mode : {cb::MathMode::bf16, cb::MathMode::fp16}) {
    MathModeScope scope(mode);
    const double tol = mode == cb::MathMode::bf16 ? 2e-2 : 5e-3;
    double worst = 0;
    for (const AttnCase& c : kAttnCases)
      for (bool rope : {false, true}) {
        cb::AttentionKernel used{};
        const double e = attention_error<float>(c, rng, &used, rope);
        BOOST_TEST((used == (mode == cb::MathMode::bf16 ? cb::AttentionKernel::tensor_core_bf16
                                                        : cb::AttentionKernel::tensor_core_fp16)),
                   describe(c) << ": kernel " << cb::to_string(used));
        BOOST_TEST(e <= tol, describe(c) << (rope ? " rope " : " ") << cb::to_string(mode) << ": relative error " << e);
        worst = std::max(worst, e);
      }
    // Head dims without a tensor-core kernel fall back to the exact one.
    cb::AttentionKernel used{};
    const double e = attention_error<float>(kExactOnlyCases[1], rng, &used);
    BOOST_TEST((used == cb::AttentionKernel::exact));
    BOOST_TEST(e <= 1e-5);
    BOOST_TEST_MESSAGE("attention tensor-core kernel (" << cb::to_string(mode) << "): worst relative error " << worst);
  }
}

BOOST_AUTO_TEST_CASE(fused_projections_match_cpu) {
  // ops::qkv_forward and ops::gated_mlp_forward (ops/fused.hpp) on the GPU against the CPU ops: in
  // fp32 the generic sequence (1e-5); in bf16 / fp16 the input converted once, and in bf16 the
  // MLP's intermediate kept in 16 bits (2e-2); 16-bit results must differ from the fp32 GPU ones
  // (a 16-bit path ran). Biases on and off; F = 200 takes the 8-wide kernel, F = 203 the scalar one.
  Rng rng(13);
  const index_t M = 100, d = 96, nq = 128, nkv = 64;
  for (const index_t F : {index_t(200), index_t(203)})
    for (const bool biases : {true, false}) {
      const auto x = randv<float>(M * d, rng), wq = randv<float>(nq * d, rng), wk = randv<float>(nkv * d, rng),
                 wv = randv<float>(nkv * d, rng), wg = randv<float>(F * d, rng), wu = randv<float>(F * d, rng),
                 wd = randv<float>(d * F, rng), res = randv<float>(M * d, rng);
      const auto bq = randv<float>(nq, rng), bk = randv<float>(nkv, rng), bv = randv<float>(nkv, rng),
                 bg = randv<float>(F, rng), bu = randv<float>(F, rng);
      auto bias = [&](const std::vector<float>& b) { return biases ? b.data() : nullptr; };
      std::vector<float> q(static_cast<std::size_t>(M * nq)), k(static_cast<std::size_t>(M * nkv)), v(k.size()),
          y = res, g(static_cast<std::size_t>(M * F)), u(g.size());
      ops::qkv_forward(cpu{}, q.data(), k.data(), v.data(), x.data(), wq.data(), bias(bq), wk.data(), bias(bk),
                       wv.data(), bias(bv), M, d, nq, nkv);
      ops::gated_mlp_forward<ops::Silu>(cpu{}, y.data(), x.data(), wg.data(), bias(bg), wu.data(), bias(bu), wd.data(),
                                        M, d, F, g.data(), u.data());
      auto dx = device_of(x), dwq = device_of(wq), dwk = device_of(wk), dwv = device_of(wv), dwg = device_of(wg),
           dwu = device_of(wu), dwd = device_of(wd), dbq = device_of(bq), dbk = device_of(bk), dbv = device_of(bv),
           dbg = device_of(bg), dbu = device_of(bu);
      auto dbias = [&](Buffer<float, distilx::cuda>& b) { return biases ? static_cast<const float*>(b.data()) : nullptr; };
      std::vector<float> y32;
      for (cb::MathMode mode : {cb::MathMode::fp32, cb::MathMode::bf16, cb::MathMode::fp16}) {
        MathModeScope scope(mode);
        Buffer<float, distilx::cuda> gq(M * nq), gk(M * nkv), gv(M * nkv), gy(M * d), gg(M * F), gu(M * F);
        gy.copy_from_host(res.data(), M * d);
        auto& lt = cb::detail::LtBiasGemm::for_this_thread();
        const std::uint64_t lt0 = lt.runs();
        ops::qkv_forward(distilx::cuda{}, gq.data(), gk.data(), gv.data(), dx.data(), dwq.data(), dbias(dbq),
                         dwk.data(), dbias(dbk), dwv.data(), dbias(dbv), M, d, nq, nkv);
        // In 16-bit modes the q, k, v biases ride in the products' epilogue (cuBLASLt): three products.
        BOOST_TEST(lt.runs() - lt0 == (biases && mode != cb::MathMode::fp32 ? 3u : 0u),
                   cb::to_string(mode) << (biases ? " with" : " without") << " biases: " << lt.runs() - lt0
                                       << " products with the bias epilogue");
        ops::gated_mlp_forward<ops::Silu>(distilx::cuda{}, gy.data(), dx.data(), dwg.data(), dbias(dbg), dwu.data(),
                                          dbias(dbu), dwd.data(), M, d, F, gg.data(), gu.data());
        const double tol = mode == cb::MathMode::fp32 ? 1e-5 : 2e-2;
        const std::string what = std::string(cb::to_string(mode)) + " F " + std::to_string(F) +
                                 (biases ? " with biases" : " without biases");
        const auto hy = gy.to_host();
        const double eq = relative_error(gq.to_host().data(), q.data(), M * nq),
                     ek = relative_error(gk.to_host().data(), k.data(), M * nkv),
                     ev = relative_error(gv.to_host().data(), v.data(), M * nkv),
                     ey = relative_error(hy.data(), y.data(), M * d);
        BOOST_TEST(eq <= tol, what << ": q relative error " << eq);
        BOOST_TEST(ek <= tol, what << ": k relative error " << ek);
        BOOST_TEST(ev <= tol, what << ": v relative error " << ev);
        BOOST_TEST(ey <= tol, what << ": MLP output relative error " << ey);
        BOOST_TEST_MESSAGE("fused projections " << what << ": q " << eq << ", k " << ek << ", v " << ev << ", MLP " << ey);
        if (mode == cb::MathMode::fp32) y32 = hy;
        else BOOST_TEST((hy != y32), what << ": same MLP output as fp32, so the 16-bit path did not run");
      }
    }
}

BOOST_AUTO_TEST_CASE(attention_bad_shapes_refused) {
  ops::CausalAttentionShape s;
  s.B = 1;
  s.S = 4;
  s.NH = 3;
  s.NKV = 2;
  s.DH = 8;
  Buffer<float, distilx::cuda> buf(1024);
  auto call = [&] {
    ops::causal_attention_forward(distilx::cuda{}, buf.data(), buf.data(), buf.data(), buf.data(), nullptr, s, 1.0f,
                                  static_cast<float*>(nullptr), index_t{0});
  };
  BOOST_CHECK_EXCEPTION(call(), shape_error, [](const shape_error& e) {
    return std::string(e.what()).find("multiple of num_key_value_heads") != std::string::npos;
  });
  s.NKV = 1;
  s.DH = 258;
  BOOST_CHECK_EXCEPTION(call(), shape_error, [](const shape_error& e) {
    return std::string(e.what()).find("head_dim 258") != std::string::npos;
  });
}

// ---- the whole teacher ---------------------------------------------------------------------

namespace {

nlohmann::json small_config(const std::string& kind) {
  nlohmann::json j{{"vocab_size", 101}, {"hidden_size", 96},          {"intermediate_size", 160},
                   {"num_hidden_layers", 2}, {"rms_norm_eps", 1e-6}, {"max_position_embeddings", 4096}};
  if (kind == "llama3") {  // GQA 2, head_dim 64, llama3 rope scaling, untied, attention and MLP biases
    j["architectures"] = {"LlamaForCausalLM"};
    j["model_type"] = "llama";
    j["num_attention_heads"] = 4;
    j["num_key_value_heads"] = 2;
    j["head_dim"] = 64;
    j["rope_theta"] = 500000.0;
    j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}};
    j["attention_bias"] = true;
    j["mlp_bias"] = true;
    j["tie_word_embeddings"] = false;
  } else if (kind == "qwen2") {  // qkv bias, head_dim 128, MQA, tied, sliding window on layer 1
    j["architectures"] = {"Qwen2ForCausalLM"};
    j["model_type"] = "qwen2";
    j["num_attention_heads"] = 3;
    j["num_key_value_heads"] = 1;
    j["head_dim"] = 128;
    j["rope_theta"] = 1000000.0;
    j["use_sliding_window"] = true;
    j["sliding_window"] = 13;
    j["max_window_layers"] = 1;
    j["tie_word_embeddings"] = true;
  } else {  // mistral: head_dim 24 (exact kernel in every mode), window on every layer
    j["architectures"] = {"MistralForCausalLM"};
    j["model_type"] = "mistral";
    j["num_attention_heads"] = 4;
    j["num_key_value_heads"] = 2;
    j["head_dim"] = 24;
    j["sliding_window"] = 9;
    j["tie_word_embeddings"] = false;
  }
  return j;
}

struct TeacherErrors {
  double logits = 0, hidden = 0;
};

/// A cpu and a cuda teacher from the same seed on the same padded batch with explicit positions
/// (and once without mask / positions); worst errors over logits and every hidden state, real
/// positions only (padding outputs are not meaningful, though both backends define them alike).
template <class T>
TeacherErrors compare_teachers(const std::string& kind, double tol) {
  const io::HfModelConfig cfg = io::parse_hf_config(small_config(kind), kind + " (in-code config)");
  LlamaTeacher<T> tc(cfg);
  LlamaTeacher<T, distilx::cuda> tg(cfg);
  Rng r1(77), r2(77);
  tc.init_random(r1);
  tg.init_random(r2);
  const index_t B = 3, S = 45, M = B * S, V = cfg.vocab_size, d = cfg.hidden_size;
  Rng rng(5);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(M));
  for (auto& t : ids) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V)));
  const std::vector<std::uint8_t> mask = padded_mask(B, S, 11);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(M));
  hf_generate_position_ids(mask.data(), B, S, pos.data());
  TeacherErrors worst;
  for (int variant = 0; variant < 2; ++variant) {
    const bool padded = variant == 0;
    std::vector<T> lc(static_cast<std::size_t>(M * V));
    std::vector<Tensor<T>> hc;
    std::vector<Tensor<T, distilx::cuda>> hg;
    Buffer<T, distilx::cuda> lg(M * V);
    const std::uint8_t* mp = padded ? mask.data() : nullptr;
    const std::int32_t* pp = padded ? pos.data() : nullptr;
    tc.forward(ids.data(), B, S, mp, lc.data(), &hc, pp);
    tg.forward(ids.data(), B, S, mp, lg.data(), &hg, pp);
    const std::vector<std::uint8_t> rows = padded ? mask : std::vector<std::uint8_t>{};
    const double el = masked_rel(lg.to_host().data(), lc.data(), rows, M, V);
    BOOST_TEST(el <= tol, kind << (padded ? " padded" : "") << ": logits relative error " << el);
    worst.logits = std::max(worst.logits, el);
    BOOST_TEST_REQUIRE(hg.size() == hc.size());
    for (std::size_t i = 0; i < hg.size(); ++i) {
      BOOST_TEST((hg[i].shape() == Shape{B, S, d}));
      const double eh = masked_rel(hg[i].buffer().to_host().data(), hc[i].data(), rows, M, d);
      BOOST_TEST(eh <= tol, kind << (padded ? " padded" : "") << ": hidden state " << i << " relative error " << eh);
      worst.hidden = std::max(worst.hidden, eh);
    }
  }
  BOOST_TEST_MESSAGE("teacher " << kind << " (" << (sizeof(T) == 4 ? "float" : "double") << ", "
                                << cb::to_string(cb::math_mode()) << "): worst relative error logits " << worst.logits
                                << ", hidden states " << worst.hidden);
  return worst;
}

}  // namespace

BOOST_AUTO_TEST_CASE(random_teachers_match_cpu_fp32) {
  MathModeScope scope(cb::MathMode::fp32);
  for (const char* kind : {"llama3", "qwen2", "mistral"}) compare_teachers<float>(kind, 1e-4);
  compare_teachers<double>("qwen2", 1e-10);
}

BOOST_AUTO_TEST_CASE(random_teachers_match_cpu_bf16) {
  MathModeScope scope(cb::MathMode::bf16);
  for (const char* kind : {"llama3", "qwen2", "mistral"}) compare_teachers<float>(kind, 2e-2);
}

BOOST_AUTO_TEST_CASE(same_seed_same_weights) {
  const io::HfModelConfig cfg = io::parse_hf_config(small_config("llama3"), "llama3");
  LlamaTeacher<float> tc(cfg);
  LlamaTeacher<float, distilx::cuda> tg(cfg);
  Rng r1(9), r2(9);
  tc.init_random(r1);
  tg.init_random(r2);
  std::vector<const Tensor<float>*> pc;
  tc.for_each_parameter([&](const std::string&, const Tensor<float>& t) { pc.push_back(&t); });
  std::size_t i = 0, differ = 0;
  tg.for_each_parameter([&](const std::string& name, const Tensor<float, distilx::cuda>& t) {
    const auto h = t.buffer().to_host();
    if (h.size() != static_cast<std::size_t>(pc[i]->size()) ||
        std::memcmp(h.data(), pc[i]->data(), sizeof(float) * h.size()) != 0) {
      BOOST_ERROR(name << " differs between the cpu and the cuda teacher");
      ++differ;
    }
    ++i;
  });
  BOOST_TEST(i == pc.size());
  BOOST_TEST(differ == 0u);
}

BOOST_AUTO_TEST_CASE(kept_hidden_states_only) {
  const io::HfModelConfig cfg = io::parse_hf_config(small_config("qwen2"), "qwen2");
  LlamaTeacher<float, distilx::cuda> t(cfg);
  Rng r(4);
  t.init_random(r);
  const index_t B = 2, S = 20, M = B * S, d = cfg.hidden_size;
  std::vector<std::int32_t> ids(static_cast<std::size_t>(M));
  for (auto& x : ids) x = static_cast<std::int32_t>(r.below(101));
  std::vector<Tensor<float, distilx::cuda>> all, some;
  t.forward(ids.data(), B, S, nullptr, nullptr, &all);
  t.keep_hidden_states({false, true, true});
  t.forward(ids.data(), B, S, nullptr, nullptr, &some);
  BOOST_TEST_REQUIRE(some.size() == 3u);
  BOOST_TEST(some[0].size() == 0);
  for (std::size_t i = 1; i < 3; ++i) {
    const auto a = all[i].buffer().to_host(), b = some[i].buffer().to_host();
    BOOST_TEST_REQUIRE(b.size() == static_cast<std::size_t>(M * d));
    BOOST_TEST(std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
  }
  BOOST_CHECK_THROW(t.keep_hidden_states({true}), error);
}

// ---- the Hugging Face fixtures -------------------------------------------------------------

BOOST_AUTO_TEST_CASE(hf_fixtures_on_gpu) {
  namespace fs = std::filesystem;
  // The committed fixtures; run from the repository root or set DISTILX_TEST_DATA_DIR.
  const char* env = std::getenv("DISTILX_TEST_DATA_DIR");
  const fs::path data = fs::path(env ? env : "tests/data") / "teacher";
  BOOST_TEST_REQUIRE(fs::is_directory(data), "fixtures not found at " << data << "; run from the repository root "
                                                                         "or set DISTILX_TEST_DATA_DIR");
  MathModeScope scope(cb::MathMode::fp32);
  for (const char* fixture : {"qwen2_tied", "llama3_untied", "llama_sharded_bias", "mistral_window"}) {
    auto teacher = LlamaTeacher<float, distilx::cuda>::from_pretrained((data / fixture / "hf").string());
    const io::SafetensorsFile ref((data / fixture / "reference.safetensors").string());
    std::vector<std::string> cases;
    {
      std::stringstream ss(ref.metadata().at("cases"));
      for (std::string c; std::getline(ss, c, ',');) cases.push_back(c);
    }
    double worst = 0;
    for (const std::string& c : cases) {
      const Shape ids_shape = ref.info(c + ".input_ids").shape;
      const index_t B = ids_shape[0], S = ids_shape[1], M = B * S, V = teacher.vocab_size(), d = teacher.hidden_size();
      std::vector<std::int32_t> ids, pos;
      for (float v : ref.read<float>(c + ".input_ids")) ids.push_back(static_cast<std::int32_t>(v));
      std::vector<std::uint8_t> mask;
      if (ref.contains(c + ".attention_mask"))
        for (float v : ref.read<float>(c + ".attention_mask")) mask.push_back(v != 0.0f ? 1 : 0);
      if (ref.contains(c + ".position_ids"))
        for (float v : ref.read<float>(c + ".position_ids")) pos.push_back(static_cast<std::int32_t>(v));
      Buffer<float, distilx::cuda> logits(M * V);
      std::vector<Tensor<float, distilx::cuda>> hs;
      teacher.forward(ids.data(), B, S, mask.empty() ? nullptr : mask.data(), logits.data(), &hs,
                      pos.empty() ? nullptr : pos.data());
      const double el = masked_rel(logits.to_host().data(), ref.read<float>(c + ".logits").data(), mask, M, V);
      BOOST_TEST(el < 1e-4, fixture << "/" << c << ": logits relative error " << el);
      worst = std::max(worst, el);
      BOOST_TEST_REQUIRE(static_cast<index_t>(hs.size()) == teacher.num_layers() + 1);
      for (std::size_t i = 0; i < hs.size(); ++i) {
        const std::string name = c + ".hidden_states." + std::to_string(i);
        const double eh = masked_rel(hs[i].buffer().to_host().data(), ref.read<float>(name).data(), mask, M, d);
        BOOST_TEST(eh < 1e-4, fixture << "/" << name << ": relative error " << eh);
        worst = std::max(worst, eh);
      }
    }
    BOOST_TEST_MESSAGE("HF fixture " << fixture << " on the GPU (fp32): worst relative error " << worst);
  }
}

BOOST_AUTO_TEST_SUITE_END()
