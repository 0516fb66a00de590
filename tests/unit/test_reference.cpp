// Parity with the independent PyTorch reference (tests/reference/xlstm_ref.py,
// run live by the ctest fixture `reference_fixtures`): logits, every block
// output and the gradient of every trainable tensor for the scalar loss
// L = <logits, g_logits> + sum_i <block_i, g_block_i>, in double (1e-10) and
// float (1e-4), norm-based relative error per tensor.
#include <boost/test/unit_test.hpp>

#include <cstdlib>
#include <filesystem>

#include "distilx/distilx.hpp"

using namespace distilx;
namespace fs = std::filesystem;

namespace {

fs::path ref_dir() {
  const char* d = std::getenv("DISTILX_REF_DIR");
  return d ? fs::path(d) : fs::path();
}

StudentConfig config_from_fixture(const io::SafetensorsFile& f, index_t& B, index_t& S) {
  const auto j = nlohmann::json::parse(f.metadata().at("config"));
  StudentConfig c;
  c.vocab_size = j.at("vocab_size");
  c.embedding_dim = j.at("embedding_dim");
  c.num_blocks = j.at("num_blocks");
  c.slstm_at = j.at("slstm_at").get<std::vector<index_t>>();
  c.mlstm_num_heads = j.at("mlstm_num_heads");
  c.mlstm_qkv_proj_blocksize = j.at("mlstm_qkv_proj_blocksize");
  c.mlstm_proj_factor = j.at("mlstm_proj_factor");
  c.mlstm_conv1d_kernel_size = j.at("mlstm_conv1d_kernel_size");
  c.slstm_num_heads = j.at("slstm_num_heads");
  c.slstm_conv1d_kernel_size = j.at("slstm_conv1d_kernel_size");
  c.ffn_proj_factor = j.at("ffn_proj_factor");
  c.tie_weights = j.at("tie_weights");
  B = j.at("batch");
  S = j.at("seq_len");
  return c;
}

template <class T>
void check_fixture(const fs::path& file, double tol, index_t chunk) {
  io::SafetensorsFile f(file.string());
  index_t B = 0, S = 0;
  StudentConfig c = config_from_fixture(f, B, S);
  c.mlstm_chunk_size = chunk;
  Student<T> s(c);
  io::StudentLoadOptions opt;
  opt.ignore_prefixes = {"input.", "out.", "loss.", "grad."};
  io::load_student(s, file.string(), opt);
  const auto tokens = f.read<std::int64_t>("input.tokens");
  s.forward(tokens.data(), B, S);
  const index_t M = B * S, V = c.vocab_size, d = c.embedding_dim;
  std::vector<T> logits(M * V);
  s.logits(logits.data());
  const auto ref_logits = f.read<double>("out.logits");
  const std::string tag = file.filename().string() + (sizeof(T) == 8 ? " double" : " float") +
                          " chunk " + std::to_string(chunk);
  double worst = relative_error(logits.data(), ref_logits.data(), M * V);
  BOOST_TEST_INFO(tag << " logits");
  BOOST_CHECK_LE(worst, tol);
  for (index_t i = 0; i < c.num_blocks; ++i) {
    const auto ref = f.read<double>("out.block." + std::to_string(i));
    const double e = relative_error(s.block_output(i), ref.data(), M * d);
    BOOST_TEST_INFO(tag << " block " << i);
    BOOST_CHECK_LE(e, tol);
    worst = std::max(worst, e);
  }
  // Backward with the fixture's loss weights.
  const auto g_logits = f.read<T>("loss.g_logits");
  std::vector<std::vector<T>> gb;
  std::vector<const T*> gbp;
  for (index_t i = 0; i < c.num_blocks; ++i) gb.push_back(f.read<T>("loss.g_block." + std::to_string(i)));
  for (auto& g : gb) gbp.push_back(g.data());
  s.zero_grad();
  s.backward_from_logits(g_logits.data(), &gbp);
  const bool vanilla = f.metadata().count("slstm_layout") && f.metadata().at("slstm_layout") == "vanilla";
  const index_t NH = c.slstm_num_heads, DH = d / NH;
  index_t checked = 0;
  for (const auto& p : s.layout().infos()) {
    const auto ref = f.read<double>("grad." + p.name);
    std::vector<T> mine(s.grads() + p.offset, s.grads() + p.offset + p.size);
    if (vanilla && p.name.find("_recurrent_kernel_") != std::string::npos)
      slstm_r_to_vanilla(mine.data(), s.grads() + p.offset, NH, DH);
    if (vanilla && p.name.find("slstm_cell._bias_") != std::string::npos)
      slstm_bias_to_vanilla(mine.data(), s.grads() + p.offset, NH, DH);
    BOOST_REQUIRE_EQUAL(static_cast<index_t>(ref.size()), p.size);
    const double e = relative_error(mine.data(), ref.data(), p.size);
    BOOST_TEST_INFO(tag << " grad " << p.name);
    BOOST_CHECK_LE(e, tol);
    worst = std::max(worst, e);
    ++checked;
  }
  BOOST_CHECK_EQUAL(checked, static_cast<index_t>(s.layout().infos().size()));
  BOOST_TEST_MESSAGE("PyTorch parity " << tag << ": " << checked << " gradients + logits + " << c.num_blocks
                                       << " block outputs, worst relative error " << worst);
}

std::vector<fs::path> fixtures() {
  std::vector<fs::path> out;
  const fs::path d = ref_dir();
  if (!d.empty() && fs::exists(d))
    for (const auto& e : fs::directory_iterator(d))
      if (e.path().extension() == ".safetensors" && e.path().filename().string().rfind("xlstm_", 0) == 0)
        out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(reference_parity)

BOOST_AUTO_TEST_CASE(student_matches_pytorch_reference) {
  const auto files = fixtures();
  BOOST_REQUIRE_MESSAGE(files.size() >= 2, "expected PyTorch fixtures in $DISTILX_REF_DIR ("
                                               << ref_dir() << "); run ctest (fixture reference_fixtures) or "
                                               << "/usr/bin/python3 tests/reference/gen_fixtures.py --out DIR");
  for (const auto& f : files) {
    check_fixture<double>(f, 1e-10, 64);  // parallel mLSTM form
    check_fixture<double>(f, 1e-9, 4);    // chunkwise form: same function, other rounding
    check_fixture<float>(f, 1e-4, 64);
  }
}

BOOST_AUTO_TEST_SUITE_END()
