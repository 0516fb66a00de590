// Whole-student tests: parameter counts of the paper and NX-AI configs, central
// finite-difference gradients of every trainable tensor (double) through both
// block types and both mLSTM training forms, recurrent generation vs the
// full-sequence forward, NX-AI initialisation rules, and checkpoint I/O with
// its bad-input errors.
#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "distilx/distilx.hpp"
#include "distilx/testing/gradcheck.hpp"

using namespace distilx;
namespace fs = std::filesystem;

namespace {

StudentConfig tiny_config(index_t chunk = 64) {
  StudentConfig c;
  c.vocab_size = 23;
  c.embedding_dim = 16;
  c.num_blocks = 3;
  c.slstm_at = {1};
  c.mlstm_num_heads = 2;
  c.mlstm_qkv_proj_blocksize = 4;
  c.slstm_num_heads = 2;
  c.ffn_proj_factor = 1.3;
  c.mlstm_chunk_size = chunk;
  return c;
}

/// Random weights with O(1) activations on every path (R non-zero, gates away from init).
template <class T>
void randomise(Student<T>& s, std::uint64_t seed) {
  Rng rng(seed);
  s.init(seed);
  for (const auto& p : s.layout().infos()) {
    T* w = s.params() + p.offset;
    const bool norm = p.name.find("norm") != std::string::npos;
    const double sd = norm ? 0.1 : (p.shape.size() >= 2 ? 1.0 / std::sqrt(double(p.shape.back())) : 0.5);
    for (index_t i = 0; i < p.size; ++i) w[i] += static_cast<T>(sd * rng.normal());
  }
}

struct Probe {
  std::vector<double> G;                     // [B,S,V] weights of the logits
  std::vector<std::vector<double>> Gb;       // per block output weights
};

Probe make_probe(const StudentConfig& c, index_t B, index_t S, std::uint64_t seed) {
  Rng rng(seed);
  Probe p;
  p.G.resize(static_cast<std::size_t>(B * S * c.vocab_size));
  testing::fill_normal(p.G.data(), static_cast<index_t>(p.G.size()), rng);
  for (index_t i = 0; i < c.num_blocks; ++i) {
    p.Gb.emplace_back(static_cast<std::size_t>(B * S * c.embedding_dim));
    testing::fill_normal(p.Gb.back().data(), static_cast<index_t>(p.Gb.back().size()), rng, 0.3);
  }
  return p;
}

/// L = <logits, G> + sum_i <block_i, Gb_i>; fills grads when backward is true.
double loss_of(Student<double>& s, const std::vector<std::int32_t>& tok, index_t B, index_t S, const Probe& p,
               bool backward) {
  s.forward(tok.data(), B, S);
  const auto& c = s.config();
  std::vector<double> logits(static_cast<std::size_t>(B * S * c.vocab_size));
  s.logits(logits.data());
  double L = testing::dot(logits.data(), p.G.data(), static_cast<index_t>(logits.size()));
  for (index_t i = 0; i < c.num_blocks; ++i)
    L += testing::dot(s.block_output(i), p.Gb[static_cast<std::size_t>(i)].data(), B * S * c.embedding_dim);
  if (backward) {
    std::vector<const double*> db;
    for (auto& g : p.Gb) db.push_back(g.data());
    s.zero_grad();
    s.backward_from_logits(p.G.data(), &db);
  }
  return L;
}

void check_student_gradients(const StudentConfig& c, index_t B, index_t S) {
  Student<double> s(c);
  randomise(s, 11);
  Rng rng(5);
  std::vector<std::int32_t> tok(static_cast<std::size_t>(B * S));
  for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
  const Probe probe = make_probe(c, B, S, 9);
  loss_of(s, tok, B, S, probe, true);
  std::vector<double> grads(s.grads(), s.grads() + s.flat_size());
  auto f = [&] { return loss_of(s, tok, B, S, probe, false); };
  double worst = 0;
  for (const auto& p : s.layout().infos()) {
    // zero_floor 1e-4: tensors whose gradient vanishes identically (fgate at S = 1) compare
    // absolutely; every other tensor here has a gradient norm of order 0.1-100.
    auto r = testing::check_gradient(f, s.params() + p.offset, grads.data() + p.offset, p.size, 12, 1e-4, 7, 1e-4);
    BOOST_TEST_INFO("B=" << B << " S=" << S << " chunk=" << c.mlstm_chunk_size << " " << p.name << ": rel error "
                         << r.rel_error);
    BOOST_CHECK_LE(r.rel_error, 1e-6);
    worst = std::max(worst, r.rel_error);
  }
  BOOST_TEST_MESSAGE("student gradient check B=" << B << " S=" << S << " chunk=" << c.mlstm_chunk_size
                                                 << ": worst per-tensor relative error " << worst);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(student)

BOOST_AUTO_TEST_CASE(parameter_counts_match_nx_ai_and_paper) {
  const auto paper = Student<float>::count(StudentConfig::paper());
  BOOST_CHECK_EQUAL(paper.trainable, 84175968);
  BOOST_CHECK_EQUAL(paper.total(), 550923360);
  StudentConfig ill;  // spec-xlstm.md §7 illustrative config
  ill.vocab_size = 151936;
  ill.embedding_dim = 1536;
  ill.num_blocks = 6;
  ill.slstm_at = {1, 3, 5};
  const auto a = Student<float>::count(ill);
  BOOST_CHECK_EQUAL(a.trainable, 85392408);
  BOOST_CHECK_EQUAL(a.total(), 552139800);
  ill.tie_weights = true;
  BOOST_CHECK_EQUAL(Student<float>::count(ill).total(), 318766104);
  // Per-block totals of the paper config (spec §7): sLSTM 13,289,472, mLSTM 14,768,672.
  StudentConfig one = StudentConfig::paper();
  one.num_blocks = 1;
  one.slstm_at = {0};
  one.add_post_blocks_norm = false;
  BOOST_CHECK_EQUAL(Student<float>::count(one).trainable, 13289472);
  one.slstm_at = {};
  BOOST_CHECK_EQUAL(Student<float>::count(one).trainable, 14768672);
}

BOOST_AUTO_TEST_CASE(gradients_parallel_form) {
  check_student_gradients(tiny_config(64), 2, 5);
  check_student_gradients(tiny_config(64), 1, 1);
}

BOOST_AUTO_TEST_CASE(gradients_chunkwise_form) {
  check_student_gradients(tiny_config(4), 2, 9);  // S not a multiple of the chunk
}

BOOST_AUTO_TEST_CASE(gradients_all_slstm_and_all_mlstm) {
  StudentConfig c = tiny_config(64);
  c.slstm_at = {0, 1, 2};
  check_student_gradients(c, 2, 4);
  c.slstm_at = {};
  c.tie_weights = true;
  c.add_post_blocks_norm = false;
  check_student_gradients(c, 1, 6);
}

/// One block on its own: finite differences of the block input and every block parameter.
template <class BlockT>
void check_block_gradients(const StudentConfig& c, index_t B, index_t S, const char* what) {
  ParamLayout layout;
  BlockT blk(c, 1, layout, "b.");
  std::vector<double> params(static_cast<std::size_t>(layout.total())), grads(params.size(), 0.0);
  Rng rng(31);
  blk.init(params.data(), rng);
  for (const auto& p : layout.infos())  // move off the init so every path carries signal
    for (index_t i = 0; i < p.size; ++i) params[static_cast<std::size_t>(p.offset + i)] += 0.3 * rng.normal();
  const index_t n = B * S * c.embedding_dim;
  std::vector<double> x(static_cast<std::size_t>(n)), y(x.size()), G(x.size()), dx(x.size());
  testing::fill_normal(x.data(), n, rng);
  testing::fill_normal(G.data(), n, rng);
  auto f = [&] {
    blk.forward(y.data(), x.data(), params.data(), B, S);
    return testing::dot(y.data(), G.data(), n);
  };
  f();
  blk.backward(dx.data(), grads.data(), G.data(), x.data(), params.data(), B, S);
  auto r = testing::check_gradient(f, x.data(), dx.data(), n, 24);
  BOOST_TEST_INFO(what << " dx: " << r.rel_error);
  BOOST_CHECK_LE(r.rel_error, 1e-6);
  double worst = r.rel_error;
  for (const auto& p : layout.infos()) {
    auto rp = testing::check_gradient(f, params.data() + p.offset, grads.data() + p.offset, p.size, 8, 1e-4, 7, 1e-4);
    BOOST_TEST_INFO(what << " " << p.name << ": " << rp.rel_error);
    BOOST_CHECK_LE(rp.rel_error, 1e-6);
    worst = std::max(worst, rp.rel_error);
  }
  BOOST_TEST_MESSAGE(what << " block gradient check: worst relative error " << worst);
}

BOOST_AUTO_TEST_CASE(block_gradients) {
  StudentConfig c = tiny_config(64);
  check_block_gradients<MLSTMBlock<double>>(c, 2, 5, "mLSTM parallel");
  c.mlstm_chunk_size = 3;
  check_block_gradients<MLSTMBlock<double>>(c, 1, 7, "mLSTM chunkwise");
  check_block_gradients<SLSTMBlock<double>>(c, 2, 5, "sLSTM");
  c.slstm_conv1d_kernel_size = 0;  // NX-AI's "no conv" variant
  check_block_gradients<SLSTMBlock<double>>(c, 1, 4, "sLSTM without conv");
}

BOOST_AUTO_TEST_CASE(generation_matches_full_forward) {
  for (index_t chunk : {64, 3}) {
    StudentConfig c = tiny_config(chunk);
    Student<double> s(c);
    randomise(s, 21);
    const index_t B = 2, S = 8;
    Rng rng(2);
    std::vector<std::int32_t> tok(B * S);
    for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(c.vocab_size));
    s.forward(tok.data(), B, S);
    std::vector<double> full(B * S * c.vocab_size);
    s.logits(full.data());
    auto st = s.make_state(B);
    std::vector<double> step_logits(B * c.vocab_size), ref(B * c.vocab_size), got(B * c.vocab_size);
    double worst = 0;
    for (index_t t = 0; t < S; ++t) {
      std::vector<std::int32_t> col(B);
      for (index_t b = 0; b < B; ++b) col[b] = tok[b * S + t];
      s.step(col.data(), st, step_logits.data());
      for (index_t b = 0; b < B; ++b)
        for (index_t v = 0; v < c.vocab_size; ++v) ref[b * c.vocab_size + v] = full[(b * S + t) * c.vocab_size + v];
      worst = std::max(worst, relative_error(step_logits.data(), ref.data(), B * c.vocab_size));
    }
    BOOST_TEST_MESSAGE("generation vs full forward (chunk " << chunk << "): worst relative error " << worst);
    BOOST_CHECK_LE(worst, 1e-5);  // the recurrent mLSTM form places eps differently (spec §4.4)
  }
}

BOOST_AUTO_TEST_CASE(nx_ai_initialisation) {
  StudentConfig c = StudentConfig::paper(64, 192);
  c.mlstm_qkv_proj_blocksize = 8;
  Student<double> s(c);
  s.init(3);
  // mLSTM block 1: fgate bias linspace(3, 6, NH), igate weights zero, skip ones, norms zero.
  const double* fb = s.param("xlstm_block_stack.blocks.1.xlstm.mlstm_cell.fgate.bias");
  BOOST_CHECK_CLOSE(fb[0], 3.0, 1e-12);
  BOOST_CHECK_CLOSE(fb[c.mlstm_num_heads - 1], 6.0, 1e-12);
  BOOST_CHECK_EQUAL(s.param("xlstm_block_stack.blocks.1.xlstm.mlstm_cell.igate.weight")[5], 0.0);
  BOOST_CHECK_EQUAL(s.param("xlstm_block_stack.blocks.1.xlstm.learnable_skip")[7], 1.0);
  BOOST_CHECK_EQUAL(s.param("xlstm_block_stack.blocks.3.xlstm_norm.weight")[0], 0.0);
  // sLSTM block 0 (r = 0): forget bias of unit 0 is +5, of the last unit -7; R is zero.
  const index_t DH = c.embedding_dim / c.slstm_num_heads;
  const double* b = s.param("xlstm_block_stack.blocks.0.xlstm.slstm_cell._bias_");
  BOOST_CHECK_CLOSE(b[1 * DH + 0], 5.0, 1e-12);       // [h=0][g=f][j=0]
  BOOST_CHECK_CLOSE(b[1 * DH + DH - 1], -7.0, 1e-12);  // [h=0][g=f][j=DH-1]
  BOOST_CHECK_EQUAL(b[0], 0.0);                        // input-gate bias
  BOOST_CHECK_EQUAL(s.param("xlstm_block_stack.blocks.0.xlstm.slstm_cell._recurrent_kernel_")[3], 0.0);
  // Standard deviations: small_init(d) on proj_up, wang_init(d, 6) on proj_down (sampled, 5% tolerance).
  auto sd = [&](const std::string& n) {
    const auto& p = s.info(n);
    const double* w = s.params() + p.offset;
    double ss = 0;
    for (index_t i = 0; i < p.size; ++i) ss += w[i] * w[i];
    return std::sqrt(ss / p.size);
  };
  BOOST_CHECK_CLOSE(sd("xlstm_block_stack.blocks.1.xlstm.proj_up.weight"), std::sqrt(2.0 / (5 * 192)), 5.0);
  BOOST_CHECK_CLOSE(sd("xlstm_block_stack.blocks.1.xlstm.proj_down.weight"), 2.0 / (6 * std::sqrt(192.0)), 5.0);
}

BOOST_AUTO_TEST_CASE(bad_config_is_refused) {
  StudentConfig c = tiny_config();
  c.slstm_at = {7};
  BOOST_CHECK_EXCEPTION(Student<float>{c}, config_error,
                        [](const config_error& e) { return std::string(e.what()).find("slstm_at entry 7") != std::string::npos; });
  c = tiny_config();
  c.slstm_num_heads = 3;
  BOOST_CHECK_THROW(Student<float>{c}, config_error);
  nlohmann::json j = tiny_config();
  j["num_blcks"] = 3;
  BOOST_CHECK_EXCEPTION(j.get<StudentConfig>(), config_error,
                        [](const config_error& e) { return std::string(e.what()).find("num_blcks") != std::string::npos; });
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(student_io)

namespace {
fs::path tmp_dir() {
  fs::path d = fs::temp_directory_path() / ("distilx_student_io_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}
std::vector<float> logits_of(Student<float>& s, const std::vector<std::int32_t>& tok, index_t B, index_t S) {
  s.forward(tok.data(), B, S);
  std::vector<float> z(B * S * s.config().vocab_size);
  s.logits(z.data());
  return z;
}
bool msg_has(const std::exception& e, std::initializer_list<const char*> parts) {
  const std::string m = e.what();
  for (const char* p : parts)
    if (m.find(p) == std::string::npos) return false;
  return true;
}
}  // namespace

BOOST_AUTO_TEST_CASE(save_load_round_trip_both_layouts) {
  const fs::path dir = tmp_dir();
  StudentConfig c = tiny_config();
  Student<float> a(c);
  randomise(a, 4);
  std::vector<std::int32_t> tok{1, 5, 7, 2, 9, 3};
  const auto za = logits_of(a, tok, 2, 3);
  for (auto layout : {io::SLSTMLayout::cuda, io::SLSTMLayout::vanilla}) {
    const std::string path = (dir / "s.safetensors").string();
    io::save_student(a, path, layout);
    Student<float> b(c);
    io::load_student(b, path);
    const auto zb = logits_of(b, tok, 2, 3);
    BOOST_CHECK_EQUAL_COLLECTIONS(za.begin(), za.end(), zb.begin(), zb.end());
    // The R tensor is stored in the requested layout.
    io::SafetensorsFile f(path);
    const auto& r = f.info("xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_");
    BOOST_CHECK_EQUAL(r.shape[1], layout == io::SLSTMLayout::cuda ? 8 : 32);
    BOOST_CHECK(f.contains("lm_head.weight"));
  }
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(bad_checkpoints_name_the_problem) {
  const fs::path dir = tmp_dir();
  StudentConfig c = tiny_config();
  Student<float> a(c);
  randomise(a, 4);
  const std::string good = (dir / "good.safetensors").string();
  io::save_student(a, good);
  io::SafetensorsFile src(good);
  auto rewrite = [&](const std::string& path, const std::string& drop, const std::string& extra,
                     const std::string& reshape) {
    io::SafetensorsWriter w;
    for (const auto& n : src.names()) {
      if (n == drop) continue;
      auto v = src.read<float>(n);
      Shape sh = src.info(n).shape;
      if (n == reshape) sh = {sh[0] * sh[1]};
      w.add(n, sh, v.data());
    }
    if (!extra.empty()) {
      float z = 0;
      w.add(extra, {1}, &z);
    }
    w.write(path);
  };
  const std::string key = "xlstm_block_stack.blocks.0.xlstm.proj_up.weight";
  Student<float> b(c);
  rewrite((dir / "missing.safetensors").string(), key, "", "");
  BOOST_CHECK_EXCEPTION(io::load_student(b, (dir / "missing.safetensors").string()), io_error,
                        [&](const io_error& e) { return msg_has(e, {"missing", key.c_str()}); });
  rewrite((dir / "extra.safetensors").string(), "", "xlstm_block_stack.blocks.9.bogus", "");
  BOOST_CHECK_EXCEPTION(io::load_student(b, (dir / "extra.safetensors").string()), io_error,
                        [&](const io_error& e) { return msg_has(e, {"unexpected", "blocks.9.bogus"}); });
  rewrite((dir / "shape.safetensors").string(), "", "", key);
  BOOST_CHECK_EXCEPTION(io::load_student(b, (dir / "shape.safetensors").string()), io_error,
                        [&](const io_error& e) { return msg_has(e, {key.c_str(), "[2048]", "[128, 16]"}); });
  // Truncated file: cut the data section short.
  const std::string trunc = (dir / "trunc.safetensors").string();
  fs::copy_file(good, trunc);
  fs::resize_file(trunc, fs::file_size(good) - 100);
  BOOST_CHECK_THROW(io::load_student(b, trunc), io_error);
  // A checkpoint from a different config is refused.
  StudentConfig other = c;
  other.embedding_dim = 32;
  Student<float> o(other);
  BOOST_CHECK_THROW(io::load_student(o, good), io_error);
  fs::remove_all(dir);
}

BOOST_AUTO_TEST_SUITE_END()
