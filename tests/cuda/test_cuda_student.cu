// The whole student on the GPU against the CPU backend: the paper's block shapes
// (d 1536, 16 heads, qkv block 32, FFN 1.7, sLSTM at 0, 2, 4) with a small
// vocabulary and short sequences, parallel and chunkwise mLSTM forms. Hidden
// states, every block output and the gradient of every trainable tensor must
// agree to 1e-4 relative (float32, TF32 off); generation steps too.
#include <boost/test/unit_test.hpp>

#include <vector>

#include "distilx/cuda.cuh"
#include "cuda_test_util.cuh"
#include "distilx/testing/gradcheck.hpp"

using namespace distilx;

namespace {

template <class S>
std::vector<float> to_host(const float* p, index_t n) {
  std::vector<float> h(static_cast<std::size_t>(n));
  if constexpr (std::is_same_v<typename S::backend_type, distilx::cuda>)
    DISTILX_CUDA_CHECK(cudaMemcpy(h.data(), p, sizeof(float) * n, cudaMemcpyDeviceToHost));
  else
    std::copy(p, p + n, h.begin());
  return h;
}

void compare_student(StudentConfig c, index_t B, index_t S) {
  Student<float> cpu_s(c);
  Student<float, distilx::cuda> gpu_s(c);
  Rng rng(9);
  testing::make_twin_students(cpu_s, gpu_s, rng);
  std::vector<std::int32_t> tok(static_cast<std::size_t>(B * S));
  for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
  cpu_s.forward(tok.data(), B, S);
  gpu_s.forward(tok.data(), B, S);
  const index_t M = B * S, d = c.embedding_dim;
  double worst = relative_error(to_host<Student<float, distilx::cuda>>(gpu_s.hidden(), M * d).data(), cpu_s.hidden(), M * d);
  BOOST_CHECK_LE(worst, 1e-4);
  for (index_t i = 0; i < c.num_blocks; ++i) {
    const double e = relative_error(to_host<Student<float, distilx::cuda>>(gpu_s.block_output(i), M * d).data(),
                                    cpu_s.block_output(i), M * d);
    BOOST_TEST_INFO("block " << i);
    BOOST_CHECK_LE(e, 1e-4);
    worst = std::max(worst, e);
  }
  // Backward from random gradients of the final hidden state and every block output.
  testing::backward_twins(cpu_s, gpu_s, M, rng);
  const std::vector<float> gc = cpu_s.grads_to_host(), gg = gpu_s.grads_to_host();
  index_t n = 0;
  for (const auto& pi : cpu_s.layout().infos()) {
    const double e = relative_error(gg.data() + pi.offset, gc.data() + pi.offset, pi.size);
    BOOST_TEST_INFO(pi.name << " gradient");
    BOOST_CHECK_LE(e, 1e-4);
    worst = std::max(worst, e);
    ++n;
  }
  BOOST_TEST_MESSAGE("GPU vs CPU student, B " << B << " S " << S << " chunk " << c.mlstm_chunk_size << ": " << n
                                              << " gradients + outputs, worst relative error " << worst);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_student)

BOOST_AUTO_TEST_CASE(paper_blocks_match_cpu) {
  StudentConfig c = StudentConfig::paper(512, 1536);
  compare_student(c, 2, 48);   // parallel mLSTM form (S <= chunk)
  c.mlstm_chunk_size = 32;
  compare_student(c, 1, 75);   // chunkwise, partial last chunk
}

BOOST_AUTO_TEST_CASE(generation_matches_cpu) {
  StudentConfig c = StudentConfig::paper(256, 256);
  c.mlstm_num_heads = c.slstm_num_heads = 4;
  c.mlstm_qkv_proj_blocksize = 16;
  Student<float> cpu_s(c);
  Student<float, distilx::cuda> gpu_s(c);
  cpu_s.init(3);
  gpu_s.set_params(cpu_s.params_to_host().data());
  gpu_s.set_embedding(cpu_s.embedding_to_host().data());
  gpu_s.set_head(cpu_s.head_to_host().data());
  const index_t B = 3, V = c.vocab_size;
  auto cs = cpu_s.make_state(B);
  auto gs = gpu_s.make_state(B);
  std::vector<float> lc(static_cast<std::size_t>(B * V));
  Buffer<float, distilx::cuda> lg(B * V);
  double worst = 0;
  for (int t = 0; t < 12; ++t) {
    std::vector<std::int32_t> tok{t % 7, (3 * t + 1) % 11, (5 * t + 2) % 13};
    cpu_s.step(tok.data(), cs, lc.data());
    gpu_s.step(tok.data(), gs, lg.data());
    worst = std::max(worst, relative_error(lg.to_host().data(), lc.data(), B * V));
  }
  BOOST_TEST_MESSAGE("GPU vs CPU generation: worst relative error " << worst);
  BOOST_CHECK_LE(worst, 1e-4);
}

BOOST_AUTO_TEST_SUITE_END()
